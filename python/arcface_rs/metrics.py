"""Face-verification metrics, computed in Rust: ROC, AUC, TAR@FAR, LFW-protocol accuracy."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from ._gallery import Gallery
from ._search import cosine_topk
from ._validate import count as _count

__all__ = ["IdentificationReport", "VerificationReport", "identification", "verification"]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class VerificationReport:
    """Result of :func:`verification`.

    ``fpr``/``tpr``/``thresholds`` are the full ROC (scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``): pairs scoring >= threshold are predicted "same".
    ``tar_at_far[far]`` is the highest TPR over thresholds whose FPR <= far (NaN when there
    are fewer than 1/far negative pairs; ``far=0`` is the TPR with no false accept).
    ``fold_accuracy`` holds the LFW protocol: each fold's accuracy with the threshold that is
    best on the other folds.
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


def _is_same(value: Any) -> np.ndarray:
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
    """Verification report of pair scores against their ground truth.

    Sort-based, O(n log n), parallel. Ties count like scikit-learn (one ROC point per
    distinct score).

    Parameters
    ----------
    scores : array_like
        (n,) finite pair scores, higher = more alike.
    is_same : array_like
        (n,) booleans (or 0/1): whether each pair is the same identity; both kinds needed.
    far : sequence of float
        False-accept rates in [0, 1] for ``tar_at_far`` (0: no false accept at all).
    folds : int
        Contiguous folds of the LFW-protocol accuracy (0 skips it; else 2..n).

    Returns
    -------
    VerificationReport
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.dtype.kind not in "iuf":
        raise TypeError(f"scores must be numeric, got dtype {s.dtype}")
    s = np.ascontiguousarray(s, dtype=np.float64)
    labels = _is_same(is_same)
    if len(labels) != len(s):
        raise ValueError(f"is_same has {len(labels)} entries but scores has {len(s)}")
    fars = np.asarray(far, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(fars) & (fars >= 0) & (fars <= 1)):
        raise ValueError(f"far: values must lie in [0, 1], got {fars.tolist()}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)):
        raise TypeError(f"folds must be an int, got {type(folds).__name__}")
    if folds < 0 or folds > len(s):
        raise ValueError(f"folds must be 0 (none) or in 2..={len(s)}, got {folds}")
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


@dataclass(frozen=True)
class IdentificationReport:
    """Result of :func:`identification`.

    ``cmc[r]``: fraction of mated probes whose best mate ranks within the top ``r`` among all
    gallery samples and distractors (a non-mate scoring equal to the mate counts as above it).
    ``tpir_at_fpir[f]``: fraction of mated probes whose rank-1 result is a mate scoring above
    the threshold that at most a fraction ``f`` of the non-mated probes' (identity not
    enrolled) best scores exceed; NaN without enough non-mated probes (without a warning for
    a closed set, where TPIR does not apply).
    """

    cmc: dict[int, float]
    tpir_at_fpir: dict[float, float]
    mated_probes: int
    non_mated_probes: int
    ranks: np.ndarray = field(repr=False)  # per mated probe; max(ranks) + 1 means "beyond"

    @property
    def rank1(self) -> float:
        """Rank-1 identification rate of the mated probes."""
        return self.cmc.get(1, float("nan"))


def _labels(name: str, value: Any, n: int) -> np.ndarray:
    labels = np.asarray(value)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _top_k(source: Any, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, row positions) of an array or a Gallery (positions in ``ids()`` order;
    -1 pads). ``k`` is at most the number of rows."""
    if isinstance(source, Gallery):
        gallery_ids = source.ids()
        scores, ids = source.search(probes, k=k)
        order = np.argsort(gallery_ids, kind="stable")
        sorted_ids = gallery_ids[order]
        at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        return scores, np.where(ids >= 0, order[at], -1)
    return cosine_topk(probes, source, k=k)


