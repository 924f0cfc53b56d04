"""Counts that cannot be zero or negative are refused when the recipe is read, with the key named."""

from __future__ import annotations

import pytest

from dialogrl.training.config import RecipeError, load_recipe, recipe_kinds


@pytest.mark.parametrize(("stage", "override", "key"), [
    ("ppo", "ppo.updates=-1", "ppo.updates"),
    ("ppo", "ppo.minibatch_episodes=0", "ppo.minibatch_episodes"),
    ("ppo", "ppo.epochs=0", "ppo.epochs"),
    ("sft", "training.per_device_batch_size=0", "training.per_device_batch_size"),
    ("dpo", "training.save_steps=0", "training.save_steps"),
    ("ppo", "sampling.max_new_tokens=0", "sampling.max_new_tokens"),
])
def test_a_count_below_its_minimum_is_refused_naming_the_key(stage, override, key):
    with pytest.raises(RecipeError, match=rf"'{key}' must be >= 1, got -?\d+"):
        load_recipe(None, [override], expected=recipe_kinds()[stage])


def test_the_smallest_allowed_value_loads():
    recipe = load_recipe(None, ["ppo.updates=1", "ppo.epochs=1", "reward.rule_weight=1"], expected=recipe_kinds()["ppo"])
    assert recipe.ppo.updates == 1 and recipe.ppo.epochs == 1


def test_recipe_keys_show_the_minimum():
    from dialogrl.training.config import describe_recipe

    rows = {key: text for key, _type, _default, text in describe_recipe(recipe_kinds()["ppo"])}
    assert rows["ppo.updates"].endswith("(at least 1)")
    assert "(at least" not in rows["ppo.learning_rate"]
