"""ARCFACE_RS_SIMD caps the kernels' instruction set; every level gives the same answers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import arcface_rs as afr
from _reference import make_problem, ref_loss, rel_err

LEVELS = ("avx512", "avx2", "neon", "scalar")


def _levels_from(best: str) -> list[str]:
    """The levels this machine can run, from its best down: x86-64 has AVX-512, AVX2 and
    the portable loops; aarch64 has NEON and the portable loops."""
    if best == "neon":
        return ["neon", "scalar"]
    x86 = ["avx512", "avx2", "scalar"]
    return x86[x86.index(best) :]


def _run(code: str, level: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ARCFACE_RS_SIMD", None)
    if level is not None:
        env["ARCFACE_RS_SIMD"] = level
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_simd_level_names_the_level_in_use():
    assert afr.simd_level() in LEVELS
    want = os.environ.get("ARCFACE_RS_SIMD")
    if want:
        assert afr.simd_level() == want.strip().lower()


def test_the_cap_is_honoured_and_answers_agree_across_levels():
    code = """
        import numpy as np, arcface_rs as afr
        rng = np.random.default_rng(0)
        g = rng.standard_normal((3000, 64)).astype(np.float32)
        q = rng.standard_normal((20, 64)).astype(np.float32)
        gal = afr.Gallery(64, "float16")
        gal.add(g)
        _, a = afr.cosine_topk(q, g, k=5)
        _, b = gal.search(q[:1], k=5)
        print(afr.simd_level(), a.tolist(), b.tolist())
    """
    best = _run(code, None)
    assert best.returncode == 0, best.stderr
    best_level, *want = best.stdout.split(" ", 1)
    for level in _levels_from(best_level):
        got = _run(code, level)
        assert got.returncode == 0, got.stderr
        name, *rest = got.stdout.split(" ", 1)
        assert name == level and rest == want, (level, got.stdout[:200])


def test_a_level_the_cpu_lacks_or_an_unknown_name_is_refused_at_import():
    best = afr.simd_level() if not os.environ.get("ARCFACE_RS_SIMD") else None
    bad = _run("import arcface_rs", "sse9")
    assert bad.returncode != 0 and "ARCFACE_RS_SIMD" in bad.stderr
    if best is not None and best != "avx512":
        lacking = _run("import arcface_rs", "avx512")
        assert lacking.returncode != 0
        assert "lacks avx512" in lacking.stderr and best in lacking.stderr
    if best is not None and best != "neon":  # an x86-64 CPU has no NEON
        lacking = _run("import arcface_rs", "neon")
        assert lacking.returncode != 0 and "lacks neon" in lacking.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_head_at_this_level_matches_the_reference(dtype):
    emb, weight, labels = make_problem(7, 33, 50, seed=3, dtype=dtype)
    margin = afr.ArcFace(s=30.0, m=0.5)
    got = afr.margin_loss(emb, weight, labels, margin)
    want = ref_loss(emb.astype(np.float64), weight.astype(np.float64), labels, margin)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


def test_many_queries_and_the_head_agree_across_levels():
    """The int8 first pass (VNNI or AVX2) or the float tiles, whatever the level: the same
    ids as exact search; the head's loss and gradients equal up to float32 rounding."""
    code = """
        import json, numpy as np, arcface_rs as afr
        rng = np.random.default_rng(1)
        g = rng.standard_normal((4000, 96)).astype(np.float32)
        q = rng.standard_normal((300, 96)).astype(np.float32)   # >= 256: an int8 pass
        _, ids = afr.cosine_topk(q, g, k=7)
        gal = afr.Gallery(96, "bfloat16")
        gal.add(g)
        _, gids = gal.search(q, k=7)
        emb, w = g[:64] * 3, g[64:1064]
        loss, ge, gw = afr.margin_loss(emb, w, np.arange(64) * 7, afr.ArcFace())
        print(json.dumps([afr.simd_level(), ids.tolist(), gids.tolist(), float(loss),
                          ge.astype(float).tolist(), gw[:50].astype(float).tolist()]))
    """
    import json

    best = _run(code, None)
    assert best.returncode == 0, best.stderr
    level, ids, gids, loss, ge, gw = json.loads(best.stdout)
    for other in _levels_from(level)[1:]:
        got = _run(code, other)
        assert got.returncode == 0, got.stderr
        name, ids2, gids2, loss2, ge2, gw2 = json.loads(got.stdout)
        assert name == other and ids2 == ids and gids2 == gids, other
        assert abs(loss2 - loss) <= 1e-5 * abs(loss)
        np.testing.assert_allclose(ge2, ge, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gw2, gw, rtol=1e-4, atol=1e-6)
