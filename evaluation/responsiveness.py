"""Responsiveness: does a reply answer its own user turn, or would it fit after any turn?

The score is a contrastive pointwise mutual information under a FIXED scorer model
(never the model under test, never a reward model trained here, so no training
stage can learn to game it):

    pmi(reply, context) = log p(reply | context) - log mean_j p(reply | context_j)

where `context` is the end of the reply's own dialogue (its last `context_messages`
messages, ending with the user turn) and the `context_j` are a fixed panel of
`negatives` contexts of the same shape taken from other, human dialogues (the
corpus's train split, so they never overlap with evaluation dialogues). A generic reply ("I'm not sure.", "Hey there!")
is about as likely after any turn, so its PMI is near 0; a reply that takes up what
the user said is much likelier after that turn than after others. This is the
maximum-mutual-information idea of Li et al. 2016 ("A Diversity-Promoting Objective
Function for Neural Conversation Models"), with the marginal p(reply) estimated over
real contexts rather than from an unconditioned model.

Cost. The panel is the same for every reply, so each panel context is run through
the scorer once and its KV cache kept: scoring a reply under the panel runs only the
reply's own tokens. Per reply that is one pass over its own context and reply plus
`negatives` passes over the reply alone, about a third of the tokens of running
every (context, reply) pair in full. Identical (context, reply) pairs (a model
repeating itself, two interventions giving the same first reply) are scored once.

The value is in nats, summed over the reply's tokens. The system prompt is left out
of every context: the question is whether the reply answers the user, not whether it
keeps the rules (a rule-shaped reply is scored the same way under every context, so
the rules cancel in the ratio anyway). The threshold below which a reply counts as
unresponsive was chosen on the corpus eval split (`dialogrl eval validate-scorer`):
true human replies against the same replies moved into another dialogue.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dialogrl.data.options import option

Messages = list[dict[str, str]]
# Every scored context opens with this one short system turn: templates that add a long default system
# prompt when there is none (SmolLM2's does) would otherwise put ~20 extra tokens in every scored row,
# and the same text under every context cancels in the ratio anyway.
SCORER_SYSTEM_PROMPT = "Reply to the user."


@dataclass
class ResponsivenessConfig:
    enabled: bool = option(True, help="Score responsiveness and gate on it; off = repeat/echo/per-reply gate only.")
    scorer: str = option(
        "packaged:smollm2-135m-instruct",
        help="The fixed scorer model: a model reference (packaged:NAME, a directory, a hub id). Never the model "
        "under test's own checkpoint if you want the verdict to mean anything across checkpoints.",
    )
    context_messages: int = option(
        3, help="Messages of the reply's own dialogue the scorer sees (ending with the user turn)."
    )
    show_replies: bool = option(
        True, help="Whether the scorer's context keeps the replier's own earlier messages. They carry much of "
        "what a reply takes up (AUC 0.855 with them, 0.756 on the user's turns alone, 100 human replies), but a "
        "reply that copies an earlier reply of its own is then 'predicted' by the copy: the repeat check is what "
        "catches that. Off: only the user's turns among the context messages are shown, in one user turn."
    )
    negatives: int = option(8, help="Contexts from other dialogues (a fixed panel) that every reply is contrasted with.")
    threshold: float = option(
        1.51, help="Least PMI (nats) a reply needs to count as responsive. 1.51 is the Youden cut of "
        "`dialogrl eval validate-scorer --dialogues 100` with the defaults (true human replies vs swapped and "
        "canned ones); re-validate when changing scorer, context_messages or negatives."
    )
    max_reply_tokens: int = option(48, help="Reply tokens scored (longer replies are cut; the PMI is a sum).")
    max_context_words: int = option(
        48, help="Words kept of each context message (its last ones): a pasted essay costs the scorer without "
        "telling it more about what the reply should take up."
    )
    batch_tokens: int = option(
        4096, help="Token budget of one forward pass (rows x padded length); memory grows with it."
    )
    batch_logits: int = option(
        1024, help="Scored positions one forward pass may hold logits for (rows x reply length); each takes "
        "vocabulary x 4 bytes (1024 x SmolLM2's 49k vocabulary = 200 MB)."
    )
    seed: int = option(0, help="Seed for drawing the contrast contexts; same seed, same scores.")

    def __post_init__(self) -> None:
        if self.context_messages < 1 or self.negatives < 1:
            raise ValueError("responsiveness.context_messages and responsiveness.negatives must be >= 1")
        if self.batch_tokens < 1 or self.batch_logits < 1:
            raise ValueError("responsiveness.batch_tokens and responsiveness.batch_logits must be >= 1")


def _tail_words(text: str, limit: int) -> str:
    words = text.split()
    return text if len(words) <= limit else " ".join(words[-limit:])


def context_of(messages: Sequence[dict[str, str]], before_reply: int, context_messages: int) -> Messages:
    """The last `context_messages` non-system messages before `messages[before_reply]`, as plain dicts."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages[:before_reply] if m["role"] != "system"]
    return turns[-context_messages:]


