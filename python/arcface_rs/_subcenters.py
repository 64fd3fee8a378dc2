"""The clean-up step of sub-center ArcFace (Deng et al., ECCV 2020): after training with K
centres per class, keep each class's dominant centre and drop the samples far from it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validate import floats as _floats
from ._validate import labels as _labels
from ._validate import sub_centers as _sub_centers
from ._validate import unit_rows

__all__ = ["dominant_centers", "find_outliers"]


def _unit(rows: np.ndarray, name: str) -> np.ndarray:
    """Unit rows in float64 for any finite non-zero magnitude, as the heads accept them."""
    unit, ok = unit_rows(rows)
    if not ok.all():
        raise ValueError(
            f"{name}: every row must be finite and non-zero (row {int(np.argmin(ok))} is not)"
        )
    return unit


def _centres(weight: Any, k: Any) -> tuple[np.ndarray, int]:
    """The weight as unit centres, (C, K, D) float64."""
    weight, k = _floats("weight", weight), _sub_centers(k)
    if weight.shape[0] == 0 or weight.shape[0] % k:
        raise ValueError(
            f"weight: has {weight.shape[0]} rows, expected a positive multiple of K = {k}"
        )
    return _unit(weight, "weight").reshape(-1, k, weight.shape[1]), k


def _sample_cosines(
    emb: Any, labels: Any, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows with a label, their labels, (n, K) cosines to their class's centres)."""
    emb, labels = _floats("emb", emb), _labels(labels)
    c, _, d = centres.shape
    if emb.shape[1] != d:
        raise ValueError(f"emb: has {emb.shape[1]} columns but weight has {d}")
    if len(labels) != emb.shape[0]:
        raise ValueError(f"labels: has {len(labels)} entries but emb has {emb.shape[0]} rows")
    if labels.size and (labels.min() < -1 or labels.max() >= c):
        raise ValueError(f"labels: values must be in [-1, {c}) (-1 marks an ignored row)")
    rows = np.nonzero(labels >= 0)[0]
    x = _unit(emb[rows], "emb")
    cos = np.einsum("nd,nkd->nk", x, centres[labels[rows]])
    return rows, labels[rows], cos


def dominant_centers(
    weight: Any, K: int, emb: Any = None, labels: Any = None, return_index: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Each class's dominant sub-centre.

    With samples (``emb``, ``labels``), as in the paper: every sample is assigned to its
    class's closest centre, and the dominant centre is the one with the most samples (ties:
    the lower index; a class without samples falls back to the rule below). Without, the
    centre with the largest summed cosine to its siblings (the one the others agree with:
    a centre that absorbed noisy samples drifts away from the clean ones).

    Parameters
    ----------
    weight : array_like
        (C*K, D) float32/float64 sub-centres, class j's in rows j*K .. j*K+K-1.
    K : int
        Centres per class.
    emb : array_like, optional
        (B, D) training embeddings.
    labels : array_like, optional
        (B,) their classes, -1 for rows to skip.
    return_index : bool
        Also return which centre of each class is dominant.

    Returns
    -------
    centers : numpy.ndarray
        (C, D) the dominant centres, as given (not normalised), in ``weight``'s dtype: the
        weight of a one-centre head after the clean-up.
    index : numpy.ndarray
        (C,) int64 the dominant centre of each class, in 0..K (with ``return_index``).
    """
    centres, k = _centres(weight, K)
    agreement = np.einsum("ckd,cjd->ck", centres, centres)  # includes the centre itself
    index = np.argmax(agreement, axis=1)
    if (emb is None) != (labels is None):
        raise ValueError("emb and labels: give both or neither")
    if emb is not None:
        _, y, cos = _sample_cosines(emb, labels, centres)
        counts = np.zeros((len(centres), k), dtype=np.int64)
        np.add.at(counts, (y, np.argmax(cos, axis=1)), 1)
        seen = counts.sum(axis=1) > 0
        index = np.where(seen, np.argmax(counts, axis=1), index)
    w = np.asarray(weight)
    chosen = w.reshape(len(centres), k, -1)[np.arange(len(centres)), index]
    return (chosen, index.astype(np.int64)) if return_index else chosen


def find_outliers(
    emb: Any, labels: Any, weight: Any, K: int, threshold_deg: float = 75.0
) -> np.ndarray:
    """The samples the paper drops: those whose angle to their class's dominant centre
    (:func:`dominant_centers` with these samples) exceeds ``threshold_deg``.

    Parameters
    ----------
    emb : array_like
        (B, D) embeddings.
    labels : array_like
        (B,) classes, -1 for rows to skip (never outliers).
    weight : array_like
        (C*K, D) sub-centres.
    K : int
        Centres per class.
    threshold_deg : float
        The angle in degrees, in [0, 180] (the paper uses 75).

    Returns
    -------
    numpy.ndarray
        (B,) bool, True for the outliers.
    """
    threshold = float(threshold_deg)
    if not 0.0 <= threshold <= 180.0:
        raise ValueError(f"threshold_deg: must be in [0, 180], got {threshold_deg}")
    centres, k = _centres(weight, K)
    _, index = dominant_centers(weight, k, emb, labels, return_index=True)
    rows, y, cos = _sample_cosines(emb, labels, centres)
    to_dominant = np.clip(cos[np.arange(len(rows)), index[y]], -1.0, 1.0)
    out = np.zeros(len(_labels(labels)), dtype=bool)
    out[rows] = np.degrees(np.arccos(to_dominant)) > threshold
    return out
