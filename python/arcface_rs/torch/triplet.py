"""``arcface_rs.torch.TripletLoss``: the fused triplet loss as a ``torch.library`` custom op
(CPU tensors: the Rust kernel; other devices: the same math in torch ops). Re-exported by
``arcface_rs.torch``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _core
from .._triplet import check_arguments
from ._ops import is_exactly_one

__all__ = ["TripletLoss"]

_SCHEMA = (
    "(Tensor emb, Tensor labels, float margin, str mining, str distance, str reduction) "
    "-> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor emb, Tensor labels, float margin, str mining, str distance, Tensor upstream) -> Tensor"
)


def _numpy(emb: Tensor) -> np.ndarray:
    """float32/float64 as given (half precision is computed in float32)."""
    e = emb.detach()
    return (e if e.dtype in (torch.float32, torch.float64) else e.float()).numpy()


@torch.library.custom_op(
    "arcface_rs::triplet_loss", mutates_args=(), device_types="cpu", schema=_SCHEMA
)
def _triplet_op(
    emb: Tensor, labels: Tensor, margin: float, mining: str, distance: str, reduction: str
) -> tuple[Tensor, Tensor]:
    loss, per_anchor, grad, _, _ = _core.triplet_loss(
        _numpy(emb), labels.detach().numpy(), margin, mining, distance, reduction
    )
    out = (
        torch.from_numpy(per_anchor)
        if reduction == "none"
        else torch.tensor(loss, dtype=torch.float64)
    )
    return out.to(emb.dtype), torch.from_numpy(grad).to(emb.dtype)


@_triplet_op.register_fake
def _(emb, labels, margin, mining, distance, reduction):
    shape = (emb.shape[0],) if reduction == "none" else ()
    return emb.new_empty(shape), emb.new_empty(emb.shape)


@torch.library.custom_op(
    "arcface_rs::triplet_loss_backward",
    mutates_args=(),
    device_types="cpu",
    schema=_BACKWARD_SCHEMA,
)
def _triplet_backward_op(
    emb: Tensor, labels: Tensor, margin: float, mining: str, distance: str, upstream: Tensor
) -> Tensor:
    """The gradient of sum(upstream * per-anchor losses)."""
    weights = np.ascontiguousarray(upstream.detach().to(torch.float64).numpy())
    _, _, grad, _, _ = _core.triplet_loss(
        _numpy(emb), labels.detach().numpy(), margin, mining, distance, "none", weights
    )
    return torch.from_numpy(grad).to(emb.dtype)


@_triplet_backward_op.register_fake
def _(emb, labels, margin, mining, distance, upstream):
    return emb.new_empty(emb.shape)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    emb, labels, margin, mining, distance, reduction = inputs
    ctx.options = (margin, mining, distance, reduction)
    ctx.mark_non_differentiable(output[1])
    # no zero gradient materialised for the gradient output (a B×D fill per step)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(emb, labels, output[1])


def _backward(ctx: Any, grad_loss: Tensor | None, _grad_grad: Tensor | None):
    emb, labels, grad = ctx.saved_tensors
    margin, mining, distance, reduction = ctx.options
    if grad_loss is None:
        return None, *[None] * 5
    if reduction == "none":
        return _triplet_backward_op(emb, labels, margin, mining, distance, grad_loss), *[None] * 5
    if is_exactly_one(grad_loss):
        # loss.backward(): the forward's gradient as it is, no extra pass over B×D
        return grad, *[None] * 5
    return grad * grad_loss, *[None] * 5


torch.library.register_autograd("arcface_rs::triplet_loss", _backward, setup_context=_setup)


def plain_triplet_loss(
    emb: Tensor, labels: Tensor, margin: float, mining: str, distance: str, reduction: str
) -> Tensor:
    """The same loss in torch ops (what CUDA tensors run): anchors in chunks, so no more than
    64 × B × B triplet values exist at once."""
    x = F.normalize(emb.float() if emb.dtype not in (torch.float32, torch.float64) else emb)
    cosine = distance == "cosine"
    mat = x @ x.T if cosine else torch.cdist(x, x)
    y = labels.long()
    valid = y != -1
    same = (y[:, None] == y[None, :]) & valid[:, None] & valid[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    pos = same & ~eye
    neg = (y[:, None] != y[None, :]) & valid[:, None] & valid[None, :]
    per_anchor = torch.zeros(len(y), dtype=mat.dtype, device=mat.device)
    total, count, active = mat.new_zeros(()), mat.new_zeros(()), mat.new_zeros(())
    if mining == "batch_hard":
        inf = torch.full_like(mat, math.inf)
        if cosine:  # hardest positive: least similar; hardest negative: most similar
            ap = torch.where(pos, mat, inf).min(dim=1).values
            an = torch.where(neg, mat, -inf).max(dim=1).values
        else:  # hardest positive: farthest; hardest negative: closest
            ap = torch.where(pos, mat, -inf).max(dim=1).values
            an = torch.where(neg, mat, inf).min(dim=1).values
        has = pos.any(dim=1) & neg.any(dim=1)
        v = (an - ap if cosine else ap - an) + margin
        per_anchor = torch.where(has, v.clamp(min=0), torch.zeros_like(v))
        total, count = per_anchor.sum(), has.sum().to(mat.dtype)
        active = (per_anchor > 0).sum().to(mat.dtype)
    else:
        for lo in range(0, len(y), 64):
            hi = min(lo + 64, len(y))
            ap, an = mat[lo:hi, :, None], mat[lo:hi, None, :]
            keep = pos[lo:hi, :, None] & neg[lo:hi, None, :]
            gap = ap - an if cosine else an - ap
            if mining == "semi_hard":
                keep = keep & (gap > 0) & (gap <= margin)
            losses = torch.where(keep, (margin - gap).clamp(min=0), torch.zeros_like(gap))
            per_anchor = per_anchor.index_put((torch.arange(lo, hi, device=y.device),),
                                              losses.sum(dim=(1, 2)))  # fmt: skip
            total = total + losses.sum()
            count = count + keep.sum()
            active = active + (losses > 0).sum()
    if reduction == "none":
        return per_anchor.to(emb.dtype)
    if reduction == "sum":
        out = total
    elif reduction == "mean":
        out = torch.where(count > 0, total / count.clamp(min=1), total * 0)
    else:
        out = torch.where(active > 0, total / active.clamp(min=1), total * 0)
    return out.to(emb.dtype)


class TripletLoss(nn.Module):
    """Triplet loss with batch mining (see :func:`arcface_rs.triplet_loss`), differentiable
    in the embeddings: ``loss = TripletLoss(margin=0.2)(emb, labels)``.

    CPU tensors run the fused Rust kernel in a ``torch.library`` custom op (with a fake
    implementation, so ``torch.compile`` keeps one graph); other devices run the same math
    in torch ops. float16/bfloat16 are computed in float32.

    Parameters
    ----------
    margin : float
        The margin, >= 0.
    mining : {"batch_hard", "semi_hard", "all"}
        As for :func:`arcface_rs.triplet_loss`.
    distance : {"cosine", "euclidean"}
        As for :func:`arcface_rs.triplet_loss`.
    reduction : {"mean", "mean_nonzero", "sum", "none"}
        As for :func:`arcface_rs.triplet_loss`.
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        distance: str = "cosine",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.margin = check_arguments(margin, mining, distance, reduction)
        self.mining, self.distance, self.reduction = mining, distance, reduction

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, D) with integer ``labels`` (B,); -1 rows take no part."""
        for name, t in (("emb", emb), ("labels", labels)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not emb.is_floating_point():
            raise TypeError(f"emb must be a floating-point tensor, got {emb.dtype}")
        if emb.dim() != 2:
            raise ValueError(f"emb must be 2-D (batch, embedding_size), got {tuple(emb.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != (emb.shape[0],) or labels.device != emb.device:
            raise ValueError(
                f"labels must be ({emb.shape[0]},) on {emb.device}, got {tuple(labels.shape)} "
                f"on {labels.device}"
            )
        options = (self.margin, self.mining, self.distance, self.reduction)
        if emb.device.type != "cpu":
            return plain_triplet_loss(emb, labels, *options)
        loss, _ = _triplet_op(emb, labels.long(), *options)
        return loss

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}"
        )
