"""Regressions from hostile testing: sizes from the caller, fork(), extreme magnitudes,
scales beyond the dtype, ids, double backward, and the smaller items found on the way.

Every expected value comes from an independent float64 reference (``_reference.py``) or
from the same computation on a rescaled row, never from the library itself.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arcface_rs as afr
from _reference import make_problem, ref_loss, rel_err
from arcface_rs import metrics

BIG_KS = [10**12, 2**62, 2**63 - 1]


def unit(a: np.ndarray) -> np.ndarray:
    """Rows over their float64 norm, taken without over- or underflow."""
    a = np.asarray(a, dtype=np.float64)
    peak = np.abs(a).max(axis=1, keepdims=True)
    scaled = a / peak
    return scaled / np.linalg.norm(scaled, axis=1, keepdims=True)


def brute_topk(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    scores = unit(q) @ unit(g).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------------
# 1. k and ranks beyond N: capped work, padded output, a ValueError when it cannot fit.


@pytest.mark.parametrize("k", BIG_KS)
def test_cosine_topk_huge_k_is_a_value_error(k):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((3, 8)), rng.standard_normal((20, 8))
    t = time.perf_counter()
    with pytest.raises(ValueError, match="k"):
        afr.cosine_topk(q, g, k=k)
    assert time.perf_counter() - t < 5.0


def test_k_beyond_int64_and_many_queries_are_refused_before_allocating():
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((1000, 8)), rng.standard_normal((20, 8))
    with pytest.raises(ValueError, match="k"):
        afr.cosine_topk(q, g, k=10**9)  # 1000 x 1e9 x 16 bytes of padding
    with pytest.raises(ValueError, match="k"):
        afr.cosine_topk(q[:1], g, k=2**64)


def test_k_a_little_beyond_n_pads():
    rng = np.random.default_rng(2)
    q, g = rng.standard_normal((2, 8)), rng.standard_normal((5, 8))
    scores, idx = afr.cosine_topk(q, g, k=9)
    assert idx.shape == (2, 9)
    np.testing.assert_array_equal(idx[:, :5], brute_topk(q, g, 5))
    assert (idx[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("k", BIG_KS)
def test_gallery_search_huge_k_is_a_value_error(dtype, k):
    g = afr.Gallery(8, dtype)
    g.add(np.random.default_rng(3).standard_normal((30, 8)))
    with pytest.raises(ValueError, match="k"):
        g.search(np.ones(8), k=k)
    # still usable afterwards
    assert g.search(np.ones(8), k=3)[1].shape == (3,)


def test_identification_ranks_far_beyond_the_candidates():
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((12, 16))
    labels = np.arange(12)
    probes = gallery[[0, 3, 5]] + 0.5 * rng.standard_normal((3, 16))
    distractors = rng.standard_normal((7, 16))
    huge = metrics.identification(
        probes, [0, 3, 5], gallery, labels, distractors=distractors, ranks=(1, 10**12)
    )
    exact = metrics.identification(
        probes, [0, 3, 5], gallery, labels, distractors=distractors, ranks=(1, 19)
    )
    assert huge.cmc[1] == exact.cmc[1]
    # beyond every candidate (12 + 7 rows), every mate ranks within
    assert huge.cmc[10**12] == exact.cmc[19] == 1.0
    with pytest.raises(ValueError, match="ranks"):
        metrics.identification(probes, [0, 3, 5], gallery, labels, ranks=(1, 2**64))


def test_a_rust_panic_is_a_runtime_error_not_panic_exception():
    with pytest.raises(RuntimeError, match="boom"):
        afr._core._panic_for_tests("boom")
    # and the pool keeps working
    afr.cosine_topk(np.ones((20, 4)), np.eye(4), k=2)


# ---------------------------------------------------------------------------------------
# 2. fork() after the thread pool has run: the child works.


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


def _child_result(pid: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung for more than {limit} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_os_fork_child_runs_every_parallel_call():
    _parallel_calls()  # the parent's pool has started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _parallel_calls()
            code = 0
        finally:
            os._exit(code)
    assert _child_result(pid, 60.0) == 0
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


# ---------------------------------------------------------------------------------------
# 3. mmap: our own saves never truncate a mapped file.


def test_save_over_a_mapped_gallery_keeps_it_readable(tmp_path):
    path = tmp_path / "g.safetensors"
    rng = np.random.default_rng(7)
    g = afr.Gallery(16)
    g.add(rng.standard_normal((100, 16)))
    g.save(path)
    mapped = afr.Gallery.load(path, mmap=True)
    before = mapped.search(rng.standard_normal((2, 16)), k=4)
    afr.Gallery(16).save(path)  # an empty gallery replaces the file
    after = mapped.search(rng.standard_normal((2, 16)), k=4)
    assert after[1].shape == before[1].shape and (after[1] >= 0).all()
    assert len(afr.Gallery.load(path)) == 0


# ---------------------------------------------------------------------------------------
# 4-6. Every finite non-zero row, float32 denormals to float64 1e300, gives the answer of
# the rescaled row; gradients stay finite.


def _loss_of(emb, weight, labels, margin):
    loss, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin)
    for name, a in (("loss", loss), ("grad_emb", g_emb), ("grad_weight", g_w)):
        assert np.all(np.isfinite(a)), name
    return float(loss)


@pytest.mark.parametrize(
    "dtype,scale",
    [
        (np.float32, 1e-39),  # denormal
        (np.float32, 1e-44),
        (np.float32, 1e-20),
        (np.float32, 1e30),
        (np.float64, 1e-200),
        (np.float64, 1e-310),
        (np.float64, 1e200),
        (np.float64, 1e300),
    ],
)
@pytest.mark.parametrize("which", ["emb", "weight"])
def test_extreme_rows_give_the_loss_of_the_rescaled_row(dtype, scale, which):
    emb, weight, labels = make_problem(6, 8, 9, seed=8)
    emb, weight = unit(emb), unit(weight)
    margin = afr.ArcFace(s=30.0, m=0.5)
    want = float(ref_loss(emb, weight, labels, margin)[0])
    e, w = emb.astype(dtype), weight.astype(dtype)
    rows = [1, 4]
    if which == "emb":
        e[rows] = (emb[rows] * scale).astype(dtype)
    else:
        labels[0] = 4  # a tiny or huge centre is a target too
        want = float(ref_loss(emb, weight, labels, margin)[0])
        w[rows] = (weight[rows] * scale).astype(dtype)
    got = _loss_of(e, w, labels, margin)
    # the rounding of the scaled copy itself (denormals keep few digits) sets the tolerance
    tol = 5e-2 if scale < 1e-37 and dtype == np.float32 else 1e-4
    tol = 5e-2 if scale < 1e-300 else tol
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)


def test_tiny_float32_weight_rows_get_finite_gradients_along_the_true_direction():
    emb, weight, labels = make_problem(5, 8, 6, seed=9)
    emb, weight = unit(emb), unit(weight)
    margin = afr.CosFace(s=30.0, m=0.2)
    _, _, want_gw = ref_loss(emb, weight, labels, margin)
    w = weight.astype(np.float32)
    w[2] = (weight[2] * 1e-20).astype(np.float32)  # norm 1e-20: gradient ~1e20, representable
    _, _, gw = afr.margin_loss(emb.astype(np.float32), w, labels, margin)
    assert np.all(np.isfinite(gw))
    np.testing.assert_allclose(gw[2] * 1e-20, want_gw[2], rtol=1e-3, atol=1e-5)
    w[2] = (weight[2] * 1e-40).astype(np.float32)  # below 2^-100: bounded, still finite
    _, _, gw = afr.margin_loss(emb.astype(np.float32), w, labels, margin)
    assert np.all(np.isfinite(gw))
    got = gw[2].astype(np.float64)
    cos = got @ want_gw[2] / (np.linalg.norm(got) * np.linalg.norm(want_gw[2]))
    assert cos > 0.99


def test_float64_gradients_of_tiny_rows_are_exact():
    emb, weight, labels = make_problem(4, 6, 5, seed=10)
    margin = afr.ArcFace(s=16.0, m=0.4)
    _, want_ge, want_gw = ref_loss(emb, weight, labels, margin)
    _, ge, gw = afr.margin_loss(emb * 1e-200, weight * 1e-200, labels, margin)
    assert rel_err(ge * 1e-200, want_ge) < 1e-9
    assert rel_err(gw * 1e-200, want_gw) < 1e-9


@pytest.mark.parametrize(
    "dtype,scale", [(np.float32, 1e-39), (np.float32, 1e-30), (np.float64, 1e-300)]
)
def test_search_with_extreme_queries_and_rows(dtype, scale):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((12, 16))
    g = rng.standard_normal((50, 16))
    want = brute_topk(q, g, 5)
    qs, gs = (q * scale).astype(dtype), (g * scale).astype(dtype)
    for queries in (qs[:1], qs):  # the streaming and the tiled paths
        scores, idx = afr.cosine_topk(queries, gs, k=5)
        assert np.all(np.isfinite(scores)) and (idx >= 0).all()
        np.testing.assert_array_equal(idx, want[: len(queries)])
    gallery = afr.Gallery(16)
    gallery.add(gs)
    scores, ids = gallery.search(qs, k=5)
    assert np.all(np.isfinite(scores))
    np.testing.assert_array_equal(ids, want)
    who, best = gallery.identify(qs, threshold=-1.0)
    np.testing.assert_array_equal(who, want[:, 0])


def test_huge_float64_rows_are_not_called_nan():
    rng = np.random.default_rng(12)
    q, g = rng.standard_normal((3, 8)), rng.standard_normal((10, 8))
    _, idx = afr.cosine_topk(q * 1e200, g * 1e250, k=4)
    np.testing.assert_array_equal(idx, brute_topk(q, g, 4))


def test_messages_say_what_is_really_wrong():
    g = np.ones((3, 4))
    g[1] = 0.0
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        afr.cosine_topk(np.ones((1, 4)), g, k=2)
    g[1] = np.inf
    with pytest.raises(ValueError, match="row 1 contains NaN or inf"):
        afr.cosine_topk(np.ones((1, 4)), g, k=2)


# ---------------------------------------------------------------------------------------
# 7. A scale whose logits cannot be represented is refused at call time.


def test_scale_beyond_float32_is_refused_and_fine_in_float64():
    emb, weight, labels = make_problem(4, 8, 5, seed=13)
    big = afr.ArcFace(s=1e39)
    with pytest.raises(ValueError, match="float32"):
        afr.margin_loss(emb.astype(np.float32), weight.astype(np.float32), labels, big)
    with pytest.raises(ValueError, match="s"):
        afr.apply_margin(np.zeros((2, 3), np.float32), [0, 1], big)
    loss, ge, gw = afr.margin_loss(emb, weight, labels, big)
    assert np.isfinite(loss) and np.all(np.isfinite(ge)) and np.all(np.isfinite(gw))
    with pytest.raises(ValueError, match="s"):
        afr.margin_loss(emb, weight, labels, afr.CosFace(s=1e300))
    with pytest.raises(ValueError, match="float32"):
        afr.margin_loss(
            emb.astype(np.float32), weight.astype(np.float32), labels, afr.CosFace(m=1e37)
        )


def test_large_but_representable_scale_matches_the_reference():
    emb, weight, labels = make_problem(4, 8, 5, seed=14)
    margin = afr.CosFace(s=1e6, m=0.35)
    want = ref_loss(emb, weight, labels, margin)
    got = afr.margin_loss(emb, weight, labels, margin)
    assert rel_err(got[0], want[0]) < 1e-9
    assert rel_err(got[1], want[1]) < 1e-7


# ---------------------------------------------------------------------------------------
# 8. Negative ids are refused; identification over a Gallery is right.


def test_negative_ids_are_refused_and_nothing_is_added():
    g = afr.Gallery(4)
    with pytest.raises(ValueError, match="negative"):
        g.add(np.eye(4), ids=[0, 1, -5, 3])
    assert len(g) == 0


def test_identification_with_a_gallery_object_equals_arrays():
    rng = np.random.default_rng(15)
    rows = rng.standard_normal((40, 16))
    ids = rng.permutation(1000)[:40]
    g = afr.Gallery(16)
    g.add(rows, ids=ids)
    probes = rows[:10] + 0.8 * rng.standard_normal((10, 16))
    a = metrics.identification(probes, ids[:10], rows, ids)
    b = metrics.identification(probes, ids[:10], g)
    assert a.cmc == b.cmc and a.cmc[1] > 0


# ---------------------------------------------------------------------------------------
# 9. Double backward through the fused ops is an error, not a silent zero.


def test_double_backward_raises():
    torch = pytest.importorskip("torch")
    import arcface_rs.torch as aft

    head = aft.ArcFaceHead(embedding_size=8, num_classes=10).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss = head(x, y)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    z = head.logits(x, y)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(z.sum(), x, create_graph=True)
    # first-order gradients still work
    (g,) = torch.autograd.grad(head(x, y), x)
    assert torch.isfinite(g).all()


def test_torch_heads_take_numpy_integer_sizes():
    pytest.importorskip("torch")
    import arcface_rs.torch as aft

    head = aft.CosFaceHead(embedding_size=np.int64(8), num_classes=np.int32(5))
    assert tuple(head.weight.shape) == (5, 8) and type(head.num_classes) is int
    with pytest.raises(TypeError, match="num_classes"):
        aft.CosFaceHead(embedding_size=8, num_classes=5.0)


def test_torch_extreme_rows_are_finite():
    torch = pytest.importorskip("torch")
    import arcface_rs.torch as aft

    head = aft.ArcFaceHead(embedding_size=8, num_classes=6)
    x = torch.randn(3, 8)
    x[1] *= 1e-39
    x.requires_grad_(True)
    with torch.no_grad():
        head.weight[2] *= 1e-30
    loss = head(x, torch.tensor([2, 1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.isfinite(head.weight.grad).all()


# ---------------------------------------------------------------------------------------
# The smaller items.


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_empty_gallery_searches_as_padding(dtype):
    g = afr.Gallery(4, dtype)
    scores, ids = g.search(np.ones((2, 4)), k=3)
    assert ids.shape == (2, 3) and (ids == -1).all() and np.isneginf(scores).all()
    who, best = g.identify(np.ones(4), threshold=0.0)
    assert who == -1 and np.isneginf(best)
    scores, idx = afr.cosine_topk(np.ones((1, 4)), np.zeros((0, 4)), k=2)
    assert (idx == -1).all()


def test_remove_refuses_duplicates_and_empty_input_is_a_no_op():
    g = afr.Gallery(4)
    g.add(np.eye(4) + 0.1)
    with pytest.raises(ValueError, match="twice"):
        g.remove([1, 1])
    assert len(g) == 4
    assert g.remove([]) == 0
    assert len(g.add([], ids=[])) == 0
    assert len(g.add(np.zeros((0, 4)))) == 0
    assert len(g) == 4


def test_arcface_fallback_is_what_the_docs_say():
    for m in (0.5, 2.0, 2.6):
        margin = afr.ArcFace(s=1.0, m=m)
        c = np.cos(np.pi - m / 4)  # theta beyond pi - m
        assert abs(margin.psi(c) - (c - max(m * np.sin(m), 1 - np.cos(m)))) < 1e-12
        assert "max(m sin m, 1 - cos m)" in afr.ArcFace.__doc__


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    path = tmp_path / "g.safetensors"
    # a pid that cannot exist (beyond pid_max) and our own (a save that may be in progress)
    stale = tmp_path / "g.safetensors.tmp-4194305-0"
    ours = tmp_path / f"g.safetensors.tmp-{os.getpid()}-99"
    other = tmp_path / "other.safetensors.tmp-4194305-0"
    for f in (stale, ours, other):
        f.write_bytes(b"x" * 1000)
    g = afr.Gallery(4)
    g.add(np.eye(4))
    g.save(path)
    assert not stale.exists() and ours.exists() and other.exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_self_match_scores_are_never_above_one(dtype):
    rng = np.random.default_rng(16)
    rows = rng.standard_normal((200, 64)).astype(np.float32)
    g = afr.Gallery(64, dtype)
    g.add(rows)
    stored = g.vectors()
    scores, _ = g.search(stored, k=1)
    assert scores.max() <= 1.0
    top, _ = afr.cosine_topk(rows, rows, k=1)
    assert top.max() <= 1.0 and top.min() >= -1.0
    if dtype == "float32":
        who, _ = g.identify(stored, threshold=1.0 - 1e-6)
        assert (who >= 0).all()


def test_friendly_errors():
    rng = np.random.default_rng(17)
    scores, same = rng.standard_normal(100), rng.random(100) < 0.5
    with pytest.raises(ValueError, match="folds"):
        metrics.verification(scores, same, folds=-1)
    with pytest.raises(ValueError, match="far"):
        metrics.verification(scores, same, far=(float("nan"),))
    probes = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match="fpir"):
        metrics.identification(probes, [0, 1, 2], probes, [0, 1, 2], fpir=(float("nan"),))
    with pytest.raises(ValueError, match="gallery"):
        metrics.identification(probes, [0, 1, 2], np.zeros((0, 4)), np.zeros(0, np.int64))


def test_far_zero_is_the_tar_with_no_false_accept():
    scores = np.array([0.9, 0.8, 0.7, 0.75, 0.2, 0.1])
    same = np.array([True, True, True, False, False, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = metrics.verification(scores, same, far=(0.0,), folds=0)
    assert rep.tar_at_far[0.0] == pytest.approx(2 / 3)


def test_big_endian_arrays_are_converted():
    rng = np.random.default_rng(18)
    q, g = rng.standard_normal((2, 8)), rng.standard_normal((30, 8))
    want = afr.cosine_topk(q, g, k=3)
    got = afr.cosine_topk(q.astype(">f8"), g.astype(">f8"), k=3)
    np.testing.assert_array_equal(got[1], want[1])
    emb, weight, labels = make_problem(3, 8, 4, seed=19)
    a = afr.margin_loss(emb, weight, labels, afr.ArcFace())
    b = afr.margin_loss(
        emb.astype(">f8"), weight.astype(">f8"), labels.astype(">i8"), afr.ArcFace()
    )
    assert a[0] == b[0]


def test_snapshot_is_consistent_under_concurrent_writers():
    rng = np.random.default_rng(20)
    g = afr.Gallery(8)
    rows = rng.standard_normal((400, 8))
    g.add(rows[:200], ids=np.arange(200))
    want = {i: r / np.linalg.norm(r) for i, r in enumerate(rows)}
    stop = threading.Event()

    def writer():
        i = 200
        while not stop.is_set() and i < 400:
            g.add(rows[i], ids=[i])
            g.remove([i - 200])
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(50):
            ids, vectors = g.snapshot()
            assert len(ids) == len(vectors)
            for i, v in zip(ids[:20], vectors[:20]):
                np.testing.assert_allclose(v, want[int(i)], atol=1e-6)
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------------------------------
# Property test over magnitudes and sizes.


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    exp_emb=st.integers(-300, 300),
    exp_w=st.integers(-300, 300),
    k=st.one_of(st.integers(1, 40), st.integers(2**40, 2**63 - 1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_any_magnitude_any_k(dtype, exp_emb, exp_w, k, seed):
    if dtype == np.float32:  # float32 spans about 1e-45 .. 3e38
        exp_emb, exp_w = exp_emb * 37 // 300 - 2, exp_w * 37 // 300 - 2
    emb, weight, labels = make_problem(5, 6, 7, seed=seed % 1000)
    emb, weight = unit(emb), unit(weight)
    margin = afr.ArcFace(s=16.0, m=0.4)
    want = float(ref_loss(emb, weight, labels, margin)[0])
    e = (emb * 10.0**exp_emb).astype(dtype)
    w = (weight * 10.0**exp_w).astype(dtype)
    if not (np.abs(e).max(axis=1) > 0).all() or not (np.abs(w).max(axis=1) > 0).all():
        return  # the cast itself rounded a row to zeros
    got = _loss_of(e, w, labels, margin)
    tol = 0.1 if min(exp_emb, exp_w) < (-37 if dtype == np.float32 else -300) else 1e-3
    assert abs(got - want) <= tol * max(1.0, abs(want))
    try:
        scores, idx = afr.cosine_topk(e, w, k=k)
    except ValueError as err:
        assert "k" in str(err) and k > 10**6
        return
    assert np.all(scores[idx >= 0] <= 1.0) and np.all(np.isfinite(scores[idx >= 0]))
    assert (idx[:, : w.shape[0]] >= 0).all() and (idx[:, w.shape[0] :] == -1).all()


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
