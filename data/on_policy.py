"""SFT targets in the policy's own voice, by rejection sampling, and the preference pairs it yields.

For every assistant turn of a dialogue window, the policy samples k replies to the
history so far (earlier turns are the targets already chosen, as the SFT row will
hold them). Each sample is judged by the evaluator's verdict: every standing rule
kept (strict) and the dialogue-aware gate passed (not a repeat of an earlier reply,
not an echo of the user, responsive). Then

- sampled: the first passing sample (in draw order) is the target;
- rewritten: no sample passed, so the best failing one (gate passed, fewest rules
  broken) is made compliant with the catalogue's rewrite and judged again; it is the
  target if it passes now;
- dropped: neither worked; the dialogue ends before this round (the builder keeps
  it when enough rounds are left, else sets it aside with the reason).

A turn with a passing and a failing sample gives an on-policy preference pair at
that history: chosen = the target, rejected = the failing sample closest to passing
(a hard negative: it reads like the policy and breaks one rule, or repeats, or echoes).

Sampling and judging are passed in (`SampleFn`, `VerdictFn`) because the data layer
loads no model: `dialogrl data build` wires the rollout engine and the evaluator's
verdict in (`training/data_stage.py`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dialogrl.data import constraints as catalogue
from dialogrl.data.builders import Window
from dialogrl.data.constraints import Constraint

Messages = list[dict[str, str]]
OUTCOMES = ("sampled", "rewritten", "dropped")
NO_RULE = "(no rule yet)"  # rounds before a user-stated rule comes in: only the gate applies


@dataclass(frozen=True)
class Verdict:
    passed: bool  # the evaluator's adherent (or, with no rule standing, the gate alone)
    gate_pass: bool
    rules_broken: tuple[str, ...]  # type names of the standing rules the reply breaks
    reason: str | None  # why it failed: a gate reason code, or "rules"
    score: float | None = None  # responsiveness (PMI, nats), when it was scored


SampleFn = Callable[[Sequence[Messages], int], list[list[str]]]  # histories, k -> k replies per history
VerdictFn = Callable[[Sequence[tuple[Messages, str, Sequence[Constraint]]]], list[Verdict]]


@dataclass
class SampledDialogue:
    window: Window
    messages: Messages
    outcomes: list[str] = field(default_factory=list)  # per kept round: sampled or rewritten
    dropped_at: int | None = None
    drop_reason: str | None = None
    pairs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SamplingCounts:
    """Per rule type and round: how each turn's target was found."""

    by_type: dict[str, dict[int, Counter]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Counter)))
    samples: int = 0
    passed_samples: int = 0
    fail_reasons: Counter = field(default_factory=Counter)

    def add(self, active: Sequence[Constraint], round_number: int, outcome: str) -> None:
        for name in [c.type_name for c in active] or [NO_RULE]:
            self.by_type[name][round_number][outcome] += 1

    def to_dict(self) -> dict[str, Any]:
        totals = Counter()
        for rounds in self.by_type.values():
            for counter in rounds.values():
                totals.update(counter)
        return {
            "samples": self.samples,
            "sample_pass_rate": round(self.passed_samples / self.samples, 4) if self.samples else None,
            "sample_fail_reasons": dict(self.fail_reasons.most_common()),
            "turns_by_rule": {o: totals[o] for o in OUTCOMES},
            "by_type": {name: {str(r): {o: c[o] for o in OUTCOMES} for r, c in sorted(rounds.items())}
                        for name, rounds in sorted(self.by_type.items())},
        }


def _rank(verdict: Verdict) -> tuple:
    """Sort key, best first: passing, then gate passed, then fewest rules broken; ties keep the draw order.

    Among passing samples the first drawn wins, so the target is a draw from the policy given that it
    passes. Ranking by responsiveness instead picked replies that copy the user's words back (they score the
    highest PMI while staying under the echo threshold: 97-111 nats against 20-45 for answers, measured on
    the packaged model).
    """
    return (not verdict.passed, not verdict.gate_pass, len(verdict.rules_broken))


