"""Helpers the benchmarks share: the CPU's name for the tables, and running a worker process
that prints one JSON line."""

from __future__ import annotations

import json
import subprocess


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


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    """Runs ``cmd`` and returns the JSON object on the last line of its output."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])
