"""Text helpers shared by the checkers and rewrites: words, sentences, case mapping, small edits.

Every checker counts words and sentences through these functions, so two rules
never disagree on what a sentence is. The definitions are simple and
deterministic rather than linguistically exact:

- a word is a run of letters/digits, with inner apostrophes ("don't" is one word,
  "well-known" two);
- a sentence is a stretch of a line ending at `.`, `!`, `?` (or their CJK and
  ellipsis forms) followed by whitespace, or at the end of the line; pieces
  without a word are not sentences. "P.S." never ends a sentence.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
LETTER_WORD_RE = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"(?<![Pp]\.[Ss])[.!?。！？…]+[\"'”’)\]]*(?=\s|$)")
_LINE = re.compile(r"[^\n]+")
_CLOSED = re.compile(r"[.!?。！？…][\"'”’)\]]*$")

# Generic sentences for padding (minimum lengths, list items). They are checked against
# every word list in vocab.py by the tests, so padding can never break another rule:
# no digits, commas, dashes, '!' or '?', no forbidden, required or meat words, no names.
FILLERS: tuple[str, ...] = (
    "Here is a little more detail on that.",
    "I hope this is useful to you.",
    "Let me know if you want more.",
    "There is more to say on this topic.",
    "That covers the main points.",
    "Thanks for asking about this.",
)

# Sentence openers that read wrongly once something is put in front of them ("Sam, The ...").
_OPENER_WORDS = (
    "the this that these those it its there here yes no sure well of a an you your we our my what how "
    "why when where which who thanks thank hello hi hey good great oh so and but if in on at for to "
    "as let please okay ok maybe perhaps actually honestly"
)
_COMMON_OPENERS = frozenset(_OPENER_WORDS.split())


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def word_count(text: str) -> int:
    return sum(1 for _ in WORD_RE.finditer(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence, start at its first non-space character."""
    pieces: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        start = line.start()
        for end in _SENTENCE_END.finditer(text, line.start(), line.end()):
            pieces.append((start, end.end()))
            start = end.end()
        pieces.append((start, line.end()))
    spans = []
    for start, end in pieces:
        piece = text[start:end]
        if WORD_RE.search(piece):
            spans.append((start + len(piece) - len(piece.lstrip()), end))
    return spans


def sentences(text: str) -> list[str]:
    return [text[s:e] for s, e in sentence_spans(text)]


def sentence_count(text: str) -> int:
    return len(sentence_spans(text))


def ends_sentence(text: str) -> bool:
    """Whether `text` (right-stripped) already ends with sentence punctuation."""
    return bool(_CLOSED.search(text.rstrip()))


def append_sentence(text: str, sentence: str) -> str:
    """`text` followed by `sentence`, closing the last sentence of `text` first if it is open."""
    body = text.rstrip()
    if not body.strip():
        return sentence
    if not ends_sentence(body):
        body = body.rstrip(",;:-–— \t") + "."
    return f"{body} {sentence}"


def prepend_phrase(text: str, phrase: str) -> str:
    """`phrase, text`, lowercasing a common opener of `text` ("Sam, the weather ...")."""
    body = text.lstrip()
    if not body:
        return f"{phrase}."
    first = WORD_RE.match(body)
    if (
        first
        and first.group().casefold() in _COMMON_OPENERS
        and first.group()[:1].isupper()
        and (first.group()[1:].islower() or len(first.group()) == 1)
    ):
        body = body[:1].lower() + body[1:]
    return f"{phrase}, {body}"


def whole_word(word: str) -> re.Pattern[str]:
    """A case-insensitive pattern for `word` (or phrase) not glued to other letters or digits."""
    return re.compile(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", re.IGNORECASE)


def normalised_words(text: str) -> str:
    """Casefolded words joined by single spaces, padded with a space on each side (for phrase search)."""
    return " " + " ".join(w.casefold() for w in words(text)) + " "


def is_shape_line(line: str) -> bool:
    """A line that is markup rather than prose: a bullet, a heading, a title, a section header."""
    stripped = line.strip()
    return bool(re.match(r"(?:[-*+]\s|#|<<|SECTION\s+\d)", stripped, re.IGNORECASE))


# --------------------------------------------------------------------------- case


def is_titlecase(ch: str) -> bool:
    """A titlecase letter ('ǅ', 'ᾼ'): neither upper nor lower case, so it breaks both all-lowercase and all-caps."""
    return unicodedata.category(ch) == "Lt"


def _is_cased(ch: str) -> bool:
    return ch.isupper() or ch.islower() or is_titlecase(ch)


def _breaks_lowercase(ch: str) -> bool:
    return ch.isupper() or is_titlecase(ch)


def _breaks_uppercase(ch: str) -> bool:
    return ch.islower() or is_titlecase(ch)


def _mapped(ch: str, lower: bool) -> str:
    """`ch` lowercased (or uppercased); "" if no mapping gets rid of the other cases (e.g. 'ª', 'ℂ' -> 'c')."""
    wrong = _breaks_lowercase if lower else _breaks_uppercase
    for candidate in (ch, unicodedata.normalize("NFKC", ch)):
        out = candidate.lower() if lower else candidate.upper()
        if not any(wrong(c) for c in out):
            return out
    return ""


def to_lowercase(text: str) -> str:
    return "".join(_mapped(ch, True) if _is_cased(ch) else ch for ch in text)


def to_uppercase(text: str) -> str:
    return "".join(_mapped(ch, False) if _is_cased(ch) else ch for ch in text)


def first_alnum_index(text: str, start: int = 0, end: int | None = None) -> int | None:
    """Index of the first letter or digit in text[start:end]."""
    end = len(text) if end is None else end
    for i in range(start, end):
        if text[i].isalnum():
            return i
    return None


# --------------------------------------------------------------------------- edits


def drop_sentences(text: str, offending: re.Pattern[str], fallback: str) -> str:
    """`text` without the sentences matching `offending`; `fallback` if nothing is left."""
    for _ in range(len(text) + 1):
        spans = [(s, e) for s, e in sentence_spans(text) if offending.search(text[s:e])]
        if not spans:
            break
        out, last = [], 0
        for start, end in spans:
            out.append(text[last:start])
            last = end
        out.append(text[last:])
        text = re.sub(r"[ \t]{2,}", " ", "".join(out)).strip()
    if offending.search(text):  # a match straddling two sentences: cut the match itself
        text = replace_all(text, offending, "")
    return text if word_count(text) else fallback


def replace_all(text: str, pattern: re.Pattern[str], replacement: str, limit: int = 10_000) -> str:
    """Replace matches until none is left (a replacement must not recreate one; bounded anyway)."""
    for _ in range(limit):
        new = pattern.sub(replacement, text)
        if new == text:
            return new
        text = new
    return text


def cycle_pick(options: Iterable[str], key: str) -> str:
    """A deterministic choice that varies with the text (rewrites must not depend on a global rng)."""
    opts = list(options)
    return opts[sum(map(ord, key)) % len(opts)]
