"""Resident-memory measurement shared by the benchmarks (Linux /proc)."""

from __future__ import annotations

from typing import Callable


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def rss_growth_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory during fn() minus resident memory just before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS:")
    fn()
    return (_status_kib("VmHWM:") - before) / 1024
