"""`dialogrl reward --config RECIPE`: a reward model on per-turn preference pairs.

Trained with TRL's RewardTrainer (Bradley-Terry loss on chosen vs rejected). Each
row ends on the compared reply's end token, where the score is read, so the same
model scores every turn of a dialogue in one pass (see reward_scoring.py).
After training, held-out accuracy is reported overall and by turn index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dialogrl.data.options import option
from dialogrl.training import length_groups
from dialogrl.training.config import register_recipe
from dialogrl.training.reward_scoring import pair_accuracy
from dialogrl.training.stage_config import StageRecipe, TrainData, preference_data
from dialogrl.training.trainer_setup import (
    StageParts,
    check_rows_kept,
    load_reward_model,
    lora_config,
    prepare_stage,
    train_stage,
    trl_arguments,
)

ACCURACY_FILENAME = "eval_accuracy.json"


@register_recipe("reward")
@dataclass
class RewardRecipe(StageRecipe):
    data: TrainData = option(default_factory=preference_data, help="Preference pairs to train on.")
    center_rewards_coefficient: float | None = option(
        None, help="Weight of a penalty on the squared mean score, keeping scores centred on 0 (e.g. 0.01)."
    )

    def __post_init__(self) -> None:
        if self.lora.enabled and not self.lora.merge:
            raise ValueError("a LoRA reward model must set lora.merge: true, so that the checkpoint loads with "
                             "AutoModelForSequenceClassification (later stages read OUTPUT_DIR/merged)")


def accuracy_table(accuracy: dict) -> str:
    rows = "\n".join(f"| {turn} | {v['pairs']} | {v['accuracy']:.3f} |" for turn, v in accuracy["by_turn"].items())
    return (f"\n## Held-out accuracy by turn\nOverall {accuracy['accuracy']:.3f} on {accuracy['pairs']} pairs "
            f"(mean margin {accuracy['mean_margin']:.3f}).\n\n| turn | pairs | accuracy |\n|---|---|---|\n{rows}\n")


def build(recipe: RewardRecipe, log=print) -> StageParts:
    from trl import RewardConfig, RewardTrainer

    inputs = prepare_stage(recipe, "reward", log)
    model = load_reward_model(recipe, inputs.resolved, inputs.tokenizer, inputs.added_pad)
    args = trl_arguments(
        RewardConfig, inputs.run, has_eval=inputs.data.eval is not None,
        max_length=recipe.data.max_length, center_rewards_coefficient=recipe.center_rewards_coefficient,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=inputs.data.train, eval_dataset=inputs.data.eval,
                            processing_class=inputs.tokenizer, peft_config=lora_config(recipe.lora, "SEQ_CLS"))
    if recipe.training.group_by_length:
        length_groups.keep_length_column(trainer)
    check_rows_kept(trainer, inputs.data)
    return StageParts(inputs.run, trainer, inputs.tokenizer, inputs.data)


def held_out_accuracy(parts: StageParts, log=print) -> tuple[dict, str]:
    """Accuracy of the trained model on the held-out pairs, overall and by turn index."""
    if parts.data.eval is None or not parts.trainer.accelerator.is_main_process:
        return {}, ""
    accuracy = pair_accuracy(parts.trainer.model.eval(), parts.data.eval, pad_id=parts.tokenizer.pad_token_id,
                             batch_size=parts.run.recipe.training.per_device_batch_size)
    (parts.run.output_dir / ACCURACY_FILENAME).write_text(json.dumps(accuracy, indent=2) + "\n")
    log(f"held-out accuracy {accuracy['accuracy']:.3f} on {accuracy['pairs']} pairs; by turn: "
        + ", ".join(f"{t}: {v['accuracy']:.2f}" for t, v in accuracy["by_turn"].items()))
    metrics = {"eval_accuracy": accuracy["accuracy"], "eval_mean_margin": accuracy["mean_margin"]}
    metrics |= {f"eval_accuracy_turn_{t}": v["accuracy"] for t, v in accuracy["by_turn"].items()}
    return metrics, accuracy_table(accuracy)


def main(recipe: RewardRecipe, log=print) -> dict:
    return train_stage(build(recipe, log), lambda parts: held_out_accuracy(parts, log))
