"""Length-grouped batches for the pair stages: the sampler is used, and it pads less than random order."""

import pytest
from test_stages import recipe, write_pairs

from dialogrl.training import length_groups


def test_padding_share_counts_both_sides_of_every_pair_against_the_batch_maximum():
    lengths = [(4, 2), (10, 6), (3, 3)]
    # batch 1: rows 4, 2, 10, 6 padded to 10 -> 22 real of 40; batch 2: 3, 3 padded to 3
    assert length_groups.padding_share(lengths, [0, 1, 2], 2) == pytest.approx(1 - 28 / 46)
    assert length_groups.padding_share(lengths, [2, 0, 1], 1) == pytest.approx(1 - 28 / (6 + 8 + 20))


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_grouped_batches_pad_less_than_random_ones(stage, tiny_model_dir, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from dialogrl.training import dpo, reward

    pairs = write_pairs(tmp_path / "pairs.jsonl", 48)
    module = reward if stage == "reward" else dpo
    parts = module.build(recipe(stage, tiny_model_dir, pairs, tmp_path / "out", "data.eval_fraction=0.2",
                                "training.group_by_length=true", "training.per_device_batch_size=4"),
                         log=lambda _m: None)
    trainer = parts.trainer
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    share = parts.data.summary["train"]["padding_share"]
    assert share["length_grouped"] < share["random_order"]
    # what the trainer really feeds the model pads less than random order would (its sampler shuffles with
    # its own generator, so the grouped share is the report's estimate, not the exact epoch)
    pad = trainer.processing_class.pad_token_id
    real = total = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"] if "attention_mask" in batch else batch["input_ids"] != pad
        real += int(mask.sum())
        total += mask.numel()
    assert 1 - real / total < share["random_order"] - 0.05
    assert len(list(trainer.get_eval_dataloader())) > 0  # held-out batches are grouped too: they need lengths
