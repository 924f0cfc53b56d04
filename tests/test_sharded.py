"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (recipes/accelerate/cpu-zero*.yaml), for the Trainer stages.

Each stage runs a few steps on 2 processes x 2 rows and on 1 process x 2 rows x 2 accumulation steps (the
same global batch). The backend must really be engaged (run_summary.json records it; under ZeRO-3 each
process holds half the parameters), the losses must agree at every step, and the saved model must load
with from_pretrained and give the 1-process model's logits.

Tolerance: 1e-5 on losses and 1e-4 on logits. Both runs compute in fp32; what differs is the order in
which the two halves of each gradient are summed (DeepSpeed's reduce-scatter against one process's
accumulation), which moves a loss of ~8 by rounding error (~1e-7 relative per step) over 4 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_stages import CLI, logged, write_conversations, write_pairs

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
BACKENDS = {"zero2": 2, "zero3": 3}


def _common(stage: str, tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    config = tmp_path / f"{stage}.yaml"
    config.write_text(f"stage: {stage}\n")
    data = write_pairs(tmp_path / "pairs.jsonl", 16) if stage != "sft" else write_conversations(tmp_path / "c.jsonl", 16)
    return [stage, "--config", str(config), f"model.name_or_path={tiny_model_dir}", f"data.train=[{{path: {data}}}]",
            "data.eval_fraction=0", "tracking.report_to=none", f"training.max_steps={STEPS}", "training.logging_steps=1",
            "training.per_device_batch_size=2", "training.learning_rate=1e-3"]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """stage -> output dir of its 1-process run (2 accumulation steps), made once per stage."""
    made: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in made:
            tmp = tmp_path_factory.mktemp(f"one-{stage}")
            _run([*CLI, *_common(stage, tiny_model_dir, tmp), f"output_dir={tmp / 'out'}",
                  "training.gradient_accumulation_steps=2"])
            made[stage] = tmp / "out"
        return made[stage]

    return get


def _logits(model_dir: Path, stage: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    model = loader.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.arange(3, 19).unsqueeze(0)).logits


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_a_sharded_run_on_two_processes_equals_one_process(stage, backend, tiny_model_dir, tmp_path, one_process):
    sharded = tmp_path / "sharded"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO_ROOT / "recipes" / "accelerate" / f"cpu-{backend}.yaml"), "-m", "dialogrl.training.cli"]
    _run([*launch, *_common(stage, tiny_model_dir, tmp_path), f"output_dir={sharded}"])
    single = one_process(stage)

    summary = json.loads((sharded / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["distributed"]["type"] == "DEEPSPEED" and summary["distributed"]["zero_stage"] == BACKENDS[backend]
    if backend == "zero3":
        assert summary["distributed"]["parameter_share"] == pytest.approx(0.5, abs=0.01)  # really sharded
    losses = logged(sharded, "loss")
    assert len(losses) == STEPS and losses == pytest.approx(logged(single, "loss"), abs=1e-5)
    assert torch.allclose(_logits(sharded, stage), _logits(single, stage), atol=1e-4)
