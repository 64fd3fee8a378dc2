"""Margin objects: the target-logit function psi of each head, validated by the Rust core."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _core

__all__ = [
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "MagFace",
    "MVSoftmax",
    "Margin",
    "SphereFace",
    "Softmax",
]

_GRADS = ("exact", "straight_through")
#: kind codes of the margins that re-weight non-target logits (CurricularFace, MV-Softmax)
KINDS_WITH_HARD_NEGATIVES = (
    _core.MARGIN_KINDS["curricularface"],
    _core.MARGIN_KINDS["mvsoftmax"],
)


class Margin:
    """Base class of the margins. Logits are ``s * c`` except the target: ``s * psi(c)``."""

    _params: tuple[str, ...] = ()
    _spec: _core.Margin
    _block: tuple[float, ...]
    #: (B, MARGIN_PARAMS) parameter blocks when the margin has one value per row, else None
    _row_blocks: np.ndarray | None = None

    @property
    def block(self) -> tuple[float, ...]:
        """The margin's parameter block ``[kind, s, p0, p1, ...]`` (the core's
        ``Margin.encode()``): what the fused ops, the CUDA kernels and a sharded head's
        configuration check read. Per-row margins hold their rows elsewhere."""
        return self._block

    def _values(self) -> tuple[Any, ...]:
        values = (getattr(self, name) for name in self._params)
        return tuple(tuple(v.tolist()) if isinstance(v, np.ndarray) else v for v in values)

    def _rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        """The per-row parameter blocks of one call, or None for one margin for all rows.

        ``norms()`` and ``target_cos()`` return the batch's (B,) float64 feature norms and
        target cosines (NaN for ignored rows), computed only when a margin asks for them.
        Margins with running state (AdaFace, CurricularFace) compute the state this call
        moves them to when ``step`` (a loss call in training) and use it; per-sample draws
        (ElasticFace) are made here. Nothing changes yet: the new state waits in
        ``_pending`` until the caller's work has been accepted and it calls ``_commit()``,
        so a refused call leaves the margin as it was."""
        return self._row_blocks

    def _commit(self) -> None:
        """Applies the state of the last ``_rows`` call (see there); margins without state
        have none."""

    def _rows_again(self) -> np.ndarray | None:
        """The blocks of the last accepted ``_rows`` call, for a backward of that call."""
        return getattr(self, "_last_rows", self._row_blocks)

    @property
    def scale(self) -> float | None:
        """The fixed logit scale ``s``, or None when logits scale by the feature norm."""
        return self._spec.scale

    def psi(self, cos: Any, norm: float | None = None) -> np.ndarray:
        """Target logit before scaling, elementwise (float64).

        With one margin per row, ``cos`` has one leading entry per row. ``norm`` is the
        feature norm for margins that read it (MagFace)."""
        return self._eval("psi", cos, norm)

    def dpsi(self, cos: Any, norm: float | None = None) -> np.ndarray:
        """d psi / d cos, elementwise (float64); finite for every cos in [-1, 1]."""
        return self._eval("dpsi", cos, norm)

    def _eval(self, what: str, cos: Any, norm: float | None) -> np.ndarray:
        cos = np.asarray(cos, dtype=np.float64)
        if self._row_blocks is None:
            return getattr(self._spec, what)(cos, norm)
        if cos.ndim == 0 or cos.shape[0] != len(self._row_blocks):
            raise ValueError(
                f"cos: this margin has {len(self._row_blocks)} per-row values, so cos needs "
                f"one leading entry per row, got shape {cos.shape}"
            )
        rows = [_core.Margin.decode(list(b)) for b in self._row_blocks]
        return np.stack(
            [getattr(r, what)(np.ascontiguousarray(c), norm) for r, c in zip(rows, cos)]
        )

    def __repr__(self) -> str:
        shown = [n for n in self._params if not (n == "grad" and self.grad == "exact")]  # type: ignore[attr-defined]
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
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


def _per_row(name: str, value: Any) -> float | np.ndarray:
    """A float, or a read-only 1-D float64 array of one value per row."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number or a 1-D array, got {type(value).__name__}")
    arr = np.array(value, dtype=np.float64)
    if arr.ndim == 0:
        return float(arr)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{name}: must be a float or a 1-D array of one value per row, got shape {arr.shape}"
        )
    arr.flags.writeable = False
    return arr


