"""What every TRL-backed stage does around its trainer: model, pad token, LoRA, arguments, resume, save.

A stage's `main(recipe)` reads as: `start_run` -> `load_policy`/`load_reward_model`
-> `prepare_data` -> `trl_arguments` -> build the TRL trainer -> `train` ->
`finish_run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogrl.data.chat_tokens import ChatTokenizer
from dialogrl.training.config import dump_recipe, save_recipe
from dialogrl.training.models import ModelConfig, ResolvedModel, load_tokenizer, resolve_model
from dialogrl.training.stage_config import LoraOptions, StageRecipe
from dialogrl.training.tracking import setup_tracking

SUMMARY_FILENAME = "run_summary.json"
MERGED_DIRNAME = "merged"
# Pad candidates tried before adding a new token: names that model families reserve for padding or
# document ends, which chat templates do not emit inside a conversation.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


class StageError(RuntimeError):
    """A stage that cannot start as configured (output directory state, resume target, arguments)."""


@dataclass
class Run:
    recipe: StageRecipe
    stage: str
    output_dir: Path
    resume_from: str | None
    report_to: list[str]
    started: float = field(default_factory=time.perf_counter)


def start_run(recipe: StageRecipe, stage: str) -> Run:
    """Check the output directory against `resume`, save config.yaml, set up tracking."""
    output_dir = Path(recipe.output_dir)
    resume_from = find_resume_checkpoint(output_dir, recipe.resume)
    if is_main_process():
        save_recipe(recipe, output_dir)
    report_to = setup_tracking(recipe.tracking, output_dir)
    return Run(recipe, stage, output_dir, resume_from, report_to)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_complete_checkpoint(output_dir: Path, state_file: str = "trainer_state.json") -> str | None:
    """The newest checkpoint-N that was fully written.

    A run killed while saving leaves a checkpoint directory without its state file, which is
    written last (the Trainer's trainer_state.json, PPO's ppo_state.json); transformers'
    get_last_checkpoint would pick that directory anyway.
    """
    numbered = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            numbered.append((int(suffix), path))
    for _step, path in sorted(numbered, reverse=True):
        try:
            json.loads((path / state_file).read_text())
        except (OSError, ValueError):
            continue
        return str(path)
    return None


def find_resume_checkpoint(output_dir: Path, resume: str, state_file: str = "trainer_state.json") -> str | None:
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


# --------------------------------------------------------------------------- tokenizer and models


def ensure_distinct_pad(tokenizer) -> bool:
    """Give the tokenizer a pad token that the chat template never emits; True if one was added.

    Many chat checkpoints (SmolLM2 among them) pad with their end-of-turn token. Then
    the reward model's "last non-pad token" pooling skips the reply's end token, and a
    policy trained with pad == eos never learns to stop. So pad must differ from
    every token the template writes.
    """
    sample = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        tokenize=False,
    )
    used = {tokenizer.eos_token} | {tok for tok in tokenizer.all_special_tokens if tok in sample}
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.pad_token, tokenizer.unk_token, *PAD_CANDIDATES]
    for candidate in candidates:
        if candidate and candidate in vocab and candidate not in used:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def load_training_tokenizer(model: ModelConfig) -> tuple[Any, ChatTokenizer, ResolvedModel, bool]:
    """The model's tokenizer with a distinct pad token (True if one was added), right padding, its ChatTokenizer."""
    resolved = resolve_model(model.name_or_path, revision=model.revision)
    tokenizer = load_tokenizer(model, resolved)
    added = ensure_distinct_pad(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer, ChatTokenizer(tokenizer), resolved, added


def fit_to_tokenizer(model, tokenizer, added_pad: bool):
    if added_pad:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_policy(recipe: StageRecipe, resolved: ResolvedModel, tokenizer, added_pad: bool):
    from dialogrl.training.models import load_causal_lm

    return fit_to_tokenizer(load_causal_lm(recipe.model, resolved), tokenizer, added_pad)


def load_reward_model(recipe: StageRecipe, resolved: ResolvedModel, tokenizer, added_pad: bool):
    from dialogrl.training.models import load_scorer

    return fit_to_tokenizer(load_scorer(recipe.model, resolved), tokenizer, added_pad)


def lora_config(lora: LoraOptions, task_type: str):
    if not lora.enabled:
        return None
    from peft import LoraConfig

    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    # A reward model's score head is new: it must be trained and saved in full next to the adapter.
    extra = {"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      task_type=task_type, **extra)


# --------------------------------------------------------------------------- arguments


def precision_flags(precision: str) -> dict[str, bool]:
    import torch

    if precision == "auto":
        precision = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return {"bf16": precision == "bfloat16", "fp16": precision == "float16"}


def trl_arguments(config_cls: type, run: Run, *, has_eval: bool, **stage_args: Any):
    """The TRL config for a stage: the recipe's `training` section, then the stage's keys, then trainer_args."""
    import torch

    t = run.recipe.training
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [k for k in t.trainer_args if k not in valid]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, valid, n=1)) else k for k in unknown]
        raise StageError(f"training.trainer_args: {', '.join(hints)} not arguments of {config_cls.__name__}")
    args: dict[str, Any] = {
        "output_dir": str(run.output_dir),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "warmup_steps": t.warmup,
        "lr_scheduler_type": t.lr_scheduler,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        # transformers 5 renamed gradient_checkpointing; TRL configs still default it to True, so set it either way.
        ("activation_checkpointing" if "activation_checkpointing" in valid else "gradient_checkpointing"):
            t.gradient_checkpointing,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "eval_strategy": "steps" if t.eval_steps and has_eval else "no",
        "eval_steps": t.eval_steps,
        "seed": t.seed,
        "data_seed": t.seed,
        "report_to": run.report_to,
        "run_name": run.recipe.tracking.run_name or run.output_dir.name,
        # On a machine without CUDA the Trainer must build a CPU accelerator, also under torchrun.
        "use_cpu": not torch.cuda.is_available(),
        "include_num_input_tokens_seen": "non_padding",
        "dataset_num_proc": None,
        **precision_flags(t.precision),
        **stage_args,
        **t.trainer_args,
    }
    return config_cls(**args)


