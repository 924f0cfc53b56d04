"""`dialogrl pipeline --config RECIPE`: data -> sft -> reward -> dpo / ppo, then every checkpoint evaluated.

A pipeline recipe lists steps, each a stage with its own recipe file and
overrides. Steps are wired by one rule: a path in a step's recipe that points at
another step's standalone output directory (its recipe's `output_dir`, such as
`outputs/smollm2-135m/sft`) is redirected to that step's directory in this run
(`RUN_DIR/sft`, or `RUN_DIR/sft/merged` for a merged LoRA model). So the
standalone recipes chain as they are; `model_from` picks another start, and a
step whose model is no earlier step's output starts from `base_model`.

A rerun skips a step whose outputs are complete for the exact recipe and inputs
it has now (its fingerprint) and says so; an interrupted step with the same
fingerprint resumes from its last checkpoint (its `resume: auto`); a step whose
recipe, overrides or inputs changed is trained again from scratch, and so is
every step that reads its output (each output has a new `output_id`, which is
part of its readers' fingerprints); a data step's reply cache survives that, its
entries being keyed by model and history rather than by recipe. Then the base model and
every evaluated checkpoint are scored by the evaluator in one report, and
`summary.md`, `summary.json` and `adherence.png` compare them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dialogrl.data.build import CACHE_DIR
from dialogrl.data.fingerprint import fingerprint, read_fingerprint
from dialogrl.data.options import option
from dialogrl.training import output_lock
from dialogrl.training.config import (
    STAGE_MODULES,
    load_recipe,
    recipe_kinds,
    recipe_to_dict,
    register_recipe,
    save_recipe,
)
from dialogrl.training.memory import PeakMemory
from dialogrl.training.run_lifecycle import StageError

TRAINING_STAGES = ("sft", "reward", "dpo", "ppo")
CHECKPOINT_STAGES = ("sft", "dpo", "ppo")  # stages that produce a policy worth evaluating
STEP_RECORD = "pipeline_step.json"  # a step's time and peak memory, kept next to its outputs


@dataclass
class PipelineStep:
    name: str = option("sft", help="Step label: names its directory under output_dir and its line in the summary.")
    stage: Literal["data", "sft", "reward", "dpo", "ppo"] = option("sft", help="Which stage the step runs.")
    recipe: str | None = option(None, help="The stage's recipe file; null: the stage's defaults.")
    overrides: list[str] = option(default_factory=list, help="dotted.key=value overrides applied to that recipe.")
    model_from: str | None = option(
        None, help="Start from this earlier step's checkpoint instead of the recipe's model."
    )
    evaluate: bool = option(True, help="Evaluate this step's checkpoint (sft, dpo and ppo steps).")


@dataclass
class PipelineEval:
    recipe: str = option("recipes/smollm2-135m/eval-quick.yaml", help="The eval recipe scoring every checkpoint.")
    overrides: list[str] = option(default_factory=list, help="dotted.key=value overrides for the eval recipe.")
    include_base: bool = option(True, help="Evaluate the base model too, as the first line of the comparison.")


@register_recipe("pipeline")
@dataclass
class PipelineRecipe:
    base_model: str = option("packaged:smollm2-135m-instruct", help="The model the chain starts from (the baseline).")
    output_dir: str = option("outputs/pipeline", help="Run directory: one sub-directory per step, eval/, the summary.")
    steps: list[PipelineStep] = option(default_factory=list, help="Steps in the order they run.")
    eval: PipelineEval = option(default_factory=PipelineEval, help="How checkpoints are compared.")

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"steps: names must be unique, {duplicates} repeat")
        for i, step in enumerate(self.steps):
            if step.model_from is not None and step.model_from not in names[:i]:
                raise ValueError(f"steps[{i}] ({step.name}): model_from {step.model_from!r} is not an earlier step")
            if step.model_from is not None and step.stage == "data":
                raise ValueError(f"steps[{i}] ({step.name}): a data step has no model_from")


def _stage_recipe(step: PipelineStep):
    cls = recipe_kinds()[step.stage]
    return load_recipe(step.recipe, step.overrides, expected=cls)


def checkpoint_of(step_dir: Path) -> Path:
    """The directory later stages and the evaluator load: the merged model when LoRA wrote one."""
    merged = step_dir / "merged"
    return merged if (merged / "config.json").is_file() else step_dir


def completed_digest(stage: str, step_dir: Path) -> str | None:
    """The fingerprint digest of the finished outputs in `step_dir`, or None when they are not finished."""
    record = step_dir / ("manifest.json" if stage == "data" else "run_summary.json")
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if stage != "data" and done.get("status") != "complete":
        return None
    return done.get("fingerprint")


def _redirect(value: Any, redirects: dict[str, str]) -> Any:
    """Replace a leading standalone output dir by the run's step directory, in every string of a recipe."""
    if isinstance(value, str):
        for original, target in redirects.items():
            if value == original or value.startswith(original.rstrip("/") + "/"):
                return target + value[len(original.rstrip("/")):]
        return value
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            setattr(value, f.name, _redirect(getattr(value, f.name), redirects))
        return value
    if isinstance(value, list):
        return [_redirect(v, redirects) for v in value]
    if isinstance(value, dict):
        return {k: _redirect(v, redirects) for k, v in value.items()}
    return value


