"""The CUDA path of arcface_rs.torch.

Everywhere: the Python glue around the CUDA launch (row weights for each reduction, label
and bad-row checks, the reductions, the backward of reduction="none"), with the launch
replaced by a CPU stand-in that computes through the CPU core from the very tensors the glue
allocated. With a GPU and a build with the `cuda` feature: the fused CUDA head against the
CPU head (the kernels themselves are also tested on CPU by `cargo test --features cuda`,
which runs them in an emulator).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

import arcface_rs as afr
import arcface_rs.torch as aft
from _reference import all_margins, make_problem
from arcface_rs.torch import _cuda as tcuda
from arcface_rs.torch import _ops as tops
from arcface_rs.torch._rows import encode

FUSED = afr.cuda_available()
needs_gpu = pytest.mark.skipif(
    not FUSED, reason="needs a CUDA device and a build with the `cuda` feature"
)


def _cpu_launch(
    shape,
    dtype,
    spec,
    blocks,
    per_row,
    x,
    w,
    y,
    row_weight,
    row_loss,
    g_emb,
    g_w,
    bad,
    workspace,
    interclass_filter=None,
    weight_dtype=None,
    tf32=False,
    sub_centers=1,
):
    """What the CUDA launch computes, done by the CPU core on the same buffers (the
    half-precision path in float32)."""
    b, c, d = shape
    assert blocks.dtype == torch.float64 and blocks.is_contiguous()
    if per_row:
        assert blocks.shape == (b, afr._core.MARGIN_PARAMS)
    else:
        assert blocks.tolist() == spec.encode()
    half = dtype in ("bfloat16", "float16")
    assert x.shape == (b, d) and w.shape == (c, d) and y.shape == (b,)
    assert str(x.dtype).endswith("float32" if half else dtype) and y.dtype == torch.int64
    assert str(w.dtype).endswith(weight_dtype or dtype)
    assert not tf32 or dtype == "float32"
    assert row_weight.dtype == row_loss.dtype == torch.float64 and bad.dtype == torch.int32
    for t in (x, w, y, row_weight, row_loss, g_emb, g_w, bad):
        assert t is None or t.is_contiguous()
    # on the 16-bit path: a float32 emb gradient, the weight's in the weight's dtype
    assert g_emb is None or g_emb.dtype == x.dtype
    assert g_w is None or g_w.dtype == w.dtype
    assert bad.shape == (3,) and not bad.any()  # the caller zeroes the flags
    g_w_out, w = g_w, w.to(x.dtype)  # computed in float32, handed back in the weight's dtype
    if g_w is not None and g_w.dtype != x.dtype:
        g_w = torch.empty_like(w)
    for slot, m in ((0, x), (1, w)):
        norms = m.double().norm(dim=1)
        broken = torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten()
        if len(broken):
            bad[slot] = int(broken[-1]) + 1
    wrong = torch.nonzero((y < -1) | (y >= c // sub_centers)).flatten()
    if len(wrong):
        bad[2] = int(wrong[-1]) + 1
    if bad.any():
        return
    _, rows, ge, gw, _ = afr._core.margin_loss(
        x.numpy(),
        w.numpy(),
        y.numpy(),
        spec,
        "none",
        grad_emb=g_emb is not None,
        grad_weight=g_w is not None,
        interclass_filter=interclass_filter,
        sub_centers=sub_centers,
        upstream=row_weight.numpy(),
        row_margins=blocks.numpy() if per_row else None,
    )
    row_loss.copy_(torch.from_numpy(rows))
    if g_emb is not None:
        g_emb.copy_(torch.from_numpy(ge))
    if g_w is not None:
        g_w.copy_(torch.from_numpy(gw))
    if g_w_out is not None and g_w_out is not g_w:
        g_w_out.copy_(g_w)


@pytest.fixture
def cpu_launch(monkeypatch):
    monkeypatch.setattr(tcuda, "launch_cuda", _cpu_launch)
    if not afr._core.cuda_feature:
        monkeypatch.setattr(afr._core, "cuda_head_workspace_bytes", lambda *a: 0)


def _problem(b, d, c, dtype, seed=0, ignore=2):
    emb, weight, labels = make_problem(b, d, c, seed=seed, ignore=ignore)
    return (
        torch.tensor(emb, dtype=dtype),
        torch.tensor(weight, dtype=dtype),
        torch.tensor(labels, dtype=torch.int64),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", all_margins()[:5], ids=repr)
def test_glue_gives_what_the_cpu_op_gives(cpu_launch, margin, reduction):
    emb, weight, labels = _problem(7, 5, 11, torch.float64, seed=3)
    kind, params = encode(margin)
    want = tops.loss_op(emb, weight, labels, kind, params, 1, None, None, reduction, True, True)
    got = tcuda._loss_cuda(emb, weight, labels, kind, params, 1, None, None, reduction, True, True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_glue_backward_of_reduction_none_weights_rows_by_upstream(cpu_launch):
    emb, weight, labels = _problem(6, 4, 9, torch.float64, seed=4)
    kind, params = encode(afr.ArcFace())
    upstream = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    want = tops.loss_backward_op(
        emb, weight, labels, kind, params, 1, None, None, "none", upstream, True, True
    )
    got = tcuda._loss_backward_cuda(
        emb, weight, labels, kind, params, 1, None, None, "none", upstream, True, True
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # a scalar upstream broadcasts over the rows
    one = torch.tensor(2.0, dtype=torch.float64)
    got = tcuda._loss_backward_cuda(
        emb, weight, labels, kind, params, 1, None, None, "none", one, True, False
    )
    want = tops.loss_backward_op(
        emb, weight, labels, kind, params, 1, None, None, "none", one, True, False
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert got[1].numel() == 0


def test_glue_all_rows_ignored_gives_zero_not_nan(cpu_launch):
    emb, weight, _ = _problem(4, 5, 6, torch.float64)
    labels = torch.full((4,), -1)
    kind, params = encode(afr.CosFace())
    loss, g_emb, g_w = tcuda._loss_cuda(
        emb, weight, labels, kind, params, 1, None, None, "mean", True, True
    )
    assert loss.item() == 0.0 and not g_emb.any() and not g_w.any()


@pytest.mark.parametrize("emb_dtype", [torch.float16, torch.float32])
def test_glue_half_precision_inputs_take_the_16_bit_path(cpu_launch, monkeypatch, emb_dtype):
    # float16 weight: GEMMs in float16, float32 rows and gradients inside, each gradient
    # back in its tensor's dtype
    emb, weight, labels = _problem(5, 8, 7, torch.float32)
    seen = []
    monkeypatch.setattr(
        tcuda, "launch_cuda", lambda *a, **k: seen.append((a[1], k)) or _cpu_launch(*a, **k)
    )
    kind, params = encode(afr.ArcFace())
    args = (labels, kind, params, 1, None, None, "mean", True, True)
    got = tcuda._loss_cuda(emb.to(emb_dtype), weight.half(), *args)
    want = tops.loss_op(emb.to(emb_dtype), weight.half(), *args)
    assert seen[0][0] == "float16" and seen[0][1]["weight_dtype"] == "float16"
    assert got[0].dtype == torch.float32 and got[1].dtype == emb_dtype
    assert got[2].dtype == torch.float16
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # a float32 weight (autocast's master copy) stays float32 and gets a float32 gradient
    got = tcuda._loss_cuda(emb.bfloat16(), weight, *args)
    assert seen[1][0] == "bfloat16" and seen[1][1]["weight_dtype"] == "float32"
    assert got[2].dtype == torch.float32
    with pytest.raises(TypeError, match="bfloat16 and float16 cannot be mixed"):
        tcuda._loss_cuda(emb.bfloat16(), weight.half(), *args)


def test_glue_tf32_follows_torch_s_float32_matmul_setting(cpu_launch, monkeypatch):
    emb, weight, labels = _problem(5, 8, 7, torch.float32)
    seen = []
    monkeypatch.setattr(
        tcuda, "launch_cuda", lambda *a, **k: seen.append(k["tf32"]) or _cpu_launch(*a, **k)
    )
    kind, params = encode(afr.CosFace())
    args = (emb, weight, labels, kind, params, 1, None, None, "mean", True, True)
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            tcuda._loss_cuda(*args)
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == [False, True]


def test_glue_sub_centres_take_the_fused_path(cpu_launch):
    emb, weight, labels = _problem(6, 5, 12, torch.float64, seed=6)
    kind, params = encode(afr.ArcFace())
    args = (emb, weight, labels % 4, kind, params, 3, None, None, "mean", True, True)
    for g, w in zip(tcuda._loss_cuda(*args), tops.loss_op(*args)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="labels: must be .* in \\[0, 4\\), found 5"):
        tcuda._loss_cuda(emb, weight, labels.clamp(max=5), kind, params, 3, None, None, "mean",
                         True, True)  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e, w, y: (e, w, torch.where(y == y[0], 11, y)), "labels: .* found 11"),
        (lambda e, w, y: (e, w, torch.where(y == y[0], -2, y)), "labels: .* found -2"),
        (lambda e, w, y: (e[:0], w, y[:0]), "emb: empty batch"),
        (lambda e, w, y: (e.index_fill(0, torch.tensor([3]), 0.0), w, y), "emb: row 3"),
        (lambda e, w, y: (e, w.index_fill(0, torch.tensor([8]), float("nan")), y), "weight: row 8"),
    ],
)
def test_glue_bad_input_raises_value_error_naming_the_argument(cpu_launch, change, match):
    emb, weight, labels = change(*_problem(6, 5, 11, torch.float64, seed=5))
    kind, params = encode(afr.ArcFace())
    with pytest.raises(ValueError, match=match):
        tcuda._loss_cuda(emb, weight, labels, kind, params, 1, None, None, "mean", True, True)


class _FlagsNotToQuery:
    """An earlier call's flags whose event must not be queried."""

    def ready(self):
        raise AssertionError("an event was queried while a CUDA graph was being captured")