def _grad(value: Any) -> bool:
    if value not in _GRADS:
        raise ValueError(f"grad: must be 'exact' or 'straight_through', got {value!r}")
    return value == "straight_through"


def _specs(make: Any, **values: float | np.ndarray) -> tuple[_core.Margin, np.ndarray | None]:
    """The core margin of scalar values, or of each row when any value is an array: the
    first row's margin (for kind and scale) and every row's parameter block."""
    if not any(isinstance(v, np.ndarray) for v in values.values()):
        return make(**values), None
    try:
        arrays = np.broadcast_arrays(*(np.asarray(v) for v in values.values()))
    except ValueError:
        shapes = {k: np.shape(v) for k, v in values.items()}
        raise ValueError(f"per-row margin values must have one length, got {shapes}") from None
    rows = [make(**dict(zip(values, row))) for row in zip(*(a.tolist() for a in arrays))]
    blocks = np.array([r.encode() for r in rows], dtype=np.float64)
    blocks.flags.writeable = False
    return rows[0], blocks


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
        s, m_rows = _real("s", s), _per_row("m", m)
        easy_margin, st = bool(easy_margin), _grad(grad)

        def make(m: float) -> _core.Margin:
            return _core.Margin.arcface(s, m, easy_margin).with_straight_through(st)

        spec, blocks = _specs(make, m=m_rows)
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
        s, m_rows = _real("s", s), _per_row("m", m)
        spec, blocks = _specs(lambda m: _core.Margin.cosface(s, m), m=m_rows)
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
        s, st = _real("s", s), _grad(grad)
        rows = {n: _per_row(n, v) for n, v in (("m1", m1), ("m2", m2), ("m3", m3))}

        def make(m1: float, m2: float, m3: float) -> _core.Margin:
            return _core.Margin.combined(s, m1, m2, m3).with_straight_through(st)

        spec, blocks = _specs(make, **rows)
        self._set(s=s, grad=grad, _row_blocks=blocks, **rows)
        self._set(_spec=spec)


class _StatefulMargin(Margin):
    """A margin whose calls change it (draws, running statistics): equal only to itself.

    Pickles and copies carry the whole state (``training``, running statistics, the random
    generator's position), so a copy continues exactly where the original stands."""

    #: attributes beyond the constructor's arguments that a copy carries
    _state: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return other is self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._values(), {n: getattr(self, n) for n in self._state})

    def _stage(self, blocks: np.ndarray | None, **state: Any) -> np.ndarray | None:
        """Keeps ``state`` (and ``blocks`` for ``_rows_again``) for ``_commit``."""
        object.__setattr__(self, "_pending", {"_last_rows": blocks, **state})
        return blocks

    def _commit(self) -> None:
        pending = self.__dict__.get("_pending")
        if not pending:
            return
        object.__setattr__(self, "_pending", None)
        for name, value in pending.items():
            if name.startswith("_"):
                object.__setattr__(self, name, value)
            else:
                setattr(self, name, value)  # validated as any assignment is

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name.startswith("_"):
                object.__setattr__(self, name, value)
            else:
                setattr(self, name, value)


