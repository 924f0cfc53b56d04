"""The quality gate: degenerate replies cannot score adherence.

A model can satisfy "no commas" or "lowercase" by saying nothing, or by
looping on one phrase. So every reply is gated first, and adherence counts
only for replies that pass; the pass rate is reported beside adherence.

Checks (all deterministic, offline):
- not empty;
- length within bounds (words);
- not looping: no word 4-gram makes up too much of the reply, and no line
  repeats more than a few times;
- mostly real words: most alphabetic tokens are known English words, taken
  from the chitchat corpus vocabulary (words people actually typed, seen
  at least twice).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from dialogrl.data.options import option

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass
class GateConfig:
    min_words: int = option(1, help="Fewest words a reply may have.")
    max_words: int = option(300, help="Most words a reply may have.")
    max_ngram_share: float = option(
        0.5, help="Largest share of a reply's word 4-grams that one repeated 4-gram may take (looping)."
    )
    max_line_repeats: int = option(3, help="How often one non-empty line may repeat.")
    min_known_word_share: float = option(
        0.6, help="Smallest share of alphabetic words that must be known English words."
    )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str | None  # why it failed, for the report


@lru_cache(maxsize=1)
def known_words() -> frozenset[str]:
    from dialogrl.data.corpora import chitchat_utterances

    counts: Counter = Counter()
    for text in chitchat_utterances():
        counts.update(w.lower() for w in WORD.findall(text))
    return frozenset(w for w, n in counts.items() if n >= 2)


def check_gate(reply: str, config: GateConfig | None = None) -> GateResult:
    config = config or GateConfig()
    text = reply.strip()
    if not text:
        return GateResult(False, "empty")
    words = text.split()
    if len(words) < config.min_words:
        return GateResult(False, f"shorter than {config.min_words} words")
    if len(words) > config.max_words:
        return GateResult(False, f"longer than {config.max_words} words")
    lowered = [w.lower() for w in words]
    grams = [tuple(lowered[i: i + 4]) for i in range(len(lowered) - 3)]
    if len(grams) >= 4:
        (_gram, top), = Counter(grams).most_common(1)
        if top > 1 and top / len(grams) > config.max_ngram_share:
            return GateResult(False, "loops on a repeated phrase")
    lines = Counter(line.strip().lower() for line in text.splitlines() if line.strip())
    if lines and max(lines.values()) > config.max_line_repeats:
        return GateResult(False, "repeats a line")
    alphabetic = [w.lower() for w in WORD.findall(text)]
    if alphabetic:
        vocabulary = known_words()
        share = sum(w in vocabulary for w in alphabetic) / len(alphabetic)
        if share < config.min_known_word_share:
            return GateResult(False, f"only {share:.0%} known words")
    elif not any(ch.isalnum() for ch in text):
        return GateResult(False, "no words")
    return GateResult(True, None)
