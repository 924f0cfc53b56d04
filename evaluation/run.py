"""Evaluate several models (or one model with several interventions) and write the report.

This is the function the pipeline calls; `dialogrl eval` is a thin wrapper
that resolves model references into loaders.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogrl.data.fingerprint import fingerprint
from dialogrl.evaluation.evaluate import INTERVENTIONS, EvalConfig, evaluate_model
from dialogrl.evaluation.report import REPORT_FILENAME, SCHEMA_VERSION, build_report, write_outputs
from dialogrl.evaluation.responsiveness import ResponsivenessConfig, ResponsivenessScorer, corpus_contexts
from dialogrl.evaluation.scenarios import build_scenarios

KEPT_DIRNAME = "per_model"
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
    """`load_scorer` loads the fixed responsiveness scorer (config.responsiveness.scorer), once for all candidates.

    Each candidate's records are kept in `OUTPUT_DIR/per_model/` as soon as it is scored, under the
    fingerprint of the recipe and of that model: a later candidate that fails costs only its own work, and a
    rerun reuses every candidate whose recipe and model are unchanged.
    """
    output_dir = Path(output_dir)
    # The caller has just written this run's config.yaml: an older report beside it would describe another run.
    (output_dir / REPORT_FILENAME).unlink(missing_ok=True)
    scenarios = scorer = None
    results, speeds = {}, {}
    loaded: dict[str, tuple[Any, Any]] = {}
    for candidate in candidates:
        key = candidate_fingerprint(recipe, candidate)
        kept = kept_result(output_dir, candidate.label, key)
        if kept is not None:
            log(f"{candidate.label}: reusing its records in {_kept_path(output_dir, candidate.label)} "
                "(same recipe and model)")
        else:
            if scenarios is None:
                scenarios = build_scenarios(config.scenarios)
                scorer = build_scorer(config.responsiveness, load_scorer)
            if candidate.model not in loaded:
                loaded = {candidate.model: candidate.load()}  # one model in memory at a time
            model, tokenizer = loaded[candidate.model]
            log(f"evaluating {candidate.label}")
            records, speed = evaluate_model(model, tokenizer, scenarios, config,
                                            intervention=candidate.intervention, scorer=scorer, log=log)
            kept = {"model": candidate.model, "intervention": candidate.intervention, "records": records,
                    "speed": speed}
            keep_result(output_dir, candidate.label, key, kept)
        results[candidate.label] = {k: kept[k] for k in ("model", "intervention", "records")}
        speeds[candidate.label] = kept["speed"]
    report = build_report(results, recipe, config.scenarios.seed, config.bootstrap_samples)
    report["fingerprint"] = fingerprint(recipe).digest
    write_outputs(report, results, output_dir, speeds)
    return report


def candidate_fingerprint(recipe: dict[str, Any], candidate: Candidate) -> str:
    """What one candidate's records depend on: the recipe but its model list, that model's identity, and the
    evaluator's verdict version."""
    scoring = {key: value for key, value in recipe.items() if key != "models"} | {"schema_version": SCHEMA_VERSION}
    return fingerprint(scoring | {"candidate": {"model": candidate.model,
                                                "intervention": candidate.intervention}}).digest


def _kept_path(output_dir: Path, label: str) -> Path:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "model"
    return output_dir / KEPT_DIRNAME / f"{readable}-{hashlib.sha256(label.encode()).hexdigest()[:8]}.json"


def kept_result(output_dir: Path, label: str, key: str) -> dict[str, Any] | None:
    try:
        kept = json.loads(_kept_path(output_dir, label).read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and kept.get("fingerprint") == key else None


def keep_result(output_dir: Path, label: str, key: str, result: dict[str, Any]) -> None:
    path = _kept_path(output_dir, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps({"fingerprint": key, "label": label, **result}, ensure_ascii=False))
    scratch.replace(path)
