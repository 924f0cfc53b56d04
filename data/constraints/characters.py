"""Rules about single characters: letter case, punctuation marks, digits, emoji and markdown symbols.

Behaviour only; the registered types (names, families, phrasings) are in `rules.py`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from .base import STAGE_CASE, STAGE_CHARACTERS, ConstraintType
from .text import (
    LETTER_WORD_RE,
    first_alnum_index,
    is_titlecase,
    sentence_spans,
    to_lowercase,
    to_uppercase,
)

# --------------------------------------------------------------------------- case


def _cased(text: str) -> tuple[int, int, int]:
    """(uppercase letters, lowercase letters, titlecase letters) in `text`."""
    upper = lower = title = 0
    for ch in text:
        if ch.isupper():
            upper += 1
        elif ch.islower():
            lower += 1
        elif is_titlecase(ch):
            title += 1
    return upper, lower, title


class Lowercase(ConstraintType):
    """No uppercase or titlecase letter anywhere. Score: share of cased letters that are lowercase."""

    stage = STAGE_CASE

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        upper, lower, title = _cased(reply)
        cased = upper + lower + title
        return upper + title == 0, (lower / cased if cased else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else to_lowercase(reply)


class Uppercase(ConstraintType):
    """No lowercase or titlecase letter anywhere. Score: share of cased letters that are uppercase."""

    stage = STAGE_CASE

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        upper, lower, title = _cased(reply)
        cased = upper + lower + title
        return lower + title == 0, (upper / cased if cased else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else to_uppercase(reply)


class CapitalisedSentences(ConstraintType):
    """No sentence starts with a lowercase letter (it may start with a digit; uncased scripts pass).

    "Starts" means its first letter or digit, so "- item" and '"quote' are judged by "i" and "q".
    Score: share of sentences that comply.
    """

    stage = STAGE_CASE

    @staticmethod
    def _offenders(reply: str) -> tuple[list[int], int]:
        spans = sentence_spans(reply)
        bad = []
        for start, end in spans:
            i = first_alnum_index(reply, start, end)
            if i is not None and reply[i].islower():
                bad.append(i)
        return bad, len(spans)

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        bad, total = self._offenders(reply)
        return not bad, (1 - len(bad) / total if total else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        # Each round fixes every offending first letter; a letter with no uppercase form
        # ('ĸ') is dropped, which can expose the next letter, hence the bounded loop.
        for _ in range(len(reply) + 1):
            bad, _total = self._offenders(reply)
            if not bad:
                break
            chars = list(reply)
            for i in bad:
                chars[i] = _capital(chars[i])
            reply = "".join(chars)
        return reply


def _capital(ch: str) -> str:
    for candidate in (ch, unicodedata.normalize("NFKC", ch)):
        up = candidate.upper()
        if not any(c.islower() for c in up):
            return up
    return ""


class NoShouting(ConstraintType):
    """No word of two or more letters written entirely in capitals ("OK", "NASA", "STOP")."""

    stage = STAGE_CASE

    @staticmethod
    def _shouting(word: str) -> bool:
        upper, lower, _title = _cased(word)
        return upper >= 2 and lower == 0

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        words = LETTER_WORD_RE.findall(reply)
        loud = sum(1 for w in words if self._shouting(w))
        return loud == 0, (1 - loud / len(words) if words else 1.0)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        def soften(match: re.Match[str]) -> str:
            word = match.group()
            if not self._shouting(word):
                return word
            i = next(k for k, c in enumerate(word) if c.isupper())
            return word[: i + 1] + to_lowercase(word[i + 1 :])

        return LETTER_WORD_RE.sub(soften, reply)


# --------------------------------------------------------------------------- forbidden characters


class NoCharacters(ConstraintType):
    """None of `chars` may appear; `fix` removes them with as little damage as it can."""

    stage = STAGE_CHARACTERS

    def __init__(self, name: str, *, chars: str, fix: Callable[[str], str], **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.chars = frozenset(chars)
        self.fix = fix

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return not any(ch in self.chars for ch in reply), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        fixed = self.fix(reply)
        return "".join(ch for ch in fixed if ch not in self.chars)  # whatever `fix` missed


def drop_commas(text: str) -> str:
    text = re.sub(r"(?<=\d)[,，](?=\d{3})", "", text)  # 1,000 -> 1000
    return re.sub(r"\s*[,，]", "", text)


def calm_exclamations(text: str) -> str:
    text = re.sub(r"(?<=[.?？])[!！]+", "", text)  # "?!" -> "?"
    text = re.sub(r"[!！]+", ".", text)
    return text.replace("¡", "")


def drop_question_marks(text: str) -> str:
    text = re.sub(r"(?<=[.!！])[?？]+", "", text)
    text = re.sub(r"[?？]+", ".", text)
    return text.replace("¿", "")


def drop_dashes(text: str) -> str:
    text = re.sub(r"(?<=\d)\s*[–—]\s*(?=\d)", " to ", text)  # 3–5 -> 3 to 5
    return re.sub(r"\s*[–—]+\s*", ", ", text)


# --------------------------------------------------------------------------- digits

_UNIT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
)
_UNITS = _UNIT_WORDS.split()
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def number_words(n: int) -> str:
    """English words for 0 <= n < 1_000_000 ("twenty-one", "three hundred and five")."""
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens] + (f"-{_UNITS[unit]}" if unit else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_UNITS[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    tail = "" if not rest else (f" and {number_words(rest)}" if rest < 100 else f" {number_words(rest)}")
    return f"{number_words(thousands)} thousand{tail}"


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    stem, dash, unit = last.rpartition("-")
    word = unit if dash else last
    if word in _ORDINAL:
        word = _ORDINAL[word]
    elif word.endswith("y"):
        word = word[:-1] + "ieth"
    else:
        word += "th"
    last = f"{stem}-{word}" if dash else word
    return f"{head} {last}" if head else last


def _digit_value(ch: str) -> int | None:
    return unicodedata.digit(ch, None)


def spell_out_digits(text: str) -> str:
    """Every digit spelled out: "3" -> "three", "1,200" -> "one thousand two hundred", "2nd" -> "second"."""
    text = re.sub(r"(?<![\d,])(\d{1,3}(?:,\d{3})+)(?![\d,])", lambda m: m.group(1).replace(",", ""), text)
    text = re.sub(
        r"(?<![\d.])(\d+)\.(\d+)(?![\d.])", lambda m: f"{m.group(1)} point {' '.join(m.group(2))}", text
    )

    def ordinal(match: re.Match[str]) -> str:
        value = int(match.group(1))
        return _ordinal(number_words(value)) if value < 1_000_000 else match.group(0)

    text = re.sub(r"(?<!\d)(\d{1,6})(?:st|nd|rd|th)\b", ordinal, text)
    out: list[str] = []
    i = 0
    while i < len(text):
        if not text[i].isdigit():
            out.append(text[i])
            i += 1
            continue
        j = i
        while j < len(text) and text[j].isdigit():
            j += 1
        values = [_digit_value(ch) for ch in text[i:j]]
        digits = [v for v in values if v is not None]
        if not digits:
            spoken = ""
        elif len(digits) <= 6 and (digits[0] != 0 or len(digits) == 1):
            spoken = number_words(int("".join(map(str, digits))))
        else:
            spoken = " ".join(_UNITS[d] for d in digits)
        if spoken and out and out[-1][-1:].isalnum():
            spoken = " " + spoken
        if spoken and j < len(text) and text[j].isalnum():
            spoken += " "
        out.append(spoken)
        i = j
    return "".join(out)


class NoDigits(ConstraintType):
    """No digit characters (any script, superscripts included); numbers are written in words."""

    stage = STAGE_CHARACTERS

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return not any(ch.isdigit() for ch in reply), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        return "".join(ch for ch in spell_out_digits(reply) if not ch.isdigit())


# --------------------------------------------------------------------------- emoji and markdown

EMOJI_RE = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B50-\u2B55\u2300-\u23FF]")
_EMOJI_RUN = re.compile(
    r"[ \t]*(?:[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B50-\u2B55\u2300-\u23FF]|\uFE0F|\u200D)+"
)


class NoEmoji(ConstraintType):
    """No emoji or pictographic symbols (the common emoji blocks, dingbats and arrows-and-stars)."""

    stage = STAGE_CHARACTERS

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return EMOJI_RE.search(reply) is None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else _EMOJI_RUN.sub("", reply)


_MARKUP = re.compile(r"[*#`]|__")


class NoMarkdown(ConstraintType):
    """Plain text: no `*`, `#`, backtick, or `__` (a `- ` list is still allowed)."""

    stage = STAGE_CHARACTERS

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return _MARKUP.search(reply) is None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        reply = re.sub(r"(?m)^([ \t]*)\*[ \t]+", r"\1- ", reply)  # "* item" bullets become "- item"
        reply = re.sub(r"(?m)^([ \t]*)#+[ \t]*", r"\1", reply)  # headings lose their hashes
        return re.sub(r"_{2,}", "", re.sub(r"[*#`]", "", reply))
