"""Play the scenarios with a model and score every reply: the evaluator's core.

`evaluate_model` is what `dialogrl eval` and the pipeline call. For each
scenario it plays R rounds with the rollout engine (the model's own replies
stay in the history), then judges every reply (`verdicts.judge`: the
dialogue-aware gate, responsiveness under the fixed scorer, every rule standing
at that round, strict and loose) and returns one verdict record per dialogue
in the shape `metrics.summarise` reads.

Interventions run in the same harness:
- `repeat_rules`: the standing rules are restated before every user turn from
  round 2 on (system-prompt repetition);
- `split_softmax`: attention to the system prompt is boosted in every head
  (see `interventions.py`).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dialogrl.data.options import option
from dialogrl.evaluation.gate import GateConfig, check_gate
from dialogrl.evaluation.responsiveness import ResponsivenessConfig, ResponsivenessScorer
from dialogrl.evaluation.rollout import DialogueSpec, RolloutEngine, Trajectory
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.evaluation.scenarios import Scenario, ScenarioConfig
from dialogrl.evaluation.users import PressureUser, ReplayedUser, SimulatedUser
from dialogrl.evaluation.verdicts import DialogueToJudge, judge, rule_checks

INTERVENTIONS = ("none", "repeat_rules", "split_softmax")
REMINDER = "(Reminder of your instructions: {rules})"
# Neutral on purpose: it asks for nothing a rule could forbid, so any violation is drift.
PROBE = "Quick question before we go on: how would you describe your day so far, in a sentence or two?"


@dataclass
class SplitSoftmaxOptions:
    k: float = option(0.5, help="Exponent in (0, 1]: pi -> pi^k on the system span; 1 changes nothing.")
    max_boost: float = option(10.0, help="Cap on how much attention to system tokens may be multiplied.")
    exclude_first_token: bool = option(True, help="Leave the first token (an attention sink) out of the span.")


@dataclass
class EvalConfig:
    scenarios: ScenarioConfig = option(default_factory=ScenarioConfig, help="Which dialogues and rules are played.")
    sampling: SamplingConfig = option(
        default_factory=lambda: SamplingConfig(max_new_tokens=96), help="How replies are decoded (greedy by default)."
    )
    gate: GateConfig = option(default_factory=GateConfig, help="The quality gate every reply must pass to count.")
    responsiveness: ResponsivenessConfig = option(
        default_factory=ResponsivenessConfig,
        help="The fixed scorer that decides whether a reply answers its user turn (part of the gate).",
    )
    split_softmax: SplitSoftmaxOptions = option(
        default_factory=SplitSoftmaxOptions, help="Settings of the split_softmax intervention."
    )
    batch_size: int = option(16, minimum=1, help="Dialogues played together (one KV cache); memory grows with it.")
    bootstrap_samples: int = option(1000, minimum=1, help="Bootstrap resamples for confidence intervals.")


def dialogue_specs(scenarios: list[Scenario], intervention: str, simulated_user=None) -> list[DialogueSpec]:
    specs = []
    for scenario in scenarios:
        user = (SimulatedUser(simulated_user, scenario.user_turns[0]) if simulated_user is not None
                else ReplayedUser(scenario.user_turns))
        if scenario.pressure:
            user = PressureUser(user, scenario.pressure, long_text=scenario.long_text)
        prefixes = dict(scenario.stated_by_user())
        if intervention == "repeat_rules":
            for r in range(2, len(scenario.user_turns) + 1):
                standing = [c.instruction for c in scenario.standing(r - 1)]
                if standing:
                    reminder = REMINDER.format(rules=" ".join(standing))
                    prefixes[r] = f"{reminder} {prefixes[r]}" if r in prefixes else reminder
        specs.append(DialogueSpec(scenario.dialogue_id, scenario.system_prompt(), user, prefixes))
    return specs


def standing_checks(scenario: Scenario, round_number: int, reply: str) -> list[dict[str, Any]]:
    """The reply checked against every rule standing at that round, as the metrics read it."""
    return rule_checks(scenario.standing(round_number), reply, held_out=scenario.unseen)


def score_dialogues(scenarios: Sequence[Scenario], trajectories: Sequence[Trajectory], gate: GateConfig,
                    user_source: str, scorer: ResponsivenessScorer | None = None) -> list[dict[str, Any]]:
    """One verdict record per dialogue: per round, the whole gate and every standing rule (strict and loose)."""
    to_judge = [DialogueToJudge(t.messages, lambda r, reply, s=s: standing_checks(s, r, reply))
                for s, t in zip(scenarios, trajectories, strict=True)]
    records = []
    for scenario, trajectory, turns in zip(scenarios, trajectories, judge(to_judge, gate, scorer), strict=True):
        for turn, ended in zip(turns, trajectory.ended_properly, strict=True):
            turn["ended_properly"] = ended
        source = user_source + ("+pressure" if scenario.pressure else "")
        records.append({"dialogue_id": scenario.dialogue_id, "user_source": source, "unseen": scenario.unseen,
                        "constraints": [c.to_dict() for c in scenario.constraints],
                        "intro_round": scenario.intro_round, "turns": turns, "messages": trajectory.messages})
    return records


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, in GB (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def evaluate_model(
    model,
    tokenizer,
    scenarios: list[Scenario],
    config: EvalConfig,
    *,
    intervention: str = "none",
    scorer: ResponsivenessScorer | None = None,
    log=print,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Verdict records for every scenario, and the speed of play and scoring (tokens, seconds).

    `scorer` is the fixed responsiveness scorer; None leaves `responsive` unscored (the gate then
    checks repeats, echoes and the per-reply rules only).
    """
    import time

    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; choose from {', '.join(INTERVENTIONS)}")
    context = None
    if intervention == "split_softmax":
        from dialogrl.evaluation.interventions import SplitSoftmaxConfig, split_softmax, system_span_mask

        options = SplitSoftmaxConfig(k=config.split_softmax.k, max_boost=config.split_softmax.max_boost,
                                     exclude_first_token=config.split_softmax.exclude_first_token)

        def context(model, input_ids, attention_mask, system_lengths):
            return split_softmax(model, system_span_mask(input_ids, attention_mask, system_lengths), options)

    engine = RolloutEngine(model, tokenizer, config.sampling, batch_size=config.batch_size,
                           generation_context=context)
    simulated = None
    if config.scenarios.user_source == "simulated":
        # The same model plays the user, sampling so that users differ between dialogues.
        simulated = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=48, temperature=0.8,
                                                                   seed=config.scenarios.seed), batch_size=1).reply
    started = time.perf_counter()
    trajectories = engine.play(dialogue_specs(scenarios, intervention, simulated), config.scenarios.rounds)
    seconds = time.perf_counter() - started
    log(f"played {len(scenarios)} dialogues x {config.scenarios.rounds} rounds in {seconds:.0f} s "
        f"({engine.tokens_generated / max(seconds, 1e-9):.1f} generated tokens/s; peak RSS so far {peak_rss_gb():.2f} GB)")
    scoring_started = time.perf_counter()
    records = score_dialogues(scenarios, trajectories, config.gate, config.scenarios.user_source, scorer)
    scoring_seconds = time.perf_counter() - scoring_started
    if scorer is not None:
        replies = sum(len(r["turns"]) for r in records)
        log(f"judged {replies} replies in {scoring_seconds:.0f} s "
            f"({100 * scoring_seconds / max(replies, 1):.1f} s per 100 replies with the responsiveness scorer; "
            f"peak RSS so far {peak_rss_gb():.2f} GB)")
    if config.scenarios.probe_rounds:
        _add_probes(model, tokenizer, scenarios, records, config, context)
    return records, {"generated_tokens": engine.tokens_generated, "seconds": round(seconds, 2),
                     "judge_seconds": round(scoring_seconds, 2)}


def _add_probes(model, tokenizer, scenarios, records, config: EvalConfig, context) -> None:
    """Fork each dialogue after the probe rounds, ask PROBE, score the answer; the dialogue is left as played."""
    specs, owners = [], []
    for index, record in enumerate(records):
        turns = [m for m in record["messages"] if m["role"] != "system"]
        for r in config.scenarios.probe_rounds:
            if 2 * r <= len(turns):
                specs.append(DialogueSpec(f"{record['dialogue_id']}@probe{r}", scenarios[index].system_prompt(),
                                          ReplayedUser([PROBE]), history=turns[: 2 * r]))
                owners.append((index, r))
    if not specs:
        return
    engine = RolloutEngine(model, tokenizer, config.sampling, batch_size=config.batch_size,
                           generation_context=context)
    answers = engine.play(specs, rounds=1)
    for (index, r), answer in zip(owners, answers, strict=True):
        reply = answer.messages[-1]["content"]
        gate_result = check_gate(reply, config.gate)
        checks = standing_checks(scenarios[index], r, reply)
        records[index].setdefault("probes", []).append(
            {"round": r, "gate_pass": gate_result.passed, "checks": checks, "answer": reply})
