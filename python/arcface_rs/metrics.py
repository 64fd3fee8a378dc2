"""Face-verification metrics, computed in Rust: ROC, AUC, TAR@FAR, LFW-protocol accuracy."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core

__all__ = ["VerificationReport", "verification"]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class VerificationReport:
    """Result of :func:`verification`.

    ``fpr``/``tpr``/``thresholds`` are the full ROC (scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``): pairs scoring >= threshold are predicted "same".
    ``tar_at_far[far]`` is the highest TPR over thresholds whose FPR <= far (NaN when there
    are fewer than 1/far negative pairs). ``fold_accuracy`` holds the LFW protocol: each
    fold's accuracy with the threshold that is best on the other folds.
    """

    auc: float
    tar_at_far: dict[float, float]
    best_threshold: float
    best_accuracy: float
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    thresholds: np.ndarray = field(repr=False)
    fold_accuracy: np.ndarray = field(repr=False)

    @property
    def accuracy_mean(self) -> float:
        """Mean of the fold accuracies (LFW protocol)."""
        return float(np.mean(self.fold_accuracy)) if self.fold_accuracy.size else float("nan")

    @property
    def accuracy_std(self) -> float:
        """Standard deviation of the fold accuracies."""
        return float(np.std(self.fold_accuracy)) if self.fold_accuracy.size else float("nan")


def _is_same(value: Any, n: int) -> np.ndarray:
    labels = np.asarray(value)
    if labels.ndim != 1:
        raise ValueError(f"is_same must be 1-D, got shape {labels.shape}")
    if labels.dtype == np.bool_:
        return labels
    if labels.dtype.kind in "iuf" and np.all((labels == 0) | (labels == 1)):
        return labels.astype(np.bool_)
    raise ValueError("is_same must be boolean or contain only 0 and 1")


def verification(
    scores: Any,
    is_same: Any,
    far: Sequence[float] = DEFAULT_FARS,
    folds: int = 10,
) -> VerificationReport:
    """Verification report of pair ``scores`` (higher = more alike) against ``is_same``.

    Sort-based, O(n log n), parallel. Ties count like scikit-learn (one ROC point per
    distinct score). ``folds=0`` skips the fold accuracy.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.dtype.kind not in "iuf":
        raise TypeError(f"scores must be numeric, got dtype {s.dtype}")
    s = np.ascontiguousarray(s, dtype=np.float64)
    labels = _is_same(is_same, len(s))
    if len(labels) != len(s):
        raise ValueError(f"is_same has {len(labels)} entries but scores has {len(s)}")
    fars = np.asarray(far, dtype=np.float64).reshape(-1)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)):
        raise TypeError(f"folds must be an int, got {type(folds).__name__}")
    out = _core.verification(s, np.ascontiguousarray(labels), fars, int(folds))
    tar = {float(f): float(t) for f, t in zip(fars, out["tar_at_far"])}
    unreachable = [f for f, t in tar.items() if np.isnan(t)]
    if unreachable:
        negatives = int(len(labels) - labels.sum())
        warnings.warn(
            f"TAR@FAR is NaN for FAR {unreachable}: {negatives} negative pairs cannot "
            "measure a false-accept rate below 1/negatives",
            RuntimeWarning,
            stacklevel=2,
        )
    return VerificationReport(
        auc=float(out["auc"]),
        tar_at_far=tar,
        best_threshold=float(out["best_threshold"]),
        best_accuracy=float(out["best_accuracy"]),
        fpr=out["fpr"],
        tpr=out["tpr"],
        thresholds=out["thresholds"],
        fold_accuracy=out["fold_accuracy"],
    )
