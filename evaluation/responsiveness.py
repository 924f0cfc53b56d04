"""Responsiveness: does a reply answer its own user turn, or would it fit after any turn?

The score is a contrastive pointwise mutual information under a FIXED scorer model
(never the model under test, never a reward model trained here, so no training
stage can learn to game it):

    pmi(reply, context) = log p(reply | context) - log mean_j p(reply | context_j)

where `context` is the end of the reply's own dialogue (its last `context_messages`
messages, ending with the user turn) and the `context_j` are contexts of the same
shape taken from other, human dialogues (the corpus's train split, so they never
overlap with evaluation dialogues). A generic reply ("I'm not sure.", "Hey there!")
is about as likely after any turn, so its PMI is near 0; a reply that takes up what
the user said is much likelier after that turn than after others. This is the
maximum-mutual-information idea of Li et al. 2016 ("A Diversity-Promoting Objective
Function for Neural Conversation Models"), with the marginal p(reply) estimated over
real contexts rather than from an unconditioned model.

The value is in nats, summed over the reply's tokens. The system prompt is left out
of every context: the question is whether the reply answers the user, not whether it
keeps the rules (a rule-shaped reply is scored the same way under every context, so
the rules cancel in the ratio anyway). The threshold below which a reply counts as
unresponsive was chosen on the corpus eval split (`dialogrl eval validate-scorer`):
true human replies against the same replies moved into another dialogue.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

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
    negatives: int = option(8, help="Contexts from other dialogues that the reply is contrasted with.")
    threshold: float = option(
        2.31, help="Least PMI (nats) a reply needs to count as responsive. 2.31 is the Youden cut of "
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
    seed: int = option(0, help="Seed for drawing the contrast contexts; same seed, same scores.")

    def __post_init__(self) -> None:
        if self.context_messages < 1 or self.negatives < 1:
            raise ValueError("responsiveness.context_messages and responsiveness.negatives must be >= 1")


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


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ResponsivenessScorer:
    """Batched contrastive PMI of replies under one fixed causal LM; see the module docstring."""

    def __init__(self, model, tokenizer, config: ResponsivenessConfig, contrast_pool: Sequence[Messages]):
        if len(contrast_pool) <= config.negatives:
            raise ValueError(f"the contrast pool has {len(contrast_pool)} contexts; need more than "
                             f"responsiveness.negatives={config.negatives}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.pool = list(contrast_pool)
        self.scored_replies = 0
        self.scored_tokens = 0
        self.seconds = 0.0

    def negatives_for(self, reply: str, own_contexts: Sequence[Messages]) -> list[Messages]:
        """The contrast contexts of one reply: seeded by the reply's text, so its score does not depend on
        which other replies are scored with it, and one reply scored after several contexts (a validation's
        true and swapped pairs, a model repeating itself) shares one marginal. Own contexts are left out."""
        rng = random.Random(_stable_seed(self.config.seed, reply))
        own = {tuple(m["content"] for m in context) for context in own_contexts}
        chosen: list[Messages] = []
        for index in rng.sample(range(len(self.pool)), k=len(self.pool)):
            if tuple(m["content"] for m in self.pool[index]) not in own:
                chosen.append(self.pool[index])
                if len(chosen) == self.config.negatives:
                    break
        return chosen

    def score(self, items: Sequence[tuple[Messages, str]]) -> list[float]:
        """PMI in nats for each (context, reply); context ends with the user turn the reply answers."""
        import time

        started = time.perf_counter()
        contexts_by_reply: dict[str, list[Messages]] = {}
        for context, reply in items:
            contexts_by_reply.setdefault(reply, []).append(context)
        negatives = {reply: self.negatives_for(reply, contexts) for reply, contexts in contexts_by_reply.items()}
        pairs = [*items, *((n, reply) for reply, ns in negatives.items() for n in ns)]
        logps = self.log_likelihoods(pairs)
        log_marginal, offset = {}, len(items)
        for reply, ns in negatives.items():
            others = logps[offset: offset + len(ns)]
            offset += len(ns)
            peak = max(others)
            log_marginal[reply] = peak + math.log(sum(math.exp(x - peak) for x in others) / len(others))
        self.scored_replies += len(items)
        self.seconds += time.perf_counter() - started
        return [logps[i] - log_marginal[reply] for i, (_context, reply) in enumerate(items)]

    def _encode(self, context: Messages, reply: str) -> tuple[list[int], int]:
        """Prompt tokens as inference builds them (generation prompt on) + the reply's tokens; -> (ids, reply length).

        The reply is tokenised on its own after the generation prompt, exactly as a model would have
        produced it; its end-of-turn token is not scored (every reply has one, it says nothing about the turn).
        """
        shown = [{"role": m["role"], "content": _tail_words(m["content"], self.config.max_context_words)}
                 for m in context]
        prompt = self.tokenizer.apply_chat_template([{"role": "system", "content": SCORER_SYSTEM_PROMPT}, *shown],
                                                    tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"][: self.config.max_reply_tokens]
        if not reply_ids:  # an empty reply: score its end token instead, so every pair has a number
            reply_ids = [self.tokenizer.eos_token_id]
        return prompt_ids + reply_ids, len(reply_ids)

    def log_likelihoods(self, pairs: Sequence[tuple[Messages, str]]) -> list[float]:
        """log p(reply | context) summed over reply tokens, for every pair, in batched forward passes.

        Rows are left-padded so that every reply ends at the last position; only the last
        (longest reply + 1) positions get logits (`logits_to_keep`), which keeps the
        [rows, kept, vocab] logits small. Rows are sorted by length so batches pad little.
        """
        import torch

        encoded = [self._encode(context, reply) for context, reply in pairs]
        self.scored_tokens += sum(len(ids) for ids, _ in encoded)
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), encoded[i][1]))
        out = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * len(encoded[order[stop]][0]) <= self.config.batch_tokens:
                stop += 1
            batch = [encoded[i] for i in order[start:stop]]
            width = max(len(ids) for ids, _ in batch)
            keep = max(n for _, n in batch) + 1
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch], device=device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                    use_cache=False, logits_to_keep=keep).logits.float()
            # logits[:, j] predicts input_ids[:, width - keep + j + 1]
            targets = input_ids[:, width - keep + 1:]
            token_logps = logits[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits[:, :-1].logsumexp(-1)
            for row, (index, (_, n)) in enumerate(zip(order[start:stop], batch, strict=True)):
                out[index] = float(token_logps[row, keep - 1 - n:].sum())
            start = stop
        return out
