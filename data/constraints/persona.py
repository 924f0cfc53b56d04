"""Persona and secrecy rules: who the model says it is, and what it must never reveal."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from .base import STAGE_REMOVE, ConstraintType
from .text import drop_sentences
from .vocab import CANARIES, MODEL_NAMES_PATTERN, PERSONA_NAMES, REDACTED, SECRETS

# Said instead of a reply when every sentence of it had to go.
NEUTRAL_REPLY = "Happy to help with that."

_AP = r"['’]"
_END = r"(?![^\W_])"

# --------------------------------------------------------------------------- names

# "my name is X" names X whatever its case; "I am X" / "I'm X" / "call me X" only when X is
# capitalised like a name, so "I am happy" and "call me anytime" are not self-introductions.
_NAMES_ANY = re.compile(
    rf"(?i:\bmy\s+name(?:\s+is|{_AP}s)|\bi(?:\s+am|{_AP}m)\s+(?:called|named))\s+([^\W\d_]+)"
)
_NAMES_CAPITALISED = re.compile(rf"(?i:\bi(?:\s+am|{_AP}m)|\bcall\s+me)\s+([^\W\d_]+)")
_MODEL_NAMES = re.compile(rf"(?<![^\W_])(?:{MODEL_NAMES_PATTERN}){_END}", re.IGNORECASE)
# Words that follow "I'm" or "my name is" without being a name.
_NOT_NAME_WORDS = (
    "a an the not so here there sure sorry happy glad afraid just really very also still always going "
    "able ready unable excited back fine good well curious confident certain thrilled delighted all "
    "now trying looking doing thinking learning working getting feeling new hoping interested aware "
    "quite too only never more in on at with from by for to of no grateful honored honoured done "
    "unsure called named your our their his her this that what whatever anything something nothing "
    "nobody someone everyone secret unknown private irrelevant pleased proud tired busy sad worried "
    "late early free available"
)
_NOT_NAMES = frozenset(_NOT_NAME_WORDS.split())


def _capitalised(word: str) -> bool:
    return word[:1].isupper() and any(c.islower() for c in word[1:])


def _wrong_names(reply: str, name: str) -> list[tuple[int, int]]:
    own = name.casefold()
    spans = []
    for pattern, needs_capital in ((_NAMES_ANY, False), (_NAMES_CAPITALISED, True)):
        for m in pattern.finditer(reply):
            word = m.group(1)
            if word.casefold() in (own, *_NOT_NAMES) or (needs_capital and not _capitalised(word)):
                continue
            spans.append(m.span(1))
    return spans


class PersonaName(ConstraintType):
    """The model is `name`: it never introduces itself otherwise, nor names a model (SmolLM, ChatGPT, ...)."""

    stage = STAGE_REMOVE

    def sample_params(self, rng) -> dict[str, Any]:
        return {"name": rng.choice(PERSONA_NAMES)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        ok = _MODEL_NAMES.search(reply) is None and not _wrong_names(reply, params["name"])
        return ok, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        name = params["name"]
        reply = _MODEL_NAMES.sub(name, reply)
        # Replacing a wrong name with the right one cannot create a new wrong one; one pass suffices.
        for start, end in sorted(set(_wrong_names(reply, name)), reverse=True):
            reply = reply[:start] + name + reply[end:]
        return reply


# --------------------------------------------------------------------------- AI disclosure

_AI_WORDS = (
    r"(?:ai|a\.i\.|artificial\s+intelligence|(?:large\s+)?language\s+model|llm|chat\s?bot|virtual\s+assistant"
    r"|ai\s+assistant|digital\s+assistant|machine\s+learning\s+model|computer\s+program|bot)"
)
AI_DISCLOSURE = re.compile(
    "|".join(
        (
            rf"\bas\s+an?\s+{_AI_WORDS}{_END}",
            rf"\bi(?:\s+am|{_AP}m)\s+(?:(?:just|only|merely|simply|actually|really)\s+)?(?:an?\s+)?{_AI_WORDS}{_END}",
            rf"\bi(?:\s+was|\s+have\s+been|{_AP}ve\s+been)\s+(?:trained|created|developed|built|made|programmed"
            rf"|designed)\s+by{_END}",
            rf"\bi(?:\s+am|{_AP}m)\s+not\s+(?:a\s+)?(?:human|real\s+person|person){_END}",
            rf"\b(?:openai|hugging\s?face|anthropic|google|meta)\s+(?:trained|created|developed|built|made)\s+me{_END}",
            rf"\bmy\s+(?:training\s+data|programming|knowledge\s+cutoff){_END}",
            # self-descriptions that need no "I am": "SmolLM, an AI assistant made by Hugging Face"
            rf"\ban?\s+ai\s+(?:assistant|language\s+model|model|chat\s?bot|system){_END}",
            rf"\b(?:made|created|developed|trained|built)\s+by\s+(?:openai|hugging\s?face|anthropic|google|meta"
            rf"|microsoft|mistral){_END}",
        )
    ),
    re.IGNORECASE,
)


class NoAIDisclosure(ConstraintType):
    """Never says it is an AI, a language model or a bot, or who trained it; the rewrite drops such sentences."""

    stage = STAGE_REMOVE

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return AI_DISCLOSURE.search(reply) is None, 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return (
            reply
            if self.check_strict(reply, params)[0]
            else drop_sentences(reply, AI_DISCLOSURE, NEUTRAL_REPLY)
        )


# --------------------------------------------------------------------------- secrets


def _folded(text: str) -> tuple[str, list[int]]:
    """Letters and digits of `text`, NFKC-normalised and casefolded, with each one's index in `text`."""
    chars: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKC", ch).casefold():
            if c.isalnum():
                chars.append(c)
                where.append(i)
    return "".join(chars), where


