"""The fused CPU ops of arcface_rs.torch: ``torch.library`` custom ops over the Rust core,
their fake implementations (so ``torch.compile`` keeps one graph) and their autograd.

Margins cross the op boundary as their parameter block (``Margin.encode()`` of the core:
the one definition the CUDA kernels read too) and an optional (B, MARGIN_PARAMS) float64
tensor of one block per row: ops take only tensors and numbers.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _core

NATIVE = (torch.float32, torch.float64)

# The ops' schemas, spelled out rather than inferred from the annotations: torch 2.4's
# inference cannot read the string annotations of `from __future__ import annotations`.
# Every op also takes the head's class layout and filter: `int sub_centers, float?
# interclass_filter` (arcface_rs.margin_loss's keywords).
_HEAD = "int sub_centers, float? interclass_filter"
# The loss ops also take `float? grad_filter`: None for the exact gradient, else the
# probability floor ("auto" is resolved to the dtype's eps/32 before the op).
_LOSS_SCHEMA = (
    "(Tensor emb, Tensor weight, Tensor labels, float[] margin, Tensor? row_margins, "
    f"{_HEAD}, float? grad_filter, str reduction, bool need_emb, bool need_weight) "
    "-> (Tensor, Tensor, Tensor)"
)
_LOSS_BACKWARD_SCHEMA = (
    "(Tensor emb, Tensor weight, Tensor labels, float[] margin, Tensor? row_margins, "
    f"{_HEAD}, float? grad_filter, str reduction, Tensor upstream, bool need_emb, "
    "bool need_weight) -> (Tensor, Tensor)"
)
_LOGITS_SCHEMA = (
    "(Tensor emb, Tensor weight, Tensor labels, float[] margin, Tensor? row_margins, "
    f"{_HEAD}) -> Tensor"
)
_LOGITS_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor emb, Tensor weight, Tensor labels, float[] margin, Tensor? row_margins, "
    f"{_HEAD}) -> (Tensor, Tensor)"
)


@functools.lru_cache(maxsize=256)
def core_margin(block: tuple[float, ...]) -> _core.Margin:
    """The core margin of a parameter block (validated by the core)."""
    return _core.Margin.decode(list(block))


def _row_blocks(row_margins: Tensor | None) -> np.ndarray | None:
    return None if row_margins is None else _numpy(row_margins, torch.float64)


def compute_dtype(emb: Tensor, weight: Tensor) -> torch.dtype:
    """float32/float64 as given; half precision (autocast) is computed in float32."""
    if emb.dtype in NATIVE and weight.dtype in NATIVE:
        return emb.dtype
    return torch.float64 if torch.float64 in (emb.dtype, weight.dtype) else torch.float32


def _numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A NumPy view of a CPU tensor (any strides; a copy only when the dtype changes)."""
    t = t.detach()
    return (t if t.dtype == dtype else t.to(dtype)).numpy()


# ---------------------------------------------------------------------------------------
# Each op, its fake (register_fake) and its CUDA kernel (_cuda.py) restate the same
# parameter list by necessity: torch.library calls them with the op's arguments, in order.
#
# Custom ops (CPU). The loss op computes the gradients in its forward pass (the fused
# kernel) and hands them to autograd; reduction="none" instead recomputes in backward with
# the upstream row weights.


