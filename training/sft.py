"""`dialogrl sft --config RECIPE`: supervised fine-tuning with the loss on every assistant turn."""

from __future__ import annotations

from dataclasses import dataclass

from dialogrl.data.options import option
from dialogrl.training import packed_attention
from dialogrl.training.config import register_recipe
from dialogrl.training.stage_config import StageRecipe
from dialogrl.training.trainer_setup import (
    StageParts,
    load_policy,
    lora_config,
    prepare_stage,
    train_stage,
    trl_arguments,
)


@register_recipe("sft")
@dataclass
class SFTRecipe(StageRecipe):
    packing: bool = option(
        False, help="Padding-free packing: rows are packed into sequences of up to data.max_length tokens, "
        "position ids restart at each row and no row attends to another; no padding is computed. Attention runs "
        "per conversation (flash-attention's varlen kernel if model.attn_implementation names one, else SDPA on "
        "each conversation's slice), never over a mask as wide as the packed row."
    )


def build(recipe: SFTRecipe, log=print) -> StageParts:
    from trl import SFTConfig, SFTTrainer

    inputs = prepare_stage(recipe, "sft", log)
    model = load_policy(recipe, inputs.resolved, inputs.tokenizer, inputs.added_pad)
    if recipe.packing:
        log(f"packing: attention per conversation ({packed_attention.use_for_packing(model)})")
    args = trl_arguments(
        SFTConfig, inputs.run, has_eval=inputs.data.eval is not None,
        max_length=recipe.data.max_length, packing=recipe.packing, padding_free=recipe.packing,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=inputs.data.train, eval_dataset=inputs.data.eval,
                         processing_class=inputs.tokenizer, peft_config=lora_config(recipe.lora, "CAUSAL_LM"))
    return StageParts(inputs.run, trainer, inputs.tokenizer, inputs.data)


def main(recipe: SFTRecipe, log=print) -> dict:
    return train_stage(build(recipe, log))
