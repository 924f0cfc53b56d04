"""Evaluate several models (or one model with several interventions) and write the report.

This is the function the pipeline calls; `dialogrl eval` is a thin wrapper
that resolves model references into loaders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogrl.evaluation.evaluate import INTERVENTIONS, EvalConfig, evaluate_model
from dialogrl.evaluation.report import build_report, write_outputs
from dialogrl.evaluation.scenarios import build_scenarios


@dataclass
class Candidate:
    label: str  # how the report names it
    model: str  # the reference it was loaded from
    intervention: str
    load: Callable[[], tuple[Any, Any]]  # -> (model, tokenizer)


def parse_candidate(entry: str) -> tuple[str, str]:
    """`REF` or `REF@intervention` -> (reference, intervention)."""
    reference, sep, intervention = entry.rpartition("@")
    if not sep:
        return entry, "none"
    if intervention not in INTERVENTIONS:
        raise ValueError(f"model entry {entry!r}: unknown intervention {intervention!r}; "
                         f"use REF or REF@{'|'.join(INTERVENTIONS[1:])}")
    return reference, intervention


def run_eval(config: EvalConfig, candidates: list[Candidate], output_dir: str | Path, recipe: dict[str, Any],
             log=print) -> dict:
    scenarios = build_scenarios(config.scenarios)
    results, speeds = {}, {}
    loaded: dict[str, tuple[Any, Any]] = {}
    for candidate in candidates:
        if candidate.model not in loaded:
            loaded = {candidate.model: candidate.load()}  # one model in memory at a time
        model, tokenizer = loaded[candidate.model]
        log(f"evaluating {candidate.label}")
        records, speed = evaluate_model(model, tokenizer, scenarios, config, intervention=candidate.intervention,
                                        log=log)
        results[candidate.label] = {"model": candidate.model, "intervention": candidate.intervention,
                                    "records": records}
        speeds[candidate.label] = speed
    report = build_report(results, recipe, config.scenarios.seed, config.bootstrap_samples)
    write_outputs(report, results, output_dir, speeds)
    return report
