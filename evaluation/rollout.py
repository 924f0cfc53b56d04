"""The multi-round rollout engine: the evaluator and PPO both play dialogues with it.

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
    turn_index:     [T] round of each token (0 for the system prompt)
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
class _Row:
    """One dialogue's state inside a batch: every position of its (padded) sequence."""

    spec: DialogueSpec
    messages: list[dict[str, str]]
    tokens: list[int] = field(default_factory=list)
    attention: list[int] = field(default_factory=list)  # 0 on padding and on tokens after a reply's end
    generated: list[int] = field(default_factory=list)  # 1 on tokens the policy generated and kept
    turn: list[int] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
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
        self._with_logprobs = False

    def play(self, dialogues: Sequence[DialogueSpec], rounds: int, *, with_tokens: bool = False) -> list[Trajectory]:
        import torch

        results: list[Trajectory] = []
        for start in range(0, len(dialogues), self.batch_size):
            # One seed per batch: a dialogue's sampled replies do not depend on what ran before it.
            torch.manual_seed(self.sampling.seed + start)
            self._with_logprobs = with_tokens
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
        once per sibling: it is short next to the replies. Returns the dialogues as
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
            self._with_logprobs = True
            choices = random.Random(self.sampling.seed + start)
            batch, batch_groups = self._play_batch(dialogues[start: start + per_batch], rounds, True,
                                                   siblings=siblings, choose=partial(choices.randrange, siblings))
            played += batch
            groups += [TurnGroup(start + g.dialogue_index, g.round_number, g.replies, g.continued) for g in batch_groups]
        return played, groups

    # ------------------------------------------------------------------ one batch

    def _play_batch(self, specs: Sequence[DialogueSpec], rounds: int, with_tokens: bool, *, siblings: int = 1,
                    choose: Callable[[], int] | None = None) -> tuple[list[Trajectory], list[TurnGroup]]:
        """Play a batch; with `siblings` > 1, each spec has that many consecutive rows (see `play_turn_groups`)."""
        rows = [_Row(spec, ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else [])
                     + list(spec.history)) for spec in specs for _ in range(siblings)]
        groups: list[TurnGroup] = []
        in_cache: list[_Row] = []  # rows held by `cache`, in its batch order
        cache = None
        for round_number in range(1, rounds + 1):
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
                            sibling.messages.append({"role": "user",
                                                     "content": f"{prefix} {text}" if prefix else text})
            live = [row for row in rows if row.active]
            if not live:
                break
            if not self.reuse_cache:
                cache = None
                for row in live:
                    row.tokens, row.attention, row.generated, row.turn, row.logprob = [], [], [], [], []
            elif cache is not None and len(live) < len(in_cache):
                # Dialogues whose user has finished leave the batch, and their cache rows with them.
                import torch

                keep = torch.tensor([i for i, row in enumerate(in_cache) if row.active])
                for layer in cache.layers:
                    layer.batch_select_indices(keep)
            if cache is not None:
                cache = self._compact(live, cache)
            cache = self._generate_round(live, cache, round_number)
            in_cache = live
            if siblings > 1:
                groups += self._branch(rows, live, cache, siblings, round_number, choose)
        return [self._trajectory(row, with_tokens) for row in rows[::siblings]], groups

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
        """
        import torch

        kept = [[i for i in range(len(row.tokens) - 1) if row.attention[i]] for row in rows]
        width = max(len(positions) for positions in kept)
        if width == cache.layers[0].keys.shape[2]:
            return cache  # nothing masked in the longest row: no shorter layout exists
        self.positions_dropped += len(rows) * cache.layers[0].keys.shape[2] - sum(map(len, kept))
        index = torch.zeros(len(rows), width, dtype=torch.long)
        padding = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, (row, positions) in enumerate(zip(rows, kept, strict=True)):
            pad = width - len(positions)
            positions = positions + [len(row.tokens) - 1]
            for name, filler in self._row_fields():
                values = getattr(row, name)
                setattr(row, name, [filler] * pad + [values[i] for i in positions])
            index[b, pad:] = torch.tensor(positions[:-1], dtype=torch.long)
            padding[b, :pad] = True
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
        if not row.tokens or not replies:
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

        segments = self.tokenizer([self._new_segment(row) for row in rows_in_batch], add_special_tokens=False)[
            "input_ids"]
        cache = self._prefill(rows_in_batch, cache, segments, round_number)
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

        length = max(len(row.tokens) for row in rows)
        for row in rows:
            self._insert_padding(row, len(row.tokens) - 1, length - len(row.tokens))
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

    def _prefill(self, rows: list[_Row], cache, segments: list[list[int]], round_number: int):
        """Append each row's new segment and run the model over it, all but its last token (generate feeds that).

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
        cached = len(rows[0].tokens) - 1 if rows[0].tokens else 0  # rows are of equal length after _compact
        # What each row still has to run: its last token from before (not yet in the cache) and the segment.
        to_run = [row.tokens[-1:] + segment[:-1] for row, segment in zip(rows, segments, strict=True)]
        widest = max(len(tokens) for tokens in to_run)
        merged = None
        if cache is not None:
            merged = self._reserve_round_cache(len(rows), cached + widest, cache.layers, copy_and_release=True)
        for group in _length_groups([len(tokens) for tokens in to_run], self.group_overhead_tokens):
            width = max(len(to_run[i]) for i in group)
            for i in group:
                row = rows[i]
                self._insert_padding(row, cached, width - len(to_run[i]))
                self._append_prompt(row, segments[i][:-1], round_number)
            batch = [rows[i] for i in group]
            self.prefill_groups += 1
            merged = self._run_group(batch, merged, group, cached, len(rows), cached + widest)
        for row, segment in zip(rows, segments, strict=True):
            self._insert_padding(row, len(row.tokens), cached + widest - len(row.tokens))
            self._append_prompt(row, segment[-1:], round_number)
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
        """Run the rows of one length group from position `cached` on, appending to `group_cache`."""
        import torch

        device = self.model.device
        input_ids = torch.tensor([row.tokens for row in batch], device=device)
        attention = torch.tensor([row.attention for row in batch], device=device)
        # As generate does: positions count real tokens only, so padding anywhere leaves them unchanged.
        positions = (attention.cumsum(-1) - 1).masked_fill_(attention == 0, 1)
        context = contextlib.nullcontext()
        if self.generation_context:
            context = self.generation_context(self.model, input_ids, attention,
                                              [self._system_length(row) for row in batch])
        with torch.inference_mode(), context:
            self.model(input_ids=input_ids[:, cached:], attention_mask=attention, position_ids=positions[:, cached:],
                       past_key_values=group_cache, use_cache=True, logits_to_keep=1)

    def _row_fields(self) -> tuple[tuple[str, Any], ...]:
        """The per-position lists of a row, with the value a padding position holds in each."""
        return ("tokens", self.pad_id), ("attention", 0), ("generated", 0), ("turn", 0), ("logprob", 0.0)

    def _insert_padding(self, row: _Row, position: int, count: int) -> None:
        for name, filler in self._row_fields():
            getattr(row, name)[position:position] = [filler] * count

    @staticmethod
    def _append_prompt(row: _Row, tokens: list[int], round_number: int) -> None:
        row.tokens += tokens
        row.attention += [1] * len(tokens)
        row.generated += [0] * len(tokens)
        row.turn += [round_number] * len(tokens)
        row.logprob += [0.0] * len(tokens)

    def _generate_chunk(self, batch: list[_Row], cache, step: int):
        import torch

        input_ids = torch.tensor([row.tokens for row in batch], device=self.model.device)
        attention = torch.tensor([row.attention for row in batch], device=self.model.device)
        context = contextlib.nullcontext()
        if self.generation_context:
            context = self.generation_context(self.model, input_ids, attention,
                                              [self._system_length(row) for row in batch])
        kwargs = {**self.generate_kwargs, "max_new_tokens": step}
        with torch.inference_mode(), context:
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention, past_key_values=cache, use_cache=True,
                return_dict_in_generate=True, output_logits=self._with_logprobs, **kwargs,
            )
        new_tokens = output.sequences[:, input_ids.shape[1]:]
        # Log-probs cost a [B, steps, vocab] softmax: computed only when token outputs were asked for.
        logprobs = (self._token_logprobs(output.logits, new_tokens) if self._with_logprobs
                    else torch.zeros(new_tokens.shape))
        for b, row in enumerate(batch):
            self._append_chunk(row, new_tokens[b].tolist(), logprobs[b].tolist())
        return output

    def _append_chunk(self, row: _Row, tokens: list[int], logprobs: list[float]) -> None:
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        kept = len(tokens) if end is None else end + 1
        row.tokens += tokens
        row.attention += [1] * kept + [0] * (len(tokens) - kept)
        row.generated += [1] * kept + [0] * (len(tokens) - kept)
        row.turn += [row.turn_now] * kept + [0] * (len(tokens) - kept)
        row.logprob += logprobs[:kept] + [0.0] * (len(tokens) - kept)
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
            keep = [i for i, a in enumerate(row.attention) if a]
            trajectory.token_ids = [row.tokens[i] for i in keep]
            trajectory.assistant_mask = [row.generated[i] for i in keep]
            trajectory.turn_index = [row.turn[i] for i in keep]
            trajectory.logprobs = [row.logprob[i] for i in keep]
        return trajectory


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
