"""The quality gate: degenerate or parroted replies cannot score adherence.

A model can satisfy "no commas" or "lowercase" by saying nothing, by looping on
one phrase, or by repeating one compliant sentence to every user turn. So every
reply is gated first, and adherence counts only for replies that pass; the pass
rate is reported beside adherence.

Per-reply checks (`check_gate`; deterministic, offline):
- not empty;
- length within bounds (words);
- not looping: no word 4-gram makes up too much of the reply, no line
  repeats more than a few times, and no sentence is said more than twice
  ("I'm glad to hear that." six times in a row has many distinct 4-grams, so
  the 4-gram check alone misses it; of the corpus eval split's 6,436 human
  replies none says a sentence three times, 5 say one twice);
- mostly real words: most alphabetic tokens are known English words, taken
  from the chitchat corpus vocabulary (words people actually typed, seen
  at least twice).

Dialogue-aware checks (`check_dialogue_gate`), which need the history:
- repeat: the reply is the same as, or nearly the same as, an earlier reply of
  the same dialogue. "Nearly" is word-sequence similarity 2M / (|a| + |b|),
  M = words in the longest matching blocks (difflib), over lowercased words
  with punctuation dropped: 1.0 for the same words in the same order, so
  "I'm not sure." vs "I'm not sure, sorry." is 0.89. Symmetric on purpose: a
  reply that takes an earlier sentence and adds as much again is new text.
  Contractions are spelled out before comparing ("how's" -> "how is",
  "don't" -> "do not"), so "How's it going?" to "How is it going?" is an echo.
- echo: most of the reply's words are the user's last turn played back, in
  order: M / |reply| against that turn ("do you like pizza?" -> "you like
  pizza?" is 1.0, "yes, I like pizza" 0.5).
- responsiveness (a fixed scorer model's contrastive PMI, `responsiveness.py`),
  applied by the caller because it needs a model.
Both thresholds (0.8) were set on human dialogues of the corpus eval split so
that people rarely trip them (`dialogrl eval validate-scorer` prints the rates).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from dialogrl.data.options import option

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+|\n")


@dataclass
class GateConfig:
    min_words: int = option(1, help="Fewest words a reply may have.")
    max_words: int = option(300, help="Most words a reply may have.")
    max_ngram_share: float = option(
        0.5, help="Largest share of a reply's word 4-grams that one repeated 4-gram may take (looping)."
    )
    max_line_repeats: int = option(3, help="How often one non-empty line may repeat.")
    max_sentence_repeats: int = option(
        2, help="How often one sentence (lowercased words, split at . ! ? and line ends) may occur in a reply."
    )
    min_known_word_share: float = option(
        0.6, help="Smallest share of alphabetic words that must be known English words."
    )
    max_repeat_similarity: float = option(
        0.8, help="A reply at least this similar (word-sequence similarity, 0-1) to an earlier reply of the "
        "dialogue is a repeat."
    )
    max_echo_share: float = option(
        0.8, help="A reply whose words are at least this share the user's last turn, in order, is an echo."
    )


# Short codes for `gate_reason` (stable: reports and filters use them); `detail` says it in words.
REASONS = ("empty", "too_short", "too_long", "loops", "repeated_line", "repeated_sentence", "unknown_words",
           "no_words", "repeat", "echo", "unresponsive")


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str | None = None  # one of REASONS when it failed
    detail: str | None = None  # the reason in words, for the report


def _fail(reason: str, detail: str) -> GateResult:
    return GateResult(False, reason, detail)


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
        return _fail("empty", "empty reply")
    words = text.split()
    if len(words) < config.min_words:
        return _fail("too_short", f"shorter than {config.min_words} words")
    if len(words) > config.max_words:
        return _fail("too_long", f"longer than {config.max_words} words")
    lowered = [w.lower() for w in words]
    grams = [tuple(lowered[i: i + 4]) for i in range(len(lowered) - 3)]
    if len(grams) >= 4:
        (_gram, top), = Counter(grams).most_common(1)
        if top > 1 and top / len(grams) > config.max_ngram_share:
            return _fail("loops", "loops on a repeated phrase")
    lines = Counter(line.strip().lower() for line in text.splitlines() if line.strip())
    if lines and max(lines.values()) > config.max_line_repeats:
        return _fail("repeated_line", "repeats a line")
    sentences = Counter(" ".join(_TOKEN.findall(sentence.lower())) for sentence in _SENTENCE_END.split(text))
    sentences.pop("", None)
    if sentences and max(sentences.values()) > config.max_sentence_repeats:
        sentence, times = sentences.most_common(1)[0]
        return _fail("repeated_sentence", f"says {sentence!r} {times} times")
    alphabetic = [w.lower() for w in WORD.findall(text)]
    if alphabetic:
        vocabulary = known_words()
        share = sum(w in vocabulary for w in alphabetic) / len(alphabetic)
        if share < config.min_known_word_share:
            return _fail("unknown_words", f"only {share:.0%} known words")
    elif not any(ch.isalnum() for ch in text):
        return _fail("no_words", "no words")
    return GateResult(True)


# --------------------------------------------------------------------------- dialogue-aware

# Spelled out so a contraction cannot hide a replay. "'s" and "'d" are ambiguous (is/has, would/had,
# possessive); one fixed reading serves, because both sides of a comparison get the same one.
_IRREGULAR = {"won't": ["will", "not"], "can't": ["cannot"], "shan't": ["shall", "not"],
              "ain't": ["am", "not"], "let's": ["let", "us"]}
_SUFFIXES = (("n't", ["not"]), ("'re", ["are"]), ("'ve", ["have"]), ("'ll", ["will"]), ("'m", ["am"]),
             ("'d", ["would"]), ("'s", ["is"]))


def _spelled_out(word: str) -> list[str]:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix, expansion in _SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix):
            return [word[: -len(suffix)], *expansion]
    return [word]


def _words(text: str) -> list[str]:
    """Lowercased words, contractions spelled out, punctuation dropped; a reply of symbols only keeps its
    symbols as one token."""
    words = [part for word in _TOKEN.findall(text.lower().replace("\u2019", "'")) for part in _spelled_out(word)]
    return words or ([text.strip()] if text.strip() else [])


def _matched(a: list[str], b: list[str]) -> int:
    return sum(block.size for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())


def repeat_similarity(reply: str, earlier: str) -> float:
    """2M / (|a| + |b|) over words: 1.0 for the same words in the same order, 0.0 for nothing shared."""
    a, b = _words(reply), _words(earlier)
    return 2 * _matched(a, b) / (len(a) + len(b)) if a and b else 0.0


def echo_share(reply: str, user_turn: str) -> float:
    """Share of the reply's words that replay the user's turn in order (M / |reply|)."""
    a, b = _words(reply), _words(user_turn)
    return _matched(a, b) / len(a) if a and b else 0.0


@dataclass(frozen=True)
class CrossTurn:
    """How one reply relates to its dialogue: the closest earlier reply and the echo of the user's turn."""

    repeat_of: int | None  # round of the most similar earlier reply (1-based), None in round 1
    repeat_similarity: float
    echo_share: float