def test_glue_queries_no_event_while_a_graph_is_captured(cpu_launch, monkeypatch):
    # cudaEventQuery is refused during torch.cuda.graph's (global) capture and would
    # invalidate it: earlier calls' flags are left for the next call outside the capture
    emb, weight, labels = _problem(6, 5, 11, torch.float64, seed=5)
    kind, params = encode(afr.ArcFace())
    args = (emb, weight, labels, kind, params, 1, None, None, "mean", True, True)
    monkeypatch.setattr(tcuda, "_pending", [_FlagsNotToQuery()])
    monkeypatch.setattr(tcuda, "_capturing", lambda device: True)
    tcuda._loss_cuda(*args)
    assert len(tcuda._pending) == 1
    monkeypatch.setattr(tcuda, "_capturing", lambda device: False)
    with pytest.raises(AssertionError, match="queried while a CUDA graph"):
        tcuda._loss_cuda(*args)
    assert not tcuda._capturing(torch.device("cpu"))


def test_glue_uploads_fixed_margin_values_once_per_content(monkeypatch):
    # a copy on every step would stage through pinned memory (or, from pageable memory,
    # wait for the GPU), and a CUDA graph would replay a copy from a reused staging buffer
    uploads = []
    monkeypatch.setattr(tcuda, "rows_on", lambda rows, device: uploads.append(rows) or rows)
    monkeypatch.setattr(tcuda, "_uploaded", {})
    monkeypatch.setattr(tcuda, "_capturing", lambda device: False)
    gpu = torch.device("cuda", 0)
    per_row = np.linspace(0.0, 1.0, 4 * afr._core.MARGIN_PARAMS).reshape(4, -1)
    first = tcuda.margin_values_on(per_row, gpu)
    assert tcuda.margin_values_on(per_row.copy(), gpu) is first and len(uploads) == 1
    assert first.dtype == torch.float64 and torch.equal(first, torch.from_numpy(per_row))
    block = tuple(afr.ArcFace().block)
    assert tcuda.margin_values_on(block, gpu).tolist() == list(block) and len(uploads) == 2
    changed = per_row.copy()
    changed[1, 2] += 1.0
    assert torch.equal(tcuda.margin_values_on(changed, gpu), torch.from_numpy(changed))
    assert len(uploads) == 3
    # what a graph being captured reads outlives the cache's clearing
    monkeypatch.setattr(tcuda, "_read_by_graphs", [])
    monkeypatch.setattr(tcuda, "_capturing", lambda device: True)
    captured = tcuda.margin_values_on(block, gpu)
    tcuda._uploaded.clear()
    assert len(tcuda._read_by_graphs) == 1 and tcuda._read_by_graphs[0] is captured
    tcuda.margin_values_on(block, gpu)
    assert len(tcuda._read_by_graphs) == 2  # a new upload, read by the capture too
    monkeypatch.setattr(tcuda, "_capturing", lambda device: False)
    # off the GPU: a fresh tensor each time, which the caller may own
    on_cpu = tcuda.margin_values_on(per_row, torch.device("cpu"))
    assert on_cpu is not tcuda.margin_values_on(per_row, torch.device("cpu"))
    assert len(uploads) == 4


