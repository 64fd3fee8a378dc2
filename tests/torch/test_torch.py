"""arcface_rs.torch: heads against an independent plain-PyTorch reference, gradcheck,
torch.compile, autocast, state_dict, training, bad inputs and the plain (CUDA) path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import arcface_rs as afr
import arcface_rs.torch as aft
from _reference import all_margins, make_problem, ref_logits
from arcface_rs.torch import _ops as tops
from arcface_rs.torch import _plain as tplain
from arcface_rs.torch._rows import encode

HEADS = [
    (aft.ArcFaceHead, {"s": 64.0, "m": 0.5}),
    (aft.ArcFaceHead, {"s": 30.0, "m": 0.3, "easy_margin": True}),
    (aft.CosFaceHead, {"s": 64.0, "m": 0.35}),
    (aft.SphereFaceHead, {"m": 4}),
    (aft.SphereFaceHead, {"m": 3, "s": 30.0, "lambda_": 5.0}),
    (aft.CombinedMarginHead, {"s": 64.0, "m1": 1.1, "m2": 0.3, "m3": 0.1}),
    (aft.SoftmaxHead, {"s": 30.0}),
]


def _inputs(b, d, c, dtype, seed=0, ignore=0):
    emb, weight, labels = make_problem(b, d, c, seed=seed, ignore=ignore)
    return (
        torch.tensor(emb, dtype=dtype, requires_grad=True),
        torch.tensor(weight, dtype=dtype),
        torch.tensor(labels),
    )


def _reference(emb, weight, labels, margin, reduction="mean"):
    e = emb.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = ref_logits(e, w, labels, margin)
    rows = F.cross_entropy(z, labels, ignore_index=-1, reduction="none")
    n = (labels >= 0).sum()
    loss = {"mean": rows.sum() / n, "sum": rows.sum(), "none": rows}[reduction]
    loss.sum().backward()
    return loss.detach(), e.grad, w.grad


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
@pytest.mark.parametrize("cls, kw", HEADS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_head_matches_plain_pytorch_reference(cls, kw, dtype, tol):
    emb, weight, labels = _inputs(37, 24, 300, dtype, seed=1, ignore=3)
    head = cls(embedding_size=24, num_classes=300, dtype=dtype, **kw)
    with torch.no_grad():
        head.weight.copy_(weight)
    loss = head(emb, labels)
    loss.backward()
    r_loss, r_emb, r_w = _reference(emb, head.weight, labels, head.margin)
    assert loss.dtype == dtype and emb.grad.dtype == dtype and head.weight.grad.dtype == dtype
    assert _rel(loss, r_loss) < (1e-9 if dtype == torch.float64 else 1e-5)
    assert _rel(emb.grad, r_emb) < tol
    assert _rel(head.weight.grad, r_w) < tol
    logits = head.logits(emb, labels)
    assert _rel(logits, ref_logits(emb.double(), weight.double(), labels, head.margin)) < tol


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_upstream_gradients(reduction):
    emb, weight, labels = _inputs(20, 12, 50, torch.float64, seed=2, ignore=2)
    weight.requires_grad_()
    margin = afr.ArcFace(s=30.0, m=0.4)
    loss = aft.margin_loss(emb, weight, labels, margin, reduction=reduction)
    upstream = torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * upstream).sum().backward()
    e = emb.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    z = ref_logits(e, w, labels, margin)
    rows = F.cross_entropy(z, labels, ignore_index=-1, reduction="none")
    ref = {"mean": rows.sum() / (labels >= 0).sum(), "sum": rows.sum(), "none": rows}[reduction]
    (ref * upstream).sum().backward()
    assert _rel(loss, ref.detach()) < 1e-9
    assert _rel(emb.grad, e.grad) < 1e-9
    assert _rel(weight.grad, w.grad) < 1e-9


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_gradcheck_float64(margin):
    emb, weight, labels = _inputs(5, 4, 7, torch.float64, seed=3, ignore=1)
    weight.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda e, w, r=reduction: aft.margin_loss(e, w, labels, margin, r), (emb, weight)
        )
    assert torch.autograd.gradcheck(
        lambda e, w: aft.margin_logits(e, w, labels, margin), (emb, weight)
    )


@pytest.mark.parametrize(
    "margin, head",
    [(afr.ArcFace(), (1, None)), (afr.MVSoftmax(), (3, 0.4))],
    ids=["arcface", "mv-subcentres-filter"],
)
def test_opcheck_custom_ops(margin, head):
    k = head[0]
    emb, weight, labels = _inputs(6, 5, 9 * k, torch.float64, seed=4)
    labels = labels % 9
    kind, params = encode(margin)
    torch.library.opcheck(
        torch.ops.arcface_rs.margin_loss.default,
        (emb, weight, labels, kind, params, *head, None, "mean", True, True),
    )
    torch.library.opcheck(
        torch.ops.arcface_rs.margin_logits.default, (emb, weight, labels, kind, params, *head)
    )


def _loss_and_grads(fn, emb, weight, labels):
    e, w = emb.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(e, w, labels)
    loss.backward()
    return loss.detach(), e.grad, w.grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager_without_graph_breaks(backend):
    torch._dynamo.reset()
    emb, weight, labels = _inputs(16, 8, 40, torch.float32, seed=5)
    margin = afr.ArcFace()

    def step(e, w, y):
        return aft.margin_loss(e * 2.0, w, y, margin) + aft.margin_logits(e, w, y, margin).mean()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    want = _loss_and_grads(step, emb, weight, labels)
    got = _loss_and_grads(compiled, emb, weight, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(half):
    emb, weight, labels = _inputs(12, 16, 30, torch.float32, seed=6)
    emb_h = emb.detach().to(half).requires_grad_()
    weight32 = weight.clone().requires_grad_()
    loss = aft.margin_loss(emb_h, weight32, labels, afr.ArcFace())
    loss.backward()
    assert loss.dtype == torch.float32
    assert emb_h.grad.dtype == half and weight32.grad.dtype == torch.float32
    e = emb_h.detach().float().requires_grad_()
    w = weight.clone().requires_grad_()
    want = aft.margin_loss(e, w, labels, afr.ArcFace())
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(emb_h.grad, e.grad.to(half))
    torch.testing.assert_close(weight32.grad, w.grad)


def test_autocast_training_step():
    torch.manual_seed(0)
    net = torch.nn.Linear(20, 16)
    head = aft.CosFaceHead(embedding_size=16, num_classes=10)
    x, y = torch.randn(32, 20), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        assert emb.dtype == torch.bfloat16
        loss = head(emb, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.weight.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert torch.all(torch.isfinite(net.weight.grad)) and net.weight.grad.abs().sum() > 0


def test_no_grad_and_frozen_weight_skip_gradients():
    emb, weight, labels = _inputs(10, 8, 20, torch.float64, seed=7)
    head = aft.ArcFaceHead(embedding_size=8, num_classes=20, dtype=torch.float64)
    head.weight.requires_grad_(False)
    loss = head(emb, labels)
    loss.backward()
    assert head.weight.grad is None and emb.grad is not None
    with torch.no_grad():
        again = head(emb, labels)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_ignored_labels_get_zero_gradient():
    emb, weight, labels = _inputs(10, 8, 20, torch.float64, seed=8)
    labels[[1, 4]] = -1
    weight.requires_grad_()
    aft.margin_loss(emb, weight, labels, afr.ArcFace()).backward()
    assert torch.all(emb.grad[[1, 4]] == 0)
    all_ignored = aft.margin_loss(emb, weight, torch.full((10,), -1), afr.ArcFace())
    assert all_ignored.item() == 0.0


def test_state_dict_round_trip_keeps_weights_and_annealing_step():
    head = aft.SphereFaceHead(embedding_size=8, num_classes=12, anneal=True, base=100.0)
    emb, _, labels = _inputs(6, 8, 12, torch.float32, seed=9)
    for _ in range(3):
        head(emb, labels)
    assert int(head.iteration) == 3
    assert head.current_lambda() == pytest.approx(max(5.0, 100.0 / (1 + 0.12 * 3)))
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    clone = aft.SphereFaceHead(embedding_size=8, num_classes=12, anneal=True, base=100.0)
    clone.load_state_dict(torch.load(buf))
    assert int(clone.iteration) == 3 and torch.equal(clone.weight, head.weight)
    head.eval(), clone.eval()
    assert head(emb, labels).item() == clone(emb, labels).item()
    assert int(head.iteration) == 3  # eval mode does not advance the schedule


def test_a_few_optimiser_steps_reduce_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    head = aft.ArcFaceHead(embedding_size=16, num_classes=8, s=16.0, m=0.3)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 32), torch.randint(0, 8, (64,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = head(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs_raise_clear_errors():
    emb, weight, labels = _inputs(6, 8, 10, torch.float32, seed=10)
    head = aft.ArcFaceHead(embedding_size=8, num_classes=10)
    with pytest.raises(ValueError, match="embedding size 5 but weight has 8"):
        head(torch.randn(6, 5), labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        head(emb, labels.float())
    with pytest.raises(ValueError, match="labels must be 1-D"):
        head(emb, labels[:, None])
    with pytest.raises(ValueError, match="labels must be 1-D with one entry per row"):
        head(emb, labels[:4])
    with pytest.raises(ValueError, match="one device"):
        head(emb, labels.to("meta"))
    with pytest.raises(TypeError, match="floating-point"):
        head(emb.long(), labels)
    with pytest.raises(TypeError, match="share one dtype"):
        head(emb.double(), labels)
    with pytest.raises(ValueError, match="labels: value 10"):
        head(emb, torch.full((6,), 10))
    with pytest.raises(ValueError, match="emb: row 0 contains NaN"):
        head(torch.full((6, 8), float("nan")), labels)
    with pytest.raises(ValueError, match="emb must be 2-D"):
        head(emb[0], labels)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        aft.ArcFaceHead(embedding_size=8, num_classes=0)
    with pytest.raises(ValueError, match="m: must be in"):
        aft.ArcFaceHead(embedding_size=8, num_classes=3, m=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        aft.margin_loss(emb, weight, labels, afr.ArcFace(), reduction="avg")
    with pytest.raises(TypeError, match="margin must be"):
        aft.margin_loss(emb, weight, labels, "arcface")


@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_plain_pytorch_path_matches_the_fused_kernels(margin):
    """The implementation CUDA tensors use, checked on CPU against the Rust path."""
    emb, weight, labels = _inputs(15, 10, 33, torch.float64, seed=11, ignore=2)
    weight.requires_grad_()
    fused = _loss_and_grads(lambda e, w, y: aft.margin_loss(e, w, y, margin), emb, weight, labels)
    plain = _loss_and_grads(
        lambda e, w, y: tplain.plain_loss(e, w, y, margin, "mean"), emb, weight, labels
    )
    for a, b in zip(plain, fused):
        assert _rel(a, b) < 1e-9


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "margin",
    [
        afr.MagFace(l_a=2.0, u_a=6.0, lambda_g=3.0),
        afr.MagFace(l_a=2.0, u_a=6.0, easy_margin=False, lambda_g=5.0),
    ],
    ids=["easy", "not-easy"],
)
def test_plain_pytorch_magface_matches_the_fused_kernel(margin, reduction):
    """MagFace on the plain path (its margin and regulariser move with the norm): norms
    below, inside and above [l_a, u_a], against the Rust path."""
    emb, weight, labels = _inputs(24, 10, 30, torch.float64, seed=12, ignore=2)
    norms = emb.detach().norm(dim=1)
    assert bool((norms < 2.0).any() and (norms > 6.0).any() and ((norms > 2) & (norms < 6)).any())
    fused = _loss_and_grads(
        lambda e, w, y: aft.margin_loss(e, w, y, margin, reduction), emb, weight, labels
    )
    plain = _loss_and_grads(
        lambda e, w, y: tplain.plain_loss(e, w, y, margin, reduction), emb, weight, labels
    )
    for a, b in zip(plain, fused):
        assert _rel(a, b) < 1e-9


def test_cpu_tensors_are_shared_not_copied():
    w = torch.randn(100, 16)
    assert np.shares_memory(tops._numpy(w, torch.float32), w.numpy())
    assert np.shares_memory(tops._numpy(w.T, torch.float32), w.numpy())


def test_second_backward_through_the_same_graph_recomputes():
    emb, weight, labels = _inputs(9, 6, 15, torch.float64, seed=13)
    weight.requires_grad_()
    loss = aft.margin_loss(emb, weight, labels, afr.CosFace())
    loss.backward(retain_graph=True)
    once = (emb.grad.clone(), weight.grad.clone())
    (3.0 * loss).backward()
    torch.testing.assert_close(emb.grad, 4.0 * once[0])
    torch.testing.assert_close(weight.grad, 4.0 * once[1])


def test_cuda_available_agrees_with_torch_and_never_raises():
    import arcface_rs as afr

    assert isinstance(afr.cuda_available(), bool)
    if not torch.cuda.is_available():
        assert afr.cuda_available() is False
    if not afr._core.cuda_feature:  # the default build has no CUDA path at all
        assert afr.cuda_available() is False


def test_heads_take_reduction_device_and_dtype_as_keywords():
    import inspect

    for cls in (
        aft.ArcFaceHead,
        aft.CosFaceHead,
        aft.CombinedMarginHead,
        aft.SoftmaxHead,
        aft.SphereFaceHead,
    ):
        params = inspect.signature(cls).parameters
        assert {"reduction", "device", "dtype"} <= set(params), cls.__name__
        head = cls(embedding_size=4, num_classes=3, reduction="sum", dtype=torch.float64)
        assert head.weight.dtype == torch.float64 and head.reduction == "sum"
        assert head.weight.device.type == "cpu"


def test_margin_head_takes_any_margin_and_the_named_heads_are_it():
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 3, 9, -1, 2, 3])
    for margin, named in (
        (afr.ArcFace(m=0.4), aft.ArcFaceHead(8, 10, m=0.4, dtype=torch.float64)),
        (afr.CosFace(s=30.0), aft.CosFaceHead(8, 10, s=30.0, dtype=torch.float64)),
        (afr.CurricularFace(t=0.2), aft.CurricularFaceHead(8, 10, t=0.2, dtype=torch.float64)),
    ):
        head = aft.MarginHead(8, 10, margin, dtype=torch.float64, reduction="sum")
        named.reduction = "sum"
        with torch.no_grad():
            named.weight.copy_(head.weight)
        assert isinstance(named, aft.MarginHead) and repr(named.margin) == repr(margin)
        torch.testing.assert_close(head(emb, labels), named(emb, labels), rtol=0, atol=0)
    with pytest.raises(TypeError, match="margin"):
        aft.MarginHead(8, 10, "arcface")
    with pytest.raises(TypeError):  # the head's keywords come by name
        aft.MarginHead(8, 10, afr.ArcFace(), "sum")


def test_named_heads_take_their_margin_s_keywords_and_defaults_from_the_margin_class():
    # defaults are written once, on the margin classes: the heads' signatures show them
    import inspect

    for head, margin in (
        (aft.ArcFaceHead, afr.ArcFace),
        (aft.SphereFaceHead, afr.SphereFace),
        (aft.AdaFaceHead, afr.AdaFace),
        (aft.MVSoftmaxHead, afr.MVSoftmax),
    ):
        theirs = inspect.signature(margin).parameters
        ours = list(inspect.signature(head).parameters.values())
        assert [p.name for p in ours[:2]] == ["embedding_size", "num_classes"]
        for p in ours[2 : 2 + len(theirs)]:
            assert theirs[p.name].default == p.default
        assert [p.name for p in ours[-6:]] == list(aft.HEAD_KEYWORDS)
    # positionally, in the order they had: margin keywords, then reduction and the rest
    head = aft.ArcFaceHead(8, 10, 30.0, 0.4, False, "exact", "sum", None, torch.float64)
    assert (head.margin.s, head.margin.m, head.reduction) == (30.0, 0.4, "sum")
    assert head.weight.dtype == torch.float64
    with pytest.raises(TypeError):
        aft.ArcFaceHead(8, 10, bogus=1)


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
