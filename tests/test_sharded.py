"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on two CPU processes (recipes/accelerate/cpu-*.yaml).

Each stage runs a few steps on 2 processes x 2 rows and on 1 process x 2 rows x 2 accumulation steps (the
same global batch; PPO: 2 x N episodes against 1 x 2N). The backend must really be engaged
(run_summary.json records it; under ZeRO-3 and FSDP2 each process holds half the parameters), the losses
must agree at every step, and the saved model must load with from_pretrained and give the 1-process
model's logits. Resume, a real SIGKILL and LoRA merges are checked too.

Tolerance: 1e-5 on losses and 1e-4 on logits. Both runs compute in fp32; what differs is the order in
which the two halves of each gradient are summed (a reduce-scatter or all-reduce against one process's
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
BACKENDS = {"zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}


def _common(stage: str, tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    config = tmp_path / f"{stage}.yaml"
    config.write_text(f"stage: {stage}\n")
    data = write_pairs(tmp_path / "pairs.jsonl", 16) if stage != "sft" else write_conversations(tmp_path / "c.jsonl", 16)
    return [stage, "--config", str(config), f"model.name_or_path={tiny_model_dir}", f"data.train=[{{path: {data}}}]",
            "data.eval_fraction=0", "tracking.report_to=none", f"training.max_steps={STEPS}", "training.logging_steps=1",
            "training.per_device_batch_size=2", "training.learning_rate=1e-3"]


def _launch(backend: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO_ROOT / "recipes" / "accelerate" / f"cpu-{backend}.yaml"), "-m", "dialogrl.training.cli"]


def _ppo_args(tiny_model_dir: Path, tmp_path: Path, *overrides: str) -> list[str]:
    config = tmp_path / "ppo.yaml"
    config.write_text("stage: ppo\n")
    return ["ppo", "--config", str(config), f"model.name_or_path={tiny_model_dir}", "tracking.report_to=none",
            "ppo.updates=2", "episodes.rounds=2", *overrides]


# Sampled replies, rule reward only, no critic: PPO's group mode with one norm (the policy's) to compare.
SAMPLED_TURN_GROUP = ("reward.rm_weight=0", "reward.rule_weight=1", "sampling.max_new_tokens=6",
                      "sampling.temperature=1.0", "ppo.advantage=turn_group", "ppo.group_size=2",
                      "ppo.generation_batch_size=2", "ppo.scale_by_group_std=false", "responsiveness.enabled=false")


def _ppo_on_two_processes_and_one(backend: str, args: list[str], episodes: int, tmp_path: Path,
                                  two_only: tuple[str, ...] = ()):
    """Metrics of PPO on 2 processes x `episodes` (with `two_only` overrides too) and on 1 x twice as many,
    one minibatch per update (its rows are then the same in both runs); the runs are in tmp_path/two and
    tmp_path/one."""
    from test_ppo import metrics

    for command, n, name, extra in ((_launch(backend), episodes, "two", two_only), (CLI, 2 * episodes, "one", ())):
        _run([*command, *args, *extra, f"ppo.episodes_per_update={n}", f"ppo.minibatch_episodes={n}",
              f"output_dir={tmp_path / name}"])
    return metrics(tmp_path / "two"), metrics(tmp_path / "one")


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """(stage, overrides) -> output dir of its 1-process run (2 accumulation steps), made once each."""
    made: dict[tuple, Path] = {}

    def get(stage: str, *overrides: str) -> Path:
        key = (stage, *overrides)
        if key not in made:
            tmp = tmp_path_factory.mktemp(f"one-{stage}")
            _run([*CLI, *_common(stage, tiny_model_dir, tmp), *overrides, f"output_dir={tmp / 'out'}",
                  "training.gradient_accumulation_steps=2"])
            made[key] = tmp / "out"
        return made[key]

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
    launch = _launch(backend)
    _run([*launch, *_common(stage, tiny_model_dir, tmp_path), f"output_dir={sharded}"])
    single = one_process(stage)

    summary = json.loads((sharded / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    backend_used = summary["distributed"]
    assert backend_used["type"] == BACKENDS[backend]
    if backend.startswith("zero"):
        assert backend_used["zero_stage"] == int(backend[-1])
    else:
        assert backend_used["fsdp_version"] == 2
    if backend != "zero2":
        assert backend_used["parameter_share"] == pytest.approx(0.5, abs=0.01)  # really sharded
    losses = logged(sharded, "loss")
    assert len(losses) == STEPS and losses == pytest.approx(logged(single, "loss"), abs=1e-5)
    assert torch.allclose(_logits(sharded, stage), _logits(single, stage), atol=1e-4)


LORA = ("lora.enabled=true", "lora.r=4", "lora.merge=true", "lora.dropout=0")


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
@pytest.mark.parametrize("reference", ["precomputed", "lora"])
def test_dpo_reference_modes_sharded_equal_one_process(reference, backend, tiny_model_dir, tmp_path, one_process):
    """The two DPO references the stage test above does not use (it trains against a frozen copy):
    log-probs precomputed once before training, and the base with the LoRA adapter switched off; with
    LoRA the adapter is merged on a whole base."""
    overrides = ("reference=precomputed",) if reference == "precomputed" else LORA
    sharded = tmp_path / "sharded"
    launch = _launch(backend)
    _run([*launch, *_common("dpo", tiny_model_dir, tmp_path), *overrides, f"output_dir={sharded}"])
    single = one_process("dpo", *overrides)
    assert json.loads((sharded / "run_summary.json").read_text())["distributed"]["parameter_share"] < 0.6
    losses = logged(sharded, "loss")
    assert len(losses) == STEPS and losses == pytest.approx(logged(single, "loss"), abs=1e-5)
    assert losses[-1] < losses[0]
    model = "merged" if reference == "lora" else "."
    assert torch.allclose(_logits(sharded / model, "dpo"), _logits(single / model, "dpo"), atol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_sharded_steps_once_per_minibatch_and_clips_as_one_process(backend, tiny_model_dir, tmp_path):
    """PPO on 2 processes x 4 dialogues against 1 process x 8, sampled replies (turn_group: no critic, so
    DeepSpeed's one norm is the policy's): two epochs over an update's minibatch are two optimizer steps, the
    logged gradient norm is the real one (under ZeRO-2 it was 0, or prepare failed, before), and with
    ppo.max_grad_norm far below it the second update's scores and losses still match: the backend clipped
    where one process did. Sampled replies of different lengths make the two processes call the model a
    different number of times: under ZeRO-3 and FSDP2 this hung until rollouts gathered the weights once.
    The two processes run every row in a micro-batch of its own (gradients accumulated, DeepSpeed stepping
    at the last one only; a process with fewer rows runs zero-weighted passes to keep the collectives in
    step); the one process runs each minibatch in one pass."""
    args = _ppo_args(tiny_model_dir, tmp_path, *SAMPLED_TURN_GROUP, "ppo.epochs=2", "ppo.learning_rate=1e-2",
                     "ppo.max_grad_norm=0.05")
    two, one = _ppo_on_two_processes_and_one(backend, args, 4, tmp_path, two_only=("ppo.micro_batch_tokens=1",))
    summary = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    assert summary["distributed"]["type"] == BACKENDS[backend] and summary["world_size"] == 2
    if backend != "zero2":
        assert summary["distributed"]["parameter_share"] == pytest.approx(0.5, abs=0.01)
    assert [s["optimizer/steps"] for s in two] == [s["optimizer/steps"] for s in one] == [2, 4]
    assert one[0]["grad_norm/policy"] > 10 * 0.05  # the clip binds
    for update_two, update_one in zip(two, one, strict=True):
        for key in ("reward/score", "kl/episode", "loss/policy", "policy/ratio", "grad_norm/policy"):
            assert update_two[key] == pytest.approx(update_one[key], rel=1e-4, abs=1e-5), (update_two["update"], key)
    assert abs(one[1]["kl/episode"]) > 1e-4  # update 2 plays the clipped, trained policy


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_a_sharded_run_stopped_after_a_checkpoint_resumes_to_the_same_model(backend, tiny_model_dir, tmp_path):
    """What a run killed between checkpoint-2 and step 4 leaves on disk (checkpoint-2 and no record of the
    end), rebuilt from a finished run: the rerun loads the sharded checkpoint (DeepSpeed's, or FSDP's model
    and optimizer files) and ends with the uninterrupted run's losses and weights."""
    import shutil

    launch = _launch(backend)
    common = [*_common("sft", tiny_model_dir, tmp_path), "training.save_steps=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run([*launch, *common, f"output_dir={whole}"])
    shutil.copytree(whole / "checkpoint-2", cut / "checkpoint-2")
    for name in ("config.yaml", "fingerprint.json"):
        shutil.copy(whole / name, cut / name)
    # A mark only the checkpoint holds: a run that trained from scratch instead of resuming would lack it.
    state_path = cut / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"][0]["written_before_the_stop"] = True
    state_path.write_text(json.dumps(state))
    _run([*launch, *common, f"output_dir={cut}"])
    history = json.loads((cut / "trainer_state.json").read_text())["log_history"]
    assert history[0].get("written_before_the_stop") is True
    summary = json.loads((cut / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(cut / "checkpoint-2")
    assert summary["distributed"]["type"] == BACKENDS[backend] and summary["distributed"]["parameter_share"] < 0.6
    assert logged(cut, "loss") == pytest.approx(logged(whole, "loss"), abs=1e-6)
    assert torch.allclose(_logits(cut, "sft"), _logits(whole, "sft"), atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_with_a_critic_sharded_matches_one_process(backend, tiny_model_dir, tmp_path):
    """GAE (policy and critic in one prepared module), greedy replies, 2 processes x 2 episodes vs 1 x 4,
    clipping off: the same scores and losses on both updates; DeepSpeed's one gradient norm is the norm
    of the policy's and the critic's together, as one process measures them, FSDP2 logs both as one
    process does. The saved policy (gathered from the shards) is the one process's."""
    import math

    from test_ppo import save_reward_model

    reward_model = save_reward_model(tiny_model_dir, tmp_path / "rm")
    args = _ppo_args(tiny_model_dir, tmp_path, f"reward.model={reward_model}", "ppo.epochs=1",
                     "sampling.max_new_tokens=8", "sampling.temperature=0", "ppo.learning_rate=1e-3",
                     "ppo.max_grad_norm=1e6")
    two, one = _ppo_on_two_processes_and_one(backend, args, 2, tmp_path)
    for update_two, update_one in zip(two, one, strict=True):
        for key in ("reward/score", "kl/episode", "loss/policy", "loss/value", "policy/ratio", "value/clipfrac",
                    "value/explained_variance", "optimizer/steps"):
            assert update_two[key] == pytest.approx(update_one[key], rel=1e-4, abs=1e-5), (update_two["update"], key)
        if backend == "fsdp2":
            for key in ("grad_norm/policy", "grad_norm/critic"):
                assert update_two[key] == pytest.approx(update_one[key], rel=1e-4), (update_two["update"], key)
        else:
            joint = math.hypot(update_one["grad_norm/policy"], update_one["grad_norm/critic"])
            assert update_two["grad_norm/policy"] == pytest.approx(joint, rel=1e-4)
            assert "grad_norm/critic" not in update_two
    assert torch.allclose(_logits(tmp_path / "two", "sft"), _logits(tmp_path / "one", "sft"), atol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_a_lora_model_merged_under_sharding_is_the_model_trained(stage, backend, tiny_model_dir, tmp_path):
    """Merging in place under ZeRO-3 wrote a merged/ of empty tensors (from_pretrained refused it), and
    under FSDP2 hung (a DTensor merge on the main process alone); the adapter is now merged into a freshly
    loaded base. Dropout off, so 1 process with accumulation sees the same computation: the merged model
    gives its logits (for reward, the scores of the seeded, trained head)."""
    lora = [*LORA, "training.learning_rate=1e-2"]
    launch = _launch(backend)
    common = [*_common(stage, tiny_model_dir, tmp_path), *lora]
    _run([*launch, *common, f"output_dir={tmp_path / 'sharded'}"])
    _run([*CLI, *common, f"output_dir={tmp_path / 'one'}", "training.gradient_accumulation_steps=2"])
    merged, single = _logits(tmp_path / "sharded" / "merged", stage), _logits(tmp_path / "one" / "merged", stage)
    assert torch.allclose(merged, single, atol=1e-4)
    if stage == "sft":
        assert (merged - _logits(tiny_model_dir, stage)).abs().max() > 1e-2  # the adapter changed the model


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_ppo_with_lora_sharded_matches_one_process_and_merges(backend, tiny_model_dir, tmp_path):
    """LoRA PPO: the reference is the policy with its adapter switched off, inside the gathered rollout
    passes; the saved adapter, merged on a whole base, is the one process's model."""
    args = _ppo_args(tiny_model_dir, tmp_path, *SAMPLED_TURN_GROUP, *LORA, "ppo.epochs=1", "ppo.learning_rate=5e-2")
    two, one = _ppo_on_two_processes_and_one(backend, args, 4, tmp_path)
    for update_two, update_one in zip(two, one, strict=True):
        for key in ("reward/score", "kl/episode", "loss/policy", "policy/ratio"):
            assert update_two[key] == pytest.approx(update_one[key], rel=1e-4, abs=1e-5), (update_two["update"], key)
    assert abs(one[1]["kl/episode"]) > 1e-4  # the adapter moved the policy away from its base
    merged = _logits(tmp_path / "two" / "merged", "sft")
    assert torch.allclose(merged, _logits(tmp_path / "one" / "merged", "sft"), atol=1e-4)
    assert (merged - _logits(tiny_model_dir, "sft")).abs().max() > 1e-3


@pytest.mark.distributed
def test_a_killed_fsdp2_run_resumes_from_its_last_complete_checkpoint(tiny_model_dir, tmp_path):
    """The launcher and both workers SIGKILLed while the run trains and checkpoints: the rerun continues
    from the newest complete checkpoint (a mark written into it survives into the final log) and trains
    each step once."""
    import signal
    import time

    import psutil

    from dialogrl.training.run_lifecycle import last_complete_checkpoint

    out = tmp_path / "out"
    command = [*_launch("fsdp2"), *_common("sft", tiny_model_dir, tmp_path), f"output_dir={out}",
               "training.max_steps=200", "training.save_steps=10", "training.per_device_batch_size=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-20" / "trainer_state.json").is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    # The launcher and both workers at once, as when the machine goes; torchrun starts each worker in
    # its own session, so the launcher's process group alone would leave them running.
    launcher = psutil.Process(process.pid)
    workers = launcher.children(recursive=True)
    assert len(workers) >= 2
    for victim in [*workers, launcher]:
        victim.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not (out / "run_summary.json").exists()  # it really died mid-run
    resume_point = last_complete_checkpoint(out)
    state_path = Path(resume_point) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"][0]["written_before_the_kill"] = True
    state_path.write_text(json.dumps(state))
    _run(command)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 200 and summary["resumed_from"] == resume_point
    assert summary["distributed"]["type"] == "FSDP"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0].get("written_before_the_kill") is True, "the run did not continue from its checkpoint"
    steps_logged = [e["step"] for e in history if "loss" in e]
    assert steps_logged == sorted(set(steps_logged))


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_sharded_ppo_resumes_from_its_checkpoint_to_the_uninterrupted_run(backend, tiny_model_dir, tmp_path):
    """What a PPO run stopped after checkpoint-2 leaves (that checkpoint, the first two metrics lines),
    rebuilt from a finished 3-update run: the rerun loads the sharded optimizer and weights and plays
    update 3 as the uninterrupted run did."""
    import shutil

    from test_ppo import metrics, save_reward_model

    reward_model = save_reward_model(tiny_model_dir, tmp_path / "rm")
    args = [*_ppo_args(tiny_model_dir, tmp_path, f"reward.model={reward_model}", "ppo.epochs=1",
                       "sampling.max_new_tokens=8", "sampling.temperature=0", "ppo.learning_rate=1e-3"),
            "ppo.updates=3", "ppo.save_every=2", "ppo.episodes_per_update=2", "ppo.minibatch_episodes=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run([*_launch(backend), *args, f"output_dir={whole}"])
    shutil.copytree(whole / "checkpoint-2", cut / "checkpoint-2")
    for name in ("config.yaml", "fingerprint.json"):
        shutil.copy(whole / name, cut / name)
    (cut / "metrics.jsonl").write_text("".join((whole / "metrics.jsonl").read_text().splitlines(True)[:2]))
    _run([*_launch(backend), *args, f"output_dir={cut}"])
    summary = json.loads((cut / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(cut / "checkpoint-2") and summary["distributed"]["parameter_share"] < 0.6
    resumed, uninterrupted = metrics(cut), metrics(whole)
    assert [s["update"] for s in resumed] == [1, 2, 3]
    for key in ("reward/score", "kl/episode", "loss/policy", "loss/value", "grad_norm/policy"):
        assert resumed[2][key] == pytest.approx(uninterrupted[2][key], rel=1e-5, abs=1e-6), key
    assert abs(uninterrupted[2]["kl/episode"]) > 1e-3  # update 3 starts from trained weights
    assert torch.allclose(_logits(cut, "sft"), _logits(whole, "sft"), atol=1e-5)
