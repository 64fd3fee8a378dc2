"""CurricularFace, MV-Softmax, sub-centres and inter-class filtering against float64
references written here from each paper's definition (autograd for the gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import arcface_rs as afr
from _papers import (
    arc_target,
    cosines,
    cross_entropy,
    curricular_reference,
    grads_of,
    mv_reference,
    spread_problem,
)


def _close(ours, ref, tol=1e-9):
    loss, ge, gw = ours
    rloss, rge, rgw = ref
    assert abs(float(loss) - rloss) <= tol * max(1.0, abs(rloss))
    for a, b in ((ge, rge), (gw, rgw)):
        scale = max(1.0, np.abs(b).max())
        assert np.abs(a - b).max() <= tol * scale


def test_curricularface_equals_the_reference_over_two_steps():
    s, m, alpha = 30.0, 0.5, 0.1
    margin = afr.CurricularFace(s=s, m=m, alpha=alpha, t=0.2)
    t = 0.2
    for step in range(2):
        emb, weight, labels = spread_problem(seed=step, spread=1.5 * step)
        ours = afr.margin_loss(emb, weight, labels, margin)
        ref, t = curricular_reference(s, m, alpha, t, emb, weight, labels)
        assert margin.t == pytest.approx(t, abs=1e-12)
        _close(ours, ref)
    # eval: t stays
    margin.training = False
    before = margin.t
    afr.margin_loss(emb, weight, labels, margin)
    assert margin.t == before


def test_curricularface_float32_is_close():
    emb, weight, labels = spread_problem(seed=3, spread=1.0)
    m64, m32 = afr.CurricularFace(s=30.0), afr.CurricularFace(s=30.0)
    a = afr.margin_loss(emb, weight, labels, m64)
    b = afr.margin_loss(emb.astype(np.float32), weight.astype(np.float32), labels, m32)
    assert m32.t == pytest.approx(m64.t, abs=1e-6)
    assert abs(float(b[0]) - float(a[0])) <= 2e-3 * abs(float(a[0]))
    for x, y in ((b[1], a[1]), (b[2], a[2])):
        assert np.abs(x - y).max() <= 2e-3 * np.abs(y).max()


@pytest.mark.parametrize("kind", ["cos", "arc"])
@pytest.mark.parametrize("spread", [0.0, 2.0])
def test_mvsoftmax_equals_the_reference(kind, spread):
    emb, weight, labels = spread_problem(seed=5, spread=spread)
    m = 0.35 if kind == "cos" else 0.5
    ours = afr.margin_loss(emb, weight, labels, afr.MVSoftmax(s=32.0, m=m, t=1.2, kind=kind))
    _close(ours, mv_reference(32.0, m, 1.2, kind, emb, weight, labels))


def filter_reference(s, m, threshold, straight_through, emb, weight, labels):
    """InsightFace's CombinedMarginLoss with inter-class filtering, ArcFace branch."""

    def loss(e, w):
        cos = cosines(e, w)
        rows = torch.arange(len(labels))
        with torch.no_grad():
            dirty = (cos > threshold).double()
            dirty[rows, labels] = 0.0
        cos = (1.0 - dirty) * cos
        target = cos[rows, labels]
        if straight_through:
            final = target + (arc_target(target.detach(), m)[0] - target.detach())
        else:
            final = arc_target(target, m)[0]
        cos = cos.scatter(1, torch.as_tensor(labels).view(-1, 1), final.view(-1, 1))
        return cross_entropy(s * cos, labels)

    return grads_of(loss, emb, weight)


@pytest.mark.parametrize("grad", ["exact", "straight_through"])
def test_interclass_filter_equals_insightface(grad):
    emb, weight, labels = spread_problem(seed=7, spread=1.0)
    threshold = 0.1  # low enough that random centres cross it
    margin = afr.ArcFace(s=64.0, m=0.5, grad=grad)
    ours = afr.margin_loss(emb, weight, labels, margin, interclass_filter=threshold)
    ref = filter_reference(64.0, 0.5, threshold, grad != "exact", emb, weight, labels)
    _close(ours, ref)
    cos = cosines(torch.tensor(emb), torch.tensor(weight)).numpy()
    assert (cos > threshold).sum() > len(labels)  # the filter did something


