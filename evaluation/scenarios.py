"""Evaluation scenarios: held-out human dialogues, each with rules to keep for R rounds.

Every scenario comes from the corpus's eval split (never seen in training),
uses the catalogue's eval phrasings, and draws its rule types either from the
seen types or from the held-out ones, so the report can tell learned rules
from general adherence. Some rules are stated by the user in a turn instead
of the system prompt. The same seed always gives the same scenarios.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from dialogrl.data import constraints as catalogue
from dialogrl.data.builders import BASE_SYSTEM_PROMPT
from dialogrl.data.constraints import Constraint
from dialogrl.data.corpora import load_chitchat
from dialogrl.data.options import option


@dataclass
class ScenarioConfig:
    dialogues: int = option(64, help="Dialogues per model.")
    rounds: int = option(8, help="User turns (and replies) per dialogue.")
    seed: int = option(0, help="Seed for picking dialogues, rules and sampling; same seed, same report.")
    user_source: Literal["replay", "simulated"] = option(
        "replay", help="replay: the human's turns from the corpus eval split; simulated: the model plays the user."
    )
    unseen_fraction: float = option(0.5, help="Share of dialogues whose rules are all held-out (unseen) types.")
    min_constraints: int = option(1, help="Fewest rules per dialogue.")
    max_constraints: int = option(2, help="Most rules per dialogue.")
    user_rule_fraction: float = option(0.25, help="Share of dialogues where one rule is stated by the user in a turn.")
    max_intro_round: int = option(2, help="Latest round at which a user-stated rule is introduced.")
    pressure: dict[int, str] = option(
        default_factory=dict,
        help="Round -> pressure turn that replaces the user's turn: drop_rule, topic_change or long_paste.",
    )
    probe_rounds: list[int] = option(
        default_factory=list,
        help="Rounds after which the history is forked and a fixed probe question asked; the answer is scored "
        "against the standing rules and never enters the dialogue (as in Li et al. 2024).",
    )

    def __post_init__(self) -> None:
        if self.dialogues < 1 or self.rounds < 1:
            raise ValueError("dialogues and rounds must be >= 1")
        if not 0 <= self.unseen_fraction <= 1 or not 0 <= self.user_rule_fraction <= 1:
            raise ValueError("unseen_fraction and user_rule_fraction must be in [0, 1]")
        if not 1 <= self.min_constraints <= self.max_constraints:
            raise ValueError("need 1 <= min_constraints <= max_constraints")
        bad_rounds = [r for r in [*self.pressure, *self.probe_rounds] if not 1 <= r <= self.rounds]
        if bad_rounds:
            raise ValueError(f"pressure or probe rounds {bad_rounds} are outside 1..{self.rounds}")


@dataclass
class Scenario:
    dialogue_id: str
    user_turns: list[str]
    constraints: list[Constraint]
    intro_round: list[int]  # per constraint: the round from which it is in force
    unseen: bool
    long_text: str = ""
    pressure: dict[int, str] = field(default_factory=dict)

    def system_prompt(self) -> str:
        rules = [c.instruction for c in self.constraints if c.type.introduced_by == "system"]
        return " ".join([BASE_SYSTEM_PROMPT, *rules])

    def standing(self, round_number: int) -> list[Constraint]:
        return [c for c, r in zip(self.constraints, self.intro_round, strict=True) if r <= round_number]

    def stated_by_user(self) -> dict[int, str]:
        """Round -> the rules the user states at the start of that turn."""
        stated: dict[int, list[str]] = {}
        for c, r in zip(self.constraints, self.intro_round, strict=True):
            if c.type.introduced_by == "user":
                stated.setdefault(r, []).append(c.instruction)
        return {r: " ".join(texts) for r, texts in stated.items()}

    def to_dict(self) -> dict:
        return {
            "dialogue_id": self.dialogue_id,
            "unseen": self.unseen,
            "constraints": [c.to_dict() for c in self.constraints],
            "intro_round": self.intro_round,
            "pressure": {str(k): v for k, v in self.pressure.items()},
        }


def build_scenarios(config: ScenarioConfig, split: Literal["eval", "train"] = "eval") -> list[Scenario]:
    """Dialogues with rules. `eval`: held-out dialogues, eval phrasings, seen and unseen types.

    `train` (PPO episodes): training dialogues, training phrasings, seen types only, so
    the evaluator's dialogues, phrasings and held-out types stay unseen in training.
    """
    rng = random.Random(config.seed)
    pool = [d for d in load_chitchat(split) if len(d.user_turns) >= config.rounds]
    if not pool:
        raise ValueError(f"no {split} dialogue has {config.rounds} user turns; lower rounds")
    rng.shuffle(pool)
    long_texts = [d.reply_turns[0] for d in pool if len(d.reply_turns[0].split()) > 40] or ["(no long text)"]
    scenarios = []
    for i in range(config.dialogues):
        dialogue = pool[i % len(pool)]  # with more dialogues than the pool, dialogues repeat with other rules
        unseen = split == "eval" and i < round(config.unseen_fraction * config.dialogues)
        k = rng.randint(config.min_constraints, config.max_constraints)
        rules: list[Constraint] = []
        if rng.random() < config.user_rule_fraction:
            rules = catalogue.sample_constraints(rng, 1, split=split, held_out=unseen, introduced_by="user")
        for rule in catalogue.sample_constraints(rng, k, split=split, held_out=unseen, introduced_by="system"):
            if len(rules) < k and catalogue.compatible([rule.type_name, *(r.type_name for r in rules)]):
                rules.append(rule)
        intro = [rng.randint(1, min(config.max_intro_round, config.rounds)) if c.type.introduced_by == "user" else 1
                 for c in rules]
        scenarios.append(Scenario(
            dialogue_id=f"{dialogue.conversation_id}#{i}",
            user_turns=list(dialogue.user_turns[: config.rounds]),
            constraints=rules,
            intro_round=intro,
            unseen=unseen,
            long_text=rng.choice(long_texts),
            pressure=dict(config.pressure),
        ))
    return scenarios
