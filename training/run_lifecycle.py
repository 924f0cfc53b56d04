"""The life of a training run, the same for every stage (sft, reward, dpo, ppo).

`start_run` checks the output directory against `resume` and against the
fingerprint of the recipe and inputs that made what is already there (a changed
recipe on a directory with checkpoints or a finished run is refused; the same
recipe on a finished run has nothing to do), saves config.yaml and
fingerprint.json and sets up tracking; checkpoints are `checkpoint-N` directories whose state file is
written last, rotated by `rotate_checkpoints`; `run_summary` builds the one
`run_summary.json` schema and `write_run_outputs` writes the tokenizer, the
merged weights when asked, the model card and the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dialogrl.data.fingerprint import (
    Fingerprint,
    fingerprint,
    new_output_id,
    read_fingerprint,
    write_fingerprint,
)
from dialogrl.training import output_lock
from dialogrl.training.config import dump_recipe, recipe_to_dict, save_recipe
from dialogrl.training.models import ModelConfig
from dialogrl.training.stage_config import LoraOptions
from dialogrl.training.tracking import TrackingConfig, setup_tracking

SUMMARY_FILENAME = "run_summary.json"
CARD_FILENAME = "README.md"
MERGED_DIRNAME = "merged"
TRAINER_STATE_FILENAME = "trainer_state.json"


class StageError(RuntimeError):
    """A stage that cannot start as configured (output directory state, resume target, arguments)."""


class RunComplete(Exception):
    """The output directory already holds this recipe's finished run: there is nothing to train."""

    def __init__(self, output_dir: Path, summary: dict[str, Any]):
        super().__init__(f"{output_dir} already holds the finished run of this recipe and inputs "
                         f"({summary.get('global_step')} steps); nothing to train. Give the run another output_dir "
                         "to train it again.")
        self.summary = summary


class RunRecipe(Protocol):
    """What the lifecycle reads from a recipe: `StageRecipe` and `PPORecipe` both have these sections."""

    model: ModelConfig
    lora: LoraOptions
    tracking: TrackingConfig
    output_dir: str
    resume: str


@dataclass
class Run:
    recipe: RunRecipe
    stage: str
    output_dir: Path
    resume_from: str | None
    report_to: list[str]
    fingerprint: Fingerprint
    started: float = field(default_factory=time.perf_counter)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def leave_process_group() -> None:
    """End a launched run's process group once every rank is done. The Trainer stages never destroy it, and a
    gloo group left to the interpreter's exit, or destroyed by one rank while its peer still writes, can abort
    the process after a run that succeeded."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def start_run(recipe: RunRecipe, stage: str, state_file: str = TRAINER_STATE_FILENAME) -> Run:
    """Check the output directory against `resume`, save config.yaml, set up tracking."""
    output_dir = Path(recipe.output_dir)
    if is_main_process():
        try:
            output_lock.acquire(output_dir)
        except output_lock.OutputDirInUse as err:
            raise StageError(str(err)) from None
    resume_from = find_resume_checkpoint(output_dir, recipe.resume, state_file)
    current = fingerprint(recipe_to_dict(recipe))
    try:
        check_same_recipe(output_dir, current, state_file)
    except RunComplete:
        output_lock.release(output_dir)
        raise
    if is_main_process():
        save_recipe(recipe, output_dir)
        write_fingerprint(output_dir, current)
    report_to = setup_tracking(recipe.tracking, output_dir)
    return Run(recipe, stage, output_dir, resume_from, report_to, current)


def finished_summary(output_dir: Path) -> dict[str, Any] | None:
    """run_summary.json of a finished run in `output_dir`, or None."""
    try:
        summary = json.loads((Path(output_dir) / SUMMARY_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "complete" else None


def check_same_recipe(output_dir: Path, current: Fingerprint, state_file: str = TRAINER_STATE_FILENAME) -> None:
    """Refuse to continue or rewrite what another recipe (or other inputs) made in `output_dir`: resuming would
    keep the old run's schedule and state, and the records would describe a model that was not trained so.
    Raises RunComplete when the directory already holds this very run, finished."""
    summary = finished_summary(output_dir)
    checkpoint = last_complete_checkpoint(output_dir, state_file)
    if summary is None and checkpoint is None:
        return
    held = "a finished run" if summary is not None else f"checkpoints (up to {Path(checkpoint).name})"
    way_out = f"Give this run another output_dir, or delete {output_dir} to train there from scratch."
    before = read_fingerprint(output_dir)
    if before is None:
        raise StageError(f"{output_dir} holds {held} but no fingerprint.json, so which recipe made it is unknown "
                         f"(an older dialogrl, or the file was removed). Nothing was changed. {way_out}")
    if before.digest != current.digest:
        changes = "\n  ".join(current.changes_from(before))
        raise StageError(f"{output_dir} holds {held} of another recipe or other inputs. Changed since:\n  {changes}\n"
                         f"Nothing was changed there. {way_out}")
    if summary is not None:
        raise RunComplete(output_dir, summary)


# --------------------------------------------------------------------------- checkpoints


def numbered_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(N, path) of every checkpoint-N directory, oldest first."""
    numbered = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            numbered.append((int(suffix), path))
    return sorted(numbered)