class ElasticFace(_StatefulMargin):
    """ElasticFace: ArcFace (``kind="arc"``) or CosFace (``kind="cos"``) with a margin drawn
    per row and per call, m_i ~ N(m, std).

    With ``plus=True`` (ElasticFace+) the draws are sorted against the rows' target cosines:
    the row closest to its class centre (largest cosine) gets the smallest draw, the hardest
    row the largest. Draws come from ``numpy.random.default_rng(seed)``: the same seed gives
    the same sequence of calls. Draws are clipped to the margin's valid range ([0, pi) for
    arc, >= 0 for cos).

    Parameters
    ----------
    s : float
        Logit scale.
    m : float
        Mean margin.
    std : float
        Standard deviation of the draws, >= 0.
    kind : {"arc", "cos"}
        Angular (ArcFace) or cosine (CosFace) margin.
    plus : bool
        ElasticFace+: draws assigned by the target cosines.
    seed : int or None
        Seed of the draws.

    Notes
    -----
    Every accepted call (loss or logits) draws anew; a refused call takes no draws.
    ``rng_state`` is the generator's position: pickles and copies carry it (a copy draws
    what the original would), and ``ElasticFaceHead`` saves it in its state_dict.
    """

    _params = ("s", "m", "std", "kind", "plus", "seed")

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.0125,
        kind: str = "arc",
        plus: bool = False,
        seed: int | None = None,
    ) -> None:
        s, m, std = _real("s", s), _real("m", m), _real("std", std)
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind: must be 'arc' or 'cos', got {kind!r}")
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std: must be a finite number >= 0, got {std}")
        spec = _core.Margin.arcface(s, m, False) if kind == "arc" else _core.Margin.cosface(s, m)
        self._set(s=s, m=m, std=std, kind=kind, plus=bool(plus), seed=seed)
        self._set(_rng=np.random.default_rng(seed), _spec=spec)

    _state = ("rng_state",)

    @property
    def rng_state(self) -> dict[str, Any]:
        """The position of the draws (``numpy.random.Generator.bit_generator.state``):
        saved with a checkpoint and assigned back, a resumed run continues the sequence."""
        return self._rng.bit_generator.state

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "rng_state":
            super().__setattr__(name, value)  # refused: the parameters are fixed
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = value
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"rng_state: not a NumPy PCG64 generator state ({e})") from None
        object.__setattr__(self, "_rng", rng)

    def _rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        n = len(norms())
        # drawn from a copy of the generator: it moves on only when the call is accepted
        rng = np.random.default_rng()
        rng.bit_generator.state = self._rng.bit_generator.state
        draws = rng.normal(self.m, self.std, size=n)
        upper = math.pi - 1e-9 if self.kind == "arc" else np.inf
        draws = np.clip(draws, 0.0, upper)
        if self.plus:
            cos = np.nan_to_num(target_cos(), nan=0.0)
            order = np.argsort(-cos, kind="stable")  # closest to its centre first
            ranked = np.empty(n)
            ranked[order] = np.sort(draws)
            draws = ranked
        blocks = np.tile(np.asarray(self._block, dtype=np.float64), (n, 1))
        blocks[:, 2] = draws
        return self._stage(blocks, rng_state=rng.bit_generator.state)


