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
from dialogrl.evaluation.report import REPORT_FILENAME, build_report, write_outputs
from dialogrl.evaluation.responsiveness import ResponsivenessConfig, ResponsivenessScorer, corpus_contexts
from dialogrl.evaluation.scenarios import build_scenarios

Loader = Callable[[], tuple[Any, Any]]  # -> (model, tokenizer)


@dataclass
class Candidate:
    label: str  # how the report names it
    model: str  # the reference it was loaded from
    intervention: str
    load: Loader


def parse_candidate(entry: str) -> tuple[str, str]:
    """`REF` or `REF@intervention` -> (reference, intervention)."""
    reference, sep, intervention = entry.rpartition("@")
    if not sep:
        return entry, "none"
    if intervention not in INTERVENTIONS:
        raise ValueError(f"model entry {entry!r}: unknown intervention {intervention!r}; "
                         f"use REF or REF@{'|'.join(INTERVENTIONS[1:])}")
    return reference, intervention


def build_scorer(config: ResponsivenessConfig, load: Loader | None) -> ResponsivenessScorer | None:
    """The fixed responsiveness scorer, contrasting replies with human contexts from the corpus's train split."""
    if not config.enabled:
        return None
    if load is None:
        raise ValueError("responsiveness.enabled is true but no scorer model was given; set responsiveness.scorer "
                         "or responsiveness.enabled=false")
    model, tokenizer = load()
    return ResponsivenessScorer(model.eval(), tokenizer, config,
                                corpus_contexts(config.context_messages, seed=config.seed))


def run_eval(config: EvalConfig, candidates: list[Candidate], output_dir: str | Path, recipe: dict[str, Any],
             log=print, load_scorer: Loader | None = None) -> dict:
    """`load_scorer` loads the fixed responsiveness scorer (config.responsiveness.scorer), once for all candidates."""
    # The caller has just written this run's config.yaml: an older report beside it would describe another run.
    (Path(output_dir) / REPORT_FILENAME).unlink(missing_ok=True)
    scenarios = build_scenarios(config.scenarios)
    scorer = build_scorer(config.responsiveness, load_scorer)
    results, speeds = {}, {}
    loaded: dict[str, tuple[Any, Any]] = {}
    for candidate in candidates:
        if candidate.model not in loaded:
            loaded = {candidate.model: candidate.load()}  # one model in memory at a time
        model, tokenizer = loaded[candidate.model]
        log(f"evaluating {candidate.label}")
        records, speed = evaluate_model(model, tokenizer, scenarios, config, intervention=candidate.intervention,
                                        scorer=scorer, log=log)
        results[candidate.label] = {"model": candidate.model, "intervention": candidate.intervention,
                                    "records": records}
        speeds[candidate.label] = speed
    report = build_report(results, recipe, config.scenarios.seed, config.bootstrap_samples)
    write_outputs(report, results, output_dir, speeds)
    return report