def test_preload_makes_nvrtc_and_cublas_resolve_by_name():
    # cudarc opens them by name; PyTorch's wheels keep them where the loader does not look
    from arcface_rs import _cuda

    wheels = [
        d for d in _cuda._wheel_dirs() if os.path.exists(os.path.join(d, _cuda._LIBRARIES[0]))
    ]
    if not wheels:
        pytest.skip("PyTorch's CUDA 13 wheels (nvidia/cu13/lib) are not installed")
    _cuda._preload()
    for name in _cuda._LIBRARIES:
        ctypes.CDLL(name)


def test_without_the_feature_the_cuda_entry_points_say_how_to_build():
    if afr._core.cuda_feature:
        pytest.skip("this build has the cuda feature")
    with pytest.raises(RuntimeError, match="--features python,cuda"):
        afr._core.cuda_head_workspace_bytes(4, 4, 4, "float32", True)
    with pytest.raises(RuntimeError, match="--features python,cuda"):
        afr._core._cuda_margin_loss(
            0, 0, 4, 4, 4, "float32", afr.ArcFace().spec, 8, False, *[8] * 9
        )


# ---------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.skipif(
    FUSED or not torch.cuda.is_available(), reason="needs a CUDA device, no cuda feature"
)
def test_cuda_tensors_without_the_feature_use_the_plain_path_and_warn():
    emb, weight, labels = _problem(8, 8, 16, torch.float32, seed=12)
    head = aft.ArcFaceHead(embedding_size=8, num_classes=16).cuda()
    with pytest.warns(RuntimeWarning, match="plain PyTorch"):
        loss = head(emb.cuda(), labels.cuda())
    want = head.cpu()(emb, labels)
    assert abs(loss.item() - want.item()) < 1e-4


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-300))


