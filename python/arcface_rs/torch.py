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

import inspect
import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from . import _torch_cuda  # noqa: F401  (registers the CUDA kernels of the ops)
from ._cuda import cuda_available
from ._margins import (
    ArcFace,
    CombinedMargin,
    CosFace,
    Margin,
    Softmax,
    SphereFace,
)
from ._sharded import ShardedMarginHead, ddp_sum_hook, merge_shards, shard_range, split_weight
from ._torch_cuda import check_cuda_errors
from ._torch_ops import NATIVE, _compute_dtype, _encode, _logits_op, _loss_op, _rows_of
from ._torch_plain import _note_exact_on_cuda, _plain_logits, _plain_loss, _warn_cuda_once
from ._validate import grad_filter as check_grad_filter
from ._validate import interclass_filter as check_filter
from ._validate import reduction as check_reduction
from ._validate import sub_centers as check_sub_centers

__all__ = [
    "AdaFaceHead",
    "ArcFaceHead",
    "CenterLoss",
    "CombinedMarginHead",
    "CosFaceHead",
    "CurricularFaceHead",
    "ElasticFaceHead",
    "MagFaceHead",
    "MVSoftmaxHead",
    "MarginHead",
    "ShardedMarginHead",
    "SoftmaxHead",
    "SphereFaceHead",
    "TripletLoss",
    "check_cuda_errors",
    "ddp_sum_hook",
    "margin_logits",
    "margin_loss",
    "merge_shards",
    "shard_range",
    "split_weight",
]


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


def _fused_cuda(sub_centers: int) -> bool:
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
    labels = _check(emb, weight, labels)
    check_reduction(reduction)
    head = (check_sub_centers(sub_centers), check_filter(interclass_filter))
    grad_filter = check_grad_filter(grad_filter)
    _note_exact_on_cuda(grad_filter, emb)
    rows = _rows_of(margin, emb, weight, labels, head[0])
    if emb.device.type != "cpu" and not (emb.device.type == "cuda" and _fused_cuda(head[0])):
        _warn_cuda_once()
        loss = _plain_loss(emb, weight, labels, margin, reduction, rows, *head)
    else:
        loss = _loss(emb, weight, labels, margin, reduction, rows, head, grad_filter)
    margin._commit()  # accepted: running statistics and draws move on
    return loss


