"""One run per output directory at a time.

Two runs writing one output directory would overwrite each other's checkpoints
and results while both exit 0. A run takes `OUTPUT_DIR/.dialogrl.lock` (created
exclusively, holding its pid, host, start time and command) and gives it back
when its outputs are written, or when the process exits. A lock left by a
process that no longer exists on this host (killed) is taken over; one held by
a live process stops the new run with who holds it and what to do.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILENAME = ".dialogrl.lock"
_held: set[Path] = set()


class OutputDirInUse(RuntimeError):
    """Another live run holds the output directory."""


def acquire(output_dir: Path) -> None:
    """Take the lock of `output_dir` (re-entrant within one process)."""
    path = Path(output_dir) / LOCK_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    for _attempt in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read(path)
            if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                _held.add(path)
                return
            if holder is None or (holder.get("host") == me["host"] and not process_alive(holder.get("pid"))):
                path.unlink(missing_ok=True)  # a killed run's (or a half-written) lock
                continue
            raise OutputDirInUse(
                f"{output_dir} is in use by another dialogrl run (pid {holder.get('pid')} on {holder.get('host')}, "
                f"started {holder.get('started')}: {holder.get('command')}). Wait for it or stop it, or give this "
                f"run another output_dir; if that process is gone, delete {path}."
            ) from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        if not _held:
            atexit.register(release_all)
        _held.add(path)
        return
    raise OutputDirInUse(f"could not take {path}: it keeps reappearing; another run is starting in {output_dir}")


def release(output_dir: Path) -> None:
    """Give the lock back (only a lock this process holds)."""
    path = Path(output_dir) / LOCK_FILENAME
    if path in _held:
        _held.discard(path)
        holder = _read(path)
        if holder and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


def held_dirs() -> list[Path]:
    """The output directories this process holds."""
    return sorted(path.parent for path in _held)


def release_all() -> None:
    """Give back every lock this process holds (a command that ended, however it ended)."""
    for path in list(_held):
        release(path.parent)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def process_alive(pid) -> bool:
    """Whether a process with this id runs on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
