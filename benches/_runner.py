"""Helpers the benchmarks share: the CPU's name for the tables, the best of several timed
calls, and running a worker process that prints one JSON line."""

from __future__ import annotations

import json
import subprocess
import time


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (every table states it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def best(fn, reps: int = 7) -> float:
    """The fastest of ``reps`` calls of ``fn`` after one warm-up call, in ms."""
    fn()
    t_best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        t_best = min(t_best, time.perf_counter() - t)
    return 1e3 * t_best


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    """Runs ``cmd`` and returns the JSON object on the last line of its output."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# glibc keeps freed blocks for reuse, so resident memory after a warm-up already holds the
# step's buffers and a later step's growth is noise. With these (in a worker's environment)
# every block of 64 KiB or more is mapped when allocated and unmapped when freed, so the
# resident set follows what is live.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def step_peak_mb(fn, steps: int = 7, warmup: int = 3) -> float | None:
    """The most one call of ``fn`` raises resident memory above what it was before the call,
    in MB, over ``steps`` calls after ``warmup`` calls (which first touch the buffers a
    process keeps: thread pools, per-thread packing buffers): the peak (VmHWM) is reset
    before each call through /proc/self/clear_refs (Linux >= 4.0). None where that is not
    possible. Run it under MEMORY_ENV, in a process of its own."""
    for _ in range(warmup):
        fn()
    peaks = []
    try:
        for _ in range(steps):
            before = _status_kb("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            fn()
            peaks.append(_status_kb("VmHWM:") - before)
    except OSError:
        return None
    return max(peaks) / 1024
