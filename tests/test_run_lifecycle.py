"""One lifecycle for every stage: checkpoint rotation, run_summary.json schema, model card, CLI report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ppo import ppo_overrides
from test_stages import recipe, write_conversations

from dialogrl.training import cli
from dialogrl.training.run_lifecycle import CARD_FILENAME, SUMMARY_FILENAME, rotate_checkpoints


def make_checkpoints(root: Path, steps_and_states: list[tuple[int, bool]], state_file: str) -> None:
    for step, complete in steps_and_states:
        directory = root / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_text("")
        if complete:
            (directory / state_file).write_text("{}")


def names(root: Path) -> list[str]:
    return sorted((p.name for p in root.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_rotation_keeps_the_newest_complete_checkpoints_and_leaves_newer_partial_ones(tmp_path):
    make_checkpoints(tmp_path, [(2, True), (4, False), (6, True), (8, True), (10, False)], "ppo_state.json")
    deleted = rotate_checkpoints(tmp_path, 2, "ppo_state.json")
    # checkpoint-10 has no state file yet (being written, or killed mid-write): never the one to go.
    assert names(tmp_path) == ["checkpoint-6", "checkpoint-8", "checkpoint-10"]
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-4"]
    assert rotate_checkpoints(tmp_path, 2, "ppo_state.json") == []  # nothing more to do
    assert rotate_checkpoints(tmp_path / "absent", 2) == []


def test_a_trainer_stage_rotates_its_checkpoints_with_the_shared_rotation(tiny_model_dir, tmp_path):
    """A half-written checkpoint-100 left by an earlier killed run (no trainer_state.json): the Trainer's
    own rotation would count it as the newest and delete checkpoint-6; the shared one keeps the two
    newest complete checkpoints and leaves the broken one alone."""
    from dialogrl.training import sft

    data = write_conversations(tmp_path / "sft.jsonl", 8)
    out = tmp_path / "out"
    make_checkpoints(out, [(100, False)], "trainer_state.json")
    sft.main(recipe("sft", tiny_model_dir, data, out, "data.eval_fraction=0", "training.max_steps=7",
                    "training.save_steps=2", "training.save_total_limit=2", "training.per_device_batch_size=1"),
             log=lambda _: None)
    assert names(out) == ["checkpoint-6", "checkpoint-7", "checkpoint-100"]  # the Trainer also saves at its last step


def test_ppo_and_sft_share_the_summary_schema_the_card_and_the_cli_report(tiny_model_dir, tmp_path, capsys):
    """Both stages, LoRA with merge: run_summary.json has the same keys, the card the same sections and the
    merged weights, and the CLI prints both with one code path."""
    data = write_conversations(tmp_path / "sft.jsonl", 4)
    sft_out, ppo_out = tmp_path / "sft", tmp_path / "ppo"
    lora = ["lora.enabled=true", "lora.r=4", "lora.merge=true"]
    sft_config = tmp_path / "sft.yaml"
    sft_config.write_text("stage: sft\n")
    assert cli.main(["sft", "--config", str(sft_config), f"model.name_or_path={tiny_model_dir}",
                     f"data.train=[{{path: {data}}}]", f"output_dir={sft_out}", "data.eval_fraction=0",
                     "tracking.report_to=none", "training.max_steps=2", *lora]) == 0
    sft_printed = capsys.readouterr().out
    ppo_config = tmp_path / "ppo.yaml"
    ppo_config.write_text("stage: ppo\n")
    overrides = [*ppo_overrides(tiny_model_dir, ppo_out), "ppo.updates=2", *lora]
    assert cli.main(["ppo", "--config", str(ppo_config), *overrides]) == 0
    ppo_printed = capsys.readouterr().out

    summaries = {out: json.loads((out / SUMMARY_FILENAME).read_text()) for out in (sft_out, ppo_out)}
    assert summaries[sft_out].keys() == summaries[ppo_out].keys()
    ppo_summary = summaries[ppo_out]
    assert ppo_summary["stage"] == "ppo" and ppo_summary["global_step"] == 2 == ppo_summary["metrics"]["updates"]
    assert ppo_summary["tokens_seen"] > ppo_summary["metrics"]["generated_tokens"] > 0  # histories + replies
    assert ppo_summary["data"]["episodes"] == 8 and ppo_summary["data"]["rounds"] == 2
    assert not any(key.startswith("time/") for key in ppo_summary["metrics"])
    for out in (sft_out, ppo_out):
        card = (out / CARD_FILENAME).read_text()
        sections = [line for line in card.splitlines() if line.startswith("## ")]
        assert sections[:2] == ["## Data", "## Final metrics"] and sections[-1] == "## Recipe", out
        assert f"tags: [dialogrl, {summaries[out]['stage']}]" in card
        assert summaries[out]["merged_dir"] == str(out / "merged") and (out / "merged" / "config.yaml").is_file()
    assert "## First and last update" in (ppo_out / CARD_FILENAME).read_text()

    (sft_line,) = [line for line in sft_printed.splitlines() if line.startswith("sft: 2 steps in ")]
    (ppo_line,) = [line for line in ppo_printed.splitlines() if line.startswith("ppo: 2 steps in ")]
    assert f"train_loss {summaries[sft_out]['metrics']['train_loss']:.4f}" in sft_line
    assert f"reward/score {ppo_summary['metrics']['reward/score']:.4f}" in ppo_line and "kl/episode" in ppo_line
    assert f"card: {sft_out}/README.md" in sft_printed and f"card: {ppo_out}/README.md" in ppo_printed


def test_a_finished_run_is_neither_retrained_nor_rewritten_and_a_changed_recipe_is_refused(tiny_model_dir, tmp_path,
                                                                                              capsys):
    """Issue 18 items 1-2 (standalone): the same recipe on a finished output_dir has nothing to do; a changed
    learning rate, or a changed data file, is refused with what changed, on a finished run and on one stopped
    after a checkpoint, and no record in the directory is touched."""
    data = write_conversations(tmp_path / "sft.jsonl", 4)
    out = tmp_path / "sft"
    config = tmp_path / "sft.yaml"
    config.write_text("stage: sft\n")
    command = ["sft", "--config", str(config), f"model.name_or_path={tiny_model_dir}", f"data.train=[{{path: {data}}}]",
               f"output_dir={out}", "data.eval_fraction=0", "tracking.report_to=none", "training.max_steps=2",
               "training.save_steps=1"]
    assert cli.main(command) == 0
    capsys.readouterr()
    records = ("run_summary.json", "README.md", "config.yaml", "fingerprint.json", "model.safetensors")
    written = {name: (out / name).read_bytes() for name in records}

    assert cli.main(command) == 0
    assert "already holds the finished run of this recipe" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in records} == written

    assert cli.main([*command, "training.learning_rate=0.5"]) == 1
    err = capsys.readouterr().err
    assert "holds a finished run of another recipe" in err and "training.learning_rate: 1e-05 -> 0.5" in err
    assert "another output_dir" in err and "Traceback" not in err
    assert {name: (out / name).read_bytes() for name in records} == written

    (out / "run_summary.json").unlink()  # as if it had been killed after its last checkpoint
    with data.open("a") as handle:
        handle.write(write_conversations(tmp_path / "more.jsonl", 1).read_text())
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert "holds checkpoints (up to checkpoint-2) of another recipe" in err and f"{data}: its contents changed" in err
    assert (out / "config.yaml").read_bytes() == written["config.yaml"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
