"""The score of each assistant turn of a played episode, and its parts.

    score = rm_weight * reward model + rule_weight * rule + responsiveness_weight * responsiveness - cut

- rule: the mean score of the rules standing at that round, counted only if the reply passes the
  evaluator's dialogue-aware gate (`verdicts.judge`): not degenerate, not a repeat of an earlier
  reply, not an echo of the user's turn and, with the responsiveness scorer on, responsive. A
  policy rewarded for one compliant sentence said to every turn learns to parrot; through the
  gate that sentence earns nothing.
- responsiveness: min(PMI, threshold) / threshold under the evaluator's fixed scorer, clipped below
  at -1: it saturates once a reply answers its turn as well as the evaluator asks, so nothing is
  gained by copying ever more of the user's words.
- cut: `cut_penalty` when the reply hit max_new_tokens without its end token.

Every part is also summed unweighted, so the log shows which one moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dialogrl.evaluation.evaluate import standing_checks
from dialogrl.evaluation.gate import GateConfig
from dialogrl.evaluation.rollout import Trajectory
from dialogrl.evaluation.scenarios import Scenario
from dialogrl.evaluation.verdicts import DialogueToJudge, judge
from dialogrl.training.ppo_config import PPORecipe

# (scenario, played messages) -> one rule score per assistant reply, in order
RuleScoreFn = Callable[[Scenario, list[dict[str, str]]], list[float]]
PART_NAMES = ("rm", "rule", "responsiveness", "gate_pass", "judged", "cut", "turns")


def judged_turns(scenarios: Sequence[Scenario], dialogues: Sequence[Sequence[dict[str, str]]],
                 responsiveness_scorer=None) -> list[list[dict]]:
    """The evaluator's verdict of every reply of every dialogue, in one batched pass of the scorer.

    Dialogues that share a history (siblings of a turn group) share their earlier replies: the
    scorer scores each distinct (context, reply) once.
    """
    to_judge = [DialogueToJudge(list(messages), _checks_for(scenario))
                for scenario, messages in zip(scenarios, dialogues, strict=True)]
    return judge(to_judge, GateConfig(), responsiveness_scorer)


def _checks_for(scenario: Scenario):
    return lambda round_number, reply: standing_checks(scenario, round_number, reply)


def rule_scores(scenario: Scenario, messages: Sequence[dict[str, str]]) -> list[float]:
    """Per reply of one played dialogue: the gated rule score (no responsiveness scorer)."""
    (turns,) = judged_turns([scenario], [messages])
    return [gated_rule_score(turn) for turn in turns]


def gated_rule_score(turn: dict) -> float:
    if not turn["gate_pass"]:
        return 0.0
    checks = turn["checks"]
    return sum(c["score"] for c in checks) / len(checks) if checks else 1.0


def responsiveness_term(pmi: float, threshold: float) -> float:
    return max(min(pmi, threshold) / threshold, -1.0)


@dataclass
class TurnScores:
    scores: torch.Tensor  # [B, K] weighted turn scores; nan where the turn is absent or not scored
    parts: dict[str, float]  # unweighted sums over the scored turns (PART_NAMES)


class TurnScorer:
    """Scores the turns of played trajectories; `rule_score` replaces the gated rule part (tests use toy rules)."""

    def __init__(self, recipe: PPORecipe, *, reward_model=None, reward_chat=None, responsiveness_scorer=None,
                 rule_score: RuleScoreFn | None = None, batch_size: int = 8):
        self.options = recipe.reward
        self.rounds = recipe.episodes.rounds
        self.reward_model = reward_model if self.options.rm_weight else None
        self.reward_chat = reward_chat
        self.responsiveness_scorer = responsiveness_scorer
        self.rule_score = rule_score
        self.batch_size = batch_size

    def __call__(self, trajectories: Sequence[Trajectory], scenarios: Sequence[Scenario], *,
                 last_turn_only: bool = False) -> TurnScores:
        """Every turn of each trajectory, or with `last_turn_only` its last one (a turn group's sibling)."""
        from dialogrl.training.reward_scoring import score_conversations

        o = self.options
        dialogues = [t.messages for t in trajectories]
        rm = (score_conversations(self.reward_model, self.reward_chat, dialogues,
                                  pad_id=self.reward_chat.tokenizer.pad_token_id, batch_size=self.batch_size)
              if self.reward_model is not None else None)
        judged = None
        if self.responsiveness_scorer is not None or (o.rule_weight and self.rule_score is None):
            judged = judged_turns(scenarios, dialogues, self.responsiveness_scorer)
        scores = torch.full((len(trajectories), self.rounds), float("nan"))
        parts = dict.fromkeys(PART_NAMES, 0.0)
        for row, (trajectory, scenario) in enumerate(zip(trajectories, scenarios, strict=True)):
            played = min(trajectory.rounds, self.rounds)
            custom_rules = self.rule_score(scenario, trajectory.messages) if o.rule_weight and self.rule_score else None
            for k in range(played - 1 if last_turn_only else 0, played):
                score = 0.0
                parts["turns"] += 1
                if judged is not None:
                    parts["gate_pass"] += judged[row][k]["gate_pass"]
                    parts["judged"] += 1
                if rm is not None:
                    score += o.rm_weight * rm[row][k]
                    parts["rm"] += rm[row][k]
                if o.rule_weight:
                    rule = custom_rules[k] if custom_rules is not None else gated_rule_score(judged[row][k])
                    score += o.rule_weight * rule
                    parts["rule"] += rule
                if self.responsiveness_scorer is not None:
                    term = responsiveness_term(judged[row][k]["responsiveness"],
                                               self.responsiveness_scorer.config.threshold)
                    score += o.responsiveness_weight * term
                    parts["responsiveness"] += term
                if not trajectory.ended_properly[k]:
                    score -= o.cut_penalty
                    parts["cut"] += 1
                scores[row, k] = score
        return TurnScores(scores, parts)
