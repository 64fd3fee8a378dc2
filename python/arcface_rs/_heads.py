"""NumPy API of the heads: argument checks here, the work in the Rust core."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _core
from ._margins import Margin
from ._validate import floats as _floats
from ._validate import labels as _labels
from ._validate import reduction as _reduction
from ._validate import same_dtype as _same_dtype

__all__ = [
    "apply_margin",
    "apply_margin_backward",
    "margin_logits",
    "margin_logits_backward",
    "margin_loss",
]


def _margin(value: Any) -> _core.Margin:
    if not isinstance(value, Margin):
        raise TypeError(
            "margin must be ArcFace, CosFace, SphereFace, CombinedMargin or Softmax, "
            f"got {type(value).__name__}"
        )
    return value._spec


def margin_logits(emb: Any, weight: Any, labels: Any, margin: Margin) -> np.ndarray:
    """(B, C) logits: ``s * cos`` with ``s * psi(cos)`` at each row's label (-1: no margin).

    ``emb`` is (B, D), ``weight`` (C, D) with one row per class centre; both are
    L2-normalised inside. The output has the inputs' dtype.
    """
    emb, weight = _floats("emb", emb), _floats("weight", weight)
    _same_dtype(emb=emb, weight=weight)
    return _core.margin_logits(emb, weight, _labels(labels), _margin(margin))


def margin_logits_backward(
    grad_logits: Any, emb: Any, weight: Any, labels: Any, margin: Margin
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(grad_emb, grad_weight)`` of any loss given dL/dlogits of margin_logits."""
    grad_logits = _floats("grad_logits", grad_logits)
    emb, weight = _floats("emb", emb), _floats("weight", weight)
    _same_dtype(grad_logits=grad_logits, emb=emb, weight=weight)
    return _core.margin_logits_backward(grad_logits, emb, weight, _labels(labels), _margin(margin))


def margin_loss(
    emb: Any,
    weight: Any,
    labels: Any,
    margin: Margin,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> tuple[np.floating | np.ndarray, np.ndarray, np.ndarray]:
    """Fused softmax cross-entropy of the margin logits: ``(loss, grad_emb, grad_weight)``.

    Never holds the whole (B, C) logits. Rows labelled -1 add no loss and get zero
    gradient; ``mean`` divides by the rows that are not ignored (0 if all are).
    ``reduction="none"`` returns the per-row losses, with the gradients of their sum.
    The loss is a NumPy scalar (or array) of the inputs' dtype, computed in float64.
    """
    emb, weight = _floats("emb", emb), _floats("weight", weight)
    _same_dtype(emb=emb, weight=weight)
    _reduction(reduction)
    loss, rows, g_emb, g_w = _core.margin_loss(
        emb, weight, _labels(labels), _margin(margin), reduction
    )
    out = rows.astype(emb.dtype) if reduction == "none" else emb.dtype.type(loss)
    return out, g_emb, g_w


def apply_margin(cos: Any, labels: Any, margin: Margin) -> np.ndarray:
    """Margin on a (B, C) cosine matrix from any GEMM: ``s * cos``, ``s * psi`` on targets.

    Cosines may overshoot [-1, 1] by 1e-3 (rounding) and are clamped; SphereFace needs a
    fixed ``s`` here because a cosine matrix carries no feature norm.
    """
    cos = _floats("cos", cos)
    return _core.apply_margin(cos, _labels(labels), _margin(margin))


def apply_margin_backward(grad_logits: Any, cos: Any, labels: Any, margin: Margin) -> np.ndarray:
    """dL/dcos from dL/dlogits of :func:`apply_margin`."""
    grad_logits, cos = _floats("grad_logits", grad_logits), _floats("cos", cos)
    _same_dtype(grad_logits=grad_logits, cos=cos)
    return _core.apply_margin_backward(grad_logits, cos, _labels(labels), _margin(margin))