def wire(recipe: PipelineRecipe, run_dir: Path) -> list[tuple[PipelineStep, Any, Path]]:
    """Each step's resolved recipe, with outputs in the run directory and inputs redirected to earlier steps."""
    redirects: dict[str, str] = {}
    wired = []
    for step in recipe.steps:
        stage_recipe = _stage_recipe(step)
        standalone = stage_recipe.output_dir
        step_dir = run_dir / step.name
        _redirect(stage_recipe, redirects)
        stage_recipe.output_dir = str(step_dir)
        if step.model_from is not None:
            stage_recipe.model.name_or_path = str(checkpoint_of(run_dir / step.model_from))
        elif stage_recipe.model.name_or_path not in redirects.values():
            # A step that does not continue another step's model starts the chain from the base model.
            stage_recipe.model.name_or_path = recipe.base_model
        # Later steps that name this step's standalone output read this run's copy instead. A LoRA
        # step with merge: true is read through its merged directory.
        merged = step.stage in TRAINING_STAGES and getattr(stage_recipe, "lora", None) is not None \
            and stage_recipe.lora.enabled and stage_recipe.lora.merge
        redirects[standalone] = str(step_dir / "merged") if merged else str(step_dir)
        wired.append((step, stage_recipe, step_dir))
    return wired