def subcenter_reference(s, m, k, emb, weight, labels):
    def loss(e, w):
        cos = cosines(e, w, k)
        rows = torch.arange(len(labels))
        final = arc_target(cos[rows, labels], m)[0]
        cos = cos.scatter(1, torch.as_tensor(labels).view(-1, 1), final.view(-1, 1))
        return cross_entropy(s * cos, labels)

    return grads_of(loss, emb, weight)


@pytest.mark.parametrize("k", [2, 3])
def test_subcenters_equal_the_reference(k):
    emb, weight, labels = spread_problem(c=40 * k, seed=9)
    labels = labels % 40
    ours = afr.margin_loss(emb, weight, labels, afr.ArcFace(s=64.0, m=0.5), sub_centers=k)
    _close(ours, subcenter_reference(64.0, 0.5, k, emb, weight, labels))
    # one row's gradient reaches each class at its arg-max centre only
    _, _, g = afr.margin_loss(emb[:1], weight, labels[:1], afr.ArcFace(), sub_centers=k)
    nonzero = np.abs(g.reshape(40, k, -1)).sum(axis=2) > 0
    assert nonzero.sum(axis=1).tolist() == [1] * 40
    cos = (weight @ emb[0] / np.linalg.norm(weight, axis=1)).reshape(40, k)
    assert np.argmax(nonzero, axis=1).tolist() == np.argmax(cos, axis=1).tolist()


def test_subcenters_equal_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    c, k, d = 30, 3, 16
    emb, weight, labels = spread_problem(b=20, d=d, c=c * k, seed=13)
    labels = labels % c
    head = pml.SubCenterArcFaceLoss(
        num_classes=c, embedding_size=d, margin=math.degrees(0.5), scale=64.0, sub_centers=k
    ).double()
    with torch.no_grad():
        head.W.copy_(torch.tensor(weight.T))
    e = torch.tensor(emb, requires_grad=True)
    loss = head(e, torch.as_tensor(labels))
    loss.backward()
    ref = (loss.item(), e.grad.numpy(), head.W.grad.numpy().T)
    ours = afr.margin_loss(emb, weight, labels, afr.ArcFace(s=64.0, m=0.5), sub_centers=k)
    _close(ours, ref)


def test_sub_centers_and_filter_compose_with_curricularface():
    k = 2
    emb, weight, labels = spread_problem(c=40 * k, seed=17, spread=1.0)
    labels = labels % 40
    s, m, alpha, thr = 30.0, 0.5, 0.01, 0.3

    def loss(e, w):
        cos = cosines(e, w, k)
        rows = torch.arange(len(labels))
        with torch.no_grad():
            dirty = (cos > thr).double()
            dirty[rows, labels] = 0.0
        cos = (1.0 - dirty) * cos
        target = cos[rows, labels].view(-1, 1)
        final, ctm = arc_target(target, m)
        t = alpha * target.mean().item()
        cos = torch.where(cos > ctm, cos * (t + cos), cos)
        cos = cos.scatter(1, torch.as_tensor(labels).view(-1, 1), final)
        return cross_entropy(s * cos, labels)

    margin = afr.CurricularFace(s=s, m=m, alpha=alpha)
    ours = afr.margin_loss(emb, weight, labels, margin, sub_centers=k, interclass_filter=thr)
    _close(ours, grads_of(loss, emb, weight))


