"""The margin-softmax heads: :class:`MarginHead` (any margin) and the named heads built
from a margin class's keywords. Their work is :mod:`arcface_rs.torch.functional`'s."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from .._margins import ArcFace, CombinedMargin, CosFace, Margin, Softmax, SphereFace
from .._validate import grad_filter as check_grad_filter
from .._validate import interclass_filter as check_filter
from .._validate import reduction as check_reduction
from .._validate import sub_centers as check_sub_centers
from ._ops import logits_op
from ._plain import note_exact_on_cuda, plain_logits, plain_loss, warn_cuda_once
from ._rows import encode
from .functional import fused_cuda, fused_loss, margin_logits, margin_loss

__all__ = [
    "HEAD_KEYWORDS",
    "ArcFaceHead",
    "CombinedMarginHead",
    "CosFaceHead",
    "MarginHead",
    "SoftmaxHead",
    "SphereFaceHead",
]


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
        encode(margin)  # a TypeError for anything but a margin
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
        note_exact_on_cuda(self.grad_filter, emb)
        if emb.device.type != "cpu" and not (emb.device.type == "cuda" and fused_cuda(head[0])):
            warn_cuda_once()
            return plain_loss(emb, self.weight, labels, self.margin, self.reduction, rows, *head)
        margin, reduction = self.margin, self.reduction
        return fused_loss(emb, self.weight, labels, margin, reduction, rows, head, self.grad_filter)

    def _logits_with_rows(self, emb: Tensor, labels: Tensor, rows: Tensor | None) -> Tensor:
        """The logits with this batch's per-row parameter blocks; ``labels`` already checked."""
        if emb.device.type != "cpu":
            warn_cuda_once()
            return plain_logits(emb, self.weight, labels, self.margin, rows, *self._head)
        block, _ = encode(self.margin)
        return logits_op(emb, self.weight, labels, block, rows, *self._head)

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