def last_complete_checkpoint(output_dir: Path, state_file: str = TRAINER_STATE_FILENAME) -> str | None:
    """The newest checkpoint-N that was fully written.

    A run killed while saving leaves a checkpoint directory without its state file, which is
    written last (the Trainer's trainer_state.json, PPO's ppo_state.json); transformers'
    get_last_checkpoint would pick that directory anyway.
    """
    for _step, path in reversed(numbered_checkpoints(output_dir)):
        try:
            json.loads((path / state_file).read_text())
        except (OSError, ValueError):
            continue
        return str(path)
    return None


def find_resume_checkpoint(output_dir: Path, resume: str, state_file: str = TRAINER_STATE_FILENAME) -> str | None:
    """What `resume: auto|never|DIR` means for this output directory."""
    last = last_complete_checkpoint(output_dir, state_file)
    if resume == "auto":
        return last
    if resume == "never":
        if last is not None:
            raise StageError(f"{output_dir} already holds checkpoint {last}; set resume: auto to continue it, "
                             "or choose another output_dir")
        return None
    target = Path(resume)
    if not (target / state_file).is_file():
        raise StageError(f"resume: {resume} is not a checkpoint directory (no {state_file}); "
                         "use auto, never, or a checkpoint-N directory")
    return str(target)


