"""Issue 18 item 7: a full disk is a one-line error naming where the run was writing, never a traceback.

Each writer says it its own way; the messages below are the ones they print on a full tmpfs (checked by
hand with `mount -t tmpfs -o size=2M`: safetensors for sft weights, Python's OSError for an eval's report
set). The writers are made to fail here, as a test cannot count on mounting a small filesystem.
"""

from __future__ import annotations

import pytest
from safetensors import SafetensorError
from test_run_lifecycle import one_torch_thread  # noqa: F401  (autouse: one thread per test)
from test_stages import write_conversations

from dialogrl.training import cli

FULL_DISK_ERRORS = {
    "safetensors": lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "torch.save": lambda: RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 5696 vs 5584"),
    "python": lambda: OSError(28, "No space left on device"),
}


@pytest.mark.parametrize("writer", FULL_DISK_ERRORS)
def test_a_full_disk_while_saving_is_a_one_line_error_naming_the_output_dir(writer, tiny_model_dir, tmp_path,
                                                                             monkeypatch, capsys):
    import transformers.modeling_utils
    import transformers.trainer

    def full(*_args, **_kwargs):
        raise FULL_DISK_ERRORS[writer]()

    if writer == "safetensors":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    elif writer == "torch.save":
        monkeypatch.setattr(transformers.trainer.torch, "save", full)
    else:
        monkeypatch.setattr(transformers.trainer.TrainerState, "save_to_json", full)
    data = write_conversations(tmp_path / "sft.jsonl", 4)
    config = tmp_path / "sft.yaml"
    config.write_text("stage: sft\n")
    out = tmp_path / "out"
    status = cli.main(["sft", "--config", str(config), f"model.name_or_path={tiny_model_dir}",
                       f"data.train=[{{path: {data}}}]", f"output_dir={out}", "data.eval_fraction=0",
                       "tracking.report_to=none", "training.max_steps=1"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 1 and line.startswith(f"error: no space left on device while writing {out} (")
    assert "rerun the same command" in line and "Traceback" not in err


def test_other_errors_are_not_taken_for_a_full_disk():
    from dialogrl.training.disk_full import is_disk_full

    assert not is_disk_full(RuntimeError("shape mismatch"))
    assert not is_disk_full(OSError(13, "Permission denied"))
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not save the checkpoint") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
