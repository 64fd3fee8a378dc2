"""Verification metrics against scikit-learn and a NumPy brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from arcface_rs import metrics
from arcface_rs.metrics import verification


def _sklearn_tar(fpr, tpr, far):
    return tpr[fpr <= far].max()


@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    n = 20_000
    same = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.5 * same
    if ties:
        scores = np.round(scores, 1)  # many exact ties
    rep = verification(scores, same, far=(1e-4, 1e-3, 1e-2, 1e-1))
    fpr, tpr, thr = roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_array_equal(rep.fpr, fpr)
    np.testing.assert_array_equal(rep.tpr, tpr)
    np.testing.assert_array_equal(rep.thresholds[1:], thr[1:])
    assert abs(rep.auc - roc_auc_score(same, scores)) < 1e-9
    for far, tar in rep.tar_at_far.items():
        assert abs(tar - _sklearn_tar(fpr, tpr, far)) < 1e-12


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 60),
    seed=st.integers(0, 10_000),
    levels=st.integers(1, 6),
    folds=st.sampled_from([0, 2, 3, 10]),
)
def test_small_inputs_match_brute_force(n, seed, levels, folds):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    same[0], same[1] = True, False
    scores = rng.integers(0, levels, size=n).astype(float)  # heavy ties
    if folds > n:
        folds = 0
    rep = verification(scores, same, far=(0.5,), folds=folds)
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(rep.fpr, fpr)
    np.testing.assert_allclose(rep.tpr, tpr)
    assert abs(rep.auc - roc_auc_score(same, scores)) < 1e-9
    # best accuracy over all thresholds ("same" when score >= t), brute force
    cands = np.r_[np.inf, np.unique(scores)]
    accs = [np.mean((scores >= t) == same) for t in cands]
    assert abs(rep.best_accuracy - max(accs)) < 1e-12
    if folds:
        bounds = np.array_split(np.arange(n), folds)
        for k, idx in enumerate(bounds):
            rest = np.setdiff1d(np.arange(n), idx)
            # sweep order: +inf, then scores descending; ties keep the highest threshold
            order = np.r_[np.inf, np.unique(scores)[::-1]]
            rest_accs = [np.mean((scores[rest] >= t) == same[rest]) for t in order]
            best_t = order[int(np.argmax(rest_accs))]
            want = np.mean((scores[idx] >= best_t) == same[idx])
            assert abs(rep.fold_accuracy[k] - want) < 1e-12


def test_report_fields_and_lfw_accuracy():
    rng = np.random.default_rng(3)
    same = np.repeat([True, False], 3000)
    scores = rng.normal(size=6000) + 2.0 * same
    with pytest.warns(RuntimeWarning, match="FAR"):  # 3000 negatives cannot reach 1e-4
        rep = verification(scores, same.astype(int))
    assert len(rep.fold_accuracy) == 10
    assert 0.8 < rep.accuracy_mean <= 1 and rep.accuracy_std >= 0
    assert rep.best_accuracy >= rep.accuracy_mean - 0.02
    assert set(rep.tar_at_far) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}


def test_far_below_one_over_negatives_is_nan_with_a_warning():
    scores, same = np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0])
    with pytest.warns(RuntimeWarning, match="negative pairs"):
        rep = verification(scores, same, far=(1e-3, 0.5), folds=2)
    assert np.isnan(rep.tar_at_far[1e-3]) and rep.tar_at_far[0.5] == 1.0


@pytest.mark.parametrize(
    "scores, same, kw, exc, match",
    [
        ([0.1, 0.2], [1], {}, ValueError, "is_same has 1 entries"),
        ([0.1, 0.2], [1, 2], {}, ValueError, "only 0 and 1"),
        ([0.1, 0.2], ["a", "b"], {}, ValueError, "only 0 and 1"),
        ([0.1, 0.2], [1, 1], {"folds": 0}, ValueError, "needs both same and different"),
        ([0.1, 0.2], [0, 0], {"folds": 0}, ValueError, "needs both same and different"),
        ([np.nan, 0.2], [1, 0], {"folds": 0}, ValueError, "scores: entry 0 is NaN"),
        ([0.1, 0.2], [1, 0], {"folds": 3}, ValueError, "folds"),
        ([0.1, 0.2], [1, 0], {"folds": 0, "far": (2.0,)}, ValueError, "far"),
        ([[0.1, 0.2]], [1, 0], {}, ValueError, "scores must be 1-D"),
        (["x", "y"], [1, 0], {}, TypeError, "scores must be numeric"),
    ],
)
def test_bad_input(scores, same, kw, exc, match):
    with pytest.raises(exc, match=match):
        verification(scores, same, **kw)


def test_far_zero_is_the_tar_with_no_false_accept():
    scores = np.array([0.9, 0.8, 0.7, 0.75, 0.2, 0.1])
    same = np.array([True, True, True, False, False, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = metrics.verification(scores, same, far=(0.0,), folds=0)
    assert rep.tar_at_far[0.0] == pytest.approx(2 / 3)