class AdaFace(_StatefulMargin):
    """AdaFace (CVPR 2022): a margin that adapts to image quality through the feature norm.

    With n_i = clip(||x_i||, 1e-3, 100) (no gradient), running statistics updated from the
    batch before use while ``training``: ``batch_mean <- t_alpha mean(n) + (1 - t_alpha)
    batch_mean``, ``batch_std`` likewise from the unbiased std; the margin scaler
    z_i = clip(h (n_i - batch_mean) / (batch_std + 1e-3), -1, 1); cosines clamped to
    1 -+ 1e-3 and the target logit s (cos(clip(theta - m z_i, 1e-3, pi - 1e-3)) - (m + m z_i)).

    Parameters
    ----------
    s : float
        Logit scale.
    m : float
        Margin, in [0, pi/2).
    h : float
        Scaler concentration.
    t_alpha : float
        Momentum of the running statistics, in [0, 1].
    batch_mean, batch_std : float
        Initial running statistics (the attributes): batch_mean finite, batch_std finite
        and >= 0, checked here and on every assignment.

    Notes
    -----
    The statistics move only in loss calls (:func:`arcface_rs.margin_loss`, a head's
    forward) while ``training`` is True, and only once the call has been accepted: a refused
    call (an empty batch, a NaN row, a bad label) leaves them as they were. Logits calls
    (:func:`arcface_rs.margin_logits`, a head's ``.logits()``) use them unchanged. Pickles
    and copies carry the statistics and ``training``.
    """

    _params = ("s", "m", "h", "t_alpha")

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        batch_mean: float = 20.0,
        batch_std: float = 100.0,
    ) -> None:
        s, m, h = _real("s", s), _real("m", m), _real("h", h)
        t_alpha = _real("t_alpha", t_alpha)
        if not (0.0 <= t_alpha <= 1.0):
            raise ValueError(f"t_alpha: must be in [0, 1], got {t_alpha}")
        if not (math.isfinite(h) and h >= 0):
            raise ValueError(f"h: must be a finite number >= 0, got {h}")
        self._set(s=s, m=m, h=h, t_alpha=t_alpha, _spec=_core.Margin.adaface(s, m, 0.0))
        self.batch_mean = batch_mean
        self.batch_std = batch_std
        self.training = True

    _state = ("batch_mean", "batch_std", "training")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "batch_mean":
            value = _real(name, value)
            if not math.isfinite(value):
                raise ValueError(f"batch_mean: must be finite, got {value}")
        elif name == "batch_std":
            value = _real(name, value)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"batch_std: must be a finite number >= 0, got {value}")
        elif name == "training":
            value = bool(value)
        else:
            raise AttributeError(f"AdaFace.{name} is fixed; build a new one")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"AdaFace(s={self.s!r}, m={self.m!r}, h={self.h!r}, t_alpha={self.t_alpha!r}, "
            f"batch_mean={self.batch_mean!r}, batch_std={self.batch_std!r})"
        )

    def margin_scaler(self, norms: Any) -> np.ndarray:
        """z_i for feature norms ``norms`` with the current statistics (no update)."""
        n = np.clip(np.asarray(norms, dtype=np.float64), 1e-3, 100.0)
        return np.clip(self.h * (n - self.batch_mean) / (self.batch_std + 1e-3), -1.0, 1.0)

    def _rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        n = np.clip(np.asarray(norms(), dtype=np.float64), 1e-3, 100.0)
        mean, std = self.batch_mean, self.batch_std
        state = {}
        if self.training and step and n.size and np.isfinite(n).all():
            # (a batch the core refuses, empty or with a NaN row, moves nothing: the update
            # is kept for _commit, which runs only once the call is accepted)
            row_std = float(n.std(ddof=1)) if n.size > 1 else 0.0
            a = self.t_alpha
            mean = a * float(n.mean()) + (1.0 - a) * mean
            std = a * row_std + (1.0 - a) * std
            state = {"batch_mean": mean, "batch_std": std}
        blocks = np.tile(np.asarray(self._block, dtype=np.float64), (n.size, 1))
        with np.errstate(invalid="ignore"):
            blocks[:, 3] = np.clip(self.h * (n - mean) / (std + 1e-3), -1.0, 1.0)
        return self._stage(blocks, **state)


class MagFace(Margin):
    """MagFace (CVPR 2021): ArcFace whose margin grows with the feature norm, plus a
    regulariser that pulls the norm up.

    a_i = clip(||x_i||, l_a, u_a) (the gradient flows through a_i), m(a) = l_m + (u_m - l_m)
    (a - l_a) / (u_a - l_a), target logit s cos(theta + m(a_i)) (``easy_margin`` as ArcFace's),
    and each row's loss gains lambda_g g(a_i), g(a) = a / u_a^2 + 1 / a.

    Parameters
    ----------
    s : float
        Logit scale.
    l_a, u_a : float
        The norm range, 0 < l_a < u_a.
    l_m, u_m : float
        The margins at l_a and u_a, in [0, pi).
    lambda_g : float
        Weight of the regulariser, >= 0.
    easy_margin : bool
        psi = c where c <= 0 (the MagFace reference's default).
    """

    _params = ("s", "l_a", "u_a", "l_m", "u_m", "lambda_g", "easy_margin")

    def __init__(
        self,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
    ) -> None:
        vals = {
            n: _real(n, v)
            for n, v in (
                ("s", s),
                ("l_a", l_a),
                ("u_a", u_a),
                ("l_m", l_m),
                ("u_m", u_m),
                ("lambda_g", lambda_g),
            )
        }
        easy = bool(easy_margin)
        spec = _core.Margin.magface(
            vals["s"], vals["l_a"], vals["u_a"], vals["l_m"], vals["u_m"], easy, vals["lambda_g"]
        )
        self._set(easy_margin=easy, **vals)
        self._set(_spec=spec)

    def margin_of(self, norm: Any) -> np.ndarray:
        """m(a) for feature norms ``norm``."""
        a = np.clip(np.asarray(norm, dtype=np.float64), self.l_a, self.u_a)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)