# --------------------------------------------------------------------------- what every stage does first


@dataclass
class StageInputs:
    run: Run
    tokenizer: Any
    resolved: ResolvedModel
    added_pad: bool  # a pad token was added: the model's embeddings must grow by one
    data: Any  # train_data.PreparedData


def prepare_stage(recipe: StageRecipe, stage: str, log=print) -> StageInputs:
    """Start the run, load the tokenizer, read and tokenise the stage's rows, report what was set aside."""
    from dialogrl.training.train_data import describe_data, prepare_data

    run = start_run(recipe, stage)
    tokenizer, chat, resolved, added_pad = load_training_tokenizer(recipe.model)
    data = prepare_data(recipe.data, stage, chat, run.output_dir, write_rejects=is_main_process())
    log(describe_data(data.summary))
    return StageInputs(run, tokenizer, resolved, added_pad, data)


def check_rows_kept(trainer, data) -> None:
    """TRL's preference trainers drop over-long rows without a word; every row was length-checked, so none may go."""
    if len(trainer.train_dataset) != len(data.train):
        raise StageError(f"the {type(trainer).__name__} kept {len(trainer.train_dataset)} of {len(data.train)} "
                         "pairs; every pair should fit data.max_length after the length check")


# --------------------------------------------------------------------------- training and finishing


@dataclass
class StageParts:
    """Everything a stage built before training; tests inspect it, `train_stage` runs it."""

    run: Run
    trainer: Any
    tokenizer: Any
    data: Any  # train_data.PreparedData


def train_stage(parts: StageParts, after_training=None) -> dict[str, Any]:
    """Train (resuming if asked), evaluate, then write the model, card and summary.

    `after_training(parts)` may return (extra metrics, extra model-card markdown).
    """
    parts.trainer.train(resume_from_checkpoint=parts.run.resume_from)
    metrics = final_log_metrics(parts.trainer)
    if parts.data.eval is not None:
        metrics |= parts.trainer.evaluate()
    extra_metrics, card = after_training(parts) if after_training else ({}, "")
    metrics |= extra_metrics
    return finish_run(parts.run, parts.trainer, parts.tokenizer, parts.data.summary, metrics,
                      parts.run.recipe.model.name_or_path, card)


def finish_run(run: Run, trainer, tokenizer, data_summary: dict[str, Any], metrics: dict[str, Any],
               base_model: str, extra_card: str = "") -> dict[str, Any]:
    """Save the final model (and merged weights if asked), the model card and run_summary.json."""
    trainer.save_model(str(run.output_dir))
    state = trainer.state
    seconds = time.perf_counter() - run.started
    summary = {
        "stage": run.stage,
        "status": "complete",
        "base_model": base_model,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "resumed_from": run.resume_from,
        "world_size": trainer.accelerator.num_processes,
        "seconds": round(seconds, 1),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(state.num_input_tokens_seen / metrics["train_runtime"], 1)
        if metrics.get("train_runtime") else None,
        "metrics": metrics,
        "data": data_summary,
    }
    if not trainer.accelerator.is_main_process:
        return summary
    tokenizer.save_pretrained(str(run.output_dir))
    state.save_to_json(str(run.output_dir / "trainer_state.json"))  # the whole log history, for comparisons
    if run.recipe.lora.enabled and run.recipe.lora.merge:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(str(run.output_dir / MERGED_DIRNAME))
        tokenizer.save_pretrained(str(run.output_dir / MERGED_DIRNAME))
        save_recipe(run.recipe, run.output_dir / MERGED_DIRNAME)
        summary["merged_dir"] = str(run.output_dir / MERGED_DIRNAME)
    (run.output_dir / "README.md").write_text(model_card(run, summary, extra_card))
    (run.output_dir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def final_log_metrics(trainer) -> dict[str, float]:
    """The last logged value of every training metric (loss, rewards/..., learning rate)."""
    last: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                last[key] = value
    return last


def model_card(run: Run, summary: dict[str, Any], extra: str = "") -> str:
    data = summary["data"]
    rows = [f"| {s['path']} ({s['split']}) | {s['rows']} | {s['invalid']} | {s['wrong_kind']} |"
            for role in ("train", "eval") for s in data["sources"][role]]
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(summary["metrics"].items())
                        if isinstance(v, (int, float)))
    adapter = "a LoRA adapter (load with peft)" if run.recipe.lora.enabled else "full weights"
    merged = f" The adapter merged into the base is in `{MERGED_DIRNAME}/`." if "merged_dir" in summary else ""
    return f"""---
base_model: {summary['base_model']}
library_name: transformers
tags: [dialogrl, {run.stage}]
---
# {run.output_dir.name}

`dialogrl {run.stage}` from **{summary['base_model']}**: {adapter}.{merged}
{summary['global_step']} optimizer steps in {summary['seconds']:.0f} s
({summary['tokens_seen']} tokens seen){f", resumed from {summary['resumed_from']}" if summary['resumed_from'] else ""}.

## Data
Training rows: {data['train']['rows']}; held-out rows: {data['eval']['rows']} ({data['eval_from']});
max length {data['max_length']} tokens. Set aside (in `rejects.jsonl`, never silently):
{json.dumps(data['rejects']) if data['rejects'] else 'none'}.

| source | rows read | invalid | wrong kind |
|---|---|---|---|
{chr(10).join(rows)}

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
