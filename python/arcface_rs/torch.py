"""PyTorch heads on the fused Rust kernels: ``import arcface_rs.torch`` (needs torch).

``ArcFaceHead``, ``CosFaceHead``, ``SphereFaceHead``, ``CombinedMarginHead`` and
``SoftmaxHead`` own the class centres ``weight`` (C, D) and a ``margin``; ``head(emb, labels)``
returns the loss, ``head.logits(emb, labels)`` the (B, C) logits. The work runs in
``torch.library`` custom ops (with fake implementations, so ``torch.compile`` keeps one
graph); CPU tensors are shared with the Rust core without copies. float32 and float64 keep
their dtype; float16/bfloat16 (autocast) are computed in float32 and their gradients come
back in the input dtype.

``ShardedMarginHead`` splits the class centres across the ranks of a torch.distributed
process group (model parallel, Partial FC style); see its docstring.

CUDA tensors run the fused CUDA kernels when arcface_rs was built with the ``cuda`` feature
and a device is present (``arcface_rs.cuda_available()``): on torch's current stream, over
the tensors' own memory, with scratch from torch's allocator. Otherwise they run a plain
PyTorch implementation of the same math (same margins, same exact gradient) and warn once.
``margin_logits`` on CUDA tensors always runs the plain implementation.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _core
from ._cuda import cuda_available
from ._margins import ArcFace, CombinedMargin, CosFace, Margin, Softmax, SphereFace
from ._sharded import ShardedMarginHead, ddp_sum_hook, merge_shards, shard_range, split_weight

__all__ = [
    "ArcFaceHead",
    "CombinedMarginHead",
    "CosFaceHead",
    "ShardedMarginHead",
    "SoftmaxHead",
    "SphereFaceHead",
    "ddp_sum_hook",
    "margin_logits",
    "margin_loss",
    "merge_shards",
    "shard_range",
    "split_weight",
]

_NATIVE = (torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------
# Margins cross the custom-op boundary as (kind, params): ops take only tensors and numbers.


def _encode(margin: Margin) -> tuple[str, list[float]]:
    if isinstance(margin, ArcFace):
        return "arcface", [margin.s, margin.m, float(margin.easy_margin)]
    if isinstance(margin, CosFace):
        return "cosface", [margin.s, margin.m]
    if isinstance(margin, SphereFace):
        return "sphereface", [
            float(margin.m),
            -1.0 if margin.s is None else margin.s,
            margin.lambda_,
        ]
    if isinstance(margin, CombinedMargin):
        return "combined", [margin.s, margin.m1, margin.m2, margin.m3]
    if isinstance(margin, Softmax):
        return "softmax", [margin.s]
    raise TypeError(
        "margin must be ArcFace, CosFace, SphereFace, CombinedMargin or Softmax, "
        f"got {type(margin).__name__}"
    )


@functools.lru_cache(maxsize=256)
def _decode(kind: str, params: tuple[float, ...]) -> Margin:
    if kind == "arcface":
        return ArcFace(params[0], params[1], bool(params[2]))
    if kind == "cosface":
        return CosFace(params[0], params[1])
    if kind == "sphereface":
        return SphereFace(int(params[0]), None if params[1] < 0 else params[1], params[2])
    if kind == "combined":
        return CombinedMargin(*params)
    return Softmax(params[0])


def _compute_dtype(emb: Tensor, weight: Tensor) -> torch.dtype:
    """float32/float64 as given; half precision (autocast) is computed in float32."""
    if emb.dtype in _NATIVE and weight.dtype in _NATIVE:
        return emb.dtype
    return torch.float64 if torch.float64 in (emb.dtype, weight.dtype) else torch.float32


def _numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A NumPy view of a CPU tensor (any strides; a copy only when the dtype changes)."""
    t = t.detach()
    return (t if t.dtype == dtype else t.to(dtype)).numpy()


# ---------------------------------------------------------------------------------------
# Custom ops (CPU). The loss op computes the gradients in its forward pass (the fused
# kernel) and hands them to autograd; reduction="none" instead recomputes in backward with
# the upstream row weights.


