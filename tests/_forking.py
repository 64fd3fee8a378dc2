"""A check run in a child forked from the test process, for the fork() safety tests."""

from __future__ import annotations

import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable

import pytest


def in_forked_child(check: Callable[[], object], limit: float = 60.0) -> str | None:
    """Runs ``check()`` in a child forked from this process. Returns None when it passed,
    else the child's traceback; a child still running after ``limit`` seconds (a hang) is
    killed and fails the test."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            check()
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            pytest.fail(f"the forked child hung for more than {limit} s")
        time.sleep(0.05)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode()
    return None if os.waitstatus_to_exitcode(status) == 0 else report or "no report"