def _pair(window: Window, history: Messages, round_number: int, chosen: str, rejected: str, verdict: Verdict,
          active: Sequence[Constraint]) -> dict[str, Any]:
    return {
        "prompt": [dict(m) for m in history],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "meta": window.meta() | {"turn_index": round_number, "rejected_kind": "on_policy",
                                 "violated": list(verdict.rules_broken), "rejected_gate_reason":
                                 None if verdict.gate_pass else verdict.reason,
                                 "active_constraints": [c.type_name for c in active]},
    }


def sample_dialogues(windows: Sequence[Window], sample: SampleFn, judge: VerdictFn, *, samples_per_turn: int,
                     counts: SamplingCounts, log=print) -> list[SampledDialogue]:
    """Play every window round by round (all windows batched per round); see the module docstring."""
    dialogues = {w.key: SampledDialogue(w, [{"role": "system", "content": w.system_prompt()}]) for w in windows}
    alive = dict(dialogues)
    for r in range(1, max((w.rounds for w in windows), default=0) + 1):
        batch = [d for d in alive.values() if d.window.rounds >= r]
        if not batch:
            break
        histories = [d.messages + [{"role": "user", "content": d.window.user_turn(r)}] for d in batch]
        replies = sample(histories, samples_per_turn)
        verdicts = iter(judge([(h, reply, d.window.active(r))
                               for d, h, k_replies in zip(batch, histories, replies, strict=True)
                               for reply in k_replies]))
        to_rewrite = []
        for d, history, k_replies in zip(batch, histories, replies, strict=True):
            judged = sorted(((reply, next(verdicts)) for reply in k_replies), key=lambda rv: _rank(rv[1]))
            counts.samples += len(judged)
            counts.passed_samples += sum(v.passed for _, v in judged)
            counts.fail_reasons.update(v.reason for _, v in judged if not v.passed)
            passing = [rv for rv in judged if rv[1].passed]
            failing = [rv for rv in judged if not rv[1].passed]
            if passing:
                d.messages = history + [{"role": "assistant", "content": passing[0][0]}]
                d.outcomes.append("sampled")
                counts.add(d.window.active(r), r, "sampled")
                if failing:
                    d.pairs.append(_pair(d.window, history, r, passing[0][0], failing[0][0], failing[0][1],
                                         d.window.active(r)))
                continue
            rewrite = next((text for text in (catalogue.rewrite_all(reply, d.window.active(r)) for reply, _ in judged)
                            if text and text.strip()), None)
            if rewrite is None:
                _drop(d, r, "no sample could be rewritten to keep the rules", alive, counts)
            else:
                to_rewrite.append((d, history, rewrite))
        rewrites = judge([(h, text, d.window.active(r)) for d, h, text in to_rewrite]) if to_rewrite else []
        for (d, history, text), verdict in zip(to_rewrite, rewrites, strict=True):
            if verdict.passed:
                d.messages = history + [{"role": "assistant", "content": text}]
                d.outcomes.append("rewritten")
                counts.add(d.window.active(r), r, "rewritten")
            else:
                _drop(d, r, f"the rewritten reply fails the gate ({verdict.reason})", alive, counts)
        log(f"on-policy sampling: round {r}: {len(batch)} dialogues x {samples_per_turn} samples")
    return list(dialogues.values())


def _drop(dialogue: SampledDialogue, round_number: int, reason: str, alive: dict, counts: SamplingCounts) -> None:
    dialogue.dropped_at, dialogue.drop_reason = round_number, reason
    counts.add(dialogue.window.active(round_number), round_number, "dropped")
    alive.pop(dialogue.window.key)


def sft_row(dialogue: SampledDialogue) -> dict[str, Any]:
    """The dialogue's kept rounds as an SFT row, with how each target was found."""
    kept = len(dialogue.outcomes)
    meta = dialogue.window.meta() | {"rounds": kept, "reply_source": "policy", "target_outcomes": dialogue.outcomes}
    if dialogue.dropped_at:
        meta["cut_at_round"] = dialogue.dropped_at
    return {"messages": dialogue.messages, "meta": meta}
