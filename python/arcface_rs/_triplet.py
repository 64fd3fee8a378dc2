"""Triplet loss with batch mining (NumPy API): argument checks here, the work in Rust."""

from __future__ import annotations

import numbers
from typing import Any, Literal

import numpy as np

from . import _core
from ._validate import floats as _floats
from ._validate import labels as _labels

__all__ = ["triplet_loss"]

MININGS = ("batch_hard", "semi_hard", "all")
DISTANCES = ("cosine", "euclidean")
REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")


def check_arguments(margin: Any, mining: Any, distance: Any, reduction: Any) -> float:
    """The margin as a float, after checking every option (ValueError/TypeError naming it)."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {type(margin).__name__}")
    if not (np.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin: must be a finite number >= 0, got {margin}")
    for name, value, allowed in (
        ("mining", mining, MININGS),
        ("distance", distance, DISTANCES),
        ("reduction", reduction, REDUCTIONS),
    ):
        if value not in allowed:
            raise ValueError(f"{name}: must be one of {allowed}, got {value!r}")
    return float(margin)


def triplet_loss(
    emb: Any,
    labels: Any,
    margin: float = 0.2,
    mining: Literal["batch_hard", "semi_hard", "all"] = "batch_hard",
    distance: Literal["cosine", "euclidean"] = "cosine",
    reduction: Literal["mean", "mean_nonzero", "sum", "none"] = "mean",
) -> tuple[np.floating | np.ndarray, np.ndarray]:
    """Triplet loss (FaceNet) with batch mining, fused: one GEMM for the pairwise matrix,
    the mining, the hinge and its exact gradient, O(B²) memory.

    Rows are L2-normalised. With ``distance="cosine"`` pairs are scored by similarity and
    a triplet (a, p, n) costs ``max(s(a,n) - s(a,p) + margin, 0)``; with ``"euclidean"`` by
    the distance of the unit rows and ``max(d(a,p) - d(a,n) + margin, 0)``: the
    definitions of pytorch-metric-learning's ``TripletMarginLoss`` with
    ``CosineSimilarity`` / ``LpDistance``, whose results these equal.

    Parameters
    ----------
    emb : array_like
        (B, D) float32 or float64 embeddings (any finite non-zero rows).
    labels : array_like
        (B,) integer identities; -1 marks a row that takes no part.
    margin : float
        The margin, >= 0.
    mining : {"batch_hard", "semi_hard", "all"}
        ``batch_hard``: per anchor its hardest positive and hardest negative (PML's
        ``BatchHardMiner``; ties to the lower index); ``semi_hard``: every triplet whose
        negative is farther than the positive but within the margin (FaceNet's; PML's
        ``TripletMarginMiner(type_of_triplets="semihard")`` with this margin); ``all``:
        every triplet.
    distance : {"cosine", "euclidean"}
        How pairs are compared (above).
    reduction : {"mean", "mean_nonzero", "sum", "none"}
        ``mean`` over the mined triplets (PML's ``MeanReducer``), ``mean_nonzero`` over
        those with a positive loss (PML's default ``AvgNonZeroReducer``), ``sum``, or
        ``none``: (B,) per anchor, each the sum of its triplets' losses (its one triplet
        for ``batch_hard``), with the gradient of their sum.

    Returns
    -------
    loss : numpy.floating or numpy.ndarray
        In emb's dtype (computed in float64; (B,) for ``none``).
    grad_emb : numpy.ndarray
        (B, D) dloss/demb.

    Notes
    -----
    A row forms triplets only as an anchor with at least one positive (another row of its
    label) and one negative (a row of another label): a batch of one label, or of distinct
    labels only, has no triplet, and its loss and gradient are 0 (as in PML).
    """
    margin = check_arguments(margin, mining, distance, reduction)
    emb = _floats("emb", emb)
    labels = _labels(labels)
    loss, per_anchor, grad, _, _ = _core.triplet_loss(
        emb, labels, margin, mining, distance, reduction
    )
    if reduction == "none":
        return per_anchor.astype(emb.dtype), grad
    return emb.dtype.type(loss), grad