def identification(
    probes: Any,
    probe_labels: Any,
    gallery: Any,
    gallery_labels: Any = None,
    distractors: Any = None,
    ranks: Sequence[int] = (1, 5, 10),
    fpir: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> IdentificationReport:
    """Closed- and open-set identification (MegaFace CMC, IJB TPIR@FPIR) by cosine score.

    One search of the gallery and one of the distractors (exact for arrays and float32
    Galleries); the work is capped by the number of candidates, so any rank is cheap.

    Parameters
    ----------
    probes : array_like
        (n, D) probe embeddings, n >= 1.
    probe_labels : array_like
        (n,) identities; a probe whose identity is not in the gallery is non-mated.
    gallery : array_like or Gallery
        (G, D) enrolled rows (not empty) or a :class:`~arcface_rs.Gallery`.
    gallery_labels : array_like, optional
        (G,) identity of each row (for a Gallery, in ``gallery.ids()`` order); ``None``
        for a Gallery means each id is its own identity.
    distractors : array_like or Gallery, optional
        (M, D) rows that belong to no probe identity.
    ranks : sequence of int
        Ranks >= 1 of the CMC (at most 2**63 - 1).
    fpir : sequence of float
        False-positive identification rates in (0, 1] for TPIR.

    Returns
    -------
    IdentificationReport
    """
    probes = np.asarray(probes)
    if probes.ndim != 2 or probes.shape[0] == 0:
        raise ValueError(f"probes must be 2-D (n >= 1, embedding_size), got {probes.shape}")
    if isinstance(gallery, Gallery):
        if gallery_labels is None:
            gallery_labels = gallery.ids()
    else:
        gallery = np.asarray(gallery)
        if gallery.ndim != 2:
            raise ValueError("gallery must be 2-D (n, embedding_size)")
        if gallery_labels is None:
            raise ValueError("gallery_labels: required when the gallery is an array")
    if len(gallery) == 0:
        raise ValueError("gallery: is empty; identification needs at least one enrolled row")
    if distractors is not None and not isinstance(distractors, Gallery):
        distractors = np.asarray(distractors)
        if distractors.ndim != 2:
            raise ValueError(
                f"distractors must be 2-D (m, embedding_size), got {distractors.shape}"
            )
    if distractors is not None and len(distractors) == 0:
        distractors = None  # no distractor changes nothing
    probe_labels = _labels("probe_labels", probe_labels, len(probes))
    gallery_labels = _labels("gallery_labels", gallery_labels, len(gallery))
    ranks = sorted({_count("ranks", r) for r in ranks})
    if not ranks:
        raise ValueError("ranks must hold at least one integer >= 1")
    fpir = [float(f) for f in fpir]
    if not all(np.isfinite(f) and 0 < f <= 1 for f in fpir):
        raise ValueError(f"fpir: values must lie in (0, 1], got {fpir}")
    # A rank beyond every candidate (gallery rows and distractors) is met by every mate the
    # search finds, so the work is capped there, not at the rank asked for.
    candidates = len(gallery) + (0 if distractors is None else len(distractors))
    max_rank = min(ranks[-1], candidates)
    enrolled = np.isin(probe_labels, gallery_labels)
    mates_per_id = np.unique(gallery_labels, return_counts=True)[1].max()

    # Gallery: enough results to see max_rank non-mates past any probe's own mates.
    k = min(len(gallery), max_rank + int(mates_per_id))
    g_scores, g_idx = _top_k(gallery, probes, k)
    is_mate = gallery_labels[np.maximum(g_idx, 0)] == probe_labels[:, None]
    is_mate &= g_idx >= 0
    non_mate_scores = np.where(is_mate | (g_idx < 0), -np.inf, g_scores)
    top1_score = g_scores[:, 0].astype(np.float64)
    top1_is_mate = is_mate[:, 0].copy()  # a view would let the distractors edit is_mate
    if distractors is not None:
        d_scores, _ = _top_k(distractors, probes, min(max_rank, len(distractors)))
        non_mate_scores = np.concatenate([non_mate_scores, d_scores], axis=1)
        beats = d_scores[:, 0] > top1_score
        top1_score = np.maximum(top1_score, d_scores[:, 0])
        top1_is_mate &= ~beats

    # Best mate score: the search holds every mate whose score is among the top k, and a
    # probe whose best mate is not there has more than max_rank non-mates above it.
    mate_best = np.where(is_mate, g_scores, -np.inf).max(axis=1)
    above = (non_mate_scores >= mate_best[:, None]).sum(axis=1)
    probe_rank = np.where(np.isfinite(mate_best), above + 1, max_rank + 1)
    probe_rank = np.minimum(probe_rank, max_rank + 1)[enrolled]
    n_mated, n_non = int(enrolled.sum()), int((~enrolled).sum())
    cmc = {r: float(np.mean(probe_rank <= r)) if n_mated else float("nan") for r in ranks}

    tpir: dict[float, float] = {}
    non_top = np.sort(top1_score[~enrolled])[::-1]
    for f in fpir:
        if n_mated == 0 or f * n_non < 1:  # cannot resolve this FPIR
            tpir[float(f)] = float("nan")
            continue
        allowed = int(np.floor(f * n_non))
        # threshold: strictly above the (allowed+1)-th highest non-mated top-1 score
        threshold = non_top[allowed] if allowed < n_non else -np.inf
        hit = top1_is_mate[enrolled] & (top1_score[enrolled] > threshold)
        tpir[float(f)] = float(np.mean(hit))
    missing = [f for f, v in tpir.items() if np.isnan(v)]
    if missing and n_mated and n_non:  # closed set (no non-mated probes): TPIR does not apply
        warnings.warn(
            f"TPIR is NaN for FPIR {missing}: {n_non} non-mated probes cannot measure them",
            RuntimeWarning,
            stacklevel=2,
        )
    return IdentificationReport(
        cmc=cmc,
        tpir_at_fpir=tpir,
        mated_probes=n_mated,
        non_mated_probes=n_non,
        ranks=probe_rank,
    )