@torch.library.custom_op(
    "arcface_rs::margin_loss", mutates_args=(), device_types="cpu", schema=_LOSS_SCHEMA
)
def loss_op(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: list[float],
    row_margins: Tensor | None,
    sub_centers: int,
    interclass_filter: float | None,
    grad_filter: float | None,
    reduction: str,
    need_emb: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = compute_dtype(emb, weight)
    fused = reduction != "none"
    loss, rows, g_emb, g_w = _run_loss(
        emb,
        weight,
        labels,
        margin,
        row_margins,
        (sub_centers, interclass_filter, grad_filter),
        reduction,
        need_emb and fused,
        need_weight and fused,
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
    margin: list[float],
    row_margins: Tensor | None,
    head: tuple[int, float | None, float | None],
    reduction: str,
    need_emb: bool,
    need_weight: bool,
    upstream: np.ndarray | None = None,
) -> tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The fused kernel on NumPy views of CPU tensors, in the compute dtype. ``head``:
    (sub_centers, interclass_filter, grad_filter)."""
    dtype = compute_dtype(emb, weight)
    loss, rows, g_emb, g_w, _ = _core.margin_loss(
        _numpy(emb, dtype),
        _numpy(weight, dtype),
        labels.numpy(),
        core_margin(tuple(margin)),
        reduction,
        grad_emb=need_emb,
        grad_weight=need_weight,
        upstream=upstream,
        row_margins=_row_blocks(row_margins),
        sub_centers=head[0],
        interclass_filter=head[1],
        grad_filter=head[2],
    )
    return loss, rows, g_emb, g_w


def _grad_tensor(g: np.ndarray | None, like: Tensor) -> Tensor:
    if g is None:
        return like.new_empty((0,))
    return torch.from_numpy(g).to(like.dtype)


@loss_op.register_fake
def _(
    emb,
    weight,
    labels,
    margin,
    row_margins,
    sub_centers,
    interclass_filter,
    grad_filter,
    reduction,
    need_emb,
    need_weight,
):
    dtype = compute_dtype(emb, weight)
    out = emb.new_empty((emb.shape[0],) if reduction == "none" else (), dtype=dtype)
    fused = reduction != "none"
    g_emb = emb.new_empty(emb.shape if need_emb and fused else (0,))
    g_w = weight.new_empty(weight.shape if need_weight and fused else (0,))
    return out, g_emb, g_w


@torch.library.custom_op(
    "arcface_rs::margin_loss_backward",
    mutates_args=(),
    device_types="cpu",
    schema=_LOSS_BACKWARD_SCHEMA,
)
def loss_backward_op(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: list[float],
    row_margins: Tensor | None,
    sub_centers: int,
    interclass_filter: float | None,
    grad_filter: float | None,
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
        margin,
        row_margins,
        (sub_centers, interclass_filter, grad_filter),
        reduction,
        need_emb,
        need_weight,
        upstream=np.ascontiguousarray(rows),
    )
    return _grad_tensor(g_emb, emb), _grad_tensor(g_w, weight)


@loss_backward_op.register_fake
def _(
    emb,
    weight,
    labels,
    margin,
    row_margins,
    sub_centers,
    interclass_filter,
    grad_filter,
    reduction,
    upstream,
    need_emb,
    need_weight,
):
    return (
        emb.new_empty(emb.shape if need_emb else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
    )


def is_exactly_one(t: Tensor) -> bool:
    """True for a concrete scalar 1 (loss.backward()); False while tracing (fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return t.numel() == 1 and t.device.type == "cpu" and float(t) == 1.0
    except Exception:  # fake or functional tensors have no value
        return False


def scale_gradient(g: Tensor, g_loss: Tensor) -> Tensor:
    """A fused op's own gradient ``g`` times the upstream gradient ``g_loss`` (a scalar).
    On the GPU, run eagerly, a kernel scales ``g`` in place and returns at once when the
    upstream is exactly 1 (loss.backward()'s ones, which the host cannot see without waiting
    for the GPU), so the common step pays no pass over the (C, D) weight gradient. Elsewhere
    (CPU tensors, or traced by torch.compile, which fuses the product) a plain product."""
    if g.is_cuda and g_loss.is_cuda and g.numel() and not torch.compiler.is_compiling():
        from ._cuda import scale_unless_one  # the CUDA glue imports this module

        return scale_unless_one(g, g_loss)
    return g * g_loss.to(g.dtype)


def _loss_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    emb, weight, labels, margin, row_margins, sub_centers, interclass_filter = inputs[:7]
    grad_filter, reduction, need_emb, need_weight = inputs[7:]
    ctx.reduction, ctx.margin, ctx.row_margins = reduction, margin, row_margins
    ctx.head = (sub_centers, interclass_filter, grad_filter)
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


def no_double_backward() -> None:
    """The fused ops' gradients are computed by the kernel, not by torch ops, so they carry
    no graph of their own: a second derivative through them (``create_graph=True``, as a
    gradient penalty needs) would silently be zero. Refuse it instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "arcface_rs: double backward (create_graph=True) through the fused margin ops "
            "(and ShardedMarginHead) is not supported: their gradient has no graph, so a "
            "gradient penalty would "
            "silently be zero. Compute such a penalty on a plain PyTorch head instead."
        )


def _loss_backward(ctx: Any, g_loss: Tensor | None, _g1: Any, _g2: Any):
    need_emb, need_weight = ctx.need
    if g_loss is None:
        return (None,) * 11
    no_double_backward()
    if ctx.fused is not None:
        g_emb, g_w = ctx.fused
        ctx.fused = None
        # the common loss.backward() passes exactly 1: skip a pass over the (C, D) gradient
        if not is_exactly_one(g_loss):
            g_emb = scale_gradient(g_emb, g_loss)
            g_w = scale_gradient(g_w, g_loss)
    else:
        emb, weight, labels = ctx.saved_tensors
        g_emb, g_w = loss_backward_op(
            emb,
            weight,
            labels,
            ctx.margin,
            ctx.row_margins,
            *ctx.head,
            ctx.reduction,
            g_loss,
            need_emb,
            need_weight,
        )
    return (g_emb if need_emb else None, g_w if need_weight else None) + (None,) * 9


torch.library.register_autograd(
    "arcface_rs::margin_loss", _loss_backward, setup_context=_loss_setup
)


@torch.library.custom_op(
    "arcface_rs::margin_logits", mutates_args=(), device_types="cpu", schema=_LOGITS_SCHEMA
)
def logits_op(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: list[float],
    row_margins: Tensor | None,
    sub_centers: int,
    interclass_filter: float | None,
) -> Tensor:
    dtype = compute_dtype(emb, weight)
    z = _core.margin_logits(
        _numpy(emb, dtype),
        _numpy(weight, dtype),
        labels.numpy(),
        core_margin(tuple(margin)),
        row_margins=_row_blocks(row_margins),
        sub_centers=sub_centers,
        interclass_filter=interclass_filter,
    )
    return torch.from_numpy(z)


@logits_op.register_fake
def _(emb, weight, labels, margin, row_margins, sub_centers, interclass_filter):
    classes = weight.shape[0] // sub_centers
    return emb.new_empty((emb.shape[0], classes), dtype=compute_dtype(emb, weight))


@torch.library.custom_op(
    "arcface_rs::margin_logits_backward",
    mutates_args=(),
    device_types="cpu",
    schema=_LOGITS_BACKWARD_SCHEMA,
)
def _logits_backward_op(
    grad: Tensor,
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: list[float],
    row_margins: Tensor | None,
    sub_centers: int,
    interclass_filter: float | None,
) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(emb, weight)
    g_emb, g_w = _core.margin_logits_backward(
        _numpy(grad, dtype),
        _numpy(emb, dtype),
        _numpy(weight, dtype),
        labels.numpy(),
        core_margin(tuple(margin)),
        row_margins=_row_blocks(row_margins),
        sub_centers=sub_centers,
        interclass_filter=interclass_filter,
    )
    return _grad_tensor(g_emb, emb), _grad_tensor(g_w, weight)


@_logits_backward_op.register_fake
def _(grad, emb, weight, labels, margin, row_margins, sub_centers, interclass_filter):
    return emb.new_empty(emb.shape), weight.new_empty(weight.shape)


def _logits_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    emb, weight, labels, margin, row_margins, sub_centers, interclass_filter = inputs
    ctx.margin, ctx.row_margins = margin, row_margins
    ctx.head = (sub_centers, interclass_filter)
    ctx.save_for_backward(emb, weight, labels)


def _logits_backward(ctx: Any, grad: Tensor):
    no_double_backward()
    emb, weight, labels = ctx.saved_tensors
    g_emb, g_w = _logits_backward_op(
        grad, emb, weight, labels, ctx.margin, ctx.row_margins, *ctx.head
    )
    return (g_emb, g_w) + (None,) * 5


torch.library.register_autograd(
    "arcface_rs::margin_logits", _logits_backward, setup_context=_logits_setup
)
