"""Margin objects: the target-logit function psi of each head, validated by the Rust core."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _core

__all__ = ["ArcFace", "CombinedMargin", "CosFace", "Margin", "SphereFace", "Softmax"]


class Margin:
    """Base class of the margins. Logits are ``s * c`` except the target: ``s * psi(c)``."""

    _params: tuple[str, ...] = ()
    _spec: _core.Margin
    _block: tuple[float, ...]

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._params)

    @property
    def scale(self) -> float | None:
        """The fixed logit scale ``s``, or None when logits scale by the feature norm."""
        return self._spec.scale

    def psi(self, cos: Any) -> np.ndarray:
        """Target logit before scaling, elementwise (float64)."""
        return self._spec.psi(np.asarray(cos, dtype=np.float64))

    def dpsi(self, cos: Any) -> np.ndarray:
        """d psi / d cos, elementwise (float64); finite for every cos in [-1, 1]."""
        return self._spec.dpsi(np.asarray(cos, dtype=np.float64))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._params)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._values())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one")

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if "_spec" in values:
            # the core's parameter block, kept as a tuple: torch.compile traces reading it
            # (it cannot trace a call into the native module)
            object.__setattr__(self, "_block", tuple(values["_spec"].encode()))


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


class Softmax(Margin):
    """Normalised softmax (no margin): psi(c) = c, logits ``s * c``.

    Parameters
    ----------
    s : float
        Logit scale, finite and > 0.
    """

    _params = ("s",)

    def __init__(self, s: float = 64.0) -> None:
        s = _real("s", s)
        self._set(s=s, _spec=_core.Margin.softmax(s))


class ArcFace(Margin):
    """Additive angular margin: psi = cos(theta + m).

    For theta > pi - m it falls back to ``c - max(m sin m, 1 - cos m)``: the ArcFace
    reference code's ``c - m sin m`` for every m below about 2.33, and a larger shift beyond,
    so psi stays non-increasing.

    Parameters
    ----------
    s : float
        Logit scale, finite and > 0.
    m : float
        Angular margin in radians, in [0, pi).
    easy_margin : bool
        Keep psi = c where c <= 0 (InsightFace's option).
    """

    _params = ("s", "m", "easy_margin")

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> None:
        s, m = _real("s", s), _real("m", m)
        easy_margin = bool(easy_margin)
        self._set(s=s, m=m, easy_margin=easy_margin, _spec=_core.Margin.arcface(s, m, easy_margin))


class CosFace(Margin):
    """Additive cosine margin: psi = cos(theta) - m.

    Parameters
    ----------
    s : float
        Logit scale, finite and > 0.
    m : float
        Cosine margin, finite and >= 0.
    """

    _params = ("s", "m")

    def __init__(self, s: float = 64.0, m: float = 0.35) -> None:
        s, m = _real("s", s), _real("m", m)
        self._set(s=s, m=m, _spec=_core.Margin.cosface(s, m))


class SphereFace(Margin):
    """Multiplicative angular margin (A-Softmax), integer m in 1..4.

    psi = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi), blended as
    (lambda_ c + psi) / (1 + lambda_). With ``s=None`` logits scale by the unnormalised
    feature norm ||x|| as in the original paper, else by ``s``.

    Parameters
    ----------
    m : int
        Angle multiplier in 1..4.
    s : float or None
        Logit scale, or None for the feature norm.
    lambda_ : float
        Blend weight >= 0 (0: pure psi).
    """

    _params = ("m", "s", "lambda_")

    def __init__(self, m: int = 4, s: float | None = None, lambda_: float = 0.0) -> None:
        if isinstance(m, bool) or not isinstance(m, numbers.Real):
            raise TypeError(f"m must be an integer in 1..4, got {type(m).__name__}")
        if not (math.isfinite(m) and float(m).is_integer() and 1 <= m <= 4):
            raise ValueError(f"m: must be an integer in 1..=4, got {m!r}")
        m = int(m)
        s = None if s is None else _real("s", s)
        lambda_ = _real("lambda_", lambda_)
        self._set(m=m, s=s, lambda_=lambda_, _spec=_core.Margin.sphereface(m, s, lambda_))


class CombinedMargin(Margin):
    """Combined margin of InsightFace: psi = cos(m1 theta + m2) - m3.

    Where m1 theta + m2 > pi, psi continues as ``c - m3 - k`` with slope 1 and
    ``k = max(m2 sin m2, 1 + cos theta*)``, which keeps psi non-increasing and equals ArcFace
    when m1 = 1, m3 = 0.

    Parameters
    ----------
    s : float
        Logit scale, finite and > 0.
    m1 : float
        Multiplicative angular margin (SphereFace's), > 0.
    m2 : float
        Additive angular margin (ArcFace's), in [0, pi).
    m3 : float
        Additive cosine margin (CosFace's), >= 0.
    """

    _params = ("s", "m1", "m2", "m3")

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> None:
        s, m1, m2, m3 = (_real(n, v) for n, v in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)))
        self._set(s=s, m1=m1, m2=m2, m3=m3, _spec=_core.Margin.combined(s, m1, m2, m3))
