"""Hypothesis runs derandomised under CI (reproducible), randomised elsewhere (exploring)."""

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _run_isolated(code: str, timeout: float = 120.0, env: dict | None = None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def run_isolated():
    """``run_isolated(code, timeout=120, env=None)`` runs ``code`` in a fresh interpreter and
    returns the finished process (stdout and stderr as text): a test of something that used
    to crash the process fails, instead of ending the whole run, if it crashes again."""
    return _run_isolated
