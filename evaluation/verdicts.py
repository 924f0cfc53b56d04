"""Per-turn verdicts of a played (or supplied) dialogue: the one place the headline verdict is decided.

Both `dialogrl eval` (dialogues the rollout engine played) and `dialogrl eval score`
(transcripts from anywhere) call `judge`, so the two cannot disagree. A turn is

    adherent  <=>  it passes the whole gate (per-reply checks, not a repeat of an earlier
                   reply, not an echo of the user's turn, responsive under the fixed scorer)
                   AND keeps every rule standing at that round (strict).

Per-turn fields (the `dialogues.jsonl` schema; stable, other tools read them):
  round, adherent (None when no rule stands yet), gate_pass, gate_reason (a code from
  `gate.REASONS`), gate_detail, responsive (None when not scored), responsiveness (PMI,
  nats), checks, and, to show what changed, reply_gate_pass (today's per-reply gate alone),
  repeat, repeat_of, repeat_similarity, echo, echo_share, rules_kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dialogrl.data.constraints import HELD_OUT_TYPES, Constraint
from dialogrl.evaluation.gate import GateConfig, check_dialogue_gate, check_gate, cross_turn
from dialogrl.evaluation.responsiveness import ResponsivenessScorer, context_of

Checks = list[dict[str, Any]]


@dataclass
class DialogueToJudge:
    messages: list[dict[str, str]]  # system (optional) first, then user/assistant alternating
    checks_at: Callable[[int, str], Checks]  # (round, reply) -> the standing rules' checks, as metrics reads them


def rule_checks(constraints: Sequence[Constraint], reply: str, *, held_out: bool | None = None) -> Checks:
    """One check per rule, as metrics reads it. `held_out` None: taken from the catalogue's held-out types."""
    checks = []
    for constraint in constraints:
        verdict = constraint.check(reply)
        unseen = constraint.type_name in HELD_OUT_TYPES if held_out is None else held_out
        checks.append({"type_name": constraint.type_name, "family": constraint.type.family, "held_out": unseen,
                       "strict": verdict.strict, "loose": verdict.loose, "score": verdict.score})
    return checks


def _assistant_indices(messages: Sequence[dict[str, str]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def _user_turn_before(messages: Sequence[dict[str, str]], index: int) -> str:
    return next((m["content"] for m in reversed(messages[:index]) if m["role"] == "user"), "")


def responsiveness_scores(dialogues: Sequence[DialogueToJudge], scorer: ResponsivenessScorer) -> list[list[float]]:
    """PMI of every reply of every dialogue, all in one batched pass of the scorer."""
    items, owners = [], []
    for d, dialogue in enumerate(dialogues):
        for i in _assistant_indices(dialogue.messages):
            items.append((context_of(dialogue.messages, i, scorer.config.context_messages),
                          dialogue.messages[i]["content"]))
            owners.append(d)
    scores = scorer.score(items) if items else []
    out: list[list[float]] = [[] for _ in dialogues]
    for d, score in zip(owners, scores, strict=True):
        out[d].append(score)
    return out


def judge(dialogues: Sequence[DialogueToJudge], gate: GateConfig,
          scorer: ResponsivenessScorer | None = None) -> list[list[dict[str, Any]]]:
    """Per dialogue, per round: the verdict fields listed in the module docstring."""
    scores = responsiveness_scores(dialogues, scorer) if scorer is not None else [None] * len(dialogues)
    return [_judge_one(dialogue, gate, scorer, dialogue_scores)
            for dialogue, dialogue_scores in zip(dialogues, scores, strict=True)]


def _judge_one(dialogue: DialogueToJudge, gate: GateConfig, scorer: ResponsivenessScorer | None,
               scores: list[float] | None) -> list[dict[str, Any]]:
    turns, earlier = [], []
    for r, index in enumerate(_assistant_indices(dialogue.messages), start=1):
        reply = dialogue.messages[index]["content"]
        pmi = None if scores is None else scores[r - 1]
        turns.append(_turn_verdict(r, reply, earlier, _user_turn_before(dialogue.messages, index), pmi, scorer,
                                   gate, dialogue.checks_at(r, reply)))
        earlier.append(reply)
    return turns


def judge_replies(candidates: Sequence[tuple[list[dict[str, str]], str, Sequence[Constraint]]], gate: GateConfig,
                  scorer: ResponsivenessScorer | None = None) -> list[dict[str, Any]]:
    """The verdict of candidate replies, each to a history that ends with the user turn it answers.

    Same verdict as `judge` gives the reply's turn when the dialogue is played with it; the history's
    own replies are not judged again (rejection sampling judges several candidates per history).
    """
    scores = (scorer.score([(context_of(history, len(history), scorer.config.context_messages), reply)
                            for history, reply, _ in candidates])
              if scorer is not None and candidates else [None] * len(candidates))
    verdicts = []
    for (history, reply, constraints), pmi in zip(candidates, scores, strict=True):
        earlier = [m["content"] for m in history if m["role"] == "assistant"]
        verdicts.append(_turn_verdict(len(earlier) + 1, reply, earlier, _user_turn_before(history, len(history)),
                                      pmi, scorer, gate, rule_checks(constraints, reply)))
    return verdicts


def _turn_verdict(round_number: int, reply: str, earlier: Sequence[str], user_turn: str, pmi: float | None,
                  scorer: ResponsivenessScorer | None, gate: GateConfig, checks: Checks) -> dict[str, Any]:
    relation = cross_turn(reply, earlier, user_turn)
    responsive = None if pmi is None or scorer is None else pmi >= scorer.config.threshold
    verdict = check_dialogue_gate(reply, relation, responsive, gate, pmi)
    rules_kept = all(bool(c["strict"]) for c in checks) if checks else None
    return {
        "round": round_number,
        "adherent": None if rules_kept is None else verdict.passed and rules_kept,
        "gate_pass": verdict.passed,
        "gate_reason": verdict.reason,
        "gate_detail": verdict.detail,
        "responsive": responsive,
        "responsiveness": None if pmi is None else round(pmi, 4),
        "checks": checks,
        "reply_gate_pass": check_gate(reply, gate).passed,
        "repeat": relation.repeat_of is not None and relation.repeat_similarity >= gate.max_repeat_similarity,
        "repeat_of": relation.repeat_of,
        "repeat_similarity": round(relation.repeat_similarity, 4),
        "echo": relation.echo_share >= gate.max_echo_share,
        "echo_share": round(relation.echo_share, 4),
        "rules_kept": rules_kept,
    }
