"""grad_filter: the loss stays exact, the dropped gradient is within its documented bound
(checked against float64 probabilities computed here from the logits), nothing drops in
an early-training batch, and every margin, reduction, ignored rows and sub-centres work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcface_rs as afr
import arcface_rs.torch as aft
from arcface_rs import _core


def late_batch(b=48, d=64, c=3000, k=1, noise=0.6, dtype=np.float64, seed=0):
    """Class centres as the weight and rows that are noisy samples of their class (target
    cosine about 0.8): most softmax probabilities are tiny, as late in training."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c * k, d))
    weight /= np.linalg.norm(weight, axis=1, keepdims=True)
    labels = rng.integers(0, c, b)
    labels[::7] = -1
    centre = weight[np.maximum(labels, 0) * k]
    emb = centre + noise * rng.standard_normal((b, d)) / np.sqrt(d)
    return emb.astype(dtype), weight.astype(dtype), labels


def early_batch(b=48, d=512, c=3000, dtype=np.float32, seed=1):
    """Random weights: every probability is near 1/C; the few below the floor are far too
    many per tile for a sparse backward (and lost in rounding)."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, d)).astype(dtype),
        (0.01 * rng.standard_normal((c, d))).astype(dtype),
        rng.integers(0, c, b),
    )


def probabilities(emb, weight, labels, margin, **head):
    z = afr.margin_logits(emb.astype(np.float64), weight.astype(np.float64), labels, margin, **head)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def row_weights(labels, reduction):
    valid = (labels >= 0).astype(np.float64)
    return valid / max(valid.sum(), 1.0) if reduction == "mean" else valid


@pytest.mark.parametrize(
    "margin",
    [afr.ArcFace(s=64.0, m=0.5), afr.CosFace(s=64.0, m=0.35), afr.SphereFace(m=2, s=30.0)],
    ids=repr,
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dropped_gradient_is_within_the_bound(margin, reduction):
    f = 1e-7
    emb, weight, labels = late_batch()
    exact = afr.margin_loss(emb, weight, labels, margin, reduction)
    loss, ge, gw = afr.margin_loss(emb, weight, labels, margin, reduction, grad_filter=f)
    assert float(loss) == float(exact[0])  # the forward is untouched
    p = probabilities(emb, weight, labels, margin)
    p[np.arange(len(labels)), np.maximum(labels, 0)] = 1.0  # the target is always kept
    dropped = p < f * (1 + 1e-6)
    assert dropped.mean() > 0.5, "the batch must be late-training like"
    s, w = margin.scale, row_weights(labels, reduction)
    # |d dL/dx_i| <= sum_j |d dL/dc_ij| / ||x_i|| <= n_i w_i s f / ||x_i||
    bound_x = dropped.sum(axis=1) * w * s * f / np.linalg.norm(emb, axis=1)
    err_x = np.linalg.norm(ge - exact[1], axis=1)
    assert np.all(err_x <= bound_x * (1 + 1e-6) + 1e-15)
    # |d dL/dw_j| <= sum_i [dropped] w_i s f / ||w_j||
    bound_w = (dropped * w[:, None]).sum(axis=0) * s * f / np.linalg.norm(weight, axis=1)
    err_w = np.linalg.norm(gw - exact[2], axis=1)
    assert np.all(err_w <= bound_w * (1 + 1e-6) + 1e-15)
    assert err_x.max() > 0 or err_w.max() > 0  # something was dropped


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auto_on_a_small_late_batch_stays_within_1e6_of_exact(dtype):
    """(At B=256, D=512, C=100k the late batch's rows are so confident that the whole
    gradient is ~1e-3 s and auto's error is 5e-4 of it: benches/bench_grad_filter.py.)"""
    skipped = auto_within_1e6_of_exact(*late_batch(dtype=dtype))
    if dtype == np.float32:  # float64's floor, 2**-57, keeps most of this batch
        assert skipped > 0.5


def test_auto_on_an_early_batch_skips_nothing_and_changes_nothing_measurable():
    assert auto_within_1e6_of_exact(*early_batch()) == 0.0


def auto_within_1e6_of_exact(emb, weight, labels) -> float:
    """Asserts grad_filter="auto" gives the exact loss and gradients within 1e-6 of the
    largest; returns the share of the backward it skipped."""
    margin = afr.ArcFace(s=64.0, m=0.5)
    exact = afr.margin_loss(emb, weight, labels, margin)
    got = afr.margin_loss(emb, weight, labels, margin, grad_filter="auto")
    assert float(got[0]) == float(exact[0])
    for a, b in ((got[1], exact[1]), (got[2], exact[2])):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    *_, skipped = _core.margin_loss(emb, weight, labels, margin.spec, "mean", grad_filter="auto")
    return skipped


@pytest.mark.parametrize(
    "margin, head",
    [
        (afr.CurricularFace(s=64.0, t=0.5), {}),
        (afr.MVSoftmax(s=64.0), {"interclass_filter": 0.4}),
        (afr.ArcFace(s=64.0), {"sub_centers": 3}),
        (afr.MagFace(s=64.0, l_a=0.5, u_a=2.0), {}),
        (afr.AdaFace(s=64.0), {}),
        (afr.SphereFace(m=4), {}),
    ],
    ids=["curricular", "mv-filter", "sub-centres", "magface", "adaface", "feature-norm"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_margin_and_option_takes_the_filter(margin, head, reduction):
    k = head.get("sub_centers", 1)
    emb, weight, labels = late_batch(k=k, dtype=np.float32)
    if isinstance(margin, afr.CurricularFace):
        margin.training = False
    if isinstance(margin, afr.AdaFace):
        margin.training = False
    exact = afr.margin_loss(emb, weight, labels, margin, reduction, **head)
    got = afr.margin_loss(emb, weight, labels, margin, reduction, grad_filter="auto", **head)
    np.testing.assert_array_equal(got[0], exact[0])
    for a, b in ((got[1], exact[1]), (got[2], exact[2])):
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert not got[1][labels < 0].any()  # ignored rows stay at zero


def test_torch_heads_and_ops_take_the_filter():
    emb, weight, labels = late_batch(dtype=np.float32)
    head = aft.ArcFaceHead(emb.shape[1], weight.shape[0], grad_filter="auto")
    assert "grad_filter='auto'" in repr(head)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    e = torch.tensor(emb, requires_grad=True)
    loss = head(e, torch.tensor(labels))
    loss.backward()
    want = afr.margin_loss(emb, weight, labels, head.margin)
    assert loss.item() == pytest.approx(float(want[0]), rel=1e-6)
    assert np.abs(e.grad.numpy() - want[1]).max() <= 1e-6 * np.abs(want[1]).max()
    # reduction="none" recomputes in backward with the filter too
    e2 = torch.tensor(emb, requires_grad=True)
    rows = aft.margin_loss(
        e2, torch.tensor(weight), torch.tensor(labels), head.margin, "none", grad_filter=1e-6
    )
    rows.sum().backward()
    assert torch.isfinite(e2.grad).all()


def test_bad_filters_name_the_argument():
    emb, weight, labels = early_batch(d=16, c=50)
    m = afr.ArcFace()
    for bad, err in (
        (1.5, ValueError),
        (-0.1, ValueError),
        ("fast", ValueError),
        (True, TypeError),
    ):
        with pytest.raises(err, match="grad_filter"):
            afr.margin_loss(emb, weight, labels, m, grad_filter=bad)
    with pytest.raises(ValueError, match="grad_filter"):
        _core.margin_loss(emb, weight, labels, m._spec, "mean", grad_filter=float("nan"))
    with pytest.raises(ValueError, match="grad_filter"):
        aft.ArcFaceHead(4, 10, grad_filter=2.0)


def test_training_with_auto_reaches_the_exact_heads_auc():
    """The demo's digits (train on 0-5, verify on unseen 6-9): training with
    grad_filter="auto" lands within the spread between seeds of exact training."""
    from arcface_rs import demo
    from arcface_rs.metrics import verification

    x, y = demo._load_digits()
    seen = np.isin(y, demo.TRAIN_CLASSES)
    aucs: dict[str, list[float]] = {"exact": [], "auto": []}
    for seed in range(3):
        for name, options in (("exact", {}), ("auto", {"grad_filter": "auto"})):
            head = (afr.ArcFace(s=16.0, m=0.2), options)
            net, _ = demo.train(head, x[seen], y[seen], 32, 15, seed)
            scores, same = demo.open_set_scores(net, x[~seen], y[~seen])
            aucs[name].append(verification(scores, same).auc)
    exact, auto = np.array(aucs["exact"]), np.array(aucs["auto"])
    spread = exact.max() - exact.min()
    assert abs(auto.mean() - exact.mean()) <= max(spread, 1e-3), aucs


def test_tensors_off_the_cpu_are_told_they_get_the_exact_gradient(monkeypatch):
    import arcface_rs.torch._plain as torch_module

    monkeypatch.setattr(torch_module, "_warned", set())
    emb = torch.zeros(2, 3, device="meta")
    with pytest.warns(RuntimeWarning, match="exact"):
        torch_module.note_exact_on_cuda("auto", emb)
    torch_module.note_exact_on_cuda(None, emb)  # nothing to say