def _loss_and_grads(emb, weight, labels, margin, reduction="mean", upstream=None, **keywords):
    e = emb.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = aft.margin_loss(e, w, labels, margin, reduction, **keywords)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), e.grad, w.grad


@needs_gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
@pytest.mark.parametrize("margin", all_margins(), ids=repr)
@pytest.mark.parametrize("b, d, c", [(32, 64, 1000), (48, 64, 40000), (96, 16, 40000)])
def test_gpu_head_equals_the_cpu_head(margin, dtype, tol, b, d, c):
    # 40000 classes: 3 tiles, the last short. (48, 64, ...): B <= D, so a tile's stash lives
    # in the next tile's rows of dW, the last two tiles' in scratch; (96, 16, ...): B > D, so
    # the stash is separate and chunked
    emb, weight, labels = _problem(b, d, c, dtype, seed=b + c, ignore=3)
    cpu = _loss_and_grads(emb, weight, labels, margin)
    gpu = _loss_and_grads(emb.cuda(), weight.cuda(), labels.cuda(), margin)
    assert _rel(gpu[0], cpu[0]) < (1e-5 if dtype == torch.float32 else 1e-10)
    assert _rel(gpu[1], cpu[1]) < tol
    assert _rel(gpu[2], cpu[2]) < tol


