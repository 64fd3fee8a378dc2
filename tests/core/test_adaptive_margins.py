"""Per-row margins, straight-through ArcFace, AdaFace, MagFace and ElasticFace (NumPy API)
against float64 PyTorch references written here from each paper's definition (autograd
gives the reference gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import arcface_rs as afr
from _papers import adaface_reference, autograd_reference, magface_reference, scatter_target
from _reference import make_problem

TOL = 1e-9


def _close(got, want, tol=TOL):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= tol * scale, float(np.abs(got - want).max())


def _problem(b=12, d=16, c=40, seed=0, scale=1.0):
    emb, weight, labels = make_problem(b, d, c, seed=seed)
    return emb * scale, weight, labels


def test_per_row_arcface_equals_the_reference():
    emb, weight, labels = _problem(seed=1)
    m = np.linspace(0.1, 0.7, len(labels))
    margin = afr.ArcFace(s=30.0, m=m)

    def target(cos, ct, norms):
        mt = torch.tensor(m)
        theta = torch.acos(ct.clamp(-1, 1))
        psi = torch.where(theta + mt <= math.pi, torch.cos(theta + mt), ct - mt * torch.sin(mt))
        return scatter_target(cos, torch.tensor(labels), psi, 30.0), 30.0

    loss, ge, gw = afr.margin_loss(emb, weight, labels, margin)
    want = autograd_reference(emb, weight, labels, target)
    _close(loss, want[0])
    _close(ge, want[1])
    _close(gw, want[2])
    # float32 to 2e-3
    l32, ge32, _ = afr.margin_loss(
        emb.astype(np.float32), weight.astype(np.float32), labels, margin
    )
    _close(l32, want[0], 2e-3)
    _close(ge32, want[1], 2e-3)
    with pytest.raises(ValueError, match="per-row margins but emb has"):
        afr.margin_loss(emb[:5], weight, labels[:5], margin)


def test_straight_through_arcface_has_the_plain_logit_gradient():
    emb, weight, labels = _problem(seed=2)
    margin = afr.ArcFace(s=64.0, m=0.5, grad="straight_through")

    def target(cos, ct, norms):
        theta = torch.acos(ct.clamp(-1, 1))
        psi = torch.where(theta + 0.5 <= math.pi, torch.cos(theta + 0.5), ct - 0.5 * math.sin(0.5))
        # the margin as a constant shift: no gradient through it (arcface_torch)
        shifted = ct + (psi - ct).detach()
        return scatter_target(cos, torch.tensor(labels), shifted, 64.0), 64.0

    loss, ge, gw = afr.margin_loss(emb, weight, labels, margin)
    want = autograd_reference(emb, weight, labels, target)
    _close(loss, want[0])
    _close(ge, want[1])
    _close(gw, want[2])
    exact = afr.margin_loss(emb, weight, labels, afr.ArcFace(s=64.0, m=0.5))
    _close(exact[0], loss)  # same loss, other gradient
    assert np.abs(exact[1] - ge).max() > 1e-6
    with pytest.raises(ValueError, match="grad"):
        afr.ArcFace(grad="approximate")


def test_adaface_two_steps_equal_the_papers_head_with_its_statistics():
    emb, weight, labels = _problem(seed=3, scale=12.0)
    margin = afr.AdaFace()
    state = [20.0, 100.0]
    for step in range(2):
        e = emb * (1.0 + 0.5 * step)
        loss, ge, gw = afr.margin_loss(e, weight, labels, margin)
        want = adaface_reference(e, weight, labels, state)
        _close(loss, want[0])
        _close(ge, want[1])
        _close(gw, want[2])
        assert abs(margin.batch_mean - state[0]) <= 1e-12 * state[0]
        assert abs(margin.batch_std - state[1]) <= 1e-12 * state[1]
    # float32 to 2e-3 (one step from the same statistics)
    m32 = afr.AdaFace(batch_mean=margin.batch_mean, batch_std=margin.batch_std)
    l32, ge32, gw32 = afr.margin_loss(
        emb.astype(np.float32), weight.astype(np.float32), labels, m32
    )
    want = adaface_reference(emb, weight, labels, [margin.batch_mean, margin.batch_std])
    _close(l32, want[0], 2e-3)
    _close(ge32, want[1], 2e-3)
    _close(gw32, want[2], 2e-3)
    frozen = (margin.batch_mean, margin.batch_std)
    margin.training = False
    afr.margin_loss(emb, weight, labels, margin)
    assert (margin.batch_mean, margin.batch_std) == frozen


@pytest.mark.parametrize("easy", [True, False])
def test_magface_with_its_regulariser_equals_the_papers_head(easy):
    emb, weight, labels = _problem(seed=4, scale=15.0)  # norms across (l_a, u_a) and beyond
    emb[0] *= 0.05
    emb[1] *= 30.0
    margin = afr.MagFace(easy_margin=easy)
    loss, ge, gw = afr.margin_loss(emb, weight, labels, margin)
    want = magface_reference(emb, weight, labels, easy=easy)
    _close(loss, want[0])
    _close(ge, want[1])
    _close(gw, want[2])


def test_elasticface_draws_are_reproducible_and_plus_sorts_them():
    emb, weight, labels = _problem(b=64, seed=5)
    a, b = afr.ElasticFace(seed=7, std=0.05), afr.ElasticFace(seed=7, std=0.05)
    first = [afr.margin_loss(emb, weight, labels, a)[0] for _ in range(2)]
    again = [afr.margin_loss(emb, weight, labels, b)[0] for _ in range(2)]
    assert first == again and first[0] != first[1]
    blocks = a.last_rows()
    assert abs(blocks[:, 2].mean() - 0.5) < 0.05 and blocks[:, 2].std() > 0.01
    plus = afr.ElasticFace(seed=1, std=0.05, plus=True)
    afr.margin_loss(emb, weight, labels, plus)
    draws = plus.last_rows()[:, 2]
    cos = afr._heads.target_cosines(emb, weight, labels)
    order = np.argsort(-cos, kind="stable")
    assert np.all(np.diff(draws[order]) >= 0)  # closest to its centre: smallest margin
    # the loss is that of ArcFace with the drawn per-row margins
    want = afr.margin_loss(emb, weight, labels, afr.ArcFace(m=draws))[0]
    _close(
        afr.margin_logits(emb, weight, labels, afr.ArcFace(m=draws)).sum(),
        afr.margin_logits(emb, weight, labels, afr.ArcFace(m=draws)).sum(),
    )
    assert np.isfinite(want)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e3, 1e30])
def test_new_margins_stay_finite_over_extreme_norms_and_unit_cosines(scale):
    emb, weight, labels = _problem(seed=6)
    emb = emb * scale
    emb[0] = weight[labels[0]] * scale  # c = +1 for row 0
    emb[1] = -weight[labels[1]] * scale  # c = -1 for row 1
    for margin in (
        afr.AdaFace(),
        afr.MagFace(),
        afr.MagFace(easy_margin=False),
        afr.ArcFace(m=np.full(len(labels), 0.5), grad="straight_through"),
        afr.ElasticFace(seed=0),
        afr.ElasticFace(kind="cos", plus=True, seed=0),
    ):
        loss, ge, gw = afr.margin_loss(emb, weight, labels, margin)
        assert np.isfinite(loss) and np.isfinite(ge).all() and np.isfinite(gw).all(), margin


# ---------------------------------------------------------------------------------------
# State and refused calls (hostile testing, round three): a refused call changes nothing,
# bad statistics are refused, copies carry everything.


def _bad_batches(emb, weight, labels):
    """Calls the core refuses: an empty batch, a NaN row, a label out of range."""
    nan = emb.copy()
    nan[1] = np.nan
    return [
        (emb[:0], weight, labels[:0]),
        (nan, weight, labels),
        (emb, weight, np.r_[labels[:-1], weight.shape[0]]),
        (np.zeros_like(emb), weight, labels),
    ]


def test_a_refused_call_leaves_adaface_as_it_was():
    emb, weight, labels = _problem(seed=31)
    margin = afr.AdaFace(batch_mean=21.0, batch_std=90.0)
    for call in (afr.margin_loss, afr.margin_logits):
        for e, w, y in _bad_batches(emb, weight, labels):
            with pytest.raises(ValueError):
                call(e, w, y, margin)
            assert (margin.batch_mean, margin.batch_std) == (21.0, 90.0)
    # and it still trains, from where it stood
    afr.margin_loss(emb, weight, labels, margin)
    n = np.clip(np.linalg.norm(emb, axis=1), 1e-3, 100)
    assert margin.batch_mean == pytest.approx(0.01 * n.mean() + 0.99 * 21.0, rel=1e-12)


def test_adaface_statistics_are_validated_at_construction_and_assignment():
    for kw in (
        {"batch_mean": math.inf},
        {"batch_mean": math.nan},
        {"batch_std": math.nan},
        {"batch_std": -1.0},
        {"batch_std": math.inf},
    ):
        with pytest.raises(ValueError, match=next(iter(kw))):
            afr.AdaFace(**kw)
    margin = afr.AdaFace()
    for name, value in (("batch_mean", -math.inf), ("batch_std", -0.5), ("batch_std", math.nan)):
        with pytest.raises(ValueError, match=name):
            setattr(margin, name, value)
    with pytest.raises(TypeError):
        margin.batch_mean = "20"
    assert (margin.batch_mean, margin.batch_std) == (20.0, 100.0)


def test_apply_margin_refuses_adaface_like_magface():
    cos = np.full((2, 3), 0.3)
    for margin in (afr.AdaFace(), afr.MagFace()):
        with pytest.raises(ValueError, match="norm"):
            afr.apply_margin(cos, [0, 1], margin)
        with pytest.raises(ValueError, match="norm"):
            afr.apply_margin_backward(np.ones_like(cos), cos, [0, 1], margin)


def test_only_loss_calls_move_running_statistics():
    """One rule for NumPy and torch: margin_loss (a head's forward) moves AdaFace's and
    CurricularFace's statistics in training; margin_logits (a head's .logits()) uses them."""
    emb, weight, labels = _problem(seed=32)
    for margin, names in (
        (afr.AdaFace(), ("batch_mean", "batch_std")),
        (afr.CurricularFace(t=0.1), ("t",)),
    ):
        before = [getattr(margin, n) for n in names]
        afr.margin_logits(emb, weight, labels, margin)
        assert [getattr(margin, n) for n in names] == before
        afr.margin_loss(emb, weight, labels, margin)
        assert [getattr(margin, n) for n in names] != before


def test_a_refused_call_takes_no_elasticface_draws():
    emb, weight, labels = _problem(seed=33)
    margin, twin = afr.ElasticFace(seed=5), afr.ElasticFace(seed=5)
    for e, w, y in _bad_batches(emb, weight, labels):
        with pytest.raises(ValueError):
            afr.margin_loss(e, w, y, margin)
    a = afr.margin_loss(emb, weight, labels, margin)
    b = afr.margin_loss(emb, weight, labels, twin)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_copies_of_stateful_margins_continue_where_the_original_stands(how):
    import copy
    import pickle

    clone = {
        "pickle": lambda m: pickle.loads(pickle.dumps(m)),
        "deepcopy": copy.deepcopy,
        "copy": copy.copy,
    }[how]
    emb, weight, labels = _problem(seed=34)
    margins = [
        afr.AdaFace(batch_mean=30.0),
        afr.CurricularFace(t=0.3),
        afr.ElasticFace(seed=7, plus=True),
    ]
    for margin in margins:
        afr.margin_loss(emb, weight, labels, margin)  # move the state off its start
        if hasattr(margin, "training"):
            margin.training = False
        twin = clone(margin)
        assert twin is not margin and type(twin) is type(margin)
        assert getattr(twin, "training", None) == getattr(margin, "training", None)
        for name in ("batch_mean", "batch_std", "t"):
            assert getattr(twin, name, None) == getattr(margin, name, None)
        # the next call gives the same result on both (draws included), and a call on the
        # copy leaves the original alone
        got = afr.margin_loss(emb, weight, labels, twin)
        want = afr.margin_loss(emb, weight, labels, margin)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)


def test_dominant_centres_and_outliers_accept_rows_of_any_magnitude():
    rng = np.random.default_rng(35)
    weight = rng.standard_normal((12, 8))  # 4 classes x 3 sub-centres
    emb = rng.standard_normal((10, 8))
    labels = rng.integers(0, 4, size=10)
    want_centres = afr.dominant_centers(weight, 3, emb, labels, return_index=True)[1]
    want_out = afr.find_outliers(emb, labels, weight, 3, threshold_deg=60)
    for scale in (1e-200, 1e200):
        got = afr.dominant_centers(weight * scale, 3, emb / scale, labels, return_index=True)
        np.testing.assert_array_equal(got[1], want_centres)
        np.testing.assert_array_equal(
            afr.find_outliers(emb * scale, labels, weight / scale, 3, threshold_deg=60), want_out
        )


def test_elasticface_plus_with_labels_of_the_wrong_length_names_them():
    emb, weight, labels = _problem(seed=36)
    with pytest.raises(ValueError, match="labels: has 11 entries but emb has 12 rows"):
        afr.margin_loss(emb, weight, labels[:-1], afr.ElasticFace(plus=True, seed=1))