def test_logits_and_their_backward_carry_the_non_target_rules():
    emb, weight, labels = spread_problem(c=60, seed=19, spread=1.0)
    labels = labels % 30
    margin = afr.MVSoftmax(s=32.0, m=0.35, t=1.2)
    z = afr.margin_logits(emb, weight, labels, margin, sub_centers=2, interclass_filter=0.5)
    e = torch.tensor(emb, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    cos = cosines(e, w, 2)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        dirty = (cos > 0.5).double()
        dirty[rows, labels] = 0.0
    cos = (1.0 - dirty) * cos
    gt = cos[rows, labels].view(-1, 1)
    cos2 = torch.where(cos > gt - 0.35, 1.2 * cos + 0.2, cos)
    ref = 32.0 * cos2.scatter(
        1, torch.as_tensor(labels).view(-1, 1), torch.where(gt > 0.35, gt - 0.35, gt)
    )
    np.testing.assert_allclose(z, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    upstream = np.random.default_rng(0).normal(size=z.shape)
    (ref * torch.tensor(upstream)).sum().backward()
    ge, gw = afr.margin_logits_backward(
        upstream, emb, weight, labels, margin, sub_centers=2, interclass_filter=0.5
    )
    np.testing.assert_allclose(ge, e.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, w.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_apply_margin_applies_the_hard_negatives():
    emb, weight, labels = spread_problem(seed=23, spread=1.0)
    cos = cosines(torch.tensor(emb), torch.tensor(weight)).numpy()
    margin = afr.CurricularFace(s=30.0, t=0.3)
    margin.training = False  # margin_logits would move t first
    ours = afr.apply_margin(cos, labels, margin)
    np.testing.assert_allclose(ours, afr.margin_logits(emb, weight, labels, margin), atol=1e-9)


@pytest.mark.parametrize(
    "margin",
    [afr.CurricularFace(s=64.0, t=1.0), afr.MVSoftmax(s=64.0, t=2.0, kind="arc")],
    ids=["curricular", "mv"],
)
def test_no_nan_at_the_edges(margin):
    rng = np.random.default_rng(29)
    weight = rng.normal(size=(20, 8))
    labels = np.arange(6) % 20
    emb = np.concatenate([weight[:3] * 1e-30, -weight[3:6] * 1e30])  # cos = +1 and -1
    for dtype in (np.float32, np.float64):
        loss, ge, gw = afr.margin_loss(
            emb.astype(dtype) if dtype == np.float64 else (emb * 1e-10).astype(dtype),
            weight.astype(dtype),
            labels,
            margin,
            sub_centers=2,
            interclass_filter=0.9,
        )
        assert np.isfinite(loss) and np.isfinite(ge).all() and np.isfinite(gw).all()


def test_bad_options_name_the_argument():
    emb, weight, labels = spread_problem()
    m = afr.ArcFace()
    with pytest.raises(ValueError, match="sub_centers"):
        afr.margin_loss(emb, weight, labels, m, sub_centers=0)
    with pytest.raises(TypeError, match="sub_centers"):
        afr.margin_loss(emb, weight, labels, m, sub_centers=1.5)
    with pytest.raises(ValueError, match="weight"):
        afr.margin_loss(emb, weight, labels % 13, m, sub_centers=3)  # 40 rows
    with pytest.raises(ValueError, match="interclass_filter"):
        afr.margin_loss(emb, weight, labels, m, interclass_filter=2.0)
    with pytest.raises(ValueError, match="labels"):
        afr.margin_loss(emb, weight, labels, m, sub_centers=2)  # labels up to 39 of 20
    with pytest.raises(ValueError, match="t"):
        afr.CurricularFace(t=2.0)
    with pytest.raises(ValueError, match="t"):
        afr.MVSoftmax(t=0.5)
    with pytest.raises(ValueError, match="kind"):
        afr.MVSoftmax(kind="sphere")
    with pytest.raises(ValueError, match="alpha"):
        afr.CurricularFace(alpha=1.5)


def test_dominant_centers_and_outliers_follow_the_paper():
    rng = np.random.default_rng(31)
    c, k, d = 5, 3, 16
    weight = rng.normal(size=(c * k, d))
    labels = np.repeat(np.arange(c), 12)
    # most samples near centre 1 of each class; one far sample per class
    base = weight.reshape(c, k, d)[:, 1][labels]
    emb = base + 0.1 * rng.normal(size=base.shape)
    far = np.arange(c) * 12
    emb[far] = -base[far]
    centres, index = afr.dominant_centers(weight, k, emb, labels, return_index=True)
    assert index.tolist() == [1] * c
    np.testing.assert_array_equal(centres, weight.reshape(c, k, d)[:, 1])
    out = afr.find_outliers(emb, labels, weight, k, threshold_deg=75)
    # reference: angle to the dominant centre above 75 degrees
    w = weight.reshape(c, k, d)[labels, 1]
    cosd = np.sum(emb * w, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(w, axis=1)
    np.testing.assert_array_equal(out, np.degrees(np.arccos(cosd)) > 75)
    assert out[far].all() and out.sum() == c
    # without samples: the centre the siblings agree with
    twin = weight.copy().reshape(c, k, d)
    twin[:, 2] = twin[:, 0] + 0.01
    _, index = afr.dominant_centers(twin.reshape(-1, d), k, return_index=True)
    assert set(index.tolist()) <= {0, 2}
    plain = afr.dominant_centers(twin.reshape(-1, d), k)
    np.testing.assert_array_equal(plain, twin[np.arange(c), index])
    with pytest.raises(ValueError, match="weight"):
        afr.dominant_centers(weight[:-1], k)
    with pytest.raises(ValueError, match="threshold_deg"):
        afr.find_outliers(emb, labels, weight, k, threshold_deg=200)


@pytest.mark.parametrize(
    "margin, head",
    [
        (afr.MVSoftmax(s=32.0, m=0.35, t=1.2), {}),
        (afr.MVSoftmax(s=32.0, m=0.5, kind="arc"), {}),
        (afr.ArcFace(s=64.0, m=0.5), {"sub_centers": 3}),
        (afr.ArcFace(s=64.0, m=0.5), {"interclass_filter": 0.1}),
        (afr.CurricularFace(s=30.0, t=0.4), {"sub_centers": 2, "interclass_filter": 0.3}),
    ],
    ids=["mv-cos", "mv-arc", "sub-centres", "filter", "curricular-all"],
)
def test_float32_is_close_to_float64(margin, head):
    k = head.get("sub_centers", 1)
    emb, weight, labels = spread_problem(c=40 * k, seed=37, spread=1.0)
    labels = labels % 40
    if isinstance(margin, afr.CurricularFace):
        margin.training = False
    a = afr.margin_loss(emb, weight, labels, margin, **head)
    b = afr.margin_loss(emb.astype(np.float32), weight.astype(np.float32), labels, margin, **head)
    assert abs(float(b[0]) - float(a[0])) <= 2e-3 * abs(float(a[0]))
    for x, y in ((b[1], a[1]), (b[2], a[2])):
        assert np.abs(x - y).max() <= 2e-3 * np.abs(y).max()


# ---------------------------------------------------------------------------------------
# State and refused calls (hostile testing, round three).


def test_a_refused_call_leaves_curricularface_t_as_it_was():
    import warnings

    emb, weight, labels = spread_problem(seed=40)
    margin = afr.CurricularFace(t=0.25)
    nan, zero, centre0 = emb.copy(), emb.copy(), weight.copy()
    nan[2] = np.nan
    zero[3] = 0.0
    centre0[labels[0]] = 0.0
    bad = [
        (nan, weight, labels),
        (zero, weight, labels),
        (emb, centre0, labels),
        (emb, weight, labels[:-1]),
        (emb, weight, np.r_[labels[:-1], len(weight)]),
        (emb[:0], weight, labels[:0]),
    ]
    for e, w, y in bad:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the refusal comes with no warning before it
            with pytest.raises(ValueError):
                afr.margin_loss(e, w, y, margin)
        assert margin.t == 0.25
    afr.margin_loss(emb, weight, labels, margin)  # one NaN batch no longer poisons the rest
    assert margin.t != 0.25 and math.isfinite(margin.t)


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_curricularface_t_and_loss_follow_the_rescaled_rows(scale):
    """docs/heads.md promises: any finite non-zero row gives the loss of the rescaled row;
    t used to come out 0 from norms that overflowed or underflowed."""
    emb, weight, labels = spread_problem(seed=41, spread=1.0)
    plain, scaled = afr.CurricularFace(t=0.1), afr.CurricularFace(t=0.1)
    want = afr.margin_loss(emb, weight, labels, plain)
    got = afr.margin_loss(emb * scale, weight, labels, scaled)
    assert scaled.t == pytest.approx(plain.t, abs=1e-12) and plain.t != 0.1
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-9)
