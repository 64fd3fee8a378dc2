"""The margins that also re-weight hard negatives: CurricularFace and MV-Softmax."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .base import Margin, StatefulMargin, real


class CurricularFace(StatefulMargin):
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
        s, m, alpha, t = real("s", s), real("m", m), real("alpha", alpha), real("t", t)
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
        self._set(s=s, m=m, alpha=alpha, _spec=_core.Margin.curricularface(s, m, t))
        self.t = t
        self.training = True

    _state = ("t", "training")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "t":
            value = real("t", value)
            # validated by the core; the block follows t so apply_margin sees it too
            self._set(_spec=_core.Margin.curricularface(self.s, self.m, value))
        elif name == "training":
            value = bool(value)
        else:
            raise AttributeError(f"CurricularFace.{name} is fixed; build a new one")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"CurricularFace(s={self.s!r}, m={self.m!r}, alpha={self.alpha!r}, t={self.t!r})"

    def batch_rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        n = len(norms())
        block = np.asarray(self._block, dtype=np.float64)
        state = {}
        if self.training and step:
            cos = np.asarray(target_cos(), dtype=np.float64)
            cos = cos[~np.isnan(cos)]
            if cos.size:
                t = self.alpha * float(cos.mean()) + (1.0 - self.alpha) * self.t
                # the block of the new t (validated by the core); kept for commit
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
        s, m, t = real("s", s), real("m", m), real("t", t)
        if kind not in ("cos", "arc"):
            raise ValueError(f"kind: must be 'cos' or 'arc', got {kind!r}")
        spec = _core.Margin.mvsoftmax(s, m, t, kind == "arc")
        self._set(s=s, m=m, t=t, kind=kind, _spec=spec)
