"""Rules about how a reply starts and ends. Phrases compare case-insensitively, so they combine with case rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import STAGE_EDGES, ConstraintType
from .text import append_sentence, cycle_pick, is_shape_line, prepend_phrase, words
from .vocab import END_PHRASES, QUESTIONS, START_WORDS, USER_END_PHRASES


class StartWith(ConstraintType):
    """The reply's first word(s) are `word` (any case), not glued to a longer word ("Indeedy" fails)."""

    stage = STAGE_EDGES

    def sample_params(self, rng) -> dict[str, Any]:
        return {"word": rng.choice(START_WORDS)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        pattern = re.escape(params["word"]) + r"(?![^\W_])"
        return re.match(pattern, reply.lstrip(), re.IGNORECASE) is not None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        body = reply.lstrip()
        if body and is_shape_line(body.split("\n", 1)[0]):
            return f"{params['word']}:\n{body}"  # keep a list or a section header on a line of its own
        return prepend_phrase(body, params["word"])


class EndWith(ConstraintType):
    """The reply ends with `phrase` exactly (any case), trailing whitespace aside."""

    stage = STAGE_EDGES

    def sample_params(self, rng) -> dict[str, Any]:
        return {"phrase": rng.choice(END_PHRASES)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        pattern = r"(?<![^\W_])" + re.escape(params["phrase"]) + r"\Z"
        return re.search(pattern, reply.rstrip(), re.IGNORECASE) is not None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else append_sentence(reply, params["phrase"])


class EndWithQuestion(ConstraintType):
    """The last character (trailing whitespace aside) is a question mark."""

    stage = STAGE_EDGES

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return reply.rstrip().endswith(("?", "？")), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        return append_sentence(reply, cycle_pick(QUESTIONS, reply))


class EndWithWords(ConstraintType):
    """The last words are `phrase` (any case); punctuation or emoji after them is fine ("Cheers!").

    Looser than `EndWith` on purpose: it is what a user means by "end every message with 'cheers'".
    Only whitespace may separate the phrase's words, though: "Take, care." is not "take care".
    """

    stage = STAGE_EDGES

    def sample_params(self, rng) -> dict[str, Any]:
        return {"phrase": rng.choice(USER_END_PHRASES)}

    @staticmethod
    def _pattern(phrase: str) -> re.Pattern[str] | None:
        wanted = words(phrase)
        if not wanted:
            return None
        body = r"\s+".join(map(re.escape, wanted))
        return re.compile(rf"(?<![^\W_]){body}[\W_]*\Z", re.IGNORECASE)

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        pattern = self._pattern(params["phrase"])
        return pattern is None or pattern.search(reply) is not None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        phrase = params["phrase"]
        return append_sentence(reply, phrase[:1].upper() + phrase[1:] + ".")
