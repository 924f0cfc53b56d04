"""Multi-file outputs that appear whole or not at all.

A data build or an evaluation writes several files that are only meaningful
together, and one of them (a manifest, a report) tells later steps the set is
complete. The files are written into a staging directory inside the output
directory, then `publish` moves them into place with the marker last, after
deleting the old marker first: a process killed while writing leaves the
previous set untouched; one killed while swapping leaves no marker, so the
mixed set is never trusted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

STAGING_DIRNAME = ".writing"


def staging_dir(output_dir: Path) -> Path:
    """An empty staging directory inside `output_dir` (a killed writer's leftovers removed)."""
    staging = Path(output_dir) / STAGING_DIRNAME
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, output_dir: Path, marker: str) -> None:
    """Move everything in `staging` into `output_dir`; the file named `marker` goes last."""
    output_dir = Path(output_dir)
    (output_dir / marker).unlink(missing_ok=True)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == marker):
        target = output_dir / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        _move(item, target)
    staging.rmdir()


def _move(source: Path, target: Path) -> None:
    os.replace(source, target)
