"""Experiment tracking: wandb (offline unless the user set it up), tensorboard, or none.

Nothing here reaches the network on its own: wandb goes online only when the
user has chosen so (WANDB_MODE=online) or has credentials (WANDB_API_KEY, or a
`wandb login` entry in ~/.netrc). Runs logged offline can be uploaded later
with `wandb sync`.
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass
from pathlib import Path

from dialogrl.data.options import option

TRACKERS = ("wandb", "tensorboard", "none")


@dataclass
class TrackingConfig:
    report_to: list[str] = option(
        default_factory=lambda: ["wandb"],
        help="Trackers to log to: any of wandb, tensorboard; or none. wandb runs offline unless you configured it.",
    )
    project: str = option("dialogrl", help="wandb project name.")
    run_name: str | None = option(None, help="Run name shown by the tracker; defaults to the output directory's name.")

    def __post_init__(self) -> None:
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to: 'none' cannot be combined with other trackers, got {self.report_to}")


def wandb_is_configured(environ: dict[str, str] | None = None) -> bool:
    """True when the user has wandb credentials, i.e. chose to log online."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(environ.get("NETRC", Path(environ.get("HOME", str(Path.home()))) / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False
    return any("wandb" in host for host in hosts)


def setup_tracking(config: TrackingConfig, output_dir: str | Path, environ: dict[str, str] | None = None) -> list[str]:
    """Prepare the environment for the trackers and return `report_to` as transformers expects it."""
    environ = os.environ if environ is None else environ
    trackers = [name for name in config.report_to if name != "none"]
    if "wandb" in trackers:
        if "WANDB_MODE" not in environ and not wandb_is_configured(environ):
            environ["WANDB_MODE"] = "offline"
        environ.setdefault("WANDB_PROJECT", config.project)
        environ.setdefault("WANDB_DIR", str(Path(output_dir)))
        environ.setdefault("WANDB_SILENT", "true")
    return trackers or ["none"]
