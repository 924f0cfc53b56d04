"""Real human dialogue: the chitchat corpus (PyPI package `chitchat-dataset`, MIT).

7,168 conversations between two people. Each conversation is a list of message
groups; a group is one speaker's consecutive messages, and speakers alternate.
Here a group becomes one turn (its messages joined with spaces), the first
speaker plays the user and the second the assistant, whose turns serve as human
reference replies.

The train/eval split is by conversation id, from a hash, so it never changes
between runs or machines and no window of an eval conversation can reach a
training set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

Split = Literal["train", "eval"]
EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class CorpusDialogue:
    """One corpus conversation as alternating turns, user first."""

    conversation_id: str
    split: Split
    turns: tuple[str, ...]  # turns[0] user, turns[1] reply, turns[2] user, ...

    @property
    def user_turns(self) -> tuple[str, ...]:
        return self.turns[0::2]

    @property
    def reply_turns(self) -> tuple[str, ...]:
        return self.turns[1::2]

    @property
    def rounds(self) -> int:
        """Complete user + reply exchanges."""
        return len(self.turns) // 2

    def messages(self, start_round: int = 0, rounds: int | None = None) -> list[dict[str, str]]:
        """Rounds [start_round, start_round + rounds) as user/assistant messages."""
        stop = self.rounds if rounds is None else min(self.rounds, start_round + rounds)
        out = []
        for r in range(start_round, stop):
            out.append({"role": "user", "content": self.turns[2 * r]})
            out.append({"role": "assistant", "content": self.turns[2 * r + 1]})
        return out


def split_of(conversation_id: str, eval_fraction: float = EVAL_FRACTION) -> Split:
    bucket = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") % 10_000
    return "eval" if bucket < eval_fraction * 10_000 else "train"


def _raw_chitchat() -> dict:
    """The corpus file as published: every message with its text, sender id and timestamp (not cached)."""
    return json.loads((resources.files("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _chitchat_texts() -> tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]:
    """Every conversation as (id, message groups of texts), sorted by id: the only fields read here.

    Kept for the whole process (the evaluator reads it for scenarios and for the
    gate's vocabulary), so it holds no sender ids, timestamps or per-message
    dicts: about 25 MB instead of the 140 MB the parsed file takes.
    """
    return tuple(
        (conversation_id, tuple(tuple(str(m.get("text", "")) for m in group) for group in conversation["messages"]))
        for conversation_id, conversation in sorted(_raw_chitchat().items())
    )


def _turns(groups) -> tuple[str, ...]:
    """Message groups (each a list of message dicts or of texts) -> one turn per group."""
    turns = []
    for group in groups:
        text = " ".join(" ".join((str(m.get("text", "")) if isinstance(m, dict) else m).split())
                        for m in group).strip()
        if not text:
            # An empty group would make two turns of one speaker adjacent: end the dialogue before it.
            break
        turns.append(text)
    return tuple(turns)


def load_chitchat(split: Split, *, min_rounds: int = 1) -> list[CorpusDialogue]:
    """Dialogues of one split with at least `min_rounds` complete exchanges, in a fixed order.

    `split` has no default on purpose: every caller says which side it reads.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    dialogues = []
    for conversation_id, groups in _chitchat_texts():
        if split_of(conversation_id) != split:
            continue
        dialogue = CorpusDialogue(conversation_id, split, _turns(groups))
        if dialogue.rounds >= min_rounds:
            dialogues.append(dialogue)
    return dialogues


def chitchat_utterances() -> Iterator[str]:
    """Every message text in the corpus (both splits): word statistics, not training data."""
    for _conversation_id, groups in _chitchat_texts():
        for group in groups:
            yield from group


def chitchat_stats() -> dict[str, int]:
    """How many conversations each split holds and how many are usable (>= 1 exchange)."""
    counts = {"conversations": 0, "train": 0, "eval": 0, "usable_train": 0, "usable_eval": 0}
    for conversation_id, groups in _chitchat_texts():
        split = split_of(conversation_id)
        counts["conversations"] += 1
        counts[split] += 1
        if len(_turns(groups)) >= 2:
            counts[f"usable_{split}"] += 1
    return counts


CORPORA = ("chitchat",)


def corpus_rows(name: str, *, split: str) -> Iterator[tuple[int, dict]]:
    """Rows of a built-in corpus in the `messages` format, for `dialogrl data check corpus:NAME`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)}")
    if split not in ("train", "eval"):
        raise ValueError(f"corpus:{name} has splits 'train' and 'eval', not {split!r}")
    # Conversations where only one person spoke (about 44%) have no exchange and are not rows here;
    # chitchat_stats() counts them.
    for number, dialogue in enumerate(load_chitchat(split, min_rounds=1), start=1):  # type: ignore[arg-type]
        yield number, {"messages": dialogue.messages(), "conversation_id": dialogue.conversation_id}