class CurricularFace(_StatefulMargin):
    """CurricularFace (CVPR 2020): ArcFace's target, and hard negatives that weigh more as
    training goes on.

    The target logit is ArcFace's ``s cos(theta + m)`` (``s (c - m sin m)`` once theta > pi -
    m). Every non-target cosine above cos(theta_y + m) is a hard negative and becomes
    ``c (t + c)`` (gradient t + 2c; the threshold and t carry none). While ``training``, each
    call first updates ``t <- alpha * mean(target cos) + (1 - alpha) * t`` over the batch's
    rows that are not ignored (the global batch in ``ShardedMarginHead``); in eval it is used
    unchanged.

    Parameters
    ----------
    s : float
        Logit scale.
    m : float
        Angular margin, in [0, pi).
    alpha : float
        Momentum of t, in [0, 1].
    t : float
        Initial t, in [-1, 1] (the attribute, updated by training calls).

    Notes
    -----
    t moves only in loss calls (:func:`arcface_rs.margin_loss`, a head's forward) while
    ``training`` is True, and only once the call has been accepted: a refused call leaves
    it as it was. Logits calls (:func:`arcface_rs.margin_logits`, a head's ``.logits()``)
    use it unchanged. The target cosines are taken with safe norms, so rows of any finite
    non-zero magnitude give the t of the rescaled rows. Pickles and copies carry t and
    ``training``.
    """

    _params = ("s", "m", "alpha")

    def __init__(self, s: float = 64.0, m: float = 0.5, alpha: float = 0.01, t: float = 0.0):
        s, m, alpha, t = _real("s", s), _real("m", m), _real("alpha", alpha), _real("t", t)
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
        self._set(s=s, m=m, alpha=alpha, _spec=_core.Margin.curricularface(s, m, t))
        self.t = t
        self.training = True

    _state = ("t", "training")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "t":
            value = _real("t", value)
            # validated by the core; the block follows t so apply_margin sees it too
            self._set(_spec=_core.Margin.curricularface(self.s, self.m, value))
        elif name == "training":
            value = bool(value)
        else:
            raise AttributeError(f"CurricularFace.{name} is fixed; build a new one")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"CurricularFace(s={self.s!r}, m={self.m!r}, alpha={self.alpha!r}, t={self.t!r})"

    def _rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        n = len(norms())
        block = np.asarray(self._block, dtype=np.float64)
        state = {}
        if self.training and step:
            cos = np.asarray(target_cos(), dtype=np.float64)
            cos = cos[~np.isnan(cos)]
            if cos.size:
                t = self.alpha * float(cos.mean()) + (1.0 - self.alpha) * self.t
                # the block of the new t (validated by the core); kept for _commit
                block = np.asarray(_core.Margin.curricularface(self.s, self.m, t).encode())
                state = {"t": t}
        blocks = np.tile(block, (n, 1))
        return self._stage(blocks, **state)


class MVSoftmax(Margin):
    """MV-Softmax (AAAI 2020, FaceX-Zoo's adaptive MV-AM/MV-Arc): a margin on the target and
    extra weight on the misclassified non-targets.

    ``kind="cos"``: target ``c - m`` where c > m, else c; ``kind="arc"``: ``cos(theta + m)``
    where c > 0, else c. Every non-target cosine above the margined target (``c_y - m``, or
    cos(theta_y + m)) becomes ``t c + t - 1`` (gradient t; the threshold carries none).

    Parameters
    ----------
    s : float
        Logit scale.
    m : float
        Margin: cosine (>= 0) or angular (in [0, pi)).
    t : float
        Weight of the misclassified non-targets, >= 1.
    kind : {"cos", "arc"}
        The margin's kind.
    """

    _params = ("s", "m", "t", "kind")

    def __init__(self, s: float = 32.0, m: float = 0.35, t: float = 1.12, kind: str = "cos"):
        s, m, t = _real("s", s), _real("m", m), _real("t", t)
        if kind not in ("cos", "arc"):
            raise ValueError(f"kind: must be 'cos' or 'arc', got {kind!r}")
        spec = _core.Margin.mvsoftmax(s, m, t, kind == "arc")
        self._set(s=s, m=m, t=t, kind=kind, _spec=spec)