def cross_turn(reply: str, earlier_replies: Sequence[str], user_turn: str) -> CrossTurn:
    similarities = [repeat_similarity(reply, e) for e in earlier_replies]
    best = max(range(len(similarities)), key=similarities.__getitem__, default=None)
    return CrossTurn(None if best is None else best + 1, similarities[best] if best is not None else 0.0,
                     echo_share(reply, user_turn))


def check_dialogue_gate(reply: str, relation: CrossTurn, responsive: bool | None,
                        config: GateConfig | None = None, responsiveness: float | None = None) -> GateResult:
    """The whole gate: per-reply checks, then repeat, echo and responsiveness (None = not scored)."""
    config = config or GateConfig()
    per_reply = check_gate(reply, config)
    if not per_reply.passed:
        return per_reply
    if relation.repeat_of is not None and relation.repeat_similarity >= config.max_repeat_similarity:
        return _fail("repeat", f"repeats round {relation.repeat_of} (similarity {relation.repeat_similarity:.2f})")
    if relation.echo_share >= config.max_echo_share:
        return _fail("echo", f"echoes the user's turn ({relation.echo_share:.0%} of its words)")
    if responsive is False:
        shown = "" if responsiveness is None else f" (PMI {responsiveness:.2f} nats)"
        return _fail("unresponsive", f"does not take up the user's turn{shown}")
    return GateResult(True)
