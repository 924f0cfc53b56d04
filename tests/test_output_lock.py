"""One run per output directory: a second run is stopped with who holds it; a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from test_stages import recipe, write_conversations

from dialogrl.training import output_lock

CLI = [sys.executable, "-m", "dialogrl.training.cli"]


def hold_lock(directory, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / output_lock.LOCK_FILENAME).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": "2026-12-02 10:00:00", "command": "dialogrl sft ..."}))


def test_a_second_run_on_a_busy_output_dir_stops_naming_the_holder(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hold_lock(out, holder.pid)
        data = write_conversations(tmp_path / "sft.jsonl", 4)
        config = tmp_path / "sft.yaml"
        config.write_text("stage: sft\n")
        result = subprocess.run(CLI + ["sft", "--config", str(config), f"model.name_or_path={tiny_model_dir}",
                                       f"data.train=[{{path: {data}}}]",
                                       f"output_dir={out}", "tracking.report_to=none", "training.max_steps=1"],
                                capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert f"is in use by another dialogrl run (pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "run_summary.json").exists() and not (out / "config.yaml").exists()


def test_a_killed_runs_lock_is_taken_over_and_given_back_at_the_end(tiny_model_dir, tmp_path):
    from dialogrl.training import sft

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hold_lock(out, dead.pid)
    data = write_conversations(tmp_path / "sft.jsonl", 4)
    sft.main(recipe("sft", tiny_model_dir, data, out, "data.eval_fraction=0", "training.max_steps=1"), log=lambda _: None)
    assert (out / "run_summary.json").exists()
    assert not (out / output_lock.LOCK_FILENAME).exists()


def test_the_lock_is_reentrant_in_one_process_and_refuses_another(tmp_path):
    output_lock.acquire(tmp_path)
    output_lock.acquire(tmp_path)  # the same process again (a pipeline, a rebuild): fine
    assert json.loads((tmp_path / output_lock.LOCK_FILENAME).read_text())["pid"] == os.getpid()
    output_lock.release(tmp_path)
    assert not (tmp_path / output_lock.LOCK_FILENAME).exists()
    hold_lock(tmp_path, os.getppid())
    with pytest.raises(output_lock.OutputDirInUse, match=f"pid {os.getppid()}"):
        output_lock.acquire(tmp_path)


@pytest.mark.parametrize("command", ["eval", "data build", "pipeline"])
def test_an_eval_a_data_build_and_a_pipeline_stop_on_a_busy_directory(command, tiny_model_dir, tmp_path, capsys):
    """The same lock guards the directories the other commands write (before any model loads)."""
    from dialogrl.training import cli

    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    config = tmp_path / "recipe.yaml"
    config.write_text(f"stage: {command.split()[0]}\n")
    argv = {"eval": ["eval", "--model", str(tiny_model_dir), "--output-dir", str(out)],
            "data build": ["data", "build", "--config", str(config), f"output_dir={out}"],
            "pipeline": ["pipeline", "--config", str(config), f"output_dir={out}"]}[command]
    try:
        hold_lock(out, holder.pid)
        status = cli.main(argv)
    finally:
        holder.kill()
        holder.wait()
    assert status == 1 and f"is in use by another dialogrl run (pid {holder.pid}" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