@needs_gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
@pytest.mark.parametrize("margin", [afr.ArcFace(), afr.CurricularFace()], ids=repr)
def test_gpu_sub_centre_head_equals_the_cpu_head(margin, dtype, tol):
    emb, weight, labels = _problem(40, 32, 3 * 7000, dtype, seed=21, ignore=3)
    labels = torch.where(labels >= 0, labels % 7000, labels)
    cpu = _loss_and_grads(emb, weight, labels, margin, sub_centers=3)
    gpu = _loss_and_grads(emb.cuda(), weight.cuda(), labels.cuda(), margin, sub_centers=3)
    for g, c in zip(gpu, cpu):
        assert _rel(g, c) < tol


@needs_gpu
def test_gpu_reduction_none_and_a_side_stream():
    emb, weight, labels = _problem(40, 32, 5000, torch.float32, seed=7)
    up = torch.linspace(-1, 1, 40)
    cpu = _loss_and_grads(emb, weight, labels, afr.CosFace(), "none", up)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = _loss_and_grads(
            emb.cuda(), weight.cuda(), labels.cuda(), afr.CosFace(), "none", up.cuda()
        )
    stream.synchronize()
    for g, c in zip(gpu, cpu):
        assert _rel(g, c) < 1e-3


@needs_gpu
def test_gpu_head_module_trains_and_bad_input_raises():
    head = aft.ArcFaceHead(64, 3000).cuda()
    emb, _, labels = _problem(16, 64, 3000, torch.float32, seed=8)
    emb, labels = emb.cuda().requires_grad_(), labels.cuda()
    loss = head(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and head.weight.grad.shape == (3000, 64)
    # the GPU checks the inputs without making the host wait: a flagged call raises at
    # the next call, or in check_cuda_errors()
    head(emb, torch.full_like(labels, 3000))
    with pytest.raises(ValueError, match="labels: .* found 3000"):
        aft.check_cuda_errors()
    head(emb.detach().index_fill(0, torch.tensor([2], device="cuda"), 0.0), labels)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="emb: row 2 .* earlier call"):
        head(emb, labels)
    # the context survives the errors, and nothing is left pending
    assert torch.isfinite(head(emb, labels))
    aft.check_cuda_errors()


@needs_gpu
def test_gpu_head_never_nans_at_extreme_inputs():
    emb, weight, labels = _problem(8, 32, 100, torch.float32, seed=9)
    weight[labels[0]] = emb[0] * 1e3  # cos = 1 exactly: theta = 0 at the clamp
    weight[labels[1]] = -emb[1]  # cos = -1
    loss, g_emb, g_w = _loss_and_grads(
        emb.cuda() * 1e4, weight.cuda(), labels.cuda(), afr.ArcFace(s=64.0, m=0.5)
    )
    assert torch.isfinite(loss) and torch.isfinite(g_emb).all() and torch.isfinite(g_w).all()


def _reference_head(emb, weight, labels, margin):
    """Loss and both gradients in float64 on the CPU (the core's head)."""
    return _loss_and_grads(emb.double().cpu(), weight.double().cpu(), labels.cpu(), margin)


def _torch_autocast_head(emb, weight, labels, margin):
    """PyTorch's own head under bf16 autocast: F.linear of the normalised rows, the margin
    and cross-entropy in float32 (arcface_rs's plain path, the InsightFace recipe)."""
    from arcface_rs.torch import _plain as tplain

    e = emb.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = tplain.plain_loss(e, w, labels, margin, "mean")
    loss.backward()
    return loss.detach(), e.grad, w.grad


