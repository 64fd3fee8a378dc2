"""Argument checks shared by the NumPy API, the torch modules and the gallery: arrays,
labels, counts and reductions, each refused with an exception that names the argument."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

REDUCTIONS = ("mean", "sum", "none")

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def native(value: np.ndarray) -> np.ndarray:
    """The array in the machine's byte order (a big-endian array is converted, not refused)."""
    if value.dtype.byteorder not in ("=", "|") and not value.dtype.isnative:
        return value.astype(value.dtype.newbyteorder("="))
    return value


def floats(name: str, value: Any) -> np.ndarray:
    """A 2-D float32/float64 array, read through its strides (any memory order is fine)."""
    value = native(np.asarray(value))
    if value.dtype not in FLOATS:
        raise TypeError(f"{name} must have dtype float32 or float64, got {value.dtype}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {value.shape}")
    return value


def unit_rows(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row over its norm in float64, taken without overflow or underflow (the row is
    first scaled by its largest magnitude, so rows of norm 1e-300 or 1e300 come out exact),
    and whether it could be normalised: zero, NaN and inf rows give NaN, without a warning.
    """
    x = np.asarray(value, dtype=np.float64)
    peak = (
        np.max(np.abs(x), axis=-1, keepdims=True) if x.shape[-1] else np.zeros(x.shape[:-1] + (1,))
    )
    ok = np.isfinite(peak) & (peak > 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scaled = x / np.where(ok, peak, 1.0)
        norms = np.linalg.norm(scaled, axis=-1, keepdims=True)
        out = np.where(ok, scaled / np.where(ok, norms, 1.0), np.nan)
    return out, ok[..., 0]


def same_dtype(**arrays: np.ndarray) -> None:
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k}={v.dtype}" for k, v in arrays.items())
        raise TypeError(f"arrays must share one dtype, got {desc}; cast one of them first")


def labels(value: Any, name: str = "labels") -> np.ndarray:
    """A 1-D int64 array from any integer array (unsigned values must fit in int64)."""
    out = native(np.asarray(value))
    if out.ndim == 1 and out.size == 0 and out.dtype.kind == "f":
        out = out.astype(np.int64)  # an empty list arrives as float64
    if out.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {out.dtype}")
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {out.shape}")
    if out.dtype.kind == "u" and out.size and out.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: values exceed the int64 range")
    return out.astype(np.int64, copy=False)


INT64_MAX = int(np.iinfo(np.int64).max)


def count(name: str, value: Any) -> int:
    """A count the caller chose (``k``, a rank): an int >= 1 that fits in int64.

    The work is capped by the data's size and the padded output is checked against the
    memory available before anything is allocated (in the Rust core).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be at most 2**63 - 1, got {value}")
    return value


MAX_SUB_CENTERS = 255


def sub_centers(value: Any) -> int:
    """Centres per class K: an int in 1..=255."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"sub_centers must be an int, got {type(value).__name__}")
    if not 1 <= int(value) <= MAX_SUB_CENTERS:
        raise ValueError(f"sub_centers must be in 1..={MAX_SUB_CENTERS}, got {value}")
    return int(value)


def interclass_filter(value: Any) -> float | None:
    """None, or the cosine above which non-targets are filtered: a real in [-1, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"interclass_filter must be None or a float, got {type(value).__name__}")
    value = float(value)
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"interclass_filter must be None or a cosine in [-1, 1], got {value}")
    return value


def grad_filter(value: Any) -> str | float | None:
    """None (the exact gradient), "auto", or a probability in [0, 1)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"grad_filter must be None, 'auto' or a float, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"grad_filter must be None, 'auto' or a float, got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"grad_filter must be None, 'auto' or a probability in [0, 1), got {value}"
        )
    return value


def reduction(value: Any) -> str:
    """One of ``REDUCTIONS``."""
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {value!r}")
    return value
