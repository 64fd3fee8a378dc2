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
