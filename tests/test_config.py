"""Typed recipes: parsing, overrides, error messages and the saved resolved config."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from dialogrl.data.options import option
from dialogrl.training.config import (
    RecipeError,
    describe_recipe,
    load_recipe,
    register_recipe,
    save_recipe,
)


@dataclass
class Optim:
    learning_rate: float = option(1e-5, help="Peak learning rate.")
    warmup_steps: int = option(0, help="Linear warm-up steps.")
    schedule: Literal["cosine", "linear"] = option("cosine", help="Learning-rate schedule.")

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@register_recipe("toy")
@dataclass
class ToyRecipe:
    name: str = option(help="Required run name.")
    optim: Optim = option(default_factory=Optim, help="Optimiser settings.")
    tags: list[str] = option(default_factory=list, help="Free-form tags.")
    limit: int | None = option(None, help="Optional row limit.")
    use_lora: bool = option(False, help="Train LoRA adapters.")


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_nested_dataclasses(tmp_path):
    path = write(tmp_path, "stage: toy\nname: run\noptim:\n  learning_rate: 1e-4\n  schedule: linear\ntags: [a, b]\n")
    recipe = load_recipe(path)
    assert isinstance(recipe, ToyRecipe)
    # YAML 1.1 reads `1e-4` as a string; a float field still gets the number.
    assert recipe.optim.learning_rate == pytest.approx(1e-4)
    assert recipe.optim.schedule == "linear"
    assert recipe.optim.warmup_steps == 0
    assert recipe.tags == ["a", "b"]


def test_overrides_are_typed_and_strings_stay_verbatim(tmp_path):
    path = write(tmp_path, "stage: toy\nname: run\n")
    recipe = load_recipe(
        path, ["optim.warmup_steps=10", "use_lora=true", "limit=null", "name=yes", "tags=[x, y]", "optim.learning_rate=3e-5"]
    )
    assert recipe.optim.warmup_steps == 10
    assert recipe.use_lora is True
    assert recipe.limit is None
    assert recipe.name == "yes"  # not the boolean True: string fields take the text as written
    assert recipe.tags == ["x", "y"]
    assert recipe.optim.learning_rate == pytest.approx(3e-5)


def test_misspelled_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "stage: toy\nname: run\noptim:\n  learnig_rate: 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert "'optim.learnig_rate'" in message
    assert "did you mean 'optim.learning_rate'" in message


def test_key_in_wrong_section_is_pointed_to_its_section(tmp_path):
    path = write(tmp_path, "stage: toy\nname: run\nwarmup_steps: 3\n")
    with pytest.raises(RecipeError, match=r"did you mean 'optim.warmup_steps'"):
        load_recipe(path)


def test_override_with_unknown_key_names_the_override(tmp_path):
    path = write(tmp_path, "stage: toy\nname: run\n")
    with pytest.raises(RecipeError, match=r"override 'optim.lr=1'.*unknown key 'optim.lr'"):
        load_recipe(path, ["optim.lr=1"])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name: run\noptim:\n  warmup_steps: ten\n", r"'optim.warmup_steps' expects an integer, got 'ten'"),
        ("name: run\nuse_lora: 1\n", r"'use_lora' expects true or false"),
        ("name: run\noptim:\n  schedule: cosin\n", r"must be one of 'cosine', 'linear'.*did you mean 'cosine'"),
        ("name: run\noptim: 3\n", r"'optim' expects a section of keys"),
        ("optim: {}\n", r"missing required key 'name'"),
        ("name: run\noptim:\n  learning_rate: -1\n", r"'optim': learning_rate must be > 0"),
        ("name: [run\n", r"recipe.yaml:\d+:\d+: invalid YAML"),
    ],
)
def test_bad_values_fail_with_the_key_and_reason(tmp_path, body, expected):
    path = write(tmp_path, "stage: toy\n" + body)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_recipe_of_another_stage_is_refused(tmp_path):
    from dialogrl.training.chat import ChatRecipe

    path = write(tmp_path, "stage: toy\nname: run\n")
    with pytest.raises(RecipeError, match="'toy' recipe, but the command runs 'chat' recipes"):
        load_recipe(path, expected=ChatRecipe)


def test_saved_config_reloads_to_the_same_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, "stage: toy\nname: run\n"), ["optim.learning_rate=0.5", "tags=[q]"])
    saved = save_recipe(recipe, tmp_path / "out")
    assert saved.name == "config.yaml"
    assert saved.read_text().startswith("stage: toy\n")
    assert load_recipe(saved) == recipe


def test_describe_lists_every_leaf_with_help():
    rows = {key: help_text for key, _type, _default, help_text in describe_recipe(ToyRecipe)}
    assert set(rows) == {"name", "optim.learning_rate", "optim.warmup_steps", "optim.schedule", "tags", "limit", "use_lora"}
    assert rows["optim.learning_rate"] == "Peak learning rate."


def test_option_refuses_empty_help():
    with pytest.raises(ValueError):
        option(1, help="  ")


def test_cli_misspelled_key_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "stage: chat\nsampling:\n  max_new_token: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "dialogrl.training.cli", "recipe", "show", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown key 'sampling.max_new_token'" in result.stderr
    assert "did you mean 'sampling.max_new_tokens'" in result.stderr
    assert str(path) in result.stderr


def test_a_sections_own_defaults_hold_for_the_keys_a_recipe_leaves_out():
    from dialogrl.training.data_stage import DataRecipe

    # DataRecipe samples policy replies at temperature 0.7 (its default_factory), where SamplingConfig's class
    # default is greedy: overriding one key must not fall back to the class defaults for the others.
    assert load_recipe(None, [], expected=DataRecipe).sampling.temperature == 0.7
    partial = load_recipe(None, ["sampling.max_new_tokens=64"], expected=DataRecipe).sampling
    assert (partial.max_new_tokens, partial.temperature) == (64, 0.7)
    # a dict-valued key is replaced whole, not merged with its default
    mix = load_recipe(None, ["preferences.rejected={partial: 1.0}"], expected=DataRecipe).preferences.rejected
    assert mix == {"partial": 1.0}
