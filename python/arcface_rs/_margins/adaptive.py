"""The margins that adapt per row: ElasticFace (drawn), AdaFace (feature norms, running
statistics) and MagFace (feature norms)."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .. import _core
from .base import Margin, StatefulMargin, real


class ElasticFace(StatefulMargin):
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
        s, m, std = real("s", s), real("m", m), real("std", std)
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

    def batch_rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        n = len(norms())
        if not self.plus:
            return self._placed_rows(n, lambda blocks: blocks)

        def by_target_cos(ascending: np.ndarray) -> np.ndarray:
            return place_by_rank(ascending, np.nan_to_num(target_cos(), nan=0.0))

        return self._placed_rows(n, by_target_cos)

    def _placed_rows(self, n: int, place: Callable[[np.ndarray], Any]) -> Any:
        """One call's (n, P) blocks, drawn (ascending for ElasticFace+) and given to ``place``,
        which puts them in row order (see ``place_by_rank``) where the target cosines live: a
        GPU batch ranks them on the device, so the host does not wait. Staged as
        ``batch_rows`` stages; returns what ``place`` returns."""
        # drawn from a copy of the generator: it moves on only when the call is accepted
        rng = np.random.default_rng()
        rng.bit_generator.state = self._rng.bit_generator.state
        draws = rng.normal(self.m, self.std, size=n)
        upper = math.pi - 1e-9 if self.kind == "arc" else np.inf
        draws = np.clip(draws, 0.0, upper)
        if self.plus:
            draws = np.sort(draws)
        blocks = np.tile(np.asarray(self._block, dtype=np.float64), (n, 1))
        blocks[:, 2] = draws
        return self._stage(place(blocks), rng_state=rng.bit_generator.state)


def place_by_rank(ascending: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """ElasticFace+'s placement: the row with the largest target cosine (closest to its
    centre) gets the first of the ``ascending`` blocks (the smallest margin), ties in row
    order."""
    placed = np.empty_like(ascending)
    placed[np.argsort(-cos, kind="stable")] = ascending
    return placed


class AdaFace(StatefulMargin):
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
        s, m, h = real("s", s), real("m", m), real("h", h)
        t_alpha = real("t_alpha", t_alpha)
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
            value = real(name, value)
            if not math.isfinite(value):
                raise ValueError(f"batch_mean: must be finite, got {value}")
        elif name == "batch_std":
            value = real(name, value)
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

    def batch_rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        n = np.clip(np.asarray(norms(), dtype=np.float64), 1e-3, 100.0)
        mean, std = self.batch_mean, self.batch_std
        state = {}
        if self.training and step and n.size and np.isfinite(n).all():
            # (a batch the core refuses, empty or with a NaN row, moves nothing: the update
            # is kept for commit, which runs only once the call is accepted)
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
            n: real(n, v)
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
