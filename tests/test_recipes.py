"""Every file under recipes/ parses and validates; every recipe key is documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dialogrl.training.config import describe_recipe, dump_recipe, load_recipe, recipe_kinds

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACCELERATE = RECIPES / "accelerate"
STAGE_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if ACCELERATE not in p.parents)
ACCELERATE_CONFIGS = sorted(ACCELERATE.glob("*.yaml")) if ACCELERATE.is_dir() else []


def test_there_are_recipes():
    assert STAGE_RECIPES, "recipes/ holds no stage recipe"


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_stage_recipe_loads(path):
    recipe = load_recipe(path)
    head = path.read_text().splitlines()[:5]
    assert any(line.startswith("#") and "dialogrl " in line for line in head), (
        f"{path}: the first lines should show the command that runs the recipe"
    )
    # The resolved form is a fixed point: dumping and reloading changes nothing.
    assert yaml.safe_load(dump_recipe(recipe))["stage"] == type(recipe).stage


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes >= 1


@pytest.mark.parametrize("stage", sorted(recipe_kinds()))
def test_every_recipe_field_has_help(stage):
    kind = recipe_kinds()[stage]
    for key, _type, _default, help_text in describe_recipe(kind):
        assert help_text.strip(), f"{stage}: '{key}' has no help text"
    assert dataclasses.is_dataclass(kind)


def test_cpu_accelerate_config_really_starts_two_processes():
    import os
    import shutil
    import subprocess

    launcher = shutil.which("accelerate", path=os.path.dirname(__import__("sys").executable))
    script = Path(__file__).parent / "scripts" / "world_size.py"
    result = subprocess.run(
        [launcher, "launch", "--config_file", str(ACCELERATE / "cpu.yaml"), str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    import re

    # Both workers share one stdout, so their lines may interleave: match, don't split.
    reports = sorted(re.findall(r"rank=\d+ world=\d+ type=[A-Z_]+", result.stdout))
    assert reports == ["rank=0 world=2 type=MULTI_CPU", "rank=1 world=2 type=MULTI_CPU"]


# The hub datasets recipes may name, with their real splits and the shape of one row (from the
# dataset cards). A recipe naming another id, a split that does not exist, or a set whose rows the
# stage cannot read fails here, without hub access.
HUB_DATASETS = {
    "HuggingFaceH4/ultrachat_200k": {
        "splits": {"train_sft", "test_sft", "train_gen", "test_gen"},
        "row": {"prompt": "Hi?", "prompt_id": "0",
                "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    },
    "HuggingFaceH4/ultrafeedback_binarized": {
        "splits": {"train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen"},
        "row": {"prompt": "Hi?", "prompt_id": "0", "score_chosen": 8.0, "score_rejected": 3.0,
                "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go."}],
                "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    },
}


def _hub_sources(recipe):
    data = getattr(recipe, "data", None)
    sources = [*getattr(data, "train", []), *getattr(data, "eval", [])] if data is not None else []
    return [s for s in sources if "/" in s.path and not Path(s.path).exists() and not s.path.startswith(
        ("outputs/", "./", "/", "corpus:"))]


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_hub_datasets_in_recipes_are_real_and_readable(path):
    from dialogrl.data.records import Conversation, PreferencePair, normalise_row

    recipe = load_recipe(path)
    for source in _hub_sources(recipe):
        assert source.path in HUB_DATASETS, f"{path}: unknown hub dataset {source.path}"
        known = HUB_DATASETS[source.path]
        assert source.split in known["splits"], f"{path}: {source.path} has no split {source.split}"
        record = normalise_row(known["row"])
        expected = Conversation if type(recipe).stage == "sft" else PreferencePair
        assert isinstance(record, expected), f"{path}: {source.path} rows do not suit a {type(recipe).stage} stage"
        if expected is PreferencePair:
            assert [m["role"] for m in record.chosen] == ["assistant"]  # the repeated prompt was taken out


def test_the_multi_gpu_recipes_use_hub_data():
    qwen = [load_recipe(p) for p in STAGE_RECIPES if p.parent.name == "qwen2.5-7b-instruct"]
    assert {type(r).stage for r in qwen} >= {"sft", "reward", "dpo", "ppo"}
    assert all(_hub_sources(r) for r in qwen if type(r).stage in ("sft", "reward", "dpo"))