def rotate_checkpoints(output_dir: Path, keep: int, state_file: str = TRAINER_STATE_FILENAME) -> list[Path]:
    """Keep the newest `keep` checkpoints up to the newest complete one (that one included) and
    delete the older ones; returns what was deleted.

    Only a checkpoint older than the newest complete one can go, so a half-written newest
    checkpoint never costs the run its last good one.
    """
    last = last_complete_checkpoint(output_dir, state_file)
    if last is None or keep < 1:
        return []
    last_step = int(Path(last).name.removeprefix("checkpoint-"))
    # Newer (unfinished) ones are left alone: another process may still be writing them.
    finished_or_older = [path for step, path in numbered_checkpoints(output_dir) if step <= last_step]
    doomed = finished_or_older[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def checkpoint_rotation_callback(keep: int):
    """A TrainerCallback rotating the Trainer's checkpoints with `rotate_checkpoints` (the Trainer's own
    rotation is switched off: save_total_limit=None), so every stage keeps checkpoints the same way."""
    from transformers import TrainerCallback

    class CheckpointRotation(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                rotate_checkpoints(Path(args.output_dir), keep)

    return CheckpointRotation()


# --------------------------------------------------------------------------- the end of a run


def distributed_backend(accelerator, model=None) -> dict[str, Any]:
    """How the run was spread over its processes, as accelerate set it up (not as the launch config asked):
    the distributed type, DeepSpeed's ZeRO stage and the FSDP version, None where they do not apply; under
    ZeRO-3 and FSDP, the share of `model`'s parameters this process holds (about 1 / world size when really
    sharded)."""
    state = accelerator.state
    deepspeed = getattr(state, "deepspeed_plugin", None)
    fsdp = getattr(state, "fsdp_plugin", None)
    backend = {"type": str(getattr(state.distributed_type, "value", state.distributed_type)),
               "zero_stage": deepspeed.zero_stage if deepspeed is not None else None,
               "fsdp_version": getattr(fsdp, "fsdp_version", None) if fsdp is not None else None,
               "parameter_share": None}
    if model is not None and backend["zero_stage"] == 3:
        parameters = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
        total = sum(p.ds_numel for p in parameters)
        backend["parameter_share"] = round(sum(p.ds_tensor.numel() for p in parameters) / total, 4) if total else None
    elif model is not None and backend["fsdp_version"] is not None:
        parameters = list(model.parameters())  # FSDP2 keeps each as a DTensor, its local shard behind to_local()
        total = sum(p.numel() for p in parameters)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in parameters)
        backend["parameter_share"] = round(local / total, 4) if total else None
    return backend


def run_summary(run: Run, *, global_step: int, max_steps: int, world_size: int, tokens_seen: int | None,
                train_seconds: float | None, metrics: dict[str, Any], data: dict[str, Any],
                backend: dict[str, Any] | None = None) -> dict[str, Any]:
    """run_summary.json, one schema for every stage: `metrics` holds the final value of each metric,
    `data` what the run trained on."""
    return {
        "stage": run.stage,
        "status": "complete",
        "fingerprint": run.fingerprint.digest,  # of the recipe and inputs (fingerprint.json lists them)
        "output_id": new_output_id(),  # what later runs made from this one record as its identity
        "base_model": run.recipe.model.name_or_path,
        "global_step": global_step,
        "max_steps": max_steps,
        "resumed_from": run.resume_from,
        "world_size": world_size,
        "distributed": backend,
        "seconds": round(time.perf_counter() - run.started, 1),
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_seen / train_seconds, 1) if tokens_seen and train_seconds else None,
        "metrics": metrics,
        "data": data,
    }


def write_run_outputs(run: Run, summary: dict[str, Any], *, model, tokenizer, description: str,
                      data_section: str, extra_card: str = "") -> None:
    """Main process, after the final weights are saved: the tokenizer, the merged weights when
    `lora.merge` (what later stages load), the model card and run_summary.json (written last: a
    directory with it is a finished run)."""
    tokenizer.save_pretrained(str(run.output_dir))
    if run.recipe.lora.enabled and run.recipe.lora.merge:
        merged_dir = run.output_dir / MERGED_DIRNAME
        model.merge_and_unload().save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
        save_recipe(run.recipe, merged_dir)
        summary["merged_dir"] = str(merged_dir)
    (run.output_dir / CARD_FILENAME).write_text(model_card(run, summary, description, data_section, extra_card))
    (run.output_dir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    output_lock.release(run.output_dir)


def model_card(run: Run, summary: dict[str, Any], description: str, data_section: str, extra: str = "") -> str:
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(summary["metrics"].items())
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
    adapter = "a LoRA adapter (load with peft)" if run.recipe.lora.enabled else "full weights"
    merged = f" The adapter merged into the base is in `{MERGED_DIRNAME}/`." if "merged_dir" in summary else ""
    tokens = f" ({summary['tokens_seen']} tokens seen)" if summary.get("tokens_seen") else ""
    resumed = f", resumed from {summary['resumed_from']}" if summary["resumed_from"] else ""
    return f"""---
base_model: {summary['base_model']}
library_name: transformers
tags: [dialogrl, {run.stage}]
---
# {run.output_dir.name}

`dialogrl {run.stage}` from **{summary['base_model']}**: {adapter}.{merged}
{summary['global_step']} steps in {summary['seconds']:.0f} s{tokens}{resumed},
{summary['world_size']} process(es). {description}

## Data
{data_section}

## Final metrics
| metric | value |
|---|---|
{metrics}
{extra}
## Recipe
Rerun with `dialogrl {run.stage} --config config.yaml` (the resolved recipe, saved next to this card).

```yaml
{dump_recipe(run.recipe)}```
"""
