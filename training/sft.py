"""`dialogrl sft --config RECIPE`: supervised fine-tuning with the loss on every assistant turn."""

from __future__ import annotations

from dataclasses import dataclass

from dialogrl.data.options import option
from dialogrl.training.config import register_recipe
from dialogrl.training.stage_config import StageRecipe
from dialogrl.training.train_data import describe_data, prepare_data
from dialogrl.training.trainer_setup import (
    StageParts,
    load_policy,
    load_training_tokenizer,
    lora_config,
    start_run,
    train_stage,
    trl_arguments,
)


@register_recipe("sft")
@dataclass
class SFTRecipe(StageRecipe):
    packing: bool = option(
        False, help="Padding-free packing: rows are packed into sequences of up to data.max_length tokens, "
        "position ids restart at each row and no row attends to another; no padding is computed."
    )


def build(recipe: SFTRecipe, log=print) -> StageParts:
    from trl import SFTConfig, SFTTrainer

    run = start_run(recipe, "sft")
    tokenizer, chat, resolved, added_pad = load_training_tokenizer(recipe.model)
    data = prepare_data(recipe.data, "sft", chat, run.output_dir)
    log(describe_data(data.summary))
    model = load_policy(recipe, resolved, tokenizer, added_pad)
    args = trl_arguments(
        SFTConfig, run, has_eval=data.eval is not None,
        max_length=recipe.data.max_length, packing=recipe.packing, padding_free=recipe.packing,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, peft_config=lora_config(recipe.lora, "CAUSAL_LM"))
    return StageParts(run, trainer, tokenizer, data)


def main(recipe: SFTRecipe, log=print) -> dict:
    return train_stage(build(recipe, log))