def _loss(
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
    block, _ = _encode(margin)
    grad = torch.is_grad_enabled()
    emb = _autocast_operand(emb, weight)
    loss, _, _ = _loss_op(
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


def _autocast_operand(emb: Tensor, weight: Tensor) -> Tensor:
    """Under ``torch.autocast("cuda")`` the fused CUDA head's GEMMs run in the autocast
    dtype, as ``F.linear``'s would: the (B, D) embeddings are cast here, in the graph, so
    that their gradient flows back through the cast; the float32 weight stays the master
    copy (the op rounds it one class tile at a time and returns a float32 gradient)."""
    if emb.device.type != "cuda" or emb.dtype != torch.float32 or weight.dtype != torch.float32:
        return emb
    try:
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
    except TypeError:  # torch < 2.4 spells them for CUDA only
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return emb.to(dtype) if enabled and dtype in (torch.bfloat16, torch.float16) else emb


def _floor(grad_filter: str | float | None, emb: Tensor, weight: Tensor) -> float | None:
    """The gradient filter's probability floor for the ops: "auto" is the compute dtype's
    eps/32; CUDA tensors get the exact gradient (the filter is in the CPU kernel)."""
    if grad_filter is None or emb.device.type != "cpu":
        return None
    if grad_filter == "auto":
        return torch.finfo(_compute_dtype(emb, weight)).eps / 32.0
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
    labels = _check(emb, weight, labels)
    head = (check_sub_centers(sub_centers), check_filter(interclass_filter))
    rows = _rows_of(margin, emb, weight, labels, head[0], step=False)
    if emb.device.type != "cpu":
        _warn_cuda_once()
        out = _plain_logits(emb, weight, labels, margin, rows, *head)
    else:
        block, _ = _encode(margin)
        out = _logits_op(emb, weight, labels, block, rows, *head)
    margin._commit()
    return out


# ---------------------------------------------------------------------------------------
# Modules


# The keywords every head takes after its margin's, with their defaults (written once).
HEAD_KEYWORDS: dict[str, Any] = {
    "reduction": "mean",
    "device": None,
    "dtype": None,
    "sub_centers": 1,
    "interclass_filter": None,
    "grad_filter": None,
}


class MarginHead(nn.Module):
    """A margin-softmax head owning the class centres ``weight`` (num_classes * sub_centers,
    embedding_size), initialised N(0, 0.01).

    ``ArcFaceHead`` and the other named heads are this head with their margin built from
    the margin class's own keywords (``ArcFaceHead(512, 1000, m=0.4)`` is
    ``MarginHead(512, 1000, ArcFace(m=0.4))``), taken positionally after
    ``num_classes`` too, then the keywords below.

    Parameters
    ----------
    embedding_size, num_classes : int
        The shape of ``weight`` (num_classes rows per centre).
    margin : Margin
        Any margin object of :mod:`arcface_rs` (ArcFace, CosFace, AdaFace, ...).
    reduction : {"mean", "sum", "none"}
        Over the rows whose label is not -1.
    device, dtype
        Of ``weight``.
    sub_centers : int
        Centres per class K: class j's centres are rows j*K .. j*K+K-1 of ``weight``.
    interclass_filter, grad_filter
        The inter-class filter and the gradient filter (see :func:`arcface_rs.margin_loss`).
    """

    margin: Margin

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin,
        *,
        reduction: str = "mean",
        device: Any = None,
        dtype: Any = None,
        sub_centers: int = 1,
        interclass_filter: float | None = None,
        grad_filter: str | float | None = None,
    ) -> None:
        super().__init__()
        _encode(margin)  # a TypeError for anything but a margin
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        embedding_size, num_classes = int(embedding_size), int(num_classes)
        check_reduction(reduction)
        self.embedding_size, self.num_classes, self.reduction = (
            embedding_size,
            num_classes,
            reduction,
        )
        self.sub_centers = check_sub_centers(sub_centers)
        self.interclass_filter = check_filter(interclass_filter)
        self.grad_filter = check_grad_filter(grad_filter)
        rows = num_classes * self.sub_centers
        self.weight = nn.Parameter(torch.empty((rows, embedding_size), device=device, dtype=dtype))
        self.reset_parameters()
        self.margin = margin

    def __init_subclass__(
        cls, margin: type[Margin] | None = None, schedule: dict[str, Any] | None = None, **kw
    ) -> None:
        """``class ArcFaceHead(MarginHead, margin=ArcFace)``: the head takes the margin
        class's keywords (its defaults, written there once) and ``schedule``'s extra keywords
        (handed to ``_set_up``) before :data:`HEAD_KEYWORDS`."""
        super().__init_subclass__(**kw)
        if margin is not None:
            cls.__init__ = _margin_keywords_init(margin, schedule or {})  # type: ignore[method-assign]

    def _set_up(self, **schedule: Any) -> None:
        """A named head's own state after the margin and ``weight`` exist (buffers)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, embedding_size) with ``labels`` (B,)."""
        return margin_loss(
            emb, self.weight, labels, self.margin, self.reduction, *self._head, self.grad_filter
        )

    def logits(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The (B, num_classes) margin logits."""
        return margin_logits(emb, self.weight, labels, self.margin, *self._head)

    @property
    def _head(self) -> tuple[int, float | None]:
        return self.sub_centers, self.interclass_filter

    def _loss_with_rows(self, emb: Tensor, labels: Tensor, rows: Tensor | None) -> Tensor:
        """The loss with this batch's per-row parameter blocks (heads whose margin keeps
        state as buffers build them in torch ops); ``labels`` already checked."""
        head = self._head
        _note_exact_on_cuda(self.grad_filter, emb)
        if emb.device.type != "cpu" and not (emb.device.type == "cuda" and _fused_cuda(head[0])):
            _warn_cuda_once()
            return _plain_loss(emb, self.weight, labels, self.margin, self.reduction, rows, *head)
        margin, reduction = self.margin, self.reduction
        return _loss(emb, self.weight, labels, margin, reduction, rows, head, self.grad_filter)

    def _logits_with_rows(self, emb: Tensor, labels: Tensor, rows: Tensor | None) -> Tensor:
        """The logits with this batch's per-row parameter blocks; ``labels`` already checked."""
        if emb.device.type != "cpu":
            _warn_cuda_once()
            return _plain_logits(emb, self.weight, labels, self.margin, rows, *self._head)
        block, _ = _encode(self.margin)
        return _logits_op(emb, self.weight, labels, block, rows, *self._head)

    def extra_repr(self) -> str:
        extra = f", sub_centers={self.sub_centers}" if self.sub_centers > 1 else ""
        if self.interclass_filter is not None:
            extra += f", interclass_filter={self.interclass_filter}"
        if self.grad_filter is not None:
            extra += f", grad_filter={self.grad_filter!r}"
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin={self.margin!r}, reduction={self.reduction!r}{extra}"
        )


