"""Length rules: word and sentence budgets. Scores give partial credit for near misses."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import STAGE_LENGTH, ConstraintType
from .text import FILLERS, WORD_RE, append_sentence, cycle_pick, sentence_spans, word_count


def truncate_words(text: str, n: int) -> str:
    """The longest prefix of `text` with at most `n` words, cut at a sentence end when that keeps half of them."""
    spans = list(WORD_RE.finditer(text))
    if len(spans) <= n:
        return text
    if n <= 0:
        return ""
    next_word = spans[n].start()
    ends = [end for _, end in sentence_spans(text) if end <= next_word]
    if ends and word_count(text[: ends[-1]]) >= max(1, n // 2):
        return text[: ends[-1]].rstrip()
    return text[: spans[n - 1].end()] + "."


class _Budget(ConstraintType):
    """A rule with an integer budget `n` that other rules' insertions can overrun (see `tighten`)."""

    stage = STAGE_LENGTH
    choices: tuple[int, ...] = ()

    def sample_params(self, rng) -> dict[str, Any]:
        return {"n": rng.choice(self.choices)}

    def measure(self, reply: str) -> int:
        raise NotImplementedError

    def tighten(
        self, working: Mapping[str, Any], params: Mapping[str, Any], composed: str
    ) -> dict[str, Any] | None:
        # A ceiling overrun by k shrinks the working budget by k; a floor missed by k raises it by k.
        # At least a tenth of the budget moves each time: a truncation that prefers sentence ends
        # keeps the same cut under a budget one word smaller, and attempts are few.
        miss = self.measure(composed) - params["n"]
        step = max(abs(miss), 1 + working["n"] // 10)
        n = working["n"] - step if miss > 0 else working["n"] + step
        if n < 1 or n == working["n"]:
            return None
        return {**working, "n": n}


class MaxWords(_Budget):
    """At most `n` words. Score: n / words."""

    choices = (25, 40, 60, 80)

    def __init__(self, name: str, *, choices: tuple[int, ...] | None = None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if choices:
            self.choices = choices

    def measure(self, reply: str) -> int:
        return word_count(reply)

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        count = word_count(reply)
        return count <= params["n"], (min(1.0, params["n"] / count) if count else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else truncate_words(reply, params["n"])


class MinWords(_Budget):
    """At least `n` words; the rewrite pads with generic sentences. Score: words / n."""

    choices = (20, 35, 50)

    def measure(self, reply: str) -> int:
        return word_count(reply)

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        count = word_count(reply)
        return count >= params["n"], min(1.0, count / params["n"])

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        start = FILLERS.index(cycle_pick(FILLERS, reply))
        i = 0
        while word_count(reply) < params["n"]:
            reply = append_sentence(reply, FILLERS[(start + i) % len(FILLERS)])
            i += 1
        return reply


class MaxSentences(_Budget):
    """At most `n` sentences (see text.py for what a sentence is). Score: n / sentences."""

    choices = (2, 3, 4)

    def measure(self, reply: str) -> int:
        return len(sentence_spans(reply))

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        count = len(sentence_spans(reply))
        return count <= params["n"], (min(1.0, params["n"] / count) if count else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        spans = sentence_spans(reply)
        if len(spans) <= params["n"]:
            return reply
        return reply[: spans[params["n"] - 1][1]].rstrip()


class MaxWordsPerSentence(_Budget):
    """No sentence longer than `n` words. Score: share of sentences within the limit."""

    choices = (10, 12, 15)

    def measure(self, reply: str) -> int:
        return max((word_count(reply[s:e]) for s, e in sentence_spans(reply)), default=0)

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        spans = sentence_spans(reply)
        ok = sum(1 for s, e in spans if word_count(reply[s:e]) <= params["n"])
        return ok == len(spans), (ok / len(spans) if spans else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        n = params["n"]
        # One sweep splits every long sentence; a split right after "P.S." does not end a
        # sentence, so a second sweep uses line breaks, which always do.
        for breaker in (". ", ".\n"):
            long = [(s, e) for s, e in sentence_spans(reply) if word_count(reply[s:e]) > n]
            for start, end in reversed(long):
                reply = reply[:start] + _split_sentence(reply[start:end], n, breaker) + reply[end:]
        return reply


def _split_sentence(sentence: str, n: int, breaker: str) -> str:
    """`sentence` cut into pieces of at most `n` words, preferring cuts where a comma or dash already pauses."""
    spans = list(WORD_RE.finditer(sentence))
    cuts, at = [], 0
    while len(spans) - at > n:
        k = next(
            (
                k
                for k in range(at + n, at + max(1, n // 2) - 1, -1)
                if re.search(r"[,;:—–-]", sentence[spans[k - 1].end() : spans[k].start()])
            ),
            at + n,
        )
        cuts.append(k)
        at = k
    pieces, last = [], 0
    for k in cuts:
        pieces.append(sentence[last : spans[k - 1].end()] + breaker)
        resume = spans[k].start()
        upper = sentence[resume].upper()
        if len(upper) == 1 and not upper.islower():  # the new sentence starts with a capital
            pieces.append(upper)
            resume += 1
        last = resume
    pieces.append(sentence[last:])
    return "".join(pieces)