@needs_gpu
@pytest.mark.parametrize("margin", all_margins(), ids=repr)
def test_gpu_autocast_head_is_as_close_to_float64_as_torch_autocast(margin):
    # the 16-bit path against a float64 reference, side by side with PyTorch's autocast
    # head: loss within 5e-3, each gradient within that head's own error (x1.5 + 1e-3)
    emb, weight, labels = _problem(64, 128, 5000, torch.float32, seed=11, ignore=3)
    emb, weight, labels = emb.cuda() * 3.0, weight.cuda(), labels.cuda()
    want = _reference_head(emb, weight, labels, margin)
    peer = _torch_autocast_head(emb, weight, labels, margin)
    e = emb.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = aft.margin_loss(e, w, labels, margin)
    loss.backward()
    assert loss.dtype == torch.float32 and e.grad.dtype == w.grad.dtype == torch.float32
    assert _rel(loss, want[0]) < 5e-3
    for got, theirs, ref in ((e.grad, peer[1], want[1]), (w.grad, peer[2], want[2])):
        assert _rel(got, ref) <= 1.5 * _rel(theirs, ref) + 1e-3


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_tensors_get_half_gradients(dtype):
    emb, weight, labels = _problem(48, 64, 3000, torch.float32, seed=12)
    want = _reference_head(emb, weight, labels, afr.CosFace())
    emb, weight = emb.cuda().to(dtype), weight.cuda().to(dtype)
    got = _loss_and_grads(emb, weight, labels.cuda(), afr.CosFace())
    assert got[1].dtype == got[2].dtype == dtype
    assert _rel(got[0], want[0]) < 5e-3
    assert _rel(got[1], want[1]) < 3e-2 and _rel(got[2], want[2]) < 3e-2


@needs_gpu
def test_gpu_tf32_follows_the_float32_matmul_precision():
    emb, weight, labels = _problem(64, 256, 4000, torch.float32, seed=13)
    want = _reference_head(emb, weight, labels, afr.ArcFace())
    before = torch.get_float32_matmul_precision()
    errors = {}
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            got = _loss_and_grads(emb.cuda(), weight.cuda(), labels.cuda(), afr.ArcFace())
            errors[precision] = max(_rel(g, r) for g, r in zip(got[1:], want[1:]))
    finally:
        torch.set_float32_matmul_precision(before)
    assert errors["highest"] < 1e-4 < errors["high"] < 3e-2


def _step(head, emb, labels, forward=None):
    """One autocast training step of `head`; `forward` replaces head(emb, labels)."""
    head.weight.grad = None
    e = emb.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (head if forward is None else forward)(e, labels)
    loss.backward()
    return loss.detach(), e.grad, head.weight.grad