def _margin_keywords_init(margin_type: type[Margin], schedule: dict[str, Any]) -> Any:
    """A named head's ``__init__(embedding_size, num_classes, <margin_type's keywords>,
    <schedule>, <HEAD_KEYWORDS>)``, positional or keyword, with its full signature (help()
    and inspect show every keyword and default)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    margin_params = [
        p.replace(kind=kind) for p in inspect.signature(margin_type).parameters.values()
    ]
    params = [
        inspect.Parameter("self", kind),
        inspect.Parameter("embedding_size", kind, annotation=int),
        inspect.Parameter("num_classes", kind, annotation=int),
        *margin_params,
        *(inspect.Parameter(name, kind, default=v) for name, v in schedule.items()),
        *(inspect.Parameter(name, kind, default=v) for name, v in HEAD_KEYWORDS.items()),
    ]
    signature = inspect.Signature(params, return_annotation=None)

    def __init__(self: MarginHead, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        margin = margin_type(**{p.name: given[p.name] for p in margin_params})
        head = {name: given[name] for name in HEAD_KEYWORDS}
        MarginHead.__init__(self, given["embedding_size"], given["num_classes"], margin, **head)
        self._set_up(**{name: given[name] for name in schedule})

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = (
        f"The head of :class:`arcface_rs.{margin_type.__name__}` (its keywords, then "
        ":class:`MarginHead`'s)."
    )
    return __init__


class ArcFaceHead(MarginHead, margin=ArcFace):
    """ArcFace: additive angular margin, target logit ``s cos(theta + m)``.

    Parameters
    ----------
    s, m, easy_margin, grad
        As for :class:`arcface_rs.ArcFace` (``grad="straight_through"``: arcface_torch's
        gradient).
    embedding_size, num_classes, **keywords
        As for :class:`MarginHead` (reduction, device, dtype, sub_centers,
        interclass_filter, grad_filter).
    """


class CosFaceHead(MarginHead, margin=CosFace):
    """CosFace: additive cosine margin, target logit ``s (cos theta - m)``.

    Parameters
    ----------
    s, m
        As for :class:`arcface_rs.CosFace`.
    embedding_size, num_classes, **keywords
        As for :class:`MarginHead` (reduction, device, dtype, sub_centers,
        interclass_filter, grad_filter).
    """


class CombinedMarginHead(MarginHead, margin=CombinedMargin):
    """Combined margin: target logit ``s (cos(m1 theta + m2) - m3)``.

    Parameters
    ----------
    s, m1, m2, m3, grad
        As for :class:`arcface_rs.CombinedMargin`.
    embedding_size, num_classes, **keywords
        As for :class:`MarginHead` (reduction, device, dtype, sub_centers,
        interclass_filter, grad_filter).
    """


class SoftmaxHead(MarginHead, margin=Softmax):
    """Normalised softmax (no margin): logits ``s cos theta``.

    Parameters
    ----------
    s
        As for :class:`arcface_rs.Softmax`.
    embedding_size, num_classes, **keywords
        As for :class:`MarginHead` (reduction, device, dtype, sub_centers,
        interclass_filter, grad_filter).
    """


class SphereFaceHead(
    MarginHead,
    margin=SphereFace,
    schedule={"anneal": False, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
):
    """SphereFace (A-Softmax), integer ``m`` in 1..4; ``s=None`` scales by ||x||.

    ``lambda_`` blends psi with cos: ``(lambda_ cos + psi) / (1 + lambda_)``. With
    ``anneal=True`` lambda follows ``max(lambda_min, base (1 + gamma it)^-power)`` over
    training steps; the step counter ``iteration`` is a buffer saved in the state_dict and
    advances on each forward call in training mode.

    Parameters
    ----------
    m, s, lambda_
        As for :class:`arcface_rs.SphereFace`.
    anneal, base, gamma, power, lambda_min
        The lambda schedule above (used when ``anneal=True``).
    embedding_size, num_classes, **keywords
        As for :class:`MarginHead` (reduction, device, dtype, sub_centers,
        interclass_filter, grad_filter).
    """

    iteration: Tensor

    def _set_up(  # type: ignore[override]
        self, anneal: bool, base: float, gamma: float, power: float, lambda_min: float
    ) -> None:
        for name, value in (("base", base), ("gamma", gamma), ("power", power)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(lambda_min) and lambda_min >= 0):
            raise ValueError(f"lambda_min must be a finite number >= 0, got {lambda_min!r}")
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
        """The margin in force: lambda_ from the schedule when annealing."""
        if not getattr(self, "anneal", False):
            return self._fixed
        return SphereFace(m=self._fixed.m, s=self._fixed.s, lambda_=self.current_lambda())

    @margin.setter
    def margin(self, value: SphereFace) -> None:
        self._fixed = value

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        loss = super().forward(emb, labels)
        if self.training and self.anneal:
            with torch.no_grad():
                self.iteration += 1
        return loss


from ._torch_adaptive import AdaFaceHead, ElasticFaceHead, MagFaceHead  # noqa: E402
from ._torch_center import CenterLoss  # noqa: E402
from ._torch_negatives import CurricularFaceHead, MVSoftmaxHead  # noqa: E402
from ._torch_triplet import TripletLoss  # noqa: E402
