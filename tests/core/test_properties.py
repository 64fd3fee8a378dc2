"""Hypothesis property tests over shapes, margins, parameters and edge values."""

from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import arcface_rs as afr
from _reference import ref_loss, rel_err

margins = st.one_of(
    st.builds(afr.Softmax, s=st.floats(1.0, 64.0)),
    st.builds(
        afr.ArcFace, s=st.floats(1.0, 64.0), m=st.floats(0.0, 1.5), easy_margin=st.booleans()
    ),
    st.builds(afr.CosFace, s=st.floats(1.0, 64.0), m=st.floats(0.0, 1.0)),
    st.builds(
        afr.SphereFace,
        m=st.integers(1, 4),
        s=st.one_of(st.none(), st.floats(1.0, 64.0)),
        lambda_=st.floats(0.0, 10.0),
    ),
    st.builds(
        afr.CombinedMargin,
        s=st.floats(1.0, 64.0),
        m1=st.floats(0.5, 2.0),
        m2=st.floats(0.0, 1.0),
        m3=st.floats(0.0, 0.5),
    ),
)


@st.composite
def problems(draw):
    b, d, c = draw(st.integers(1, 24)), draw(st.integers(2, 24)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((b, d)) * draw(st.floats(0.1, 10.0))
    weight = rng.standard_normal((c, d))
    labels = rng.integers(-1, c, size=b)
    return emb, weight, labels


def _target_cos(emb, weight, labels):
    xn = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    wn = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    rows = labels >= 0
    return np.einsum("ij,ij->i", xn[rows], wn[labels[rows]])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), margin=margins, reduction=st.sampled_from(["mean", "sum", "none"]))
def test_matches_float64_reference(problem, margin, reduction):
    emb, weight, labels = problem
    # the reference differentiates acos, which is infinite at |c| = 1 (we clamp, see margin.rs)
    assume(np.all(np.abs(_target_cos(emb, weight, labels)) < 0.9999))
    loss, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin, reduction=reduction)
    r_loss, r_emb, r_w = ref_loss(emb, weight, labels, margin, reduction=reduction)
    assert rel_err(loss, r_loss) < 1e-9 or np.abs(loss - r_loss).max() < 1e-12
    assert rel_err(g_emb, r_emb) < 1e-9 or np.abs(g_emb - r_emb).max() < 1e-12
    assert rel_err(g_w, r_w) < 1e-9 or np.abs(g_w - r_w).max() < 1e-12