def run_step(step: PipelineStep, stage_recipe: Any, step_dir: Path, log=print) -> dict[str, Any]:
    # Computed now, not when wiring: an earlier step may just have been trained again.
    current = fingerprint(recipe_to_dict(stage_recipe))
    if completed_digest(step.stage, step_dir) == current.digest:
        log(f"[{step.name}] skipped: outputs complete for this recipe and inputs in {step_dir}")
        # The time and memory the outputs cost when they were made, so a rerun's summary still reports them.
        return _recorded_step(step_dir) | {"name": step.name, "stage": step.stage, "skipped": True,
                                           "dir": str(step_dir)}
    before = read_fingerprint(step_dir)
    if step_dir.is_dir() and any(step_dir.iterdir()) and (before is None or before.digest != current.digest):
        changes = current.changes_from(before) if before is not None else ["(no fingerprint.json: unknown recipe)"]
        log(f"[{step.name}] outputs in {step_dir} are from another recipe or other inputs; training from scratch. "
            f"Changed: {'; '.join(changes)}")
        _clear_for_rebuild(step_dir, keep=(CACHE_DIR,) if step.stage == "data" else ())
    log(f"[{step.name}] running dialogrl {step.stage if step.stage != 'data' else 'data build'} -> {step_dir}")
    started = time.perf_counter()
    module = importlib.import_module(STAGE_MODULES[step.stage])
    with PeakMemory() as peak:
        result = module.main(stage_recipe, log=lambda msg: log(f"[{step.name}] {msg}"))
    seconds = time.perf_counter() - started
    log(f"[{step.name}] done in {seconds:.0f} s, peak resident memory {peak.gib:.1f} GiB")
    record = {"seconds": round(seconds, 1), "peak_rss_gib": peak.gib, "peak_is_per_step": peak.per_step,
              "metrics": result.get("metrics") if isinstance(result, dict) else None}
    (step_dir / STEP_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return {"name": step.name, "stage": step.stage, "skipped": False, "dir": str(step_dir)} | record


def _clear_for_rebuild(step_dir: Path, keep: tuple[str, ...]) -> None:
    for entry in step_dir.iterdir():
        if entry.name in keep and entry.is_dir():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _recorded_step(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / STEP_RECORD).read_text())
    except (OSError, ValueError):
        return {}  # made by a pipeline that kept no record: the summary shows "-" for its time


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate_checkpoints(recipe: PipelineRecipe, wired, run_dir: Path, log=print) -> dict[str, Any]:
    from dialogrl.evaluation.run import run_eval
    from dialogrl.training import eval_stage

    models: list[tuple[str, str]] = [("base", recipe.base_model)] if recipe.eval.include_base else []
    models += [(step.name, str(checkpoint_of(step_dir))) for step, _r, step_dir in wired
               if step.stage in CHECKPOINT_STAGES and step.evaluate]
    eval_recipe = load_recipe(recipe.eval.recipe, recipe.eval.overrides, expected=eval_stage.EvalRecipe)
    eval_recipe.models = [reference for _label, reference in models]
    eval_recipe.output_dir = str(run_dir / "eval")
    report_path = run_dir / "eval" / "report.json"
    if report_path.is_file():
        from dialogrl.evaluation.report import SCHEMA_VERSION

        report = json.loads(report_path.read_text())
        done = {label: m["model"] for label, m in report["models"].items()}
        # The fingerprint names each checkpoint's output id: a step trained again makes the report stale. A report
        # from an older evaluator (another verdict) is stale too.
        current = report.get("schema_version") == SCHEMA_VERSION and \
            report.get("fingerprint") == fingerprint(recipe_to_dict(eval_recipe)).digest
        if current and done == dict(models):
            log(f"[eval] skipped: {report_path} already compares {', '.join(done)}")
            return report
    candidates = eval_stage.candidates(eval_recipe)
    for candidate, (label, _reference) in zip(candidates, models, strict=True):
        candidate.label = label
    save_recipe(eval_recipe, eval_recipe.output_dir)
    log(f"[eval] {len(models)} models: {', '.join(label for label, _ in models)}")
    return run_eval(eval_recipe, candidates, eval_recipe.output_dir, recipe_to_dict(eval_recipe),
                    log=lambda msg: log(f"[eval] {msg}"),
                    load_scorer=eval_stage.scorer_loader(eval_recipe, eval_recipe.model))


def summarise(report: dict[str, Any], steps: list[dict[str, Any]], recipe: PipelineRecipe, run_dir: Path,
              seconds: float) -> dict[str, Any]:
    rows = {}
    for label, m in report["models"].items():
        strict = m["curve"]["strict"]["mean"]
        rows[label] = {
            "model": m["model"], "auc_strict": m["auc_strict"], "auc_loose": m["auc_loose"],
            "adherence_round_1": strict[0], "adherence_last_round": strict[-1], "rounds": len(strict),
            "retention": m["retention"], "seen": m["seen"]["strict"], "unseen": m["unseen"]["strict"],
            "gate_pass_rate": m["gate_pass_rate"], "ssr": m["ssr"],
            "auc_strict_per_reply_gate": m.get("auc_strict_per_reply_gate"), "repeat_rate": m.get("repeat_rate"),
            "echo_rate": m.get("echo_rate"), "responsive_rate": m.get("responsive_rate"),
        }
    return {
        "run_dir": str(run_dir), "commit": _git_commit(), "seconds": round(seconds, 1),
        "base_model": recipe.base_model, "steps": steps, "models": rows,
        "comparisons": report.get("comparisons", []), "eval_config": report.get("config"),
    }


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _step_line(step: dict[str, Any]) -> str:
    # A skipped step reports what it cost when its outputs were made.
    state = "skipped (complete; time from when it ran)" if step.get("skipped") else "ran"
    seconds = f"{step['seconds']} s" if "seconds" in step else "-"
    peak = f"{step['peak_rss_gib']:.1f} GiB" if "peak_rss_gib" in step else "-"
    return f"| {step['name']} | {step['stage']} | {seconds} | {peak} | {state} |"