@needs_gpu
def test_gpu_compiled_autocast_step_equals_eager():
    head = aft.ArcFaceHead(64, 5000).cuda()
    emb, _, labels = _problem(32, 64, 5000, torch.float32, seed=14)
    emb, labels = emb.cuda(), labels.cuda()
    eager = _step(head, emb, labels)
    compiled = _step(head, emb, labels, torch.compile(head, fullgraph=True))
    for g, w in zip(compiled, eager):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize(
    "make",
    [
        lambda: aft.ArcFaceHead(64, 5000),
        # per-row margins: their blocks are uploaded once, before the capture
        lambda: aft.MarginHead(64, 5000, afr.ArcFace(m=np.linspace(0.2, 0.6, 32))),
    ],
    ids=["arcface", "per_row_arcface"],
)
def test_gpu_step_captured_in_a_cuda_graph_replays_like_eager(make):
    head = make().cuda()
    emb, _, labels = _problem(32, 64, 5000, torch.float32, seed=15)
    static_emb, static_labels = emb.cuda(), labels.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (kernels loaded, margin block uploaded)
        for _ in range(2):
            _step(head, static_emb, static_labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    head.weight.grad = None
    with torch.cuda.graph(graph):
        out = _step(head, static_emb, static_labels)
    for seed in (16, 17):
        emb, _, labels = _problem(32, 64, 5000, torch.float32, seed=seed)
        static_emb.copy_(emb.cuda())
        static_labels.copy_(labels.cuda())
        graph.replay()
        want = _step(head, static_emb, static_labels)
        for g, w in zip(out, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    aft.check_cuda_errors()  # reads the graph's flags too


@needs_gpu
@pytest.mark.parametrize(
    "make",
    [
        lambda: aft.ArcFaceHead(64, 500),
        lambda: aft.AdaFaceHead(64, 500),
        lambda: aft.MagFaceHead(64, 500),
        lambda: aft.CurricularFaceHead(64, 500),
        lambda: aft.ElasticFaceHead(64, 500, plus=True, seed=0),
    ],
    ids=["arcface", "adaface", "magface", "curricularface", "elasticface_plus"],
)
def test_gpu_training_step_never_waits_for_the_gpu(make):
    """torch's sync debug mode raises on any copy to the host or wait that torch makes: a
    warmed-up step of each head (statistics, draws, bad-row flags) makes none."""
    head = make().cuda()
    emb, _, labels = _problem(32, 64, 500, torch.float32, seed=18)
    emb, labels = emb.cuda(), labels.cuda()
    _step(head, emb, labels)  # warm up: kernels loaded, the margin's block uploaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _step(head, emb, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    aft.check_cuda_errors()


# ---------------------------------------------------------------------------------------
# Gallery(device=...)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", 3])
def test_gallery_refuses_an_unknown_device(device):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        afr.Gallery(8, device=device)


def test_gallery_on_cuda_without_a_usable_gpu_says_why(tmp_path):
    if FUSED:
        pytest.skip("a GPU is usable here")
    want = "cuda feature" if not afr._core.cuda_feature else "no CUDA driver or GPU"
    with pytest.raises(ValueError, match=want):
        afr.Gallery(8, device="cuda")
    g = afr.Gallery(8)
    g.add(np.eye(8))
    g.save(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match=want):
        afr.Gallery.load(tmp_path / "g.safetensors", device="cuda:0")
    assert g.device == "cpu" and "device" not in repr(g)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("q, k", [(1, 10), (37, 5), (300, 64), (3, 100)])
def test_gpu_gallery_search_equals_the_cpu_search(dtype, q, k):
    rng = np.random.default_rng(q + k)
    emb = rng.standard_normal((20000, 64)).astype(np.float32)
    emb[5000::997] = emb[3]  # exact duplicates: ties go to the row added first
    queries = rng.standard_normal((q, 64)).astype(np.float32)
    queries[0] = emb[3]
    ids = rng.permutation(10**6)[:20000]
    cpu, gpu = afr.Gallery(64, dtype), afr.Gallery(64, dtype, device="cuda")
    for g in (cpu, gpu):
        g.add(emb, ids=ids)
    # one more than asked: the k-th result may tie the (k+1)-th to rounding, and then either
    # may be returned (seen on an H200: float16, Q=300, k=64, where three queries' k-th and
    # (k+1)-th scores are 3e-9 to 5e-7 apart in float64; the CPU's order is float64's)
    want_s, want_i = cpu.search(queries, k=k + 1)
    got_s, got_i = gpu.search(queries, k=k)
    np.testing.assert_allclose(got_s, want_s[:, :k], rtol=0, atol=2e-6)
    # ids equal except between scores equal to float32 rounding
    differ = got_i != want_i[:, :k]
    assert not differ[0].any()
    if differ.any():
        gaps = np.abs(np.diff(want_s, axis=1))  # (Q, k): the last is the k-th to the (k+1)-th
        near = gaps <= 4e-6
        near[:, 1:] |= gaps[:, :-1] <= 4e-6
        assert not (differ & ~near).any()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_gpu_gallery_many_queries_among_more_ties_than_candidates(dtype):
    # more than 16 queries rank by one GEMM on tensor cores (16-bit, or TF32 for float32 and
    # int8) and rescore k + max(k, 32) candidates; 200 equal rows tie a query beyond its
    # spare candidates, so that query is searched again by the exact route; the rest must be
    # vouched for by the rescore's bound
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((30000, 128)).astype(np.float32)
    emb[1000:1200] = emb[1000]
    queries = np.vstack([emb[1000], emb[:40], rng.standard_normal((40, 128))])
    cpu, gpu = afr.Gallery(128, dtype), afr.Gallery(128, dtype, device="cuda")
    for g in (cpu, gpu):
        g.add(emb)
    on_device = torch.from_numpy(queries.astype(np.float32)).cuda()
    for k in (10, 100):
        want_s, want_i = cpu.search(queries, k=k + 1)
        # NumPy queries (unsure ones searched again from the host) and CUDA tensors (again
        # on the device)
        for got_s, got_i in (gpu.search(queries, k=k), gpu.search(on_device, k=k)):
            got_s, got_i = (
                np.asarray(torch.as_tensor(got_s).cpu()),
                np.asarray(torch.as_tensor(got_i).cpu()),
            )
            np.testing.assert_allclose(got_s, want_s[:, :k], rtol=0, atol=2e-6)
            np.testing.assert_array_equal(got_i[0], np.arange(1000, 1000 + k))
            differ = got_i != want_i[:, :k]
            gaps = np.abs(np.diff(want_s, axis=1))
            near = gaps <= 4e-6
            near[:, 1:] |= gaps[:, :-1] <= 4e-6
            assert not (differ & ~near).any()


def _search_in_forked_child(gallery, queries, out):
    """In a forked child: cuda_available() False, the inherited CUDA gallery searched on
    the CPU with a RuntimeWarning (ids to ``out``), a new CUDA gallery refused."""
    import warnings

    assert not afr.cuda_available()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out.put(gallery.search(queries, k=5)[1].tolist())
    assert any("fork" in str(w.message) for w in seen)
    with pytest.raises(ValueError, match="forked"):
        afr.Gallery(8, device="cuda")


@needs_gpu
def test_gpu_gallery_in_a_forked_child_searches_on_the_cpu():
    """The real driver refuses a child forked after the parent used CUDA; the child's
    searches of a CUDA gallery it inherited run on the CPU, with the CPU gallery's ids."""
    import multiprocessing

    rng = np.random.default_rng(4)
    emb = rng.standard_normal((2000, 32)).astype(np.float32)
    g = afr.Gallery(32, "float16", device="cuda")
    g.add(emb)
    queries = emb[:6] + 0.01
    g.search(queries, k=5)  # the parent's GPU copy
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_search_in_forked_child, args=(g, queries, out))
    child.start()
    found = out.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0
    cpu = afr.Gallery(32, "float16")
    cpu.add(emb)
    assert found == cpu.search(queries, k=5)[1].tolist()
    np.testing.assert_array_equal(g.search(queries, k=5)[1], cpu.search(queries, k=5)[1])


@needs_gpu
def test_gpu_gallery_follows_changes_and_identifies(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((500, 32)).astype(np.float32)
    g = afr.Gallery(32, "float16", device="cuda")
    g.add(emb[:400])
    _, ids = g.search(emb[450], k=1)
    assert ids[0] != 450
    g.add(emb[400:], ids=np.arange(400, 500))  # the GPU copy must be refreshed
    _, ids = g.search(emb[450], k=3)
    assert ids[0] == 450
    g.remove([450])
    _, ids = g.search(emb[450], k=3)
    assert 450 not in ids
    who, score = g.identify(emb[:5], threshold=0.99)
    assert list(who) == [0, 1, 2, 3, 4] and (score > 0.99).all()
    who, _ = g.identify(rng.standard_normal((4, 32)), threshold=0.9)
    assert (who == -1).all()
    g.save(tmp_path / "g.safetensors")
    back = afr.Gallery.load(tmp_path / "g.safetensors", device="cuda")
    assert back.device == "cuda:0"
    np.testing.assert_array_equal(back.search(emb[:9], k=4)[1], g.search(emb[:9], k=4)[1])
