"""arcface_rs.torch's CurricularFaceHead, MVSoftmaxHead and the heads' sub_centers= and
interclass_filter= keywords against the float64 references of test_hard_negatives.py (from
the papers' definitions): two steps with the running t, state_dict, gradcheck, the plain
PyTorch path (what CUDA tensors run) and torch.compile(fullgraph) == eager."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import arcface_rs as afr
import arcface_rs.torch as aft
from _papers import curricular_reference, float64_head, head_step, mv_reference, spread_problem
from arcface_rs.torch import _plain as tplain

TOL = 1e-9


def _close(got, want, tol=TOL):
    for a, b in zip(got, want):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


def test_curricularface_head_two_steps_and_its_buffer_equal_the_papers_head():
    emb, weight, labels = spread_problem(seed=1, spread=1.0)
    head = float64_head(aft.CurricularFaceHead, weight, s=30.0, alpha=0.2, t=0.1)
    assert set(head.state_dict()) == {"weight", "t"}
    t = 0.1
    for step in range(2):
        e = emb * (1.0 + step)
        got = head_step(head, e, labels)
        want, t = curricular_reference(30.0, 0.5, 0.2, t, e, weight, labels)
        _close(got, want)
        assert float(head.t) == pytest.approx(t, abs=1e-12)
    again = float64_head(aft.CurricularFaceHead, weight, s=30.0, alpha=0.2)
    again.load_state_dict(head.state_dict())
    _close(head_step(again, emb, labels), head_step(head, emb, labels), 1e-12)
    head.eval()
    before = float(head.t)
    head(torch.tensor(emb), torch.tensor(labels))
    assert float(head.t) == before
    # ignored rows take no part in t
    only = labels.copy()
    only[1:] = -1
    fresh = float64_head(aft.CurricularFaceHead, weight, s=30.0, alpha=1.0)
    fresh(torch.tensor(emb), torch.tensor(only))
    want = float(fresh.target_cosines(torch.tensor(emb[:1]), torch.tensor(only[:1]))[0])
    assert float(fresh.t) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("kind", ["cos", "arc"])
def test_mvsoftmax_head_equals_faceX_zoo(kind):
    emb, weight, labels = spread_problem(seed=2, spread=1.0)
    m = 0.35 if kind == "cos" else 0.5
    head = float64_head(aft.MVSoftmaxHead, weight, m=m, t=1.2, kind=kind)
    _close(head_step(head, emb, labels), mv_reference(32.0, m, 1.2, kind, emb, weight, labels))


@pytest.mark.parametrize(
    "cls, kw",
    [
        (aft.ArcFaceHead, {}),
        (aft.CosFaceHead, {}),
        (aft.SoftmaxHead, {}),
        (aft.CombinedMarginHead, {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
        (aft.SphereFaceHead, {}),
        (aft.AdaFaceHead, {}),
        (aft.MagFaceHead, {"l_a": 1.0, "u_a": 5.0}),
        (aft.CurricularFaceHead, {}),
        (aft.MVSoftmaxHead, {}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_every_head_takes_sub_centers_and_the_filter(cls, kw):
    k, c = 3, 20
    emb, weight, labels = spread_problem(c=c * k, seed=3, spread=1.0)
    labels = labels % c
    head = float64_head(cls, weight, k=k, interclass_filter=0.4, **kw)
    assert tuple(head.weight.shape) == (c * k, emb.shape[1])
    assert "sub_centers=3" in repr(head) and "interclass_filter=0.4" in repr(head)
    margin = pickle.loads(pickle.dumps(head.margin))  # its state as the head starts
    want = afr.margin_loss(emb, weight, labels, margin, sub_centers=k, interclass_filter=0.4)
    _close(head_step(head, emb, labels), want)
    z = head.logits(torch.tensor(emb), torch.tensor(labels))
    assert tuple(z.shape) == (len(labels), c)


def test_gradcheck_through_sub_centres_filter_and_hard_negatives():
    emb, weight, labels = spread_problem(b=6, d=5, c=16, seed=4, spread=1.0)
    labels = labels % 8
    e = torch.tensor(emb, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    y = torch.tensor(labels)
    for margin in (afr.MVSoftmax(s=8.0), afr.CurricularFace(s=8.0, t=0.5)):
        if isinstance(margin, afr.CurricularFace):
            margin.training = False  # t fixed: the function gradcheck perturbs
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda e, w, r=reduction, m=margin: aft.margin_loss(
                    e, w, y, m, r, sub_centers=2, interclass_filter=0.3
                ),
                (e, w),
                eps=1e-6,
                atol=1e-5,
            )
        assert torch.autograd.gradcheck(
            lambda e, w, m=margin: aft.margin_logits(
                e, w, y, m, sub_centers=2, interclass_filter=0.3
            ),
            (e, w),
            eps=1e-6,
            atol=1e-5,
        )


@pytest.mark.parametrize(
    "margin",
    [afr.CurricularFace(s=30.0, t=0.3), afr.MVSoftmax(), afr.MVSoftmax(kind="arc")],
    ids=repr,
)
def test_the_plain_path_equals_the_fused_kernel(margin):
    """What CUDA tensors run (plain PyTorch ops) gives the fused CPU kernel's results."""
    emb, weight, labels = spread_problem(c=40, seed=5, spread=1.0)
    labels = labels % 20
    labels[3] = -1
    if isinstance(margin, afr.CurricularFace):
        margin.training = False  # both paths see the same t
    want = afr.margin_loss(emb, weight, labels, margin, sub_centers=2, interclass_filter=0.3)
    e = torch.tensor(emb, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    loss = tplain.plain_loss(e, w, torch.tensor(labels), margin, "mean", None, 2, 0.3)
    loss.backward()
    _close((loss.item(), e.grad.numpy(), w.grad.numpy()), want)


@pytest.mark.parametrize("cls", [aft.CurricularFaceHead, aft.MVSoftmaxHead])
def test_compiled_heads_equal_eager_without_graph_breaks(cls):
    torch._dynamo.reset()
    emb, weight, labels = spread_problem(c=40, seed=6, spread=1.0)
    labels = labels % 20
    eager = float64_head(cls, weight, k=2, interclass_filter=0.4)
    compiled_head = float64_head(cls, weight, k=2, interclass_filter=0.4)
    compiled = torch.compile(compiled_head, backend="aot_eager", fullgraph=True)
    for step in range(2):
        e = emb * (1.0 + step)
        _close(head_step(compiled, e, labels), head_step(eager, e, labels), 1e-12)
    if cls is aft.CurricularFaceHead:
        assert float(eager.t) == pytest.approx(float(compiled_head.t), rel=1e-14)


def test_bad_head_options_name_the_argument():
    with pytest.raises(ValueError, match="sub_centers"):
        aft.ArcFaceHead(8, 10, sub_centers=0)
    with pytest.raises(TypeError, match="sub_centers"):
        aft.ArcFaceHead(8, 10, sub_centers="3")
    with pytest.raises(ValueError, match="interclass_filter"):
        aft.CosFaceHead(8, 10, interclass_filter=-3.0)
    emb, weight, labels = (torch.tensor(a) for a in spread_problem())
    with pytest.raises(ValueError, match="weight"):
        aft.margin_loss(emb, weight, labels % 13, afr.ArcFace(), sub_centers=3)


def test_a_refused_batch_leaves_t_alone_and_a_bad_label_is_a_value_error():
    torch.manual_seed(0)
    head = aft.CurricularFaceHead(8, 5, t=0.25, dtype=torch.float64)
    emb = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    nan = emb.clone()
    nan[1] = float("nan")
    for e, y in ((nan, labels), (emb, torch.tensor([0, 1, 2, 3, 4, 5]))):
        with pytest.raises(ValueError, match="emb|labels"):
            head(e, y)
        assert head.t.item() == 0.25
    with pytest.raises(ValueError, match="labels"):
        head.logits(emb, torch.tensor([0, 1, 2, 3, 4, 5]))
    head(emb, labels)
    assert head.t.item() != 0.25


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_head_t_follows_the_rescaled_rows(scale):
    torch.manual_seed(1)
    emb = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = aft.CurricularFaceHead(8, 5, t=0.1, dtype=torch.float64)
    scaled = aft.CurricularFaceHead(8, 5, t=0.1, dtype=torch.float64)
    scaled.load_state_dict(plain.state_dict())
    plain(emb, labels)
    scaled(emb * scale, labels)
    assert scaled.t.item() == pytest.approx(plain.t.item(), abs=1e-12)