def summary_markdown(summary: dict[str, Any]) -> str:
    rounds = next(iter(summary["models"].values()))["rounds"] if summary["models"] else 0
    lines = [
        f"# Pipeline summary: {summary['run_dir']}",
        "",
        f"Base model {summary['base_model']}; commit {summary['commit'] or 'unknown'}; {summary['seconds'] / 60:.1f} "
        "minutes in all. Strict adherence on held-out dialogues with eval phrasings: a turn counts when it keeps "
        "every standing rule and passes the dialogue-aware gate (no repeat, no echo, responsive). "
        "'old AUC' is the same under the per-reply gate alone.",
        "",
        f"| model | strict AUC | old AUC | A(1) | A({rounds}) | retention | seen | unseen | gate pass | repeat | echo "
        "| responsive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in summary["models"].items():
        lines.append(f"| {label} | {_fmt(row['auc_strict'])} | {_fmt(row.get('auc_strict_per_reply_gate'))} | "
                     f"{_fmt(row['adherence_round_1'])} | "
                     f"{_fmt(row['adherence_last_round'])} | {_fmt(row['retention'])} | {_fmt(row['seen'])} | "
                     f"{_fmt(row['unseen'])} | {_fmt(row['gate_pass_rate'])} | {_fmt(row.get('repeat_rate'))} | "
                     f"{_fmt(row.get('echo_rate'))} | {_fmt(row.get('responsive_rate'))} |")
    lines += ["", "| step | stage | time | peak resident memory | state |", "|---|---|---|---|---|"]
    lines += [_step_line(step) for step in summary["steps"]]
    if "eval" in summary:
        lines.append(_step_line({"name": "eval", "stage": "eval"} | summary["eval"]))
    lines += ["", "Curves with 95% bootstrap bands: `adherence.png`; full report: `eval/report.md`.", ""]
    return "\n".join(lines)


def main(recipe: PipelineRecipe, log=print) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(recipe.output_dir)
    try:
        output_lock.acquire(run_dir)  # a second pipeline on this run directory would retrain steps under it
    except output_lock.OutputDirInUse as err:
        raise StageError(str(err)) from None
    save_recipe(recipe, run_dir)
    wired = wire(recipe, run_dir)
    steps = [run_step(step, stage_recipe, step_dir, log) for step, stage_recipe, step_dir in wired]
    eval_started = time.perf_counter()
    report_path = run_dir / "eval" / "report.json"
    report_before = report_path.stat().st_mtime_ns if report_path.is_file() else None
    with PeakMemory() as peak:
        report = evaluate_checkpoints(recipe, wired, run_dir, log)
    if report_path.stat().st_mtime_ns == report_before:
        evaluation = _recorded_step(run_dir / "eval") | {"skipped": True}
    else:
        evaluation = {"seconds": round(time.perf_counter() - eval_started, 1), "peak_rss_gib": peak.gib,
                      "peak_is_per_step": peak.per_step}
        (run_dir / "eval" / STEP_RECORD).write_text(json.dumps(evaluation, indent=2) + "\n")
        evaluation["skipped"] = False
    summary = summarise(report, steps, recipe, run_dir, time.perf_counter() - started) | {"eval": evaluation}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.md").write_text(summary_markdown(summary))
    shutil.copyfile(run_dir / "eval" / "adherence.png", run_dir / "adherence.png")
    output_lock.release(run_dir)
    return summary
