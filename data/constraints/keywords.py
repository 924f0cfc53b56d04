"""Word-level rules: required, counted and forbidden words (also a persona's catchphrase, a user's name, meat words).

Words match whole and case-insensitively ("River" counts for "river", "rivers" does not).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import STAGE_ADD, STAGE_REMOVE, ConstraintType
from .text import append_sentence, normalised_words, prepend_phrase, whole_word
from .vocab import CATCHPHRASES, FORBIDDEN_WORDS, MEAT_WORDS, MENTION_TEMPLATES, REQUIRED_WORDS, USER_NAMES


def _mention(word: str, i: int) -> str:
    return MENTION_TEMPLATES[i % len(MENTION_TEMPLATES)].format(w=word)


def _same_case(replacement: str, original: str) -> str:
    """`replacement` in the case pattern of `original` (VERY -> QUITE, Very -> Quite)."""
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


class IncludeWords(ConstraintType):
    """Every one of the `count` sampled words appears. Score: share of them present."""

    stage = STAGE_ADD

    def __init__(self, name: str, *, count: int, **kwargs: Any) -> None:
        self.count = count
        super().__init__(name, **kwargs)

    def _words(self, params: Mapping[str, Any]) -> list[str]:
        return [params["word"]] if self.count == 1 else [params[f"word{i + 1}"] for i in range(self.count)]

    def sample_params(self, rng) -> dict[str, Any]:
        chosen = rng.sample(REQUIRED_WORDS, self.count)
        return {"word": chosen[0]} if self.count == 1 else {f"word{i + 1}": w for i, w in enumerate(chosen)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        wanted = self._words(params)
        present = sum(1 for w in wanted if whole_word(w).search(reply))
        return present == len(wanted), present / len(wanted)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        missing = [w for w in self._words(params) if not whole_word(w).search(reply)]
        if not missing:
            return reply
        word = " and ".join(missing)
        return append_sentence(reply, _mention(word, len(reply)))


class KeywordFrequency(ConstraintType):
    """`word` appears at least `n` times. Score: occurrences / n."""

    stage = STAGE_ADD

    def sample_params(self, rng) -> dict[str, Any]:
        return {"word": rng.choice(REQUIRED_WORDS), "n": rng.choice((2, 3))}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        found = len(whole_word(params["word"]).findall(reply))
        return found >= params["n"], min(1.0, found / params["n"])

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        found = len(whole_word(params["word"]).findall(reply))
        if found >= params["n"]:
            return reply
        # One sentence for all missing mentions, so a sentence budget is not used up.
        word = " after ".join([params["word"]] * (params["n"] - found))
        return append_sentence(reply, _mention(word, len(reply)))


class ForbidWord(ConstraintType):
    """`word` never appears; the rewrite swaps in a neutral synonym."""

    stage = STAGE_REMOVE

    def sample_params(self, rng) -> dict[str, Any]:
        return {"word": rng.choice(sorted(FORBIDDEN_WORDS))}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return whole_word(params["word"]).search(reply) is None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        synonym = FORBIDDEN_WORDS.get(params["word"].casefold(), "")
        return whole_word(params["word"]).sub(lambda m: _same_case(synonym, m.group()), reply)


class Catchphrase(ConstraintType):
    """A persona's catchphrase appears (as a word sequence, any case, punctuation ignored)."""

    stage = STAGE_ADD

    def sample_params(self, rng) -> dict[str, Any]:
        character, phrase = rng.choice(CATCHPHRASES)
        return {"character": character, "phrase": phrase}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return normalised_words(params["phrase"]) in normalised_words(reply), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        phrase = params["phrase"]
        return append_sentence(reply, phrase[:1].upper() + phrase[1:] + ".")


class AddressUser(ConstraintType):
    """The user's chosen name appears in the reply."""

    stage = STAGE_ADD

    def sample_params(self, rng) -> dict[str, Any]:
        return {"name": rng.choice(USER_NAMES)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return whole_word(params["name"]).search(reply) is not None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else prepend_phrase(reply, params["name"])


_MEAT = re.compile(
    r"(?<![^\W_])(?:" + "|".join(sorted(map(re.escape, MEAT_WORDS), key=len, reverse=True)) + r")(?![^\W_])",
    re.IGNORECASE,
)


class NoMeat(ConstraintType):
    """No meat or fish word (vocab.MEAT_WORDS); the rewrite swaps in plant-based foods."""

    stage = STAGE_REMOVE

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return _MEAT.search(reply) is None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        # No swap is itself a meat word, so one pass is enough.
        return _MEAT.sub(lambda m: _same_case(MEAT_WORDS.get(m.group().casefold(), "tofu"), m.group()), reply)
