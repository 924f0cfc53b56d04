"""Peak resident memory of this process over one stretch of work (one pipeline step).

Linux keeps the process's high-water mark (VmHWM) and lets the process reset it
(writing 5 to /proc/self/clear_refs), so each step gets its own peak with no
sampling thread. Elsewhere the lifetime peak (getrusage) is reported, and said so.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new high-water mark; False where the platform cannot (the peak is then the lifetime one)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-memory high-water mark since the last reset (or since the process started)."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """`with PeakMemory() as peak: ...`; then `peak.gib` (and `peak.per_step`: False = lifetime peak)."""

    def __enter__(self) -> PeakMemory:
        self.per_step = reset_peak()
        self.gib = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.gib = round(peak_rss_bytes() / 2**30, 2)
