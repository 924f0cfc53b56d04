"""What every TRL-backed stage does around its trainer: model, pad token, LoRA, arguments, save.

A stage's `main(recipe)` reads as: `start_run` -> `load_policy`/`load_reward_model`
-> `prepare_data` -> `trl_arguments` -> build the TRL trainer -> `train` ->
`finish_run`. The run's lifecycle (resume, checkpoint rotation, run_summary.json,
model card) is `run_lifecycle.py`, shared with the ppo stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any

from dialogrl.data.chat_tokens import ChatTokenizer
from dialogrl.training import launch_backend, length_groups
from dialogrl.training.models import (
    ModelConfig,
    ResolvedModel,
    load_tokenizer,
    resolve_model,
    stop_tokens,
)
from dialogrl.training.run_lifecycle import (
    TRAINER_STATE_FILENAME,
    Run,
    StageError,
    checkpoint_rotation_callback,
    distributed_backend,
    is_main_process,
    run_summary,
    start_run,
    write_run_outputs,
)
from dialogrl.training.stage_config import LoraOptions, StageRecipe

# Pad candidates tried before adding a new token: names that model families reserve for padding or
# document ends, which chat templates do not emit inside a conversation.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


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
    return tokenizer, ChatTokenizer(tokenizer, stop_tokens=stop_tokens(model, tokenizer, resolved)), resolved, added


def fit_to_tokenizer(model, tokenizer, added_pad: bool, seed: int = 0):
    """Grow the embeddings for an added pad token (the new row drawn from `seed`, so a policy and its
    reference, or two processes, get the same one) and record the pad id."""
    from dialogrl.training.models import seeded_init

    if added_pad:
        with seeded_init(seed):
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

    return fit_to_tokenizer(load_scorer(recipe.model, resolved, seed=recipe.training.seed), tokenizer, added_pad)


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
        "save_total_limit": None,  # train_stage rotates checkpoints (run_lifecycle.rotate_checkpoints)
        "eval_strategy": "steps" if t.eval_steps and has_eval else "no",
        "eval_steps": t.eval_steps,
        "seed": t.seed,
        "data_seed": t.seed,
        "report_to": run.report_to,
        "run_name": run.recipe.tracking.run_name or run.output_dir.name,
        # On a machine without CUDA the Trainer must build a CPU accelerator, also under torchrun.
        "use_cpu": not torch.cuda.is_available(),
        "include_num_input_tokens_seen": "non_padding",
        "train_sampling_strategy": "group_by_length" if t.group_by_length else "random",
        "length_column_name": length_groups.LENGTH_COLUMN,
        "dataset_num_proc": None,
        **precision_flags(t.precision),
        **launch_backend.trainer_arguments(),
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

    launch_backend.engage_launch_backend()  # before the Trainer builds its Accelerator: FSDP on CPU launches too
    run = start_run(recipe, stage)
    tokenizer, chat, resolved, added_pad = load_training_tokenizer(recipe.model)
    data = prepare_data(recipe.data, stage, chat, run.output_dir, write_rejects=is_main_process())
    if stage in ("reward", "dpo"):
        t = recipe.training
        data.summary["train"]["padding_share"] = length_groups.padding_report(data.train, t.per_device_batch_size,
                                                                              t.seed)
        if t.group_by_length:  # the Trainer groups the held-out batches by length as well
            data.train = length_groups.with_length_column(data.train)
            if data.eval is not None:
                data.eval = length_groups.with_length_column(data.eval)
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
    parts.trainer.add_callback(checkpoint_rotation_callback(parts.run.recipe.training.save_total_limit))
    parts.trainer.train(resume_from_checkpoint=parts.run.resume_from)
    metrics = final_log_metrics(parts.trainer)
    if parts.data.eval is not None:
        metrics |= parts.trainer.evaluate()
    extra_metrics, card = after_training(parts) if after_training else ({}, "")
    metrics |= extra_metrics
    return finish_run(parts.run, parts.trainer, parts.tokenizer, parts.data.summary, metrics, card)


def finish_run(run: Run, trainer, tokenizer, data_summary: dict[str, Any], metrics: dict[str, Any],
               extra_card: str = "") -> dict[str, Any]:
    """Save the final model, then (main process) trainer_state.json and the shared run outputs."""
    trainer.save_model(str(run.output_dir))  # every process: DeepSpeed and FSDP gather the weights here
    state = trainer.state
    summary = run_summary(run, global_step=state.global_step, max_steps=state.max_steps,
                          backend=distributed_backend(trainer.accelerator, trainer.model_wrapped),
                          world_size=trainer.accelerator.num_processes, tokens_seen=state.num_input_tokens_seen,
                          train_seconds=metrics.get("train_runtime"), metrics=metrics, data=data_summary)
    if not trainer.accelerator.is_main_process:
        return summary
    state.save_to_json(str(run.output_dir / TRAINER_STATE_FILENAME))  # the whole log history, for comparisons
    model = trainer.accelerator.unwrap_model(trainer.model)
    if run.recipe.lora.enabled and run.recipe.lora.merge and holds_shards(model):
        model = adapter_on_whole_base(run, model, tokenizer)
    write_run_outputs(run, summary, model=model, tokenizer=tokenizer,
                      description="", data_section=data_section(data_summary), extra_card=extra_card)
    return summary


def holds_shards(model) -> bool:
    """This process holds only its part of the weights: ZeRO-3 partitions (`ds_tensor`) or FSDP2 DTensors."""
    return any(hasattr(p, "ds_tensor") or hasattr(p, "device_mesh") for p in model.parameters())


def adapter_on_whole_base(run: Run, sharded, tokenizer):
    """The adapter just saved in the output directory, on a freshly loaded, unsharded base model.

    Under ZeRO-3 this process holds only its shard of every weight outside a gather, so merging the
    trained model in place writes empty tensors; under FSDP2 the merge is a DTensor operation that waits
    for the other processes, which are not merging (a hang). The saved adapter (gathered whole by
    `save_model`) on the base model it was trained from merges into what was trained. The base is loaded
    whole: partitioned, this process (the main one, alone) would wait for the others in the first gather.
    """
    from peft import PeftModel

    from dialogrl.training.models import load_causal_lm, load_scorer

    scorer = type(sharded.get_base_model()).__name__.endswith("ForSequenceClassification")
    with launch_backend.unsharded_loading():
        base = (load_scorer(run.recipe.model, seed=run.recipe.training.seed) if scorer
                else load_causal_lm(run.recipe.model))
    added_pad = base.get_input_embeddings().num_embeddings < len(tokenizer)
    return PeftModel.from_pretrained(fit_to_tokenizer(base, tokenizer, added_pad), str(run.output_dir))


def final_log_metrics(trainer) -> dict[str, float]:
    """The last logged value of every training metric (loss, rewards/..., learning rate)."""
    last: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                last[key] = value
    return last


def data_section(data: dict[str, Any]) -> str:
    """The model card's data section for rows read by `train_data.prepare_data`."""
    rows = [f"| {s['path']} ({s['split']}) | {s['rows']} | {s['invalid']} | {s['wrong_kind']} |"
            for role in ("train", "eval") for s in data["sources"][role]]
    rejects = json.dumps(data["rejects"]) if data["rejects"] else "none"
    return f"""Training rows: {data['train']['rows']}; held-out rows: {data['eval']['rows']} ({data['eval_from']});
max length {data['max_length']} tokens. Set aside (in `rejects.jsonl`, never silently): {rejects}.

| source | rows read | invalid | wrong kind |
|---|---|---|---|
{chr(10).join(rows)}"""