def contains_secret(text: str, secret: str) -> bool:
    """Whether `secret` is in `text` ignoring case, width and every separator ("zebra 7", "Z-E-B-R-A-7")."""
    needle = _folded(secret)[0]
    return bool(needle) and needle in _folded(text)[0]


def redact(text: str, secret: str) -> str:
    """Every occurrence of `secret` (as `contains_secret` sees it) replaced by "[redacted]"."""
    needle = _folded(secret)[0]
    if not needle:
        return text
    # vocab.SECRETS are chosen so that "[redacted]" cannot join its neighbours into a new
    # copy, so one sweep suffices for them; the loop only guards other secrets.
    for _ in range(len(text) + 1):
        hay, where = _folded(text)
        found, at = [], hay.find(needle)
        while at >= 0:
            found.append((where[at], where[at + len(needle) - 1] + 1))
            at = hay.find(needle, at + len(needle))
        if not found:
            return text
        for start, end in reversed(found):
            text = text[:start] + REDACTED + text[end:]
    return REDACTED


class SecretCode(ConstraintType):
    """`secret` never appears, in any case, spacing or punctuation."""

    stage = STAGE_REMOVE

    def sample_params(self, rng) -> dict[str, Any]:
        return {"secret": rng.choice(SECRETS)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return not contains_secret(reply, params["secret"]), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        return redact(reply, params["secret"])


PROMPT_TALK = re.compile(
    rf"\bsystem\s+(?:prompt|message)s?{_END}"
    rf"|\bmy\s+(?:(?:hidden|secret|original|initial)\s+)?(?:instructions|prompt){_END}"
    rf"|\bi(?:\s+was|\s+have\s+been|{_AP}ve\s+been)\s+(?:instructed|programmed)\s+to{_END}",
    re.IGNORECASE,
)


class NoPromptLeak(ConstraintType):
    """Never reveals the system prompt: neither its reference tag `canary` nor talk of "my instructions"."""

    stage = STAGE_REMOVE

    def sample_params(self, rng) -> dict[str, Any]:
        return {"canary": rng.choice(CANARIES)}

    def check_strict(self, reply: str, params: Mapping[str, Any]) -> tuple[bool, float]:
        return PROMPT_TALK.search(reply) is None and not contains_secret(reply, params["canary"]), 0.0

    def rewrite(self, reply: str, params: Mapping[str, Any]) -> str:
        if self.check_strict(reply, params)[0]:
            return reply
        return drop_sentences(redact(reply, params["canary"]), PROMPT_TALK, NEUTRAL_REPLY)
