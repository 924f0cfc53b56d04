"""A write that failed because the disk is full, told as such.

Each writer reports a full disk its own way: Python raises OSError (errno
ENOSPC), safetensors "I/O error: No space left on device (os error 28)", and
torch.save's zip writer "unexpected pos N vs M" or "file write failed", with no
path. The command names the output directories it was writing (the ones it
holds the lock of) and what to do.
"""

from __future__ import annotations

import errno

from dialogrl.training import output_lock

_SIGNS = ("no space left on device", "os error 28", "unexpected pos", "file write failed",
          "disk quota exceeded", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a write that ran out of space."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(current).lower() for sign in _SIGNS):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(err: BaseException) -> str:
    filename = getattr(err, "filename", None)
    places = [str(filename)] if filename else [str(path) for path in output_lock.held_dirs()]
    where = f" while writing {', '.join(places)}" if places else ""
    detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return (f"no space left on device{where} ({detail}). Free space, or point output_dir at a larger disk, and "
            "rerun the same command: a training run resumes from its last complete checkpoint (a half-written "
            "one is never used).")
