"""A reward model where a policy belongs, or a language model where a reward model belongs, is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_ppo import save_reward_model

from dialogrl.training.models import ModelConfig, ModelResolutionError, load_causal_lm, load_scorer

CLI = [sys.executable, "-m", "dialogrl.training.cli"]


def test_a_reward_model_is_not_loaded_as_a_language_model(tiny_model_dir, tmp_path):
    reward_model = save_reward_model(tiny_model_dir, tmp_path / "rm")
    with pytest.raises(ModelResolutionError, match="is a sequence classifier"):
        load_causal_lm(ModelConfig(name_or_path=str(reward_model)))


def test_a_language_model_does_not_score_as_a_reward_model(tiny_model_dir):
    with pytest.raises(ModelResolutionError, match="is not a reward model"):
        load_scorer(ModelConfig(name_or_path=str(tiny_model_dir)), trained_head=True)
    # Starting a reward model or a critic from it is what the reward stage and gae do: allowed.
    assert load_scorer(ModelConfig(name_or_path=str(tiny_model_dir))).score.out_features == 1


def test_reward_score_with_a_language_model_is_a_one_line_error(tiny_model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    out = subprocess.run(CLI + ["reward", "score", "--model", str(tiny_model_dir), str(rows)],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "is not a reward model" in out.stderr and "Traceback" not in out.stderr


def test_eval_of_a_reward_model_is_a_one_line_error(tiny_model_dir, tmp_path):
    reward_model = save_reward_model(tiny_model_dir, tmp_path / "rm")
    out = subprocess.run(CLI + ["eval", "--model", str(reward_model), f"output_dir={tmp_path / 'eval'}",
                                "scenarios.dialogues=2", "scenarios.rounds=1", "responsiveness.enabled=false"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "is a sequence classifier" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_checkpoint_is_a_one_line_error_with_its_path(tiny_model_dir, tmp_path, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    with pytest.raises(ModelResolutionError) as caught:
        load_causal_lm(ModelConfig(name_or_path=str(broken)))
    message = str(caught.value)
    assert str(broken) in message and "could not load the model" in message and "\n" not in message