@torch.library.custom_op("arcface_rs::margin_loss", mutates_args=(), device_types="cpu")
def _loss_op(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    kind: str,
    params: list[float],
    reduction: str,
    need_emb: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = _compute_dtype(emb, weight)
    fused = reduction != "none"
    loss, rows, g_emb, g_w = _run_loss(
        emb, weight, labels, kind, params, reduction, need_emb and fused, need_weight and fused
    )
    if reduction == "none":
        out = torch.from_numpy(rows).to(dtype)
    else:
        out = torch.scalar_tensor(loss, dtype=dtype)
    return out, _grad_tensor(g_emb, emb), _grad_tensor(g_w, weight)


def _run_loss(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    kind: str,
    params: list[float],
    reduction: str,
    need_emb: bool,
    need_weight: bool,
    upstream: np.ndarray | None = None,
) -> tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The fused kernel on NumPy views of CPU tensors, in the compute dtype."""
    dtype = _compute_dtype(emb, weight)
    return _core.margin_loss(
        _numpy(emb, dtype),
        _numpy(weight, dtype),
        labels.numpy(),
        _decode(kind, tuple(params))._spec,
        reduction,
        grad_emb=need_emb,
        grad_weight=need_weight,
        upstream=upstream,
    )


def _grad_tensor(g: np.ndarray | None, like: Tensor) -> Tensor:
    if g is None:
        return like.new_empty((0,))
    return torch.from_numpy(g).to(like.dtype)


@_loss_op.register_fake
def _(emb, weight, labels, kind, params, reduction, need_emb, need_weight):
    dtype = _compute_dtype(emb, weight)
    out = emb.new_empty((emb.shape[0],) if reduction == "none" else (), dtype=dtype)
    fused = reduction != "none"
    g_emb = emb.new_empty(emb.shape if need_emb and fused else (0,))
    g_w = weight.new_empty(weight.shape if need_weight and fused else (0,))
    return out, g_emb, g_w


@torch.library.custom_op("arcface_rs::margin_loss_backward", mutates_args=(), device_types="cpu")
def _loss_backward_op(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    kind: str,
    params: list[float],
    reduction: str,
    upstream: Tensor,
    need_emb: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of sum(upstream * loss), recomputed (upstream: (B,) or a scalar)."""
    rows = np.broadcast_to(_numpy(upstream, torch.float64), (emb.shape[0],))
    _, _, g_emb, g_w = _run_loss(
        emb,
        weight,
        labels,
        kind,
        params,
        reduction,
        need_emb,
        need_weight,
        upstream=np.ascontiguousarray(rows),
    )
    return _grad_tensor(g_emb, emb), _grad_tensor(g_w, weight)


@_loss_backward_op.register_fake
def _(emb, weight, labels, kind, params, reduction, upstream, need_emb, need_weight):
    return (
        emb.new_empty(emb.shape if need_emb else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
    )


# ---------------------------------------------------------------------------------------
# CUDA kernels of the same ops (the `cuda` cargo feature): torch allocates every buffer and
# the Rust side queues kernels and cuBLAS GEMMs on torch's current stream.

_CUDA_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _launch_cuda(shape: tuple[int, int, int], dtype: str, spec: Any, *tensors: Tensor | None):
    """Queues the fused head on torch's current stream over the tensors' memory (in the
    order of ``_core.cuda_margin_loss``; None skips a gradient)."""
    device = tensors[0].device  # type: ignore[union-attr]
    index = torch.cuda.current_device() if device.index is None else device.index
    _core.cuda_margin_loss(
        index,
        torch.cuda.current_stream(device).cuda_stream,
        *shape,
        dtype,
        spec,
        *(0 if t is None else t.data_ptr() for t in tensors),
    )


def _run_loss_cuda(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    kind: str,
    params: list[float],
    reduction: str,
    need_emb: bool,
    need_weight: bool,
    upstream: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Row losses and d loss / d row loss (float64), and the wanted gradients (compute
    dtype) on the GPU."""
    dtype = _compute_dtype(emb, weight)
    x = emb.detach().to(dtype).contiguous()
    w = weight.detach().to(dtype).contiguous()
    y = labels.detach().to(torch.int64).contiguous()
    (b, d), c = x.shape, w.shape[0]
    if b == 0:
        raise ValueError("emb: empty batch: need at least one row")
    if d == 0:
        raise ValueError("emb: embedding size is 0")
    if c == 0:
        raise ValueError("weight: has no classes (0 rows)")
    lo, hi = torch.stack(torch.aminmax(y)).tolist()
    if lo < -1 or hi >= c:
        bad = lo if lo < -1 else hi
        raise ValueError(f"labels: must be -1 (ignored) or a class in [0, {c}), found {bad}")
    valid = y >= 0
    row_weight = valid.to(torch.float64)
    if reduction == "mean":
        row_weight = row_weight / valid.sum().clamp(min=1)
    if upstream is not None:
        row_weight = row_weight * upstream.to(torch.float64)
    device = x.device
    row_loss = torch.empty(b, dtype=torch.float64, device=device)
    g_emb = torch.empty_like(x) if need_emb else None
    g_w = torch.empty_like(w) if need_weight else None
    bad_rows = torch.empty(2, dtype=torch.int32, device=device)
    name = _CUDA_DTYPES[dtype]
    workspace = torch.empty(
        _core.cuda_head_workspace_bytes(b, c, d, name, need_weight),
        dtype=torch.uint8,
        device=device,
    )

    _launch_cuda(
        (b, c, d),
        name,
        _decode(kind, tuple(params))._spec,
        x,
        w,
        y,
        row_weight,
        row_loss,
        g_emb,
        g_w,
        bad_rows,
        workspace,
    )
    bad_emb, bad_weight = bad_rows.tolist()
    if bad_emb:
        raise ValueError(f"emb: row {bad_emb - 1} is all zeros or contains NaN or inf")
    if bad_weight:
        raise ValueError(f"weight: row {bad_weight - 1} is all zeros or contains NaN or inf")
    return row_loss, row_weight, g_emb, g_w


def _like(g: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if g is None else g.to(like.dtype)


@_loss_op.register_kernel("cuda")
def _loss_cuda(emb, weight, labels, kind, params, reduction, need_emb, need_weight):
    dtype = _compute_dtype(emb, weight)
    fused = reduction != "none"
    rows, row_weight, g_emb, g_w = _run_loss_cuda(
        emb, weight, labels, kind, params, reduction, need_emb and fused, need_weight and fused
    )
    # the row weights are 1 (sum) or 1 / valid rows (mean), 0 on ignored rows
    out = rows.to(dtype) if reduction == "none" else (rows * row_weight).sum().to(dtype)
    return out, _like(g_emb, emb), _like(g_w, weight)


@_loss_backward_op.register_kernel("cuda")
def _loss_backward_cuda(
    emb, weight, labels, kind, params, reduction, upstream, need_emb, need_weight
):
    rows = torch.broadcast_to(upstream.to(torch.float64), (emb.shape[0],)).contiguous()
    _, _, g_emb, g_w = _run_loss_cuda(
        emb, weight, labels, kind, params, reduction, need_emb, need_weight, upstream=rows
    )
    return _like(g_emb, emb), _like(g_w, weight)


def _is_exactly_one(t: Tensor) -> bool:
    """True for a concrete scalar 1 (loss.backward()); False while tracing (fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return t.numel() == 1 and t.device.type == "cpu" and float(t) == 1.0
    except Exception:  # fake or functional tensors have no value
        return False


def _loss_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    emb, weight, labels, kind, params, reduction, need_emb, need_weight = inputs
    ctx.reduction, ctx.kind, ctx.params = reduction, kind, params
    ctx.need = (need_emb, need_weight)
    # The gradient outputs carry no gradient of their own; without this autograd would fill
    # a zero (C, D) tensor for them on every backward.
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(emb, weight, labels)
    # The fused forward already computed the gradients (not for "none", whose row weights
    # come only with backward). They are held as plain references and handed over once, so
    # autograd can adopt the (C, D) weight gradient as .grad without cloning it (a saved
    # tensor would keep a second reference, forcing a 200 MB copy at C=100k). A second
    # backward through the same graph recomputes them.
    ctx.fused = None if reduction == "none" else [output[1], output[2]]


def _no_double_backward() -> None:
    """The fused ops' gradients are computed by the kernel, not by torch ops, so they carry
    no graph of their own: a second derivative through them (``create_graph=True``, as a
    gradient penalty needs) would silently be zero. Refuse it instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "arcface_rs: double backward (create_graph=True) through the fused margin ops "
            "is not supported: their gradient has no graph, so a gradient penalty would "
            "silently be zero. Compute such a penalty on a plain PyTorch head instead."
        )


def _loss_backward(ctx: Any, g_loss: Tensor | None, _g1: Any, _g2: Any):
    need_emb, need_weight = ctx.need
    if g_loss is None:
        return (None,) * 8
    _no_double_backward()
    if ctx.fused is not None:
        g_emb, g_w = ctx.fused
        ctx.fused = None
        # the common loss.backward() passes exactly 1: skip a pass over the (C, D) gradient
        if not _is_exactly_one(g_loss):
            g_emb = g_emb * g_loss.to(g_emb.dtype)
            g_w = g_w * g_loss.to(g_w.dtype)
    else:
        emb, weight, labels = ctx.saved_tensors
        g_emb, g_w = _loss_backward_op(
            emb, weight, labels, ctx.kind, ctx.params, ctx.reduction, g_loss, need_emb, need_weight
        )
    return (
        g_emb if need_emb else None,
        g_w if need_weight else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "arcface_rs::margin_loss", _loss_backward, setup_context=_loss_setup
)


@torch.library.custom_op("arcface_rs::margin_logits", mutates_args=(), device_types="cpu")
def _logits_op(
    emb: Tensor, weight: Tensor, labels: Tensor, kind: str, params: list[float]
) -> Tensor:
    dtype = _compute_dtype(emb, weight)
    z = _core.margin_logits(
        _numpy(emb, dtype),
        _numpy(weight, dtype),
        labels.numpy(),
        _decode(kind, tuple(params))._spec,
    )
    return torch.from_numpy(z)


@_logits_op.register_fake
def _(emb, weight, labels, kind, params):
    return emb.new_empty((emb.shape[0], weight.shape[0]), dtype=_compute_dtype(emb, weight))


@torch.library.custom_op("arcface_rs::margin_logits_backward", mutates_args=(), device_types="cpu")
def _logits_backward_op(
    grad: Tensor, emb: Tensor, weight: Tensor, labels: Tensor, kind: str, params: list[float]
) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(emb, weight)
    g_emb, g_w = _core.margin_logits_backward(
        _numpy(grad, dtype),
        _numpy(emb, dtype),
        _numpy(weight, dtype),
        labels.numpy(),
        _decode(kind, tuple(params))._spec,
    )
    return _grad_tensor(g_emb, emb), _grad_tensor(g_w, weight)


@_logits_backward_op.register_fake
def _(grad, emb, weight, labels, kind, params):
    return emb.new_empty(emb.shape), weight.new_empty(weight.shape)


def _logits_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    emb, weight, labels, kind, params = inputs
    ctx.kind, ctx.params = kind, params
    ctx.save_for_backward(emb, weight, labels)


def _logits_backward(ctx: Any, grad: Tensor):
    _no_double_backward()
    emb, weight, labels = ctx.saved_tensors
    g_emb, g_w = _logits_backward_op(grad, emb, weight, labels, ctx.kind, ctx.params)
    return g_emb, g_w, None, None, None


torch.library.register_autograd(
    "arcface_rs::margin_logits", _logits_backward, setup_context=_logits_setup
)


# ---------------------------------------------------------------------------------------
# Plain PyTorch implementation, for CUDA tensors (and tested against the Rust path on CPU).

_THETA_EPS = 1e-3  # as margin.rs: psi' is evaluated with theta clamped to [eps, pi - eps]
_warned_cuda = False


def _psi_dpsi(margin: Margin, c: Tensor) -> tuple[Tensor, Tensor]:
    """psi(c) and psi'(c) elementwise, the formulas of margin.rs in torch ops."""
    one = torch.ones_like(c)
    if isinstance(margin, Softmax):
        return c, one
    if isinstance(margin, CosFace):
        return c - margin.m, one
    if isinstance(margin, SphereFace):
        m = margin.m
        theta = torch.acos(c)
        k = torch.clamp(torch.floor(m * theta / math.pi), max=m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        t_m = [c, 2 * c**2 - 1, 4 * c**3 - 3 * c, 8 * c**4 - 8 * c**2 + 1][m - 1]
        u_m = [one, 2 * c, 4 * c**2 - 1, 8 * c**3 - 4 * c][m - 1]
        psi, dpsi = sign * t_m - 2 * k, sign * m * u_m
        lam = margin.lambda_
        return (lam * c + psi) / (1 + lam), (lam + dpsi) / (1 + lam)
    if isinstance(margin, ArcFace):
        m1, m2, m3 = 1.0, margin.m, 0.0
    else:
        m1, m2, m3 = margin.m1, margin.m2, margin.m3
    theta = torch.acos(c)
    theta_star = (math.pi - m2) / m1
    shift = max(m2 * math.sin(m2), 1 + math.cos(theta_star))
    t = theta.clamp(_THETA_EPS, math.pi - _THETA_EPS)
    inside = theta <= theta_star
    psi = torch.where(inside, torch.cos(m1 * theta + m2) - m3, c - m3 - shift)
    dpsi = torch.where(inside, m1 * torch.sin(m1 * t + m2) / torch.sin(t), one)
    if isinstance(margin, ArcFace) and margin.easy_margin:
        psi, dpsi = torch.where(c <= 0, c, psi), torch.where(c <= 0, one, dpsi)
    return psi, dpsi


class _Psi(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, c: Tensor, margin: Margin) -> Tensor:
        psi, dpsi = _psi_dpsi(margin, c)
        ctx.save_for_backward(dpsi)
        return psi

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (dpsi,) = ctx.saved_tensors
        return grad * dpsi, None


def _plain_logits(emb: Tensor, weight: Tensor, labels: Tensor, margin: Margin) -> Tensor:
    dtype = _compute_dtype(emb, weight)
    x, w = emb.to(dtype), weight.to(dtype)
    x_norm, w_norm = x.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    for name, norms in (("emb", x_norm), ("weight", w_norm)):
        bad = ~torch.isfinite(norms) | (norms == 0)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{name}: row {row} is all zeros or contains NaN or inf")
    cos = ((x / x_norm) @ (w / w_norm).T).clamp(-1.0, 1.0)
    rows = torch.nonzero(labels >= 0).flatten()
    cols = labels[rows]
    psi = _Psi.apply(cos[rows, cols], margin)
    cos = cos.index_put((rows, cols), psi)
    scale = x_norm if margin.scale is None else margin.scale
    return cos * scale


def _plain_loss(
    emb: Tensor, weight: Tensor, labels: Tensor, margin: Margin, reduction: str
) -> Tensor:
    logits = _plain_logits(emb, weight, labels, margin)
    per_row = F.cross_entropy(logits, labels, ignore_index=-1, reduction="none")
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (labels >= 0).sum().clamp(min=1)  # 0, not NaN, if all ignored


def _warn_cuda_once() -> None:
    global _warned_cuda
    if not _warned_cuda:
        _warned_cuda = True
        warnings.warn(
            "arcface_rs: CUDA tensors run a plain PyTorch implementation of the head (same "
            "math, not fused): this build has no CUDA path or no GPU is visible. Build with "
            'MATURIN_PEP517_ARGS="--features python,cuda" pip install . for the fused kernels.',
            RuntimeWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------
# Public functional API


def _check(emb: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    for name, t in (("emb", emb), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not emb.is_floating_point():
        raise TypeError(f"emb must be a floating-point tensor, got {emb.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if emb.dtype in _NATIVE and weight.dtype in _NATIVE and emb.dtype != weight.dtype:
        raise TypeError(
            f"emb ({emb.dtype}) and weight ({weight.dtype}) must share one dtype; cast one"
        )
    if emb.dim() != 2:
        raise ValueError(f"emb must be 2-D (batch, embedding_size), got shape {tuple(emb.shape)}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (num_classes, embedding_size), got shape {tuple(weight.shape)}"
        )
    if emb.shape[1] != weight.shape[1]:
        raise ValueError(
            f"emb has embedding size {emb.shape[1]} but weight has {weight.shape[1]} columns"
        )
    if emb.device != weight.device or labels.device != emb.device:
        raise ValueError(
            f"emb, weight and labels must be on one device, got {emb.device}, "
            f"{weight.device} and {labels.device}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per row of emb ({emb.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    return labels.long()


def margin_loss(
    emb: Tensor, weight: Tensor, labels: Tensor, margin: Margin, reduction: str = "mean"
) -> Tensor:
    """Fused margin-softmax cross-entropy of ``emb`` (B, D) against class centres ``weight``
    (C, D); labels -1 are ignored. Differentiable in ``emb`` and ``weight``."""
    labels = _check(emb, weight, labels)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if emb.device.type != "cpu" and not (emb.device.type == "cuda" and cuda_available()):
        _warn_cuda_once()
        return _plain_loss(emb, weight, labels, margin, reduction)
    kind, params = _encode(margin)
    grad = torch.is_grad_enabled()
    loss, _, _ = _loss_op(
        emb,
        weight,
        labels,
        kind,
        params,
        reduction,
        grad and emb.requires_grad,
        grad and weight.requires_grad,
    )
    return loss


def margin_logits(emb: Tensor, weight: Tensor, labels: Tensor, margin: Margin) -> Tensor:
    """The (B, C) margin logits (``s * cos``, ``s * psi`` on each row's label)."""
    labels = _check(emb, weight, labels)
    if emb.device.type != "cpu":
        _warn_cuda_once()
        return _plain_logits(emb, weight, labels, margin)
    kind, params = _encode(margin)
    return _logits_op(emb, weight, labels, kind, params)


# ---------------------------------------------------------------------------------------
# Modules


class _MarginHead(nn.Module):
    """A margin-softmax head owning the class centres ``weight`` (num_classes, embedding_size)."""

    margin: Margin

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        reduction: str = "mean",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        embedding_size, num_classes = int(embedding_size), int(num_classes)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.embedding_size, self.num_classes, self.reduction = (
            embedding_size,
            num_classes,
            reduction,
        )
        self.weight = nn.Parameter(
            torch.empty((num_classes, embedding_size), device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, embedding_size) with ``labels`` (B,)."""
        return margin_loss(emb, self.weight, labels, self.margin, self.reduction)

    def logits(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The (B, num_classes) margin logits."""
        return margin_logits(emb, self.weight, labels, self.margin)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin={self.margin!r}, reduction={self.reduction!r}"
        )


class ArcFaceHead(_MarginHead):
    """ArcFace: additive angular margin, target logit ``s cos(theta + m)``."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        margin = ArcFace(s=s, m=m, easy_margin=easy_margin)
        super().__init__(embedding_size, num_classes, **kwargs)
        self.margin = margin


class CosFaceHead(_MarginHead):
    """CosFace: additive cosine margin, target logit ``s (cos theta - m)``."""

    def __init__(
        self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kwargs: Any
    ) -> None:
        margin = CosFace(s=s, m=m)
        super().__init__(embedding_size, num_classes, **kwargs)
        self.margin = margin


class CombinedMarginHead(_MarginHead):
    """Combined margin: target logit ``s (cos(m1 theta + m2) - m3)``."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        **kwargs: Any,
    ) -> None:
        margin = CombinedMargin(s=s, m1=m1, m2=m2, m3=m3)
        super().__init__(embedding_size, num_classes, **kwargs)
        self.margin = margin


class SoftmaxHead(_MarginHead):
    """Normalised softmax without margin (the baseline): logits ``s cos theta``."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, **kwargs: Any):
        margin = Softmax(s=s)
        super().__init__(embedding_size, num_classes, **kwargs)
        self.margin = margin


class SphereFaceHead(_MarginHead):
    """SphereFace (A-Softmax), integer ``m`` in 1..4; ``s=None`` scales by ||x||.

    ``lambda_`` blends psi with cos: ``(lambda_ cos + psi) / (1 + lambda_)``. With
    ``anneal=True`` lambda follows ``max(lambda_min, base (1 + gamma it)^-power)`` over
    training steps; the step counter ``iteration`` is a buffer saved in the state_dict and
    advances on each forward call in training mode.
    """

    iteration: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        m: int = 4,
        s: float | None = None,
        lambda_: float = 0.0,
        anneal: bool = False,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        **kwargs: Any,
    ) -> None:
        fixed = SphereFace(m=m, s=s, lambda_=lambda_)
        for name, value in (("base", base), ("gamma", gamma), ("power", power)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(lambda_min) and lambda_min >= 0):
            raise ValueError(f"lambda_min must be a finite number >= 0, got {lambda_min!r}")
        super().__init__(embedding_size, num_classes, **kwargs)
        self._fixed = fixed
        self.anneal, self.base, self.gamma = bool(anneal), float(base), float(gamma)
        self.power, self.lambda_min = float(power), float(lambda_min)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def current_lambda(self) -> float:
        """The blend weight in force at this step."""
        if not self.anneal:
            return self._fixed.lambda_
        it = int(self.iteration)
        return max(self.lambda_min, self.base * (1.0 + self.gamma * it) ** -self.power)

    @property
    def margin(self) -> SphereFace:  # type: ignore[override]
        if not self.anneal:
            return self._fixed
        return SphereFace(m=self._fixed.m, s=self._fixed.s, lambda_=self.current_lambda())

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        loss = super().forward(emb, labels)
        if self.training and self.anneal:
            with torch.no_grad():
                self.iteration += 1
        return loss
