"""Format rules: JSON, bullet lists, quotes, titles, sections, postscripts.

Rewrites that restructure a reply keep its frame: a leading `<<title>>` line and
a trailing `P.S.` paragraph stay where they are, so these rules compose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .base import STAGE_STRUCTURE, STAGE_WRAP, ConstraintType
from .text import FILLERS, WORD_RE, cycle_pick, ends_sentence, sentences, words
from .vocab import POSTSCRIPTS

# Models often write a title or a section header as a markdown heading ("# <<Title>>", "## SECTION 1").
_HEADING = r"(?:#+[ \t]*)?"
_TITLE = re.compile(_HEADING + r"<<([^<>\n]*)>>")
_PS = re.compile(r'(?im)^[ \t]*"?P\.[ \t]?S\.')
# Lines may end in "\r\n" (CRLF): a blank line between two of them is "\r\n\r\n".
_BLANK = re.compile(r"\r?\n[ \t]*\r?\n")
_BULLET = re.compile(r"(?m)^[ \t]*[-*][ \t]+\S")
_SECTION = re.compile(r"(?im)^[ \t]*" + _HEADING + r"SECTION[ \t]+([0-9]+)\b")
# A section header comes before the bare heading mark, so that "## SECTION 1" is removed whole.
_MARKER = re.compile(
    r"^(?:[-*+•][ \t]+|[0-9]+[.)][ \t]+|"
    + _HEADING
    + r"SECTION[ \t]+[0-9]+\b[ \t]*[:.\-–—]?[ \t]*|#+[ \t]*)",
    re.IGNORECASE,
)


def _postscript_start(text: str) -> int | None:
    """Where the postscript of `text` starts: a line of its last paragraph opening with "P.S." and some text after.

    A P.S. need not be set off by a blank line: "Thanks.\nP.S. See you." ends with a postscript too.
    """
    blanks = list(_BLANK.finditer(text))
    last_paragraph = blanks[-1].end() if blanks else 0
    for m in _PS.finditer(text, last_paragraph):
        if WORD_RE.search(text, m.end()):
            return m.start()
    return None


def split_frame(text: str) -> tuple[str, str, str]:
    """(title line or "", body, postscript or "")."""
    text = text.strip()
    head = ""
    first, _, rest = text.partition("\n")
    if _TITLE.fullmatch(first.strip()):
        head, text = first.strip(), rest.strip()
    at = _postscript_start(text)
    if at is None:
        return head, text, ""
    before, last = text[:at], text[at:]
    # A "postscript" holding list items or section headers is body text, or they would be miscounted.
    if before.strip() and not _BULLET.search(last) and not _SECTION.search(last):
        return head, before.strip(), last.strip()
    return head, text, ""


def join_frame(head: str, body: str, tail: str) -> str:
    text = "\n".join(part for part in (head, body) if part)
    return f"{text}\n\n{tail}" if tail and text else (tail or text)


def _units(body: str) -> list[str]:
    """The body's sentences with list and section markers removed, each closed with punctuation."""
    units = []
    for sentence in sentences(body):
        unit = _MARKER.sub("", sentence.strip()).strip()
        if not WORD_RE.search(unit):
            continue
        units.append(unit if ends_sentence(unit) else unit.rstrip(",;:-–— ") + ".")
    return units


