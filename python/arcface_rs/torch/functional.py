"""The functional API of :mod:`arcface_rs.torch`: ``margin_loss``, ``margin_logits`` and the
input checks the heads share. Each call routes to the fused ops (``_ops``; CUDA tensors to
their CUDA kernels, ``_cuda``) or, where those cannot run, to plain PyTorch (``_plain``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._cuda import cuda_available
from .._margins import Margin
from .._validate import grad_filter as check_grad_filter
from .._validate import interclass_filter as check_filter
from .._validate import reduction as check_reduction
from .._validate import sub_centers as check_sub_centers
from ._cuda import autocast_operand  # (importing _cuda registers the ops' CUDA kernels)
from ._ops import NATIVE, compute_dtype, logits_op, loss_op
from ._plain import note_exact_on_cuda, plain_logits, plain_loss, warn_cuda_once
from ._rows import encode, rows_of

__all__ = ["check_inputs", "fused_cuda", "fused_loss", "margin_logits", "margin_loss"]


def check_inputs(emb: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    for name, t in (("emb", emb), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not emb.is_floating_point():
        raise TypeError(f"emb must be a floating-point tensor, got {emb.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if emb.dtype in NATIVE and weight.dtype in NATIVE and emb.dtype != weight.dtype:
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


def fused_cuda(sub_centers: int) -> bool:
    """Whether CUDA tensors can take the fused CUDA kernels (else the plain path): they have
    every margin, the filter and sub-centres, so only a build or a machine without CUDA
    sends them to the plain path."""
    return sub_centers >= 1 and cuda_available()


def margin_loss(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    reduction: str = "mean",
    sub_centers: int = 1,
    interclass_filter: float | None = None,
    grad_filter: str | float | None = None,
) -> Tensor:
    """Fused margin-softmax cross-entropy, differentiable in ``emb`` and ``weight``.

    Parameters
    ----------
    emb : torch.Tensor
        (B, D) embeddings (float32/float64). On CUDA, bfloat16/float16 inputs or
        ``torch.autocast("cuda")`` run the GEMMs in 16 bits on tensor cores (row statistics
        and a float32 weight's gradient stay float32), and float32 ones use TF32 when
        ``torch.backends.cuda.matmul.allow_tf32`` is set; the CPU computes half precision
        in float32. Bad inputs met on the GPU raise at the next call (see
        :func:`check_cuda_errors`).
    weight : torch.Tensor
        (C, D) class centres, on the same device.
    labels : torch.Tensor
        (B,) integer labels; -1 rows are ignored.
    margin : Margin
        The head's margin object.
    reduction : {"mean", "sum", "none"}
        Over the rows that are not ignored.
    sub_centers, interclass_filter, grad_filter
        As for :func:`arcface_rs.margin_loss` (weight (C*K, D) for K sub-centres). The
        gradient filter applies to the CPU kernel; CUDA tensors get the exact gradient.

    Returns
    -------
    torch.Tensor
        The loss (a scalar, or (B,) for ``none``). Double backward is refused.
    """
    labels = check_inputs(emb, weight, labels)
    check_reduction(reduction)
    head = (check_sub_centers(sub_centers), check_filter(interclass_filter))
    grad_filter = check_grad_filter(grad_filter)
    note_exact_on_cuda(grad_filter, emb)
    rows = rows_of(margin, emb, weight, labels, head[0])
    if emb.device.type != "cpu" and not (emb.device.type == "cuda" and fused_cuda(head[0])):
        warn_cuda_once()
        loss = plain_loss(emb, weight, labels, margin, reduction, rows, *head)
    else:
        loss = fused_loss(emb, weight, labels, margin, reduction, rows, head, grad_filter)
    margin.commit()  # accepted: running statistics and draws move on
    return loss


def fused_loss(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    reduction: str,
    row_blocks: Tensor | None,
    head: tuple[int, float | None] = (1, None),
    grad_filter: str | float | None = None,
) -> Tensor:
    """The fused loss op with checked inputs and the batch's per-row blocks (if any);
    ``head``: (sub_centers, interclass_filter); ``grad_filter`` as checked."""
    block, _ = encode(margin)
    grad = torch.is_grad_enabled()
    emb = autocast_operand(emb, weight)
    loss, _, _ = loss_op(
        emb,
        weight,
        labels,
        block,
        row_blocks,
        *head,
        _floor(grad_filter, emb, weight),
        reduction,
        grad and emb.requires_grad,
        grad and weight.requires_grad,
    )
    return loss


def _floor(grad_filter: str | float | None, emb: Tensor, weight: Tensor) -> float | None:
    """The gradient filter's probability floor for the ops: "auto" is the compute dtype's
    eps/32; CUDA tensors get the exact gradient (the filter is in the CPU kernel)."""
    if grad_filter is None or emb.device.type != "cpu":
        return None
    if grad_filter == "auto":
        return torch.finfo(compute_dtype(emb, weight)).eps / 32.0
    return float(grad_filter)


def margin_logits(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
) -> Tensor:
    """The (B, C) margin logits, differentiable.

    Parameters
    ----------
    emb, weight, labels, margin, sub_centers, interclass_filter
        As for :func:`margin_loss`.

    Returns
    -------
    torch.Tensor
        ``s * cos`` with ``s * psi(cos)`` on each row's label (and the margin's non-target
        rule, the filter and the sub-centre max).
    """
    labels = check_inputs(emb, weight, labels)
    head = (check_sub_centers(sub_centers), check_filter(interclass_filter))
    rows = rows_of(margin, emb, weight, labels, head[0], step=False)
    if emb.device.type != "cpu":
        warn_cuda_once()
        out = plain_logits(emb, weight, labels, margin, rows, *head)
    else:
        block, _ = encode(margin)
        out = logits_op(emb, weight, labels, block, rows, *head)
    margin.commit()
    return out