@settings(max_examples=100, deadline=None)
@given(
    margin=margins,
    dtype=st.sampled_from([np.float32, np.float64]),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e15]),
    b=st.integers(1, 6),
    d=st.integers(1, 4),
    c=st.integers(1, 6),
    seed=st.integers(0, 1000),
    exact=st.booleans(),
)
# found by hypothesis: float32 logits of 1e15 once rounded the target differently in the
# softmax statistics and in the loss, giving a loss of -1.4e7 and NaN gradients
@example(
    margin=afr.SphereFace(m=1), dtype=np.float32, scale=1e15, b=1, d=1, c=1, seed=1, exact=False
)
def test_never_nan_or_inf(margin, dtype, scale, b, d, c, seed, exact):
    """Tiny and huge norms, D = 1, embeddings exactly on (or opposite) a class centre."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c, d))
    labels = rng.integers(-1, c, size=b)
    emb = rng.standard_normal((b, d))
    if exact:
        emb = weight[np.maximum(labels, 0)] * rng.choice([-1.0, 1.0], size=(b, 1))
    emb, weight = (emb * scale).astype(dtype), weight.astype(dtype)
    assume(np.all(np.linalg.norm(emb.astype(np.float64), axis=1) > 0))
    loss, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin)
    assert np.isfinite(loss) and np.all(np.isfinite(g_emb)) and np.all(np.isfinite(g_w))
    assert np.all(np.isfinite(afr.margin_logits(emb, weight, labels, margin)))


@settings(max_examples=60, deadline=None)
@given(margin=margins, c=st.floats(-1.0, 1.0))
def test_dpsi_finite_and_psi_bounded(margin, c):
    psi, dpsi = float(margin.psi(c)), float(margin.dpsi(c))
    assert np.isfinite(psi) and np.isfinite(dpsi)
    if not isinstance(margin, afr.SphereFace):
        assert psi <= c + 1e-12 or (isinstance(margin, afr.CombinedMargin) and margin.m1 < 1)


def test_gil_is_released_during_the_heavy_work():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((256, 256), dtype=np.float32)
    weight = rng.standard_normal((60_000, 256), dtype=np.float32)
    labels = rng.integers(0, 60_000, size=256)
    done = threading.Event()

    def work():
        for _ in range(3):
            afr.margin_loss(emb, weight, labels, afr.ArcFace())
        done.set()

    ticks = 0
    thread = threading.Thread(target=work)
    start = time.perf_counter()
    thread.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    thread.join()
    elapsed = time.perf_counter() - start
    # with the GIL held, the main thread could not tick during the calls at all
    assert ticks > 0.2 * elapsed / 0.001


hard_negative_margins = st.one_of(
    st.builds(
        afr.CurricularFace,
        s=st.floats(1.0, 64.0),
        m=st.floats(0.0, 1.5),
        t=st.floats(-1.0, 1.0),
    ),
    st.builds(
        afr.MVSoftmax,
        s=st.floats(1.0, 64.0),
        m=st.floats(0.0, 0.8),
        t=st.floats(1.0, 2.0),
        kind=st.sampled_from(["cos", "arc"]),
    ),
    st.builds(afr.ArcFace, s=st.floats(1.0, 64.0), m=st.floats(0.0, 1.0)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=problems(),
    margin=hard_negative_margins,
    k=st.integers(1, 3),
    interclass_filter=st.one_of(st.none(), st.floats(-1.0, 1.0)),
    grad_filter=st.one_of(st.none(), st.sampled_from(["auto", 1e-6])),
)
def test_hard_negatives_sub_centres_and_filters_equal_the_softmax_of_their_logits(
    problem, margin, k, interclass_filter, grad_filter
):
    """The fused loss equals the float64 softmax cross-entropy of margin_logits (which
    test_hard_negatives.py checks against the papers' heads), for any K and filters, and is
    finite; the filtered gradient stays within its bound of the exact one."""
    emb, weight, labels = problem
    weight = np.repeat(weight, k, axis=0) + 0.1 * np.random.default_rng(k).standard_normal(
        (weight.shape[0] * k, weight.shape[1])
    )
    if isinstance(margin, afr.CurricularFace):
        margin.training = False
    head = {"sub_centers": k, "interclass_filter": interclass_filter}
    loss, ge, gw = afr.margin_loss(emb, weight, labels, margin, grad_filter=grad_filter, **head)
    z = afr.margin_logits(emb, weight, labels, margin, **head)
    rows = labels >= 0
    want = 0.0
    if rows.any():
        zr = z[rows]
        lse = zr.max(axis=1) + np.log(np.exp(zr - zr.max(axis=1, keepdims=True)).sum(axis=1))
        want = float(np.mean(lse - zr[np.arange(rows.sum()), labels[rows]]))
    assert abs(float(loss) - want) <= 1e-9 * max(1.0, abs(want))
    assert np.isfinite(ge).all() and np.isfinite(gw).all()
    exact = afr.margin_loss(emb, weight, labels, margin, **head)
    scale = max(1.0, np.abs(exact[1]).max())
    if grad_filter is None:
        np.testing.assert_array_equal(ge, exact[1])
    else:
        floor = 2.0**-57 if grad_filter == "auto" else grad_filter
        n = weight.shape[0] // k
        bound = n * floor * margin.scale / np.linalg.norm(emb, axis=1).min()
        assert np.abs(ge - exact[1]).max() <= bound * scale + 1e-12
