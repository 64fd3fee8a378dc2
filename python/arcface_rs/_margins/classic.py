"""The fixed margins: Softmax, ArcFace, CosFace, SphereFace and the combined margin."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .. import _core
from .base import Margin, per_row, real, specs, straight_through_of


class Softmax(Margin):
    """Normalised softmax (no margin): psi(c) = c, logits ``s * c``.

    Parameters
    ----------
    s : float
        Logit scale, finite and > 0.
    """

    _params = ("s",)

    def __init__(self, s: float = 64.0) -> None:
        s = real("s", s)
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
    grad : {"exact", "straight_through"}
        ``exact`` (default): the gradient of psi. ``straight_through``: the margin shifts
        the target logit but its gradient is the plain logit's, dL/dc = s (p - onehot) for
        every column, as InsightFace's arcface_torch trains.

    A 1-D array ``m`` gives each row of the batch its own margin (same rules per row).
    """

    _params = ("s", "m", "easy_margin", "grad")

    def __init__(
        self,
        s: float = 64.0,
        m: float | Any = 0.5,
        easy_margin: bool = False,
        grad: str = "exact",
    ) -> None:
        s, m_rows = real("s", s), per_row("m", m)
        easy_margin, st = bool(easy_margin), straight_through_of(grad)

        def make(m: float) -> _core.Margin:
            return _core.Margin.arcface(s, m, easy_margin).with_straight_through(st)

        spec, blocks = specs(make, m=m_rows)
        self._set(s=s, m=m_rows, easy_margin=easy_margin, grad=grad, _row_blocks=blocks)
        self._set(_spec=spec)


class CosFace(Margin):
    """Additive cosine margin: psi = cos(theta) - m.

    Parameters
    ----------
    s : float
        Logit scale, finite and > 0.
    m : float or array_like
        Cosine margin, finite and >= 0; a 1-D array gives each row its own.
    """

    _params = ("s", "m")

    def __init__(self, s: float = 64.0, m: float | Any = 0.35) -> None:
        s, m_rows = real("s", s), per_row("m", m)
        spec, blocks = specs(lambda m: _core.Margin.cosface(s, m), m=m_rows)
        self._set(s=s, m=m_rows, _row_blocks=blocks)
        self._set(_spec=spec)


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
        s = None if s is None else real("s", s)
        lambda_ = real("lambda_", lambda_)
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
    grad : {"exact", "straight_through"}
        As for :class:`ArcFace`.

    Any of m1, m2, m3 may be a 1-D array of one value per row (the others broadcast).
    """

    _params = ("s", "m1", "m2", "m3", "grad")

    def __init__(
        self,
        s: float = 64.0,
        m1: float | Any = 1.0,
        m2: float | Any = 0.5,
        m3: float | Any = 0.0,
        grad: str = "exact",
    ) -> None:
        s, st = real("s", s), straight_through_of(grad)
        rows = {n: per_row(n, v) for n, v in (("m1", m1), ("m2", m2), ("m3", m3))}

        def make(m1: float, m2: float, m3: float) -> _core.Margin:
            return _core.Margin.combined(s, m1, m2, m3).with_straight_through(st)

        spec, blocks = specs(make, **rows)
        self._set(s=s, grad=grad, _row_blocks=blocks, **rows)
        self._set(_spec=spec)
