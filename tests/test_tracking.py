"""Tracking never goes online unless the user set wandb up."""

from __future__ import annotations

import pytest

from dialogrl.training.tracking import TrackingConfig, setup_tracking, wandb_is_configured


def test_wandb_defaults_to_offline_without_credentials(tmp_path):
    environ = {"HOME": str(tmp_path)}
    assert setup_tracking(TrackingConfig(), tmp_path / "run", environ) == ["wandb"]
    assert environ["WANDB_MODE"] == "offline"
    assert environ["WANDB_DIR"] == str(tmp_path / "run")


def test_wandb_credentials_or_explicit_mode_are_respected(tmp_path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    environ = {"HOME": str(tmp_path)}
    assert wandb_is_configured(environ)
    setup_tracking(TrackingConfig(), tmp_path, environ)
    assert "WANDB_MODE" not in environ

    environ = {"HOME": str(tmp_path / "elsewhere"), "WANDB_MODE": "disabled"}
    setup_tracking(TrackingConfig(), tmp_path, environ)
    assert environ["WANDB_MODE"] == "disabled"


def test_none_and_tensorboard_touch_no_wandb_settings(tmp_path):
    environ: dict[str, str] = {"HOME": str(tmp_path)}
    assert setup_tracking(TrackingConfig(report_to=["none"]), tmp_path, environ) == ["none"]
    assert setup_tracking(TrackingConfig(report_to=["tensorboard"]), tmp_path, environ) == ["tensorboard"]
    assert environ == {"HOME": str(tmp_path)}


@pytest.mark.parametrize("report_to", [["wandbb"], ["none", "wandb"]])
def test_bad_tracker_lists_are_refused(report_to):
    with pytest.raises(ValueError, match="report_to"):
        TrackingConfig(report_to=report_to)