def corpus_contexts(context_messages: int, *, split: str = "train", limit: int = 4000, seed: int = 0) -> list[Messages]:
    """Contexts of `context_messages` messages ending with a human's turn, from the chitchat corpus."""
    from dialogrl.data.corpora import load_chitchat

    rng = random.Random(seed)
    dialogues = load_chitchat(split)  # type: ignore[arg-type]
    contexts = []
    for dialogue in dialogues:
        messages = dialogue.messages()
        # user turns sit at even indices; pick one with enough history before it.
        user_indices = [i for i in range(0, len(messages), 2) if i + 1 >= context_messages]
        if user_indices:
            end = rng.choice(user_indices)
            contexts.append(messages[end + 1 - context_messages: end + 1])
    rng.shuffle(contexts)
    return contexts[:limit]


def _context_key(context: Messages) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in context)


class ResponsivenessScorer:
    """Batched contrastive PMI of replies under one fixed causal LM; see the module docstring.

    `contrast_pool` is shuffled already (`corpus_contexts`); its first `negatives`
    contexts are the panel.
    """

    def __init__(self, model, tokenizer, config: ResponsivenessConfig, contrast_pool: Sequence[Messages]):
        if len(contrast_pool) < config.negatives:
            raise ValueError(f"the contrast pool has {len(contrast_pool)} contexts; need at least "
                             f"responsiveness.negatives={config.negatives}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.panel = [list(context) for context in contrast_pool[: config.negatives]]
        self._panel_prefixes: _PanelPrefix | None = None
        self.scored_replies = 0
        self.scored_tokens = 0
        self.seconds = 0.0

    def score(self, items: Sequence[tuple[Messages, str]]) -> list[float]:
        """PMI in nats for each (context, reply); context ends with the user turn the reply answers.

        A panel context that is also one of the reply's own contexts in `items` is left
        out of that reply's marginal (a transcript may quote the corpus).
        """
        import time

        started = time.perf_counter()
        unique_pairs = list(dict.fromkeys((_context_key(context), reply) for context, reply in items))
        own_logp = dict(zip(unique_pairs, self.log_likelihoods(
            [([{"role": r, "content": c} for r, c in key], reply) for key, reply in unique_pairs]), strict=True))
        replies = list(dict.fromkeys(reply for _key, reply in unique_pairs))
        panel_logps = self.panel_log_likelihoods(replies)
        own_keys: dict[str, set] = {}
        for key, reply in unique_pairs:
            own_keys.setdefault(reply, set()).add(key)
        panel_keys = [_context_key(context) for context in self.panel]
        log_marginal = {}
        for reply, logps in zip(replies, panel_logps, strict=True):
            others = [x for x, key in zip(logps, panel_keys, strict=True) if key not in own_keys[reply]]
            if not others:
                raise ValueError("every panel context is also one of the reply's own contexts; raise "
                                 "responsiveness.negatives or change responsiveness.seed")
            peak = max(others)
            log_marginal[reply] = peak + math.log(sum(math.exp(x - peak) for x in others) / len(others))
        self.scored_replies += len(items)
        self.seconds += time.perf_counter() - started
        return [own_logp[(_context_key(context), reply)] - log_marginal[reply] for context, reply in items]

    def _prompt_ids(self, context: Messages) -> list[int]:
        """The context as inference renders it before a reply: scorer system turn, messages, generation prompt."""
        shown = [{"role": m["role"], "content": _tail_words(m["content"], self.config.max_context_words)}
                 for m in context if self.config.show_replies or m["role"] == "user"]
        if not self.config.show_replies:
            # One user turn of what the user said lately: templates that insist on alternating roles accept it.
            shown = [{"role": "user", "content": "\n".join(m["content"] for m in shown)}]
        prompt = self.tokenizer.apply_chat_template([{"role": "system", "content": SCORER_SYSTEM_PROMPT}, *shown],
                                                    tokenize=False, add_generation_prompt=True)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _reply_ids(self, reply: str) -> list[int]:
        """The reply tokenised on its own, as a model produces it after the generation prompt; its end-of-turn
        token is not scored (every reply has one, it says nothing about the turn)."""
        reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"][: self.config.max_reply_tokens]
        return reply_ids or [self.tokenizer.eos_token_id]  # an empty reply: score its end token instead

    def _encode(self, context: Messages, reply: str) -> tuple[list[int], int]:
        """Prompt tokens + the reply's tokens -> (ids, reply length)."""
        reply_ids = self._reply_ids(reply)
        return self._prompt_ids(context) + reply_ids, len(reply_ids)

    def _batches(self, lengths: Sequence[tuple[int, int]]) -> Iterator[list[int]]:
        """Indices of rows sorted by (padded length, scored positions), cut to the token and logit budgets."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        start = 0
        while start < len(order):
            stop, scored = start + 1, lengths[order[start]][1]
            while stop < len(order):
                rows = stop + 1 - start
                width = lengths[order[stop]][0]  # the widest so far, as rows are sorted by width
                scored = max(scored, lengths[order[stop]][1])
                if rows * width > self.config.batch_tokens or rows * scored > self.config.batch_logits:
                    break
                stop += 1
            yield order[start:stop]
            start = stop

    def log_likelihoods(self, pairs: Sequence[tuple[Messages, str]]) -> list[float]:
        """log p(reply | context) summed over reply tokens, for every pair, in batched forward passes.

        Rows are left-padded so that every reply ends at the last position; only the last
        (longest reply + 1) positions get logits (`logits_to_keep`), which keeps the
        [rows, kept, vocab] logits small. Rows are sorted by length so batches pad little.
        """
        import torch

        encoded = [self._encode(context, reply) for context, reply in pairs]
        self.scored_tokens += sum(len(ids) for ids, _ in encoded)
        out = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        for rows in self._batches([(len(ids), n + 1) for ids, n in encoded]):
            batch = [encoded[i] for i in rows]
            width = max(len(ids) for ids, _ in batch)
            keep = max(n for _, n in batch) + 1
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch], device=device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                    use_cache=False, logits_to_keep=keep).logits
            # logits[:, j] predicts input_ids[:, width - keep + j + 1]
            token_logps = _token_logps(logits[:, :-1], input_ids[:, width - keep + 1:])
            for row, (index, (_, n)) in enumerate(zip(rows, batch, strict=True)):
                out[index] = float(token_logps[row, keep - 1 - n:].sum())
        return out

    def panel_log_likelihoods(self, replies: Sequence[str]) -> list[list[float]]:
        """log p(reply | panel context j) for every reply and panel context, as [reply][j].

        Each panel context but its last token is run once and its KV cache kept, the
        caches of all panel contexts stacked left-padded to one length (`_panel_prefix`).
        Every (reply, panel context) pair is then one row of [last context token, reply
        tokens], right-padded, on its context's cache: rows of different contexts share a
        forward pass, which matters when few replies are scored at once (the data build
        judges a handful per round), where one pass per context ran small, overhead-bound
        matrix products. Padding is never attended by a row's real tokens.
        """
        import torch
        from transformers.cache_utils import DynamicCache

        reply_ids = [self._reply_ids(reply) for reply in replies]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        prefix = self._panel_prefix()
        pairs = [(i, j) for i in range(len(replies)) for j in range(len(self.panel))]
        self.scored_tokens += sum(len(reply_ids[i]) + 1 for i, _ in pairs)
        out = [[0.0] * len(self.panel) for _ in replies]
        for rows in self._batches([(len(reply_ids[i]) + 1, len(reply_ids[i]) + 1) for i, _ in pairs]):
            batch = [pairs[r] for r in rows]
            width = max(len(reply_ids[i]) for i, _ in batch) + 1
            input_ids = torch.tensor([[prefix.last_tokens[j], *reply_ids[i], *[pad] * (width - 1 - len(reply_ids[i]))]
                                      for i, j in batch], device=device)
            attention = torch.tensor([[0] * (prefix.width - prefix.lengths[j])  # the context's left padding
                                      + [1] * (prefix.lengths[j] + 1 + len(reply_ids[i]))
                                      + [0] * (width - 1 - len(reply_ids[i])) for i, j in batch], device=device)
            contexts = torch.tensor([j for _, j in batch], device=device)
            positions = torch.tensor([prefix.lengths[j] for _, j in batch], device=device)[:, None] \
                + torch.arange(width, device=device)
            cache = DynamicCache([(k.index_select(0, contexts), v.index_select(0, contexts)) for k, v in prefix.layers]) \
                if prefix.width else None
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                    past_key_values=cache, use_cache=cache is not None).logits
            # logits[:, t] predicts input_ids[:, t + 1]: the reply's tokens are 1..n.
            token_logps = _token_logps(logits[:, :-1], input_ids[:, 1:])
            for row, (i, j) in enumerate(batch):
                out[i][j] = float(token_logps[row, : len(reply_ids[i])].sum())
        return out

    def _panel_prefix(self) -> _PanelPrefix:
        """The panel contexts' KV caches (all but each context's last token), built once."""
        import torch
        from transformers.cache_utils import DynamicCache

        if self._panel_prefixes is None:
            device = next(self.model.parameters()).device
            caches, lengths, last_tokens = [], [], []
            for context in self.panel:
                ids = self._prompt_ids(context)
                self.scored_tokens += len(ids) - 1
                layers: list = []
                if len(ids) > 1:
                    cache = DynamicCache()
                    with torch.inference_mode():
                        self.model(input_ids=torch.tensor([ids[:-1]], device=device), past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
                    layers = [(layer.keys, layer.values) for layer in cache.layers]
                caches.append(layers)
                lengths.append(len(ids) - 1)
                last_tokens.append(ids[-1])
            self._panel_prefixes = _PanelPrefix.stacked(caches, lengths, last_tokens)
        return self._panel_prefixes


@dataclass
class _PanelPrefix:
    """The panel's KV caches as per-layer (keys, values) of shape [contexts, heads, width, head_dim], each
    context's cache left-padded to `width` (its real length in `lengths`), and each context's last token."""

    layers: list[tuple[Any, Any]]
    lengths: list[int]
    last_tokens: list[int]
    width: int

    @classmethod
    def stacked(cls, caches: list[list[tuple[Any, Any]]], lengths: list[int], last_tokens: list[int]) -> _PanelPrefix:
        import torch

        width = max(lengths)
        if width == 0:
            return cls([], lengths, last_tokens, 0)
        template = next(layers for layers in caches if layers)

        def left_padded(tensor, length: int, like):
            if length == 0:
                return like.new_zeros((1, like.shape[1], width, like.shape[3]))
            return torch.nn.functional.pad(tensor, (0, 0, width - length, 0))

        layers = []
        for layer, (like, _) in enumerate(template):
            keys = [left_padded(c[layer][0] if c else None, n, like) for c, n in zip(caches, lengths, strict=True)]
            values = [left_padded(c[layer][1] if c else None, n, like) for c, n in zip(caches, lengths, strict=True)]
            layers.append((torch.cat(keys), torch.cat(values)))
        return cls(layers, lengths, last_tokens, width)


def _token_logps(logits, targets):
    """log softmax of `logits` [rows, positions, vocab] at `targets` [rows, positions], in float32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
