"""The heads against an independent float64 reference, finite differences and DESIGN values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arcface_rs as afr
from _reference import all_margins, brute_topk, make_problem, ref_logits, ref_loss, rel_err, unit

SHAPES = [(188, 31, 123), (64, 128, 1000), (1, 7, 3), (32, 64, 2000)]


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_loss_and_gradients_match_float64_reference(margin, shape):
    emb, weight, labels = make_problem(*shape, seed=sum(shape), ignore=shape[0] // 10)
    loss, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin)
    r_loss, r_emb, r_w = ref_loss(emb, weight, labels, margin)
    assert isinstance(loss, np.float64)
    assert rel_err(loss, r_loss) < 1e-9
    assert rel_err(g_emb, r_emb) < 1e-9
    assert rel_err(g_w, r_w) < 1e-9


@pytest.mark.parametrize("sub_centers", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_repeated_call_gives_the_same_bits(dtype, sub_centers):
    # Many class tiles (work shared between threads in a different order each time): the
    # loss and both gradients must not depend on which thread summed what.
    emb, weight, labels = make_problem(64, 32, 6000 * sub_centers, seed=11, dtype=dtype)
    labels = labels // sub_centers
    first = afr.margin_loss(emb, weight, labels, afr.ArcFace(), sub_centers=sub_centers)
    for _ in range(5):
        again = afr.margin_loss(emb, weight, labels, afr.ArcFace(), sub_centers=sub_centers)
        assert float(again[0]) == float(first[0])
        assert np.array_equal(again[1], first[1])
        assert np.array_equal(again[2], first[2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [afr.ArcFace(), afr.SphereFace()], ids=repr)
def test_reductions(reduction, margin):
    emb, weight, labels = make_problem(40, 16, 300, seed=3, ignore=5)
    loss, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin, reduction=reduction)
    r_loss, r_emb, r_w = ref_loss(emb, weight, labels, margin, reduction=reduction)
    assert np.shape(loss) == np.shape(r_loss)
    assert rel_err(loss, r_loss) < 1e-9
    assert rel_err(g_emb, r_emb) < 1e-9
    assert rel_err(g_w, r_w) < 1e-9


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_float32_matches_reference(margin):
    emb, weight, labels = make_problem(96, 64, 700, seed=5, dtype=np.float32, ignore=4)
    loss, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin)
    assert loss.dtype == np.float32 and g_emb.dtype == np.float32 and g_w.dtype == np.float32
    r_loss, r_emb, r_w = ref_loss(emb, weight, labels, margin)
    assert rel_err(loss, r_loss) < 1e-5
    assert rel_err(g_emb, r_emb) < 1e-3
    assert rel_err(g_w, r_w) < 1e-3
    # no worse than a naive float32 implementation of the same head (+5e-4)
    _, n_emb, n_w = ref_loss(emb, weight, labels, margin, dtype=torch.float32)
    assert rel_err(g_emb, r_emb) <= rel_err(n_emb, r_emb) + 5e-4
    assert rel_err(g_w, r_w) <= rel_err(n_w, r_w) + 5e-4


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_logits_and_logits_backward_match_reference(margin):
    emb, weight, labels = make_problem(21, 9, 77, seed=11, ignore=3)
    logits = afr.margin_logits(emb, weight, labels, margin)
    e = torch.tensor(emb, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    z = ref_logits(e, w, torch.tensor(labels), margin)
    assert rel_err(logits, z.detach().numpy()) < 1e-12
    upstream = np.random.default_rng(0).standard_normal(logits.shape)
    (z * torch.tensor(upstream)).sum().backward()
    g_emb, g_w = afr.margin_logits_backward(upstream, emb, weight, labels, margin)
    assert rel_err(g_emb, e.grad.numpy()) < 1e-9
    assert rel_err(g_w, w.grad.numpy()) < 1e-9


@pytest.mark.parametrize("margin", [m for m in all_margins() if m.scale is not None], ids=repr)
def test_apply_margin_and_backward(margin):
    rng = np.random.default_rng(2)
    cos = rng.uniform(-1, 1, size=(13, 17))
    labels = rng.integers(-1, 17, size=13)
    c = torch.tensor(cos, requires_grad=True)
    y = torch.tensor(labels)
    rows = torch.nonzero(y >= 0).flatten()
    z = c.index_put((rows, y[rows]), _psi(margin, c[rows, y[rows]])) * margin.scale
    out = afr.apply_margin(cos, labels, margin)
    assert rel_err(out, z.detach().numpy()) < 1e-12
    upstream = rng.standard_normal(cos.shape)
    (z * torch.tensor(upstream)).sum().backward()
    g = afr.apply_margin_backward(upstream, cos, labels, margin)
    assert rel_err(g, c.grad.numpy()) < 1e-12


def _psi(margin, c):
    from _reference import ref_psi

    return ref_psi(margin, c)


def test_design_reference_values_arcface():
    # one row with c = [0.6, 0.1, -0.3, 0.2]: a unit embedding whose first four coordinates
    # are those cosines against the unit class centres e_0..e_3
    c = np.array([0.6, 0.1, -0.3, 0.2])
    emb = np.append(c, np.sqrt(1 - c @ c))[None, :]
    weight = np.eye(4, 5)
    loss, _, _ = afr.margin_loss(emb, weight, [0], afr.ArcFace(s=64.0, m=0.5))
    assert abs(loss - 3.67476) < 1e-5
    z = afr.apply_margin(c[None, :], [0], afr.ArcFace())
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    g = afr.apply_margin_backward(p - np.eye(1, 4), c[None, :], [0], afr.ArcFace())[0]
    np.testing.assert_allclose(g[:2], [-77.170, 0.10347], rtol=1e-4)
    np.testing.assert_allclose(g[2], 7.9e-13, rtol=1e-2)  # docs/math.md gives two digits
    np.testing.assert_allclose(g[3], 62.274, rtol=1e-4)
    assert abs(afr.ArcFace().dpsi(0.6) - 1.23715) < 1e-5
    loss_cf, _, _ = afr.margin_loss(emb, weight, [0], afr.CosFace(s=64.0, m=0.35))
    assert abs(loss_cf - 0.040018) < 1e-6


def test_design_reference_values_sphereface():
    psi = afr.SphereFace(m=4).psi([1, 0.9, 0.5, 0, -0.5, -1])
    np.testing.assert_allclose(psi, [1, -0.2312, -1.5, -3, -4.5, -7], atol=1e-12)


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_psi_non_increasing_and_dpsi_finite_on_dense_grid(margin):
    theta = np.linspace(0, np.pi, 100_001)
    c = np.cos(theta)
    c[0], c[-1] = 1.0, -1.0
    psi, dpsi = margin.psi(c), margin.dpsi(c)
    assert np.all(np.isfinite(psi)) and np.all(np.isfinite(dpsi))
    if getattr(margin, "easy_margin", False):
        # easy_margin is psi = c for c <= 0 by definition: one upward jump at theta = pi/2
        jumps = np.flatnonzero(np.diff(psi) > 1e-12)
        assert np.all(np.abs(c[jumps]) < 1e-4)
    else:
        assert np.all(np.diff(psi) <= 1e-12)


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_finite_differences(margin):
    emb, weight, labels = make_problem(5, 6, 9, seed=21)
    _, g_emb, g_w = afr.margin_loss(emb, weight, labels, margin, reduction="sum")
    rng = np.random.default_rng(1)
    h = 1e-6
    for _ in range(3):
        de, dw = rng.standard_normal(emb.shape), rng.standard_normal(weight.shape)
        plus = afr.margin_loss(emb + h * de, weight + h * dw, labels, margin, reduction="sum")[0]
        minus = afr.margin_loss(emb - h * de, weight - h * dw, labels, margin, reduction="sum")[0]
        fd = (plus - minus) / (2 * h)
        analytic = (g_emb * de).sum() + (g_w * dw).sum()
        assert abs(fd - analytic) <= 1e-5 * (1 + abs(analytic))


def test_ignored_rows_get_no_loss_and_no_gradient():
    emb, weight, labels = make_problem(10, 8, 20, seed=4)
    labels[[2, 5]] = -1
    rows, g_emb, _ = afr.margin_loss(emb, weight, labels, afr.ArcFace(), reduction="none")
    assert rows[2] == 0 and rows[5] == 0
    assert np.all(g_emb[[2, 5]] == 0)
    keep = labels >= 0
    mean, _, g_w = afr.margin_loss(emb, weight, labels, afr.ArcFace())
    _, _, g_w_kept = afr.margin_loss(emb[keep], weight, labels[keep], afr.ArcFace())
    assert np.isclose(mean, rows[keep].mean(), rtol=1e-12)
    np.testing.assert_allclose(g_w, g_w_kept, rtol=1e-10, atol=1e-15)


def test_all_rows_ignored_gives_zero_not_nan():
    emb, weight, _ = make_problem(4, 8, 20, seed=4)
    loss, g_emb, g_w = afr.margin_loss(emb, weight, [-1, -1, -1, -1], afr.ArcFace())
    assert loss == 0 and not g_emb.any() and not g_w.any()


def test_edge_cosines_stay_finite():
    # targets exactly on (and exactly opposite) their class centre, D = 1 and duplicates
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0, 2])
    for margin in all_margins():
        for dtype in (np.float32, np.float64):
            out = afr.margin_loss(emb.astype(dtype), weight.astype(dtype), labels, margin)
            assert all(np.all(np.isfinite(a)) for a in out), margin
    one_d = afr.margin_loss(
        np.array([[2.0], [-1.0]]), np.array([[1.0], [-3.0]]), [0, 0], afr.ArcFace()
    )
    assert all(np.all(np.isfinite(a)) for a in one_d)


def test_large_logits_do_not_overflow():
    emb, weight, labels = make_problem(8, 4, 50, seed=9, dtype=np.float32)
    emb *= 1e6  # SphereFace(s=None) scales logits by ||x||: logits ~ 1e6
    out = afr.margin_loss(emb, weight, labels, afr.SphereFace(m=2))
    assert all(np.all(np.isfinite(a)) for a in out)


@pytest.mark.parametrize("layout", ["fortran", "strided", "negative"])
def test_any_memory_layout_is_read_correctly(layout):
    emb, weight, labels = make_problem(17, 12, 40, seed=8)
    want = afr.margin_loss(emb, weight, labels, afr.CosFace())
    if layout == "fortran":
        e, w = np.asfortranarray(emb), np.asfortranarray(weight)
    elif layout == "strided":
        e = np.zeros((17, 24))
        e[:, ::2] = emb
        e = e[:, ::2]
        w = np.repeat(weight, 2, axis=0)[::2]
    else:
        e, w = emb[::-1][::-1], weight[:, ::-1][:, ::-1]
        e = np.flip(np.flip(emb, 0).copy(), 0)
    assert not e.flags.c_contiguous or layout == "negative"
    got = afr.margin_loss(e, w, labels, afr.CosFace())
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_labels_accept_any_integer_dtype():
    emb, weight, labels = make_problem(6, 5, 10, seed=1)
    want = afr.margin_loss(emb, weight, labels, afr.ArcFace())[0]
    for dt in (np.int32, np.int16, np.uint8, np.int64):
        assert afr.margin_loss(emb, weight, labels.astype(dt), afr.ArcFace())[0] == want
    assert afr.margin_loss(emb, weight, list(labels), afr.ArcFace())[0] == want


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


def test_huge_float64_rows_are_not_called_nan():
    rng = np.random.default_rng(12)
    q, g = rng.standard_normal((3, 8)), rng.standard_normal((10, 8))
    _, idx = afr.cosine_topk(q * 1e200, g * 1e250, k=4)
    np.testing.assert_array_equal(idx, brute_topk(q, g, 4))


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


def test_arcface_fallback_is_what_the_docs_say():
    for m in (0.5, 2.0, 2.6):
        margin = afr.ArcFace(s=1.0, m=m)
        c = np.cos(np.pi - m / 4)  # theta beyond pi - m
        assert abs(margin.psi(c) - (c - max(m * np.sin(m), 1 - np.cos(m)))) < 1e-12
        assert "max(m sin m, 1 - cos m)" in afr.ArcFace.__doc__


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
