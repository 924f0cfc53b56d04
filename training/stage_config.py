"""Recipe sections shared by the training stages (sft, reward, dpo, ppo).

Each stage's recipe is `StageRecipe` plus the stage's own keys. The sections
map onto TRL/transformers arguments in `trainer_setup.py`; anything not named
here can still reach the trainer through `training.trainer_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dialogrl.data.options import option
from dialogrl.training.models import ModelConfig
from dialogrl.training.tracking import TrackingConfig


@dataclass
class DataSource:
    path: str = option(
        "outputs/smollm2-135m/data/sft",
        help="Rows to train on: a directory from `dialogrl data build` (or any save_to_disk dataset), a "
        ".jsonl/.json/.parquet file, a hub dataset id, or corpus:chitchat.",
    )
    split: str = option("train", help="Split to read from a hub dataset or a DatasetDict directory.")
    limit: int | None = option(None, help="Read at most this many rows from the start of the source; null for all.")


@dataclass
class TrainData:
    train: list[DataSource] = option(default_factory=lambda: [DataSource()], help="Training sources, concatenated.")
    eval: list[DataSource] = option(
        default_factory=list, help="Held-out sources; when empty, eval_fraction of the training dialogues is held out."
    )
    eval_fraction: float = option(
        0.05, help="Share of training dialogues held out for evaluation when `eval` is empty (0 for none). Rows "
        "from the same dialogue stay on the same side."
    )
    max_length: int = option(
        1024, minimum=1, help="Longest row in tokens. Longer rows are not cut: they are counted, reported and written to "
        "rejects.jsonl in the output directory."
    )
    on_invalid: Literal["error", "skip"] = option(
        "skip", help="Rows that fail validation: error stops with the list; skip counts them into rejects.jsonl."
    )
    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train: give at least one source")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be at least 8 tokens, got {self.max_length}")


def preference_data() -> TrainData:
    """Default data of the preference stages: the pairs `dialogrl data build` writes."""
    return TrainData(train=[DataSource(path="outputs/smollm2-135m/data/preferences")])


@dataclass
class LoraOptions:
    enabled: bool = option(False, help="Train LoRA adapters (PEFT) instead of every weight.")
    r: int = option(16, minimum=1, help="LoRA rank.")
    alpha: int = option(32, minimum=1, help="LoRA alpha (scaling = alpha / r).")
    dropout: float = option(0.05, help="Dropout on the LoRA branch.")
    target_modules: list[str] = option(
        default_factory=lambda: ["all-linear"], help="Modules to adapt: names (q_proj, v_proj, ...) or all-linear."
    )
    merge: bool = option(
        False, help="Also write the base with the adapter merged in, to OUTPUT_DIR/merged (what later stages load)."
    )


@dataclass
class Optimisation:
    learning_rate: float = option(1e-5, help="Peak learning rate.")
    epochs: float = option(1.0, help="Passes over the training rows (ignored when max_steps > 0).")
    max_steps: int = option(-1, help="Optimizer steps to run; -1 derives them from epochs.")
    per_device_batch_size: int = option(4, minimum=1, help="Rows (or pairs) per process per micro-batch.")
    gradient_accumulation_steps: int = option(1, minimum=1, help="Micro-batches per optimizer step.")
    warmup: float = option(0.03, help="Warm-up: a fraction of the steps when < 1, else a number of steps.")
    lr_scheduler: str = option("cosine", help="transformers scheduler name: linear, cosine, constant_with_warmup, ...")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Mixed precision: auto = bfloat16 on a GPU that supports it, float32 on CPU."
    )
    gradient_checkpointing: bool = option(False, help="Recompute activations in the backward pass to save memory.")
    group_by_length: bool = option(
        False, help="Draw batches of similar length (transformers' LengthGroupedSampler: shuffled mega-batches, "
        "each sorted by length), so short rows are not padded to a long one. Pair stages key on the longer side "
        "of each pair; run_summary.json shows the padding share in random and in grouped order."
    )
    logging_steps: int = option(5, minimum=1, help="Log the training metrics every this many steps.")
    save_steps: int = option(50, minimum=1, help="Write a resumable checkpoint every this many steps.")
    save_total_limit: int = option(2, minimum=1, help="Resumable checkpoints kept on disk (the newest ones).")
    eval_steps: int | None = option(None, help="Evaluate on the held-out rows every this many steps; null: at the end only.")
    seed: int = option(0, help="Seed for weights init, shuffling and dropout.")
    trainer_args: dict[str, Any] = option(
        default_factory=dict,
        help="Any other argument of the TRL config class (SFTConfig, RewardConfig, DPOConfig), passed as is; "
        "unknown names are refused.",
    )

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if self.per_device_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("training.per_device_batch_size and gradient_accumulation_steps must be >= 1")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ValueError("training: set max_steps > 0, or max_steps: -1 with epochs > 0")


@dataclass
class StageRecipe:
    """Keys every training stage has."""

    model: ModelConfig = option(default_factory=ModelConfig, help="The model to start from.")
    data: TrainData = option(default_factory=TrainData, help="Where the rows come from and how they are checked.")
    training: Optimisation = option(default_factory=Optimisation, help="Optimizer, schedule and checkpointing.")
    lora: LoraOptions = option(default_factory=LoraOptions, help="LoRA adapters instead of full fine-tuning.")
    tracking: TrackingConfig = option(default_factory=TrackingConfig, help="Where metrics are logged.")
    output_dir: str = option("outputs/run", help="Checkpoints, the final model, config.yaml and the model card.")
    resume: str = option(
        "auto", help="auto: continue from the newest checkpoint in output_dir if there is one; never: start "
        "over (the directory must hold no checkpoint); or a checkpoint directory to continue from."
    )
