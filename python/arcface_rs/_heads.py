"""NumPy API of the heads: argument checks here, the work in the Rust core."""

from __future__ import annotations

import numbers
from typing import Any, Literal

import numpy as np

from . import _core
from ._margins import Margin

__all__ = [
    "apply_margin",
    "apply_margin_backward",
    "margin_logits",
    "margin_logits_backward",
    "margin_loss",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _native(value: np.ndarray) -> np.ndarray:
    """The array in the machine's byte order (a big-endian array is converted, not refused)."""
    if value.dtype.byteorder not in ("=", "|") and not value.dtype.isnative:
        return value.astype(value.dtype.newbyteorder("="))
    return value


def _floats(name: str, value: Any) -> np.ndarray:
    """A 2-D float32/float64 array, read through its strides (any memory order is fine)."""
    value = _native(np.asarray(value))
    if value.dtype not in _FLOATS:
        raise TypeError(f"{name} must have dtype float32 or float64, got {value.dtype}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {value.shape}")
    return value


def _same_dtype(**arrays: np.ndarray) -> None:
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k}={v.dtype}" for k, v in arrays.items())
        raise TypeError(f"arrays must share one dtype, got {desc}; cast one of them first")


def _labels(value: Any, name: str = "labels") -> np.ndarray:
    """A 1-D int64 array from any integer array (unsigned values must fit in int64)."""
    labels = _native(np.asarray(value))
    if labels.ndim == 1 and labels.size == 0 and labels.dtype.kind == "f":
        labels = labels.astype(np.int64)  # an empty list arrives as float64
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: values exceed the int64 range")
    return labels.astype(np.int64, copy=False)


_INT64_MAX = int(np.iinfo(np.int64).max)


def _count(name: str, value: Any) -> int:
    """A count the caller chose (``k``, a rank): an int >= 1 that fits in int64.

    The work is capped by the data's size and the padded output is checked against the
    memory available before anything is allocated (in the Rust core).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > _INT64_MAX:
        raise ValueError(f"{name} must be at most 2**63 - 1, got {value}")
    return value


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
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
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
