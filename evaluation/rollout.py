"""The generation engine: chat, the evaluator, PPO and data builds all generate replies with it.

`play` plays batches of dialogues for R rounds (evaluation, PPO rollouts),
`play_turn_groups` branches them into sibling replies (group-relative PPO),
`reply` answers a batch of conversations once (simulated users, policy replies
for a data build) and `open_chat` keeps one conversation going turn by turn
(`dialogrl chat`).

Each round appends every dialogue's next user turn, generates all replies in
one batched `generate` call, and appends the replies, so the history is always
the model's own. The key/value cache is kept between rounds: a round feeds the
model only the tokens that are new since the last one (the end of the previous
reply, the template's turn markers, the user turn, the generation prompt), so
the cost grows about linearly with the number of rounds instead of
re-encoding the whole history each time.

Batch layout. Rows are lists of positions, padding has attention mask 0 and
may sit anywhere in a row: position ids come from the cumulative attention
mask (as in `generate`), so a row's positions are the same as if it had no
padding. Each round, the new segments (turn markers, user turn, generation
prompt) are run in groups of similar length before `generate` (`_prefill`);
a row's gap to the widest group is padding just before its last token. Tokens a
row produces after its end-of-turn token, while other rows are still generating,
are masked the same way. Before the next round the masked positions are dropped
from the rows and the cache (`_compact`), so they never pile up over the rounds.

Memory. A round holds one cache buffer per layer, reserved by `_prefill` for
the round's longest row plus `max_new_tokens` of decoding: the old cache is
copied into it layer by layer and dropped as it goes, length groups of
consecutive rows write into it directly, rows that finish early are moved
behind the others inside it (nothing is copied out), and rows leaving the
batch are moved down inside it. So the cache costs about its own size, not
the five or so copies (old cache, group copies, reserved merge, reallocations
as rows left, set-aside views pinning old buffers) it took before.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Protocol

from dialogrl.data.chat_tokens import ChatTokenizer
from dialogrl.evaluation.sampling import SamplingConfig


class UserSource(Protocol):
    """Where user turns come from: `next_user_turn(history)` gives the next one, or None to end."""

    def next_user_turn(self, messages: list[dict[str, str]], round_number: int) -> str | None: ...


@dataclass
class DialogueSpec:
    """A dialogue to play: its system prompt and who speaks as the user."""

    dialogue_id: str
    system_prompt: str | None
    user: UserSource
    # Round number -> text put before that round's user turn (a rule the user states, a reminder).
    user_prefix: dict[int, str] = field(default_factory=dict)
    # Earlier user/assistant turns to continue from (a forked dialogue); rounds count on from them.
    history: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Trajectory:
    """A played dialogue. Token fields are filled when asked for, all of the same length T.

    token_ids:      [T] the whole dialogue as the model saw it (padding removed)
    assistant_mask: [T] 1 on tokens the policy generated (each reply and its end token)
    turn_index:     [T] 0 for the system prompt (to the end of its content), r for the tokens of round r (user
                    turn r, reply r and its end token), as `ChatTokenizer` numbers them
    logprobs:       [T] log-probability of each generated token under the sampling distribution, 0.0 elsewhere
    """

    dialogue_id: str
    messages: list[dict[str, str]]
    ended_properly: list[bool]  # per reply: it stopped at an end-of-turn token, not at the length limit
    generated_tokens: list[int]  # per reply: how many tokens the model generated
    token_ids: list[int] = field(default_factory=list)
    assistant_mask: list[int] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


@dataclass
class TurnGroup:
    """G sibling replies sampled from one identical history at one round (`play_turn_groups`).

    Each sibling is a Trajectory of the dialogue up to and including its own reply; with tokens,
    its `assistant_mask` covers that reply alone (the earlier replies were trained in their own
    round's group). The dialogue went on from `replies[continued]`.
    """

    dialogue_index: int
    round_number: int
    replies: list[Trajectory]
    continued: int


@dataclass
class _Positions:
    """Every position of a row's (padded) sequence: one list per field, all of one length. The only place
    that adds, pads, drops or reads positions, so no field can fall out of step with the others."""

    tokens: list[int] = field(default_factory=list)
    attention: list[int] = field(default_factory=list)  # 0 on padding and on tokens after a reply's end
    generated: list[int] = field(default_factory=list)  # 1 on tokens the policy generated and kept
    turn: list[int] = field(default_factory=list)  # Trajectory.turn_index
    logprob: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, tokens: list[int], *, turn: list[int], kept: int | None = None,
               logprob: list[float] | None = None) -> None:
        """Prompt tokens (`logprob` None) or generated ones, of which the first `kept` are the reply's and the
        rest, past its end token, are masked."""
        n = len(tokens)
        kept = n if kept is None else kept
        masked = n - kept
        self.tokens += tokens
        self.attention += [1] * kept + [0] * masked
        self.generated += [int(logprob is not None)] * kept + [0] * masked
        self.turn += turn[:kept] + [0] * masked
        self.logprob += (logprob[:kept] if logprob is not None else [0.0] * kept) + [0.0] * masked

    def insert_padding(self, position: int, count: int, pad_id: int) -> None:
        for name, filler in self._fillers(pad_id):
            getattr(self, name)[position:position] = [filler] * count

    def select(self, positions: list[int], pad: int, pad_id: int) -> None:
        """Keep only `positions`, behind `pad` positions of padding."""
        for name, filler in self._fillers(pad_id):
            values = getattr(self, name)
            setattr(self, name, [filler] * pad + [values[i] for i in positions])

    def unmasked(self) -> _Positions:
        keep = [i for i, a in enumerate(self.attention) if a]
        return _Positions(*([getattr(self, f.name)[i] for i in keep] for f in fields(self)))

    def _fillers(self, pad_id: int) -> tuple[tuple[str, Any], ...]:
        """Each field with the value a padding position holds in it."""
        return ("tokens", pad_id), ("attention", 0), ("generated", 0), ("turn", 0), ("logprob", 0.0)


@dataclass
class _Batch:
    """The dialogues one batch plays together, between rounds: their rows and the cache that holds them."""

    rows: list[_Row]
    siblings: int = 1
    choose: Callable[[], int] | None = None
    cache: Any = None
    in_cache: list[_Row] = field(default_factory=list)  # rows held by `cache`, in its batch order
    groups: list[TurnGroup] = field(default_factory=list)


@dataclass
class _Row:
    """One dialogue's state inside a batch."""

    spec: DialogueSpec
    messages: list[dict[str, str]]
    positions: _Positions = field(default_factory=_Positions)
    ended_properly: list[bool] = field(default_factory=list)
    generated_counts: list[int] = field(default_factory=list)
    active: bool = True
    reply: list[int] = field(default_factory=list)  # the reply being generated this round
    reply_ended: bool = False
    turn_now: int = 0


class RolloutEngine:
    """Plays batches of dialogues for R rounds with one model; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        sampling: SamplingConfig,
        *,
        batch_size: int = 16,
        reuse_cache: bool = True,
        chunk_tokens: int = 16,
        generation_context: Callable[[Any, Any, Any, list[int]], Any] | None = None,
    ):
        """`generation_context(model, input_ids, attention_mask, system_lengths)` may return a context
        manager that wraps each generate call (an intervention such as split-softmax)."""
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.batch_size = batch_size
        self.reuse_cache = reuse_cache
        self.chunk_tokens = chunk_tokens
        self.generation_context = generation_context
        self.generate_kwargs = sampling.generate_kwargs(tokenizer, model)
        self.stop_ids = set(self.generate_kwargs["eos_token_id"])
        # Replies end where generation stops, so the masks of rollouts end at the same tokens.
        self.chat = ChatTokenizer(tokenizer, stop_tokens=tokenizer.convert_ids_to_tokens(
            self.generate_kwargs["eos_token_id"]))
        self.pad_id = self.generate_kwargs["pad_token_id"]
        self.tokens_generated = 0
        self.rows_set_aside = 0  # rows that left a round early (finished before the others)
        self.positions_dropped = 0  # masked cache positions removed between rounds, summed over rows
        # What one more forward pass is taken to cost, in padded tokens (an estimate, not tuned);
        # `_length_groups` weighs it against the padding a group saves.
        self.group_overhead_tokens = 32
        self.prefill_groups = 0  # forward passes run by _prefill, over all rounds
        # Rows holding exactly the same tokens (the k samples of one history, the siblings of a turn group once
        # they are copies of the continued one) get their keys and values from one row's pass.
        self.share_identical_rows = True
        self.rows_prefilled_as_copies = 0
        self._with_tokens = False

    def play(self, dialogues: Sequence[DialogueSpec], rounds: int, *, with_tokens: bool = False) -> list[Trajectory]:
        import torch

        results: list[Trajectory] = []
        for start in range(0, len(dialogues), self.batch_size):
            # One seed per batch: a dialogue's sampled replies do not depend on what ran before it.
            torch.manual_seed(self.sampling.seed + start)
            self._with_tokens = with_tokens
            results += self._play_batch(dialogues[start: start + self.batch_size], rounds, with_tokens)[0]
        return results

    def play_turn_groups(self, dialogues: Sequence[DialogueSpec], rounds: int, siblings: int
                         ) -> tuple[list[Trajectory], list[TurnGroup]]:
        """Play each dialogue branching `siblings` ways at every round; tokens and log-probs always kept.

        Every round, each dialogue's history is held by `siblings` rows of the batch
        (`batch_size` counts rows, so a batch plays batch_size // siblings dialogues):
        they get the same user turn, sample their replies independently, and the
        dialogue goes on with one of them picked at random (seeded): its row state and
        KV cache are copied over the other siblings' rows, so the shared history is
        never re-encoded. The round's new segment (turn markers, the user turn) is run
        once for all siblings, their rows being identical then. Returns the dialogues as
        played (the continued replies) and every round's group.
        """
        import random

        import torch

        if siblings < 1 or self.batch_size % siblings:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of siblings ({siblings})")
        per_batch = self.batch_size // siblings
        played, groups = [], []
        for start in range(0, len(dialogues), per_batch):
            torch.manual_seed(self.sampling.seed + start)
            self._with_tokens = True
            choices = random.Random(self.sampling.seed + start)
            batch, batch_groups = self._play_batch(dialogues[start: start + per_batch], rounds, True,
                                                   siblings=siblings, choose=partial(choices.randrange, siblings))
            played += batch
            groups += [TurnGroup(start + g.dialogue_index, g.round_number, g.replies, g.continued) for g in batch_groups]
        return played, groups

    def reply(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
        """One reply to each conversation, whose last message is the user turn to answer.

        Sampling is seeded as `play` seeds it, on a forked RNG: the same conversations get the same replies,
        and the caller's own sampling stream (a policy played alongside a simulated user) is left as it was.
        """
        import torch

        specs = []
        for i, conversation in enumerate(conversations):
            if not conversation or conversation[-1]["role"] != "user":
                last = conversation[-1]["role"] if conversation else "nothing"
                raise ValueError(f"conversation {i}: a reply needs a user turn last, got {last}")
            system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
            history = [dict(m) for m in conversation[(system is not None):-1]]
            specs.append(DialogueSpec(str(i), system, _ScriptedUser([conversation[-1]["content"]]), history=history))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            played = self.play(specs, rounds=1)
        return [trajectory.messages[-1]["content"] for trajectory in played]

    def open_chat(self, system_prompt: str | None = None) -> ChatTurns:
        """A conversation played one round at a time, whose cache is kept between turns."""
        return ChatTurns(self, system_prompt)

    # ------------------------------------------------------------------ one batch

    def _play_batch(self, specs: Sequence[DialogueSpec], rounds: int, with_tokens: bool, *, siblings: int = 1,
                    choose: Callable[[], int] | None = None) -> tuple[list[Trajectory], list[TurnGroup]]:
        """Play a batch; with `siblings` > 1, each spec has that many consecutive rows (see `play_turn_groups`)."""
        batch = self._open_batch(specs, siblings, choose)
        for round_number in range(1, rounds + 1):
            if not self._play_round(batch, round_number):
                break
        return [self._trajectory(row, with_tokens) for row in batch.rows[::siblings]], batch.groups

    def _open_batch(self, specs: Sequence[DialogueSpec], siblings: int = 1,
                    choose: Callable[[], int] | None = None) -> _Batch:
        rows = [_Row(spec, ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else [])
                     + list(spec.history)) for spec in specs for _ in range(siblings)]
        return _Batch(rows, siblings, choose)

    def _play_round(self, batch: _Batch, round_number: int) -> bool:
        """One round of every live dialogue of `batch`: the user turns, then the replies. False when none is live."""
        rows, siblings = batch.rows, batch.siblings
        for first in range(0, len(rows), siblings):
            row = rows[first]
            if row.active:
                # Asked once per dialogue: a simulated user must not answer the siblings differently.
                text = row.spec.user.next_user_turn(row.messages, round_number)
                prefix = row.spec.user_prefix.get(round_number)
                for sibling in rows[first: first + siblings]:
                    if text is None:
                        sibling.active = False
                    else:
                        sibling.messages.append({"role": "user", "content": f"{prefix} {text}" if prefix else text})
        live = [row for row in rows if row.active]
        if not live:
            return False
        cache = batch.cache
        if not self.reuse_cache:
            cache = None  # the rows keep their positions; the model runs over all of them again
        elif cache is not None and len(live) < len(batch.in_cache):
            # Dialogues whose user has finished leave the batch, and their cache rows with them.
            import torch

            keep = torch.tensor([i for i, row in enumerate(batch.in_cache) if row.active])
            for layer in cache.layers:
                layer.batch_select_indices(keep)
        if live[0].positions:
            cache = self._compact(live, cache)
        batch.cache = self._generate_round(live, cache, round_number)
        batch.in_cache = live
        if siblings > 1:
            batch.groups += self._branch(rows, live, batch.cache, siblings, round_number, batch.choose)
        return True

    def _branch(self, rows: list[_Row], live: list[_Row], cache, siblings: int, round_number: int,
                choose: Callable[[], int]) -> list[TurnGroup]:
        """Record each live dialogue's sibling replies, then copy the continued sibling over the others."""
        import torch

        groups, source = [], list(range(len(live)))
        slot = {id(row): i for i, row in enumerate(live)}
        for first in range(0, len(rows), siblings):
            family = rows[first: first + siblings]
            if not family[0].active:
                continue
            replies = [self._reply_only(self._trajectory(row, True), round_number) for row in family]
            chosen = choose()
            groups.append(TurnGroup(first // siblings, round_number, replies, chosen))
            for k, row in enumerate(family):
                if k != chosen:
                    rows[first + k] = _copy_row(family[chosen])
                    source[slot[id(row)]] = slot[id(family[chosen])]
        live[:] = [row for row in rows if row.active]
        if cache is not None and source != list(range(len(source))):
            index = torch.tensor(source, device=cache.layers[0].keys.device)
            for layer in cache.layers:
                layer.keys.copy_(layer.keys[index])
                layer.values.copy_(layer.values[index])
        return groups

    @staticmethod
    def _reply_only(trajectory: Trajectory, round_number: int) -> Trajectory:
        """A snapshot that later rounds cannot change, with only this round's reply marked as generated."""
        trajectory.messages = [dict(m) for m in trajectory.messages]
        trajectory.ended_properly = list(trajectory.ended_properly)
        trajectory.generated_tokens = list(trajectory.generated_tokens)
        trajectory.assistant_mask = [m if turn == round_number else 0
                                     for m, turn in zip(trajectory.assistant_mask, trajectory.turn_index, strict=True)]
        return trajectory

    def _compact(self, rows: list[_Row], cache) -> Any:
        """Drop masked positions (padding, tokens after a reply's end) from the rows and the cache.

        Masked positions pile up round after round (each round's padding and the
        tail of every reply that ended early), and each costs as much as a real
        one in every later step: attention reads it and the cache holds it.
        Dropping them changes nothing the model computes: position ids come from the
        cumulative attention mask and RoPE is already applied to the cached keys.
        Rows are left-padded again to the longest; the last token of a row is
        kept whatever its mask, as it is not in the cache yet (generate feeds it).
        With no cache (`reuse_cache=False`) only the rows are compacted.
        """
        import torch

        held = len(rows[0].positions) - 1  # positions in the cache: all but the last (rows are of one length)
        kept = [[i for i in range(held) if row.positions.attention[i]] for row in rows]
        width = max(len(positions) for positions in kept)
        if width == held:
            return cache  # nothing masked in the longest row: no shorter layout exists
        self.positions_dropped += len(rows) * held - sum(map(len, kept))
        index = torch.zeros(len(rows), width, dtype=torch.long)
        padding = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, (row, positions) in enumerate(zip(rows, kept, strict=True)):
            pad = width - len(positions)
            row.positions.select(positions + [held], pad, self.pad_id)
            index[b, pad:] = torch.tensor(positions, dtype=torch.long)
            padding[b, :pad] = True
        if cache is None:
            return None
        for layer in cache.layers:
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            gather = index.to(layer.keys.device)[:, None, :, None].expand(-1, heads, -1, dim)
            blank = padding.to(layer.keys.device)[:, None, :, None]
            layer.keys = torch.gather(layer.keys, 2, gather).masked_fill_(blank, 0.0)
            layer.values = torch.gather(layer.values, 2, gather).masked_fill_(blank, 0.0)
        return cache

    def _new_segment(self, row: _Row) -> str:
        """Template text from the end of what the row already holds to the new generation prompt."""
        text = self.tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
        replies = [i for i, m in enumerate(row.messages) if m["role"] == "assistant"]
        if not row.positions or not replies:
            return text
        k = replies[-1]
        _start, content_end, span_end = self.chat.locate_reply(row.messages, k, text)
        # A reply cut at the length limit has no end token yet: the template's comes in the new segment.
        return text[span_end if row.ended_properly[-1] else content_end:]

    def _generate_round(self, rows_in_batch: list[_Row], cache, round_number: int):
        """Generate one reply per row; rows that finish early leave the batch until the round ends.

        HF `generate` keeps stepping every row until the last one stops, so a
        round is generated in chunks of `chunk_tokens`; after each chunk the
        rows that reached their end token are set aside and the rest go on. A
        row set aside stays in the round's cache buffers, moved behind the rows
        still generating (which alone are passed to `generate`), so setting rows
        aside copies nothing out of the cache. At the end of the round the rows
        are put back in order, padded (attention 0) to the common length.
        """
        import torch

        texts = [self._new_segment(row) for row in rows_in_batch]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        segments = encoded["input_ids"]
        turns = []
        for row, text, offsets in zip(rows_in_batch, texts, encoded["offset_mapping"], strict=True):
            # What comes before the first user turn played (the system prompt, a forked dialogue's history) is 0.
            # Only token outputs show it, and locating a history's end needs a template that keeps history.
            first = not row.positions and len(row.messages) > 1
            before = self.chat.message_end(row.messages, len(row.messages) - 2, text) \
                if first and self._with_tokens else 0
            turns.append([0 if start < before else round_number for start, _end in offsets])
        cache = self._prefill(rows_in_batch, cache, segments, turns)
        for row in rows_in_batch:
            row.reply, row.reply_ended, row.turn_now = [], False, round_number

        pending = list(range(len(rows_in_batch)))  # indices of rows still generating, in cache order
        slots = list(range(len(rows_in_batch)))  # slots[k]: the row in buffer slot k; `pending` are the first
        set_aside: dict[int, int] = {}  # row index -> cached positions it holds in its slot
        buffers = None  # per layer (keys, values): the round's buffers, all rows
        budget = self.sampling.max_new_tokens
        while pending and budget > 0:
            step = min(self.chunk_tokens, budget)
            batch = [rows_in_batch[i] for i in pending]
            output = self._generate_chunk(batch, cache, step)
            cache = output.past_key_values
            budget -= step
            finished = [j for j, i in enumerate(pending) if rows_in_batch[i].reply_ended]
            if len(finished) == len(pending):
                break
            if not finished or budget <= 0:
                continue
            self.rows_set_aside += len(finished)
            if buffers is None:
                buffers = [layer.own_buffers(budget) for layer in cache.layers]
            keep = [j for j in range(len(pending)) if j not in set(finished)]
            order = torch.tensor(keep + finished, device=buffers[0][0].device)
            length = cache.layers[0].keys.shape[2]
            for layer, (keys, values) in zip(cache.layers, buffers, strict=True):
                keys[: len(pending), :, :length] = keys[order, :, :length]
                values[: len(pending), :, :length] = values[order, :, :length]
                layer.hold(keys[: len(keep)], values[: len(keep)], length)
            set_aside.update((pending[j], length) for j in finished)
            slots[: len(pending)] = [pending[j] for j in keep + finished]
            pending = [pending[j] for j in keep]
        for row in rows_in_batch:
            self._finish_reply(row)
        if set_aside:
            cache = self._merge_back(rows_in_batch, cache, buffers, slots, set_aside)
        return cache

    def _merge_back(self, rows: list[_Row], cache, buffers, slots: list[int], set_aside: dict[int, int]) -> Any:
        """Put every row back in its own slot of the round's buffers; rows set aside get masked padding.

        A row's last token is never in the cache (generate feeds it next time), so
        the padding goes just before it, in the tokens and in the cache alike.
        """
        import torch

        length = max(len(row.positions) for row in rows)
        for row in rows:
            row.positions.insert_padding(len(row.positions) - 1, length - len(row.positions), self.pad_id)
        positions = length - 1  # what the rows still generating at the end hold; the others are padded to it
        source = torch.tensor([slots.index(i) for i in range(len(rows))], device=buffers[0][0].device)
        for layer, (keys, values) in zip(cache.layers, buffers, strict=True):
            if layer.keys.untyped_storage().data_ptr() != keys.untyped_storage().data_ptr():
                raise RuntimeError("a cache layer outgrew the buffers reserved for the round")
            keys[:, :, :positions] = keys[source, :, :positions]
            values[:, :, :positions] = values[source, :, :positions]
            for i, held in set_aside.items():
                keys[i, :, held:positions] = 0.0
                values[i, :, held:positions] = 0.0
            layer.hold(keys, values, positions)
        return cache

    def _prefill(self, rows: list[_Row], cache, segments: list[list[int]], turns: list[list[int]]):
        """Append each row's new segment (`turns`: the round of each of its tokens) and run the model over it,
        all but its last token (generate feeds that).

        Padding every segment to the longest would make the model run over the
        padding too, and the segments' lengths vary a lot (a greeting, a pasted
        text, a system prompt with several rules). Rows are therefore run in
        groups of similar length (`_length_groups`), each at its own width, and
        the groups write into one cache of all rows; a row's gap to the widest
        group is masked padding just before its last token. Returns that cache.

        Memory: the cache of all rows is reserved once, for the whole round (this
        prefill and `max_new_tokens` of decoding), and the old cache is copied
        into it layer by layer and emptied as it goes (`cache` cannot be used
        afterwards), so the two never coexist beyond one layer. A group of
        consecutive rows (one group of all rows is the common case) writes into
        the new cache in place; any other group runs on a copy of its own rows,
        which is then written back and dropped before the next group runs.
        """
        # Rows are of one length after _compact; all but their last token are in the cache, if there is one.
        cached = len(rows[0].positions) - 1 if cache is not None else 0
        # What each row still has to run: what the cache lacks of it (its last token, or all of it) and the segment.
        to_run = [row.positions.tokens[cached:] + segment[:-1] for row, segment in zip(rows, segments, strict=True)]
        widest = max(len(tokens) for tokens in to_run)
        merged = None
        if cache is not None:
            merged = self._reserve_round_cache(len(rows), cached + widest, cache.layers, copy_and_release=True)
        for group in _length_groups([len(tokens) for tokens in to_run], self.group_overhead_tokens):
            width = max(len(to_run[i]) for i in group)
            for i in group:
                rows[i].positions.insert_padding(cached, width - len(to_run[i]), self.pad_id)
                rows[i].positions.append(segments[i][:-1], turn=turns[i][:-1])
            batch = [rows[i] for i in group]
            self.prefill_groups += 1
            merged = self._run_group(batch, merged, group, cached, len(rows), cached + widest)
        for row, segment, turn in zip(rows, segments, turns, strict=True):
            row.positions.insert_padding(len(row.positions), cached + widest - len(row.positions), self.pad_id)
            row.positions.append(segment[-1:], turn=turn[-1:])
        return merged

    def _reserve_round_cache(self, batch: int, length: int, like_layers, *, copy_and_release: bool = False):
        """A zeroed cache of `batch` rows x `length` positions, with room for one round of decoding.

        Each layer takes its shapes from the layer of `like_layers` at its index.
        With `copy_and_release`, that layer's keys and values (the old cache) are
        copied into the first positions and dropped from it before the next layer
        is reserved, so the old and new caches never coexist beyond one layer.
        """
        from dialogrl.evaluation.kv_cache import AppendInPlaceCache

        cache = AppendInPlaceCache()
        for old in like_layers:
            layer = cache.layer_class_to_replicate()
            # generate appends at most max_new_tokens positions in a round; the next round gets a new cache.
            keys, values = layer.reserve(batch, length, old.keys, spare=self.sampling.max_new_tokens)
            if copy_and_release:
                keys[:, :, : old.keys.shape[2]] = old.keys
                values[:, :, : old.values.shape[2]] = old.values
                old.keys = old.values = None
            cache.layers.append(layer)
        return cache

    def _run_group(self, batch: list[_Row], merged, group: list[int], cached: int, rows: int, length: int):
        """Run the rows of one length group from position `cached` on, into `merged` (the cache of all rows).

        `merged` is None before the first group of the first round: it is then
        reserved (`rows` x `length`) from the shapes of that group's cache. Returns `merged`.
        """
        import torch
        from transformers.cache_utils import DynamicCache

        from dialogrl.evaluation.kv_cache import AppendInPlaceCache

        device = self.model.device
        consecutive = group == list(range(group[0], group[0] + len(group)))
        if merged is not None and consecutive:
            # The group's rows of the new cache, as views: the model writes its keys and values there directly.
            group_cache = AppendInPlaceCache()
            for layer in merged.layers:
                group_cache.layers.append(layer.view_rows(group[0], group[0] + len(group), cached))
        elif merged is not None and cached:
            index = torch.tensor(group, device=device)
            group_cache = DynamicCache([(layer.keys[index, :, :cached], layer.values[index, :, :cached])
                                        for layer in merged.layers])
        else:
            group_cache = DynamicCache()
        self._forward_group(batch, group_cache, cached)
        if merged is None:
            merged = self._reserve_round_cache(rows, length, group_cache.layers)
        if not (consecutive and isinstance(group_cache, AppendInPlaceCache)):
            index = torch.tensor(group, device=device)
            end = group_cache.layers[0].keys.shape[2]
            for layer, written in zip(merged.layers, group_cache.layers, strict=True):
                layer.keys[index, :, :end] = written.keys
                layer.values[index, :, :end] = written.values
        return merged

    def _forward_group(self, batch: list[_Row], group_cache, cached: int) -> None:
        """Run the rows of one length group from position `cached` on, appending to `group_cache`.

        Identical rows (same tokens, same mask, so the same cached prefix) have identical keys and values:
        each distinct row is run once and `group_cache` gets a copy per row. With k samples per history the
        prefill, about as costly as the decoding here, is run once instead of k times.
        """
        import torch
        from transformers.cache_utils import DynamicCache

        distinct: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        source = [distinct.setdefault((tuple(row.positions.tokens), tuple(row.positions.attention)), len(distinct))
                  for row in batch]
        if not self.share_identical_rows or len(distinct) == len(batch):
            self._forward_rows(batch, group_cache, cached)
            return
        firsts = [source.index(k) for k in range(len(distinct))]  # ids were given in order of first sight
        device = self.model.device
        scratch = DynamicCache()
        if cached:
            index = torch.tensor(firsts, device=device)
            scratch = DynamicCache([(layer.keys[index, :, :cached], layer.values[index, :, :cached])
                                    for layer in group_cache.layers])
        self._forward_rows([batch[i] for i in firsts], scratch, cached)
        copies = torch.tensor(source, device=device)
        for layer_index, layer in enumerate(scratch.layers):
            group_cache.update(layer.keys[copies, :, cached:], layer.values[copies, :, cached:], layer_index)
        self.rows_prefilled_as_copies += len(batch) - len(firsts)

    def _forward_rows(self, batch: list[_Row], group_cache, cached: int) -> None:
        import torch

        device = self.model.device
        input_ids = torch.tensor([row.positions.tokens for row in batch], device=device)
        attention = torch.tensor([row.positions.attention for row in batch], device=device)
        # As generate does: positions count real tokens only, so padding anywhere leaves them unchanged.
        positions = (attention.cumsum(-1) - 1).masked_fill_(attention == 0, 1)
        context = contextlib.nullcontext()
        if self.generation_context:
            context = self.generation_context(self.model, input_ids, attention,
                                              [self._system_length(row) for row in batch])
        with torch.inference_mode(), context:
            self.model(input_ids=input_ids[:, cached:], attention_mask=attention, position_ids=positions[:, cached:],
                       past_key_values=group_cache, use_cache=True, logits_to_keep=1)

    def _generate_chunk(self, batch: list[_Row], cache, step: int):
        import torch

        input_ids = torch.tensor([row.positions.tokens for row in batch], device=self.model.device)
        attention = torch.tensor([row.positions.attention for row in batch], device=self.model.device)
        context = contextlib.nullcontext()
        if self.generation_context:
            context = self.generation_context(self.model, input_ids, attention,
                                              [self._system_length(row) for row in batch])
        kwargs = {**self.generate_kwargs, "max_new_tokens": step}
        with torch.inference_mode(), context:
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention, past_key_values=cache, use_cache=True,
                return_dict_in_generate=True, output_logits=self._with_tokens,
                # The rollout always runs on whole weights (training gathers sharded ones first), so no process
                # waits on another: transformers' default under FSDP/ZeRO-3 (synced_gpus) would make every
                # process join every decoding step, and deadlock once one has fewer replies to write.
                synced_gpus=False, **kwargs,
            )
        new_tokens = output.sequences[:, input_ids.shape[1]:]
        # Log-probs cost a [B, steps, vocab] softmax: computed only when token outputs were asked for.
        logprobs = (self._token_logprobs(output.logits, new_tokens) if self._with_tokens
                    else torch.zeros(new_tokens.shape))
        for b, row in enumerate(batch):
            self._append_chunk(row, new_tokens[b].tolist(), logprobs[b].tolist())
        return output

    def _append_chunk(self, row: _Row, tokens: list[int], logprobs: list[float]) -> None:
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        kept = len(tokens) if end is None else end + 1
        row.positions.append(tokens, turn=[row.turn_now] * len(tokens), kept=kept, logprob=logprobs)
        row.reply += tokens[:kept]
        row.reply_ended = end is not None

    def _finish_reply(self, row: _Row) -> None:
        row.ended_properly.append(row.reply_ended)
        row.generated_counts.append(len(row.reply))
        self.tokens_generated += len(row.reply)
        text = self.tokenizer.decode(row.reply, skip_special_tokens=True).strip()
        row.messages.append({"role": "assistant", "content": text})

    def _token_logprobs(self, logits: tuple, tokens):
        import torch

        # [B, new, V] raw logits -> log-probs of the sampled tokens under the sampling temperature.
        stacked = torch.stack(logits, dim=1).float()
        if self.sampling.temperature > 0:
            stacked = stacked / self.sampling.temperature
        return torch.log_softmax(stacked, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _system_length(self, row: _Row) -> int:
        """Tokens of the rendered system turn at the start of the row (for split-softmax)."""
        if not row.spec.system_prompt:
            return 0
        first = self.tokenizer.apply_chat_template(row.messages[:2], tokenize=False, add_generation_prompt=False)
        end = first.find(row.spec.system_prompt) + len(row.spec.system_prompt)
        return len(self.tokenizer(first[:end], add_special_tokens=False)["input_ids"])

    def _trajectory(self, row: _Row, with_tokens: bool) -> Trajectory:
        trajectory = Trajectory(row.spec.dialogue_id, row.messages, row.ended_properly, row.generated_counts)
        if with_tokens:
            kept = row.positions.unmasked()
            trajectory.token_ids, trajectory.assistant_mask = kept.tokens, kept.generated
            trajectory.turn_index, trajectory.logprobs = kept.turn, kept.logprob
        return trajectory


class _ScriptedUser:
    """A user who says the given turns in order, then stops."""

    def __init__(self, turns: list[str]):
        self.turns = turns

    def next_user_turn(self, messages: list[dict[str, str]], round_number: int) -> str | None:
        return self.turns.pop(0) if self.turns else None


class ChatTurns:
    """One conversation on the engine, a round per `say`: the history is the model's own tokens and the
    cache of everything before the new user turn is reused, as in a rollout."""

    def __init__(self, engine: RolloutEngine, system_prompt: str | None):
        self.engine = engine
        self._user = _ScriptedUser([])
        self._batch = engine._open_batch([DialogueSpec("chat", system_prompt, self._user)])
        self.rounds = 0

    @property
    def messages(self) -> list[dict[str, str]]:
        return self._batch.rows[0].messages

    def say(self, user_text: str) -> str:
        """The model's reply to `user_text`, given everything said before."""
        self._user.turns.append(user_text)
        self.rounds += 1
        self.engine._with_tokens = False
        self.engine._play_round(self._batch, self.rounds)
        return self.messages[-1]["content"]

    def prompt_ids(self) -> list[int]:
        """The tokens the last reply was generated from: the dialogue up to its generation prompt."""
        kept = self._batch.rows[0].positions.unmasked()
        end = len(kept)
        while end and kept.generated[end - 1]:  # the last reply is the run of generated tokens at the end
            end -= 1
        return kept.tokens[:end]


def _copy_row(row: _Row) -> _Row:
    """A row with its own copy of every list (the spec, and with it the user source, stays shared)."""
    return _Row(**{f.name: (copy.deepcopy(getattr(row, f.name)) if f.name != "spec" else row.spec)
                   for f in fields(_Row)})


def _length_groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """Split rows into groups that each run at their longest length, at least total cost.

    The cost of a group is its size times its longest length (the tokens the
    model runs, padding included) plus `overhead` per group. Groups are runs of
    the rows sorted by length; the best split comes from a dynamic programme
    over the split points (O(n^2), n = rows in the batch). Returns row indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0.0] + [float("inf")] * len(order)  # best[j]: least cost of the first j rows in `order`
    start_of_last = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if cost < best[j]:
                best[j], start_of_last[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(sorted(order[start_of_last[j]: j]))
        j = start_of_last[j]
    return groups[::-1]
