"""The thread pool: it works in a forked child, caps an absurd thread count, and reads
denormal rows whatever flush mode its caller set."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import arcface_rs as afr
from _forking import in_forked_child
from _reference import make_problem
from arcface_rs import metrics


def _parallel_calls() -> None:
    """One call of every kind that runs in parallel."""
    emb, weight, labels = make_problem(64, 32, 3000, seed=5, dtype=np.float32)
    afr.margin_loss(emb, weight, labels, afr.ArcFace())
    rng = np.random.default_rng(6)
    afr.cosine_topk(rng.standard_normal((20, 32)), rng.standard_normal((5000, 32)), k=5)
    g = afr.Gallery(32)
    g.add(rng.standard_normal((5000, 32)))
    g.search(rng.standard_normal((20, 32)), k=5)
    metrics.verification(rng.standard_normal(4000), rng.random(4000) < 0.5, far=(1e-2,))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_os_fork_child_runs_every_parallel_call():
    _parallel_calls()  # the parent's pool has started
    report = in_forked_child(_parallel_calls)
    assert report is None, report
    _parallel_calls()  # and the parent still works


def _pool_task(seed: int) -> int:
    rng = np.random.default_rng(seed)
    _, idx = afr.cosine_topk(rng.standard_normal((16, 8)), rng.standard_normal((3000, 8)), k=3)
    emb, weight, labels = make_problem(16, 8, 500, seed=seed, dtype=np.float32)
    loss, _, _ = afr.margin_loss(emb, weight, labels, afr.CosFace())
    assert np.isfinite(loss)
    return int(idx[0, 0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_multiprocessing_fork_pool():
    _parallel_calls()
    want = [_pool_task(s) for s in range(4)]
    ctx = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with ctx.Pool(2) as pool:
            got = pool.map_async(_pool_task, range(4)).get(timeout=60)
    assert got == want


def test_an_absurd_thread_count_is_capped_and_said(run_isolated):
    """RAYON_NUM_THREADS=100000 used to start 100000 threads and make a small call take
    minutes; the pool stops at MAX_THREADS_PER_CPU per CPU and a warning says so."""
    code = """
        import os, time, warnings
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import arcface_rs as afr
        import numpy as np
        cpus = len(os.sched_getaffinity(0))
        assert afr.num_threads() == min(100000, afr._core.MAX_THREADS_PER_CPU * cpus)
        assert any("RAYON_NUM_THREADS" in str(w.message) for w in seen), seen
        t = time.perf_counter()
        afr.margin_loss(np.ones((4, 8)), np.eye(8), [0, 1, 2, 3], afr.ArcFace())
        assert time.perf_counter() - t < 10
        print("ok")
        """
    out = run_isolated(code, timeout=60, env={"RAYON_NUM_THREADS": "100000"})
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])
    # a sane request is followed exactly
    out = run_isolated(
        "import arcface_rs as afr; print(afr.num_threads())", env={"RAYON_NUM_THREADS": "3"}
    )
    assert out.stdout.strip() == "3", out.stderr


def test_denormals_survive_a_caller_that_flushes_them():
    """Threads inherit their creator's flush-to-zero mode; torch can set it. The library's
    threads must still read denormal rows (a fresh process, so the pool starts after)."""
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import numpy as np, torch
        rng = np.random.default_rng(0)
        q, g = rng.standard_normal((3, 8)), rng.standard_normal((20, 8))
        tiny = (g * 1e-39).astype(np.float32)  # made before the caller starts flushing
        torch.set_flush_denormal(True)
        import arcface_rs as afr
        want = afr.cosine_topk(q, g, k=4)[1]
        got = afr.cosine_topk(q.astype(np.float32), tiny, k=4)[1]
        assert (got == want).all(), (got, want)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
