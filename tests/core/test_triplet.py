"""Triplet loss against pytorch-metric-learning's TripletMarginLoss (the peer users reach
for) in float64, against finite differences, and on bad input; the torch module on its
custom op, its plain path and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcface_rs as afr
import arcface_rs.torch as aft
from arcface_rs.torch import triplet as _torch_triplet

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: E402

MININGS = ["batch_hard", "semi_hard", "all"]
DISTANCES = ["cosine", "euclidean"]
REDUCTIONS = ["mean", "mean_nonzero", "sum"]


def _batch(b=24, d=16, classes=6, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels = rng.integers(0, classes, size=b)
    emb = centres[labels] + spread * rng.standard_normal((b, d))
    return emb, labels


def _pml(emb, labels, margin, mining, distance, reduction):
    """Loss and gradient from pytorch-metric-learning, configured as the docs pair them."""
    dist = distances.CosineSimilarity() if distance == "cosine" else distances.LpDistance()
    reducer = {
        "mean": reducers.MeanReducer(),
        "mean_nonzero": reducers.AvgNonZeroReducer(),
        "sum": reducers.SumReducer(),
    }[reduction]
    loss_fn = losses.TripletMarginLoss(margin=margin, distance=dist, reducer=reducer)
    x = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    if mining == "batch_hard":
        triplets = miners.BatchHardMiner(distance=dist)(x, y)
    elif mining == "semi_hard":
        miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=dist)
        triplets = miner(x, y)
    else:
        triplets = None
    loss = loss_fn(x, y, triplets)
    loss.backward()
    return float(loss.detach()), x.grad.numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_equals_pytorch_metric_learning_in_float64(mining, distance, reduction):
    for seed, margin in ((1, 0.2), (2, 0.5), (3, 0.05)):
        emb, labels = _batch(seed=seed)
        want_loss, want_grad = _pml(emb, labels, margin, mining, distance, reduction)
        loss, grad = afr.triplet_loss(emb, labels, margin, mining, distance, reduction)
        assert abs(float(loss) - want_loss) <= 1e-9 * max(1.0, abs(want_loss))
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_gradient_equals_central_differences(mining, distance):
    emb, labels = _batch(b=12, d=5, classes=3, seed=4)
    loss, grad = afr.triplet_loss(emb, labels, 0.3, mining, distance, "mean")
    h = 1e-6
    for i, j in ((0, 0), (5, 3), (11, 4), (7, 1)):
        e1, e2 = emb.copy(), emb.copy()
        e1[i, j] += h
        e2[i, j] -= h
        fd = (
            float(afr.triplet_loss(e1, labels, 0.3, mining, distance)[0])
            - float(afr.triplet_loss(e2, labels, 0.3, mining, distance)[0])
        ) / (2 * h)
        assert abs(fd - grad[i, j]) < 1e-6 * (1 + abs(grad[i, j])), (i, j)


def test_none_is_per_anchor_and_float32_follows_float64():
    emb, labels = _batch(seed=5)
    per_anchor, grad = afr.triplet_loss(emb, labels, 0.2, "batch_hard", "cosine", "none")
    total, grad_sum = afr.triplet_loss(emb, labels, 0.2, "batch_hard", "cosine", "sum")
    assert per_anchor.shape == (len(emb),)
    assert float(per_anchor.sum()) == pytest.approx(float(total), rel=1e-12)
    np.testing.assert_allclose(grad, grad_sum, atol=1e-12)
    loss32, grad32 = afr.triplet_loss(emb.astype(np.float32), labels, 0.2, "all", "euclidean")
    loss64, grad64 = afr.triplet_loss(emb, labels, 0.2, "all", "euclidean")
    assert loss32.dtype == np.float32 and grad32.dtype == np.float32
    assert float(loss32) == pytest.approx(float(loss64), rel=1e-5)
    np.testing.assert_allclose(grad32, grad64, atol=1e-5)


def test_batches_without_triplets_are_documented_zeros():
    emb, _ = _batch(b=8, seed=6)
    for labels in (np.zeros(8, np.int64), np.arange(8)):  # no negative / no positive
        for mining in MININGS:
            loss, grad = afr.triplet_loss(emb, labels, 0.2, mining)
            assert float(loss) == 0.0 and not grad.any()
    # rows labelled -1 take no part
    labels = np.array([0, 0, 1, 1, -1, -1, -1, -1])
    want = afr.triplet_loss(emb[:4], labels[:4], 0.2, "all", "cosine", "sum")
    got = afr.triplet_loss(emb, labels, 0.2, "all", "cosine", "sum")
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-12)
    np.testing.assert_allclose(got[1][:4], want[1], atol=1e-12)
    assert not got[1][4:].any()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"margin": -0.1}, ValueError, "margin"),
        ({"margin": float("nan")}, ValueError, "margin"),
        ({"margin": "0.2"}, TypeError, "margin"),
        ({"mining": "hardest"}, ValueError, "mining"),
        ({"distance": "manhattan"}, ValueError, "distance"),
        ({"reduction": "avg"}, ValueError, "reduction"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, match):
    emb, labels = _batch(b=6, seed=7)
    with pytest.raises(exc, match=match):
        afr.triplet_loss(emb, labels, **kwargs)
    with pytest.raises(exc, match=match):
        aft.TripletLoss(**{"margin": 0.2, **kwargs})


def test_bad_rows_and_labels_are_named():
    emb, labels = _batch(b=6, seed=8)
    nan = emb.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="emb: row 2"):
        afr.triplet_loss(nan, labels)
    zero = emb.copy()
    zero[3] = 0
    with pytest.raises(ValueError, match="emb: row 3"):
        afr.triplet_loss(zero, labels)
    with pytest.raises(ValueError, match="labels"):
        afr.triplet_loss(emb, labels[:5])
    with pytest.raises(TypeError, match="labels"):
        afr.triplet_loss(emb, labels.astype(float))


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
def test_module_equals_the_numpy_function_and_the_plain_path(reduction):
    emb, labels = _batch(seed=9)
    x = torch.tensor(emb, requires_grad=True)
    y = torch.tensor(labels)
    module = aft.TripletLoss(0.2, "semi_hard", "euclidean", reduction)
    loss = module(x, y)
    upstream = torch.linspace(0.5, 1.5, len(emb), dtype=torch.float64)
    (loss * upstream).sum().backward() if reduction == "none" else loss.backward()
    # the plain torch-ops path (what CUDA tensors run), differentiated by autograd
    x2 = torch.tensor(emb, requires_grad=True)
    plain = _torch_triplet.plain_triplet_loss(x2, y, 0.2, "semi_hard", "euclidean", reduction)
    (plain * upstream).sum().backward() if reduction == "none" else plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-10)
    want, _ = afr.triplet_loss(emb, labels, 0.2, "semi_hard", "euclidean", reduction)
    np.testing.assert_allclose(loss.detach().numpy(), want, rtol=1e-12)


def test_module_compiles_into_one_graph():
    emb, labels = _batch(seed=10)
    module = aft.TripletLoss(0.2, "batch_hard")
    x = torch.tensor(emb, dtype=torch.float32, requires_grad=True)
    y = torch.tensor(labels)
    eager = module(x, y)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = compiled(x, y)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)