def _groups(body: str, n: int) -> list[str]:
    """The body cut into `n` non-empty, contiguous groups of sentences (splitting or padding as needed)."""
    units = _units(body)
    while len(units) < n:
        longest = max(range(len(units)), key=lambda i: len(words(units[i])), default=None)
        spans = list(WORD_RE.finditer(units[longest])) if longest is not None else []
        if len(spans) < 2:
            units.append(FILLERS[len(units) % len(FILLERS)])
            continue
        unit = units[longest]
        cut = spans[len(spans) // 2].start()
        head = unit[:cut].rstrip(" ,;:-–—")
        units[longest : longest + 1] = [head if ends_sentence(head) else head + ".", unit[cut:]]
    size, extra = divmod(len(units), n)
    groups, at = [], 0
    for i in range(n):
        take = size + (1 if i < extra else 0)
        groups.append(" ".join(units[at : at + take]))
        at += take
    return groups


class JsonObject(ConstraintType):
    """The whole reply is one JSON object (a ```json fence around it is allowed)."""

    stage = STAGE_WRAP

    @staticmethod
    def _parse(reply: str) -> Any:
        text = reply.strip()
        fenced = re.fullmatch(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", text, re.DOTALL | re.IGNORECASE)
        if fenced:
            text = fenced.group(1).strip()
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return None

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return isinstance(self._parse(reply), dict), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        # Control characters would come out as \u00XX escapes, i.e. as digits: drop them.
        clean = "".join(ch for ch in reply.strip() if ch >= " " or ch in "\n\t")
        return json.dumps({"reply": clean}, ensure_ascii=False)


class BulletList(ConstraintType):
    """Exactly `n` markdown bullet lines ("- " or "* "); other lines are allowed. Score: closeness of the count."""

    stage = STAGE_STRUCTURE

    def sample_params(self, rng) -> dict[str, Any]:
        return {"n": rng.choice((3, 4, 5))}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        found, n = len(_BULLET.findall(reply)), params["n"]
        return found == n, min(found, n) / max(found, n)

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        head, body, tail = split_frame(reply)
        items = "\n".join(f"- {group}" for group in _groups(body, params["n"]))
        return join_frame(head, items, tail)


class Quoted(ConstraintType):
    """The whole reply is wrapped in straight double quotes."""

    stage = STAGE_WRAP

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        text = reply.strip()
        return len(text) >= 2 and text[0] == '"' and text[-1] == '"', 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return reply if self.check_strict(reply, params)[0] else f'"{reply.strip()}"'


class Title(ConstraintType):
    """The first line is a title in double angular brackets, <<like this>>, with at least one word (after "#"s, if any)."""

    stage = STAGE_STRUCTURE

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        m = _TITLE.fullmatch(reply.strip().partition("\n")[0].strip())
        return bool(m) and WORD_RE.search(m.group(1)) is not None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        _, body, tail = split_frame(reply)  # an empty "<<>>" title is dropped and replaced
        if not WORD_RE.search(body):
            body = cycle_pick(FILLERS, body)
        plain = [w for w in words(body) if not any(c.isdigit() for c in w)][:4]
        title = " ".join(w[:1].upper() + w[1:] for w in plain) or "Reply"
        return join_frame(f"<<{title}>>", body, tail)


class Sections(ConstraintType):
    """Exactly `n` sections headed "SECTION 1" ... "SECTION n" (in order, each with some text; "## SECTION 1" counts)."""

    stage = STAGE_STRUCTURE

    def sample_params(self, rng) -> dict[str, Any]:
        return {"n": rng.choice((2, 3))}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        headers = list(_SECTION.finditer(reply))
        n = params["n"]
        numbers = [int(m.group(1)) if len(m.group(1)) < 6 else 0 for m in headers]
        ends = [m.start() for m in headers[1:]] + [len(reply)] * bool(headers)
        filled = [
            WORD_RE.search(reply, m.end(), end) is not None for m, end in zip(headers, ends, strict=True)
        ]
        ok = numbers == list(range(1, n + 1)) and all(filled)
        # Partial credit: the expected sections present with text, over the larger of wanted and found.
        good = {k for k, full in zip(numbers, filled, strict=True) if full and 1 <= k <= n}
        return ok, len(good) / max(n, len(headers))

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        head, body, tail = split_frame(reply)
        parts = [f"SECTION {i}\n{group}" for i, group in enumerate(_groups(body, params["n"]), start=1)]
        return join_frame(head, "\n\n".join(parts), tail)


class Postscript(ConstraintType):
    """The reply ends with a postscript: a line of its last paragraph starts with "P.S." and some text follows."""

    stage = STAGE_STRUCTURE

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return _postscript_start(reply.strip()) is not None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        note = f"P.S. {cycle_pick(POSTSCRIPTS, reply)}"
        body = reply.strip()
        return f"{body}\n\n{note}" if WORD_RE.search(body) else note
