"""`dialogrl dpo --config RECIPE`: direct preference optimisation on per-turn pairs.

Each pair is (the dialogue up to a user turn, a chosen reply, a rejected reply),
so a multi-turn dialogue contributes a comparison at every round it was built
for. The loss covers the compared reply and its end token only.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dialogrl.data.options import option
from dialogrl.training import length_groups
from dialogrl.training.config import register_recipe
from dialogrl.training.stage_config import StageRecipe, TrainData, preference_data
from dialogrl.training.trainer_setup import (
    StageParts,
    check_rows_kept,
    load_policy,
    lora_config,
    prepare_stage,
    train_stage,
    trl_arguments,
)


@register_recipe("dpo")
@dataclass
class DPORecipe(StageRecipe):
    data: TrainData = option(default_factory=preference_data, help="Preference pairs to train on.")
    beta: float = option(0.1, help="DPO temperature: how far the policy may move from the reference.")
    loss_type: list[str] = option(
        default_factory=lambda: ["sigmoid"],
        help="TRL DPO losses, combined: sigmoid, ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, aot, "
        "aot_unpaired, apo_zero, apo_down, discopop, sft, ...",
    )
    loss_weights: list[float] | None = option(None, help="Weight of each loss_type entry; null: all 1.")
    reference: Literal["auto", "copy", "precomputed"] = option(
        "auto", help="The reference policy. auto: the base with the LoRA adapter disabled when lora.enabled, "
        "else a frozen copy. copy: a frozen copy in memory. precomputed: reference log-probs computed once "
        "before training (no second model in memory)."
    )

    def __post_init__(self) -> None:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} loss_type(s)")
        if self.reference == "copy" and self.lora.enabled:
            raise ValueError("reference: copy with lora.enabled keeps a needless second model; use auto "
                             "(adapter disabled) or precomputed")


def pretokenized_dpo_trainer():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer that takes rows already split into prompt_ids / chosen_ids / rejected_ids.

        TRL 1.16 always re-tokenises conversations and finds the reply where the prompt
        and prompt+reply token lists diverge; the project's ChatTokenizer already gives
        exact reply boundaries for any template, so those rows are used as they are.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


REFERENCE_CACHE_DIRNAME = "reference-logps"


def on_disk(dataset, directory: Path):
    """`dataset` memory-mapped from files in `directory`, written once by the main process.

    TRL's precomputed reference writes its log-probs next to the dataset's cache files (main process)
    and every process reads them back; an in-memory dataset has none, so each process looks in its own
    temporary directory and the others find nothing. The directory is in output_dir, which every process
    sees (TRL assumes the same).
    """
    from accelerate import PartialState
    from datasets import load_from_disk

    state = PartialState()
    if state.is_main_process:
        if directory.exists():
            shutil.rmtree(directory)
        dataset.save_to_disk(str(directory))
    state.wait_for_everyone()
    return load_from_disk(str(directory))


def build(recipe: DPORecipe, log=print) -> StageParts:
    from trl import DPOConfig

    inputs = prepare_stage(recipe, "dpo", log)
    if recipe.reference == "precomputed":
        cache = inputs.run.output_dir / REFERENCE_CACHE_DIRNAME
        inputs.data.train = on_disk(inputs.data.train, cache / "train")
        if inputs.data.eval is not None:
            inputs.data.eval = on_disk(inputs.data.eval, cache / "eval")
    model = load_policy(recipe, inputs.resolved, inputs.tokenizer, inputs.added_pad)
    reference = None
    if recipe.reference in ("copy", "auto") and not recipe.lora.enabled:
        reference = load_policy(recipe, inputs.resolved, inputs.tokenizer, inputs.added_pad).eval()
    args = trl_arguments(
        DPOConfig, inputs.run, has_eval=inputs.data.eval is not None,
        beta=recipe.beta, loss_type=recipe.loss_type, loss_weights=recipe.loss_weights,
        max_length=recipe.data.max_length, precompute_ref_log_probs=recipe.reference == "precomputed",
    )
    trainer = pretokenized_dpo_trainer()(
        model=model, ref_model=reference, args=args, train_dataset=inputs.data.train,
        eval_dataset=inputs.data.eval, processing_class=inputs.tokenizer,
        peft_config=lora_config(recipe.lora, "CAUSAL_LM"))
    check_rows_kept(trainer, inputs.data)
    if recipe.training.group_by_length:
        length_groups.keep_length_column(trainer)
    return StageParts(inputs.run, trainer, inputs.tokenizer, inputs.data)


def main(recipe: DPORecipe, log=print) -> dict:
    return train_stage(build(recipe, log))
