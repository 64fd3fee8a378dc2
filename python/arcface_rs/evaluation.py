"""Evaluation protocols that face-recognition papers report: the LFW family (LFW, CFP-FP,
AgeDB-30 from InsightFace's ``.bin`` files), IJB-B/IJB-C 1:1 and 1:N over templates, and
TAR@FAR over all pairs of a large set (InsightFace's MFR).

Each function computes what InsightFace's published scripts compute (their formulas, not
their code); the heavy parts (pair scores, all-pairs TAR) run in the Rust core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._bin_file import load_bin
from .metrics import IdentificationReport, identification

__all__ = [
    "LfwReport",
    "aggregate_templates",
    "all_pairs_tar_at_far",
    "flip_fuse",
    "identification_1n",
    "lfw_protocol",
    "load_bin",
    "template_pair_scores",
]


def _matrix(name: str, value: Any) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind not in "fiu" or a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(
            f"{name}: must be a non-empty 2-D array of numbers, got {a.dtype} {a.shape}"
        )
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _l2_normalise(a: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name}: row {int(np.nonzero(norms[:, 0] == 0)[0][0])} is all zeros")
    return a / norms


def flip_fuse(emb: Any, emb_flipped: Any, mode: str = "add") -> np.ndarray:
    """The flip test: fuse each image's embedding with that of its mirror image.

    Parameters
    ----------
    emb, emb_flipped : array_like
        (n, D) embeddings of the images and of their horizontally flipped copies.
    mode : {"add", "concat"}
        ``add``: emb + emb_flipped (n, D); ``concat``: [emb, emb_flipped] (n, 2D).

    Returns
    -------
    numpy.ndarray
        The fused embeddings, L2-normalised, float64 (float32 inputs stay float32).
    """
    a, b = _matrix("emb", emb), _matrix("emb_flipped", emb_flipped)
    if a.shape != b.shape:
        raise ValueError(f"emb_flipped: shape {b.shape} differs from emb's {a.shape}")
    if mode == "add":
        fused = a + b
    elif mode == "concat":
        fused = np.concatenate([a, b], axis=1)
    else:
        raise ValueError(f"mode: must be 'add' or 'concat', got {mode!r}")
    dtype = np.float32 if fused.dtype == np.float32 else np.float64
    return _l2_normalise(fused.astype(dtype, copy=False), "emb + emb_flipped")


@dataclass(frozen=True)
class LfwReport:
    """Result of :func:`lfw_protocol` (the fields of InsightFace's ``evaluate()``)."""

    accuracy: np.ndarray  #: (folds,) test accuracy of each fold
    accuracy_mean: float
    accuracy_std: float
    thresholds: np.ndarray  #: (folds,) the best squared-distance threshold of each fold
    val: float  #: mean validation rate at FAR 1e-3 over the folds
    val_std: float
    far: float  #: mean FAR reached over the folds
    tpr: np.ndarray  #: (400,) mean TPR over the folds at each threshold of arange(0, 4, 0.01)
    fpr: np.ndarray


def _contiguous_folds(n: int, folds: int) -> list[np.ndarray]:
    """Test indices of scikit-learn's KFold(folds, shuffle=False): the first n % folds folds
    have one more element."""
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(folds)]


def _counts_below(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray):
    """For every threshold t: (true accepts, false accepts) of ``dist < t``, vectorised."""
    d_same = np.sort(dist[same])
    d_diff = np.sort(dist[~same])
    tp = np.searchsorted(d_same, thresholds, side="left")
    fp = np.searchsorted(d_diff, thresholds, side="left")
    return tp, fp, len(d_same), len(d_diff)


def _rates(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray):
    tp, fp, n_same, n_diff = _counts_below(dist, same, thresholds)
    fn, tn = n_same - tp, n_diff - fp
    tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
    fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    acc = (tp + tn).astype(np.float64) / dist.size
    return tpr, fpr, acc, tp, fp, n_same, n_diff


def _val_threshold(far_train: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold where the training FAR reaches ``target``: linear interpolation between
    the grid point before and the first grid point whose FAR exceeds it (what the script's
    ``interp1d(far_train, thresholds, kind="slinear")`` means; current SciPy refuses that call
    because the FAR repeats), 0 when no threshold reaches the target."""
    if far_train.max() < target:
        return 0.0
    above = np.nonzero(far_train > target)[0]
    if len(above) == 0:  # reached exactly, never exceeded: the first point reaching it
        return float(thresholds[np.nonzero(far_train >= target)[0][0]])
    i = int(above[0])
    if i == 0:
        return float(thresholds[0])
    f0, f1, t0, t1 = far_train[i - 1], far_train[i], thresholds[i - 1], thresholds[i]
    return float(t0 + (target - f0) * (t1 - t0) / (f1 - f0))


def lfw_protocol(embeddings: Any, issame: Any, folds: int = 10) -> LfwReport:
    """10-fold verification accuracy and VAL@FAR=1e-3, as InsightFace's
    ``eval/verification.py`` ``evaluate()`` computes them for LFW, CFP-FP and AgeDB-30.

    Pairs are rows (2i, 2i+1) of ``embeddings``; the score is the squared L2 distance (the
    embeddings are used as given: normalise them first, as the script's callers do); folds
    are contiguous (KFold without shuffling). Each fold's accuracy threshold is the first
    best of ``arange(0, 4, 0.01)`` on the other folds. VAL at FAR 1e-3 uses
    ``arange(0, 4, 0.001)``: on the training folds, the threshold is interpolated linearly
    between the grid point before and the first grid point whose FAR exceeds 1e-3 (the
    meaning of the script's ``interp1d`` call, which current SciPy refuses because the FAR
    repeats), or 0 if no threshold reaches 1e-3; VAL and FAR are then those of the test fold.
    Vectorised over thresholds (sorted distances and binary search).

    Parameters
    ----------
    embeddings : array_like
        (2P, D) embeddings, pair i in rows 2i and 2i+1.
    issame : array_like
        (P,) booleans: whether pair i shows one identity.
    folds : int
        Number of folds, 2 <= folds <= P.

    Returns
    -------
    LfwReport
    """
    emb = _matrix("embeddings", embeddings).astype(np.float64)
    same = np.asarray(issame)
    if same.dtype != bool:
        if same.dtype.kind not in "iu" or not np.isin(same, (0, 1)).all():
            raise ValueError("issame: must be booleans (or 0/1)")
        same = same.astype(bool)
    if emb.shape[0] % 2:
        raise ValueError(f"embeddings: need an even number of rows (pairs), got {emb.shape[0]}")
    pairs = emb.shape[0] // 2
    if same.shape != (pairs,):
        raise ValueError(f"issame: needs one entry per pair ({pairs}), got shape {same.shape}")
    if (
        isinstance(folds, bool)
        or not isinstance(folds, (int, np.integer))
        or not 2 <= folds <= pairs
    ):
        raise ValueError(f"folds: must be an integer in [2, {pairs}], got {folds!r}")
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    grid = np.arange(0, 4, 0.01)
    fine = np.arange(0, 4, 0.001)
    test_sets = _contiguous_folds(pairs, int(folds))
    everything = np.arange(pairs)
    accuracy = np.zeros(folds)
    best = np.zeros(folds)
    tprs, fprs = np.zeros((folds, len(grid))), np.zeros((folds, len(grid)))
    val, far = np.zeros(folds), np.zeros(folds)
    for f, test in enumerate(test_sets):
        train = np.setdiff1d(everything, test, assume_unique=True)
        for part, rows in (("training folds", train), ("test fold", test)):
            kinds = same[rows]
            if kinds.all() or not kinds.any():
                only = "same-identity" if kinds.all() else "different-identity"
                raise ValueError(
                    f"issame: fold {f}'s {part} hold only {only} pairs; accuracy thresholds "
                    "and VAL@FAR=1e-3 need both kinds in every fold (fewer folds, or pairs "
                    "interleaved as in the published lists)"
                )
        _, _, acc_train, *_ = _rates(dist[train], same[train], grid)
        b = int(np.argmax(acc_train))
        tprs[f], fprs[f], acc_test, *_ = _rates(dist[test], same[test], grid)
        accuracy[f] = acc_test[b]
        best[f] = grid[b]
        # VAL at FAR 1e-3
        _, _, _, _, fp, _, n_diff = _rates(dist[train], same[train], fine)
        threshold = _val_threshold(fp / n_diff, fine, 1e-3)
        _, _, _, tp_t, fp_t, ns_t, nd_t = _rates(dist[test], same[test], np.array([threshold]))
        val[f], far[f] = tp_t[0] / ns_t, fp_t[0] / nd_t
    return LfwReport(
        accuracy=accuracy,
        accuracy_mean=float(np.mean(accuracy)),
        accuracy_std=float(np.std(accuracy)),
        thresholds=best,
        val=float(np.mean(val)),
        val_std=float(np.std(val)),
        far=float(np.mean(far)),
        tpr=np.mean(tprs, 0),
        fpr=np.mean(fprs, 0),
    )


def aggregate_templates(
    features: Any,
    templates: Any,
    medias: Any,
    weights: Any = None,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Template features of IJB-B/IJB-C, as InsightFace's IJB 1:1 scripts build them.

    Image features are L2-normalised (unless ``normalize=False``, where their norm acts as a
    quality weight), multiplied by ``weights`` (the detector scores) if given, averaged
    within each (template, media) — frames of one video count once — and summed over the
    template's medias; the sums are L2-normalised.

    Parameters
    ----------
    features : array_like
        (n, D) image features.
    templates, medias : array_like
        (n,) integer template and media id of each image.
    weights : array_like, optional
        (n,) detector (faceness) scores.
    normalize : bool
        L2-normalise the image features first.

    Returns
    -------
    template_ids : numpy.ndarray
        (T,) sorted unique template ids.
    template_features : numpy.ndarray
        (T, D) float64, L2-normalised.
    """
    x = _matrix("features", features).astype(np.float64)
    n = x.shape[0]
    t = np.asarray(templates)
    m = np.asarray(medias)
    for name, a in (("templates", t), ("medias", m)):
        if a.shape != (n,) or a.dtype.kind not in "iu":
            raise ValueError(f"{name}: must be (n,) integers, got {a.dtype} {a.shape}")
    if normalize:
        x = _l2_normalise(x, "features")
    if weights is not None:
        wv = np.asarray(weights)
        if wv.dtype.kind not in "fiub" or wv.shape != (n,):
            raise ValueError(f"weights: must be ({n},) numbers, got {wv.dtype} {wv.shape}")
        wv = wv.astype(np.float64)
        if not np.isfinite(wv).all():
            raise ValueError(f"weights: entry {int(np.argmin(np.isfinite(wv)))} is NaN or inf")
        x = x * wv[:, None]
    ids, t_index = np.unique(t, return_inverse=True)
    # one group per (template, media): mean within it, then sum the groups of a template
    pair = np.stack([t_index, m]).T
    groups, g_index, g_count = np.unique(pair, axis=0, return_inverse=True, return_counts=True)
    g_index = g_index.reshape(-1)
    sums = np.zeros((len(groups), x.shape[1]))
    np.add.at(sums, g_index, x)
    means = sums / g_count[:, None]
    out = np.zeros((len(ids), x.shape[1]))
    np.add.at(out, groups[:, 0], means)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return ids, out / np.where(norms == 0, 1.0, norms)


def template_pair_scores(template_features: Any, template_ids: Any, t1: Any, t2: Any) -> np.ndarray:
    """The score (dot product) of every template pair of an IJB 1:1 protocol, in parallel.

    Parameters
    ----------
    template_features : array_like
        (T, D) template features (from :func:`aggregate_templates`).
    template_ids : array_like
        (T,) the id of each row.
    t1, t2 : array_like
        (P,) template ids of each pair; every id must be in ``template_ids``.

    Returns
    -------
    numpy.ndarray
        (P,) float64 scores; :func:`arcface_rs.metrics.verification` turns them into TAR@FAR.
    """
    feats = _matrix("template_features", template_features)
    if feats.dtype not in (np.float32, np.float64):
        feats = feats.astype(np.float64)
    ids = np.asarray(template_ids)
    if ids.shape != (feats.shape[0],):
        raise ValueError(f"template_ids: needs {feats.shape[0]} entries, got shape {ids.shape}")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if repeated.size:
        raise ValueError(
            f"template_ids: template id {repeated[0]!r} names more than one row; "
            "each template has one feature row"
        )

    def rows(name: str, value: Any) -> np.ndarray:
        v = np.asarray(value).reshape(-1)
        at = np.searchsorted(sorted_ids, v).clip(0, len(ids) - 1)
        missing = sorted_ids[at] != v
        if missing.any():
            raise ValueError(
                f"{name}: template id {v[np.nonzero(missing)[0][0]]!r} is not in template_ids"
            )
        return order[at].astype(np.int64)

    a, b = rows("t1", t1), rows("t2", t2)
    if a.shape != b.shape:
        raise ValueError(f"t2: has {len(b)} pairs but t1 has {len(a)}")
    return _core.pair_dots(np.ascontiguousarray(feats), a, b)


def identification_1n(
    probe_features: Any,
    probe_ids: Any,
    gallery_sets: Sequence[tuple[Any, Any]],
    ranks: Sequence[int] = (1, 5, 10),
    fpir: Sequence[float] = (1e-2, 1e-1),
) -> list[IdentificationReport]:
    """IJB 1:N: the probes against each gallery set (IJB's G1 and G2) in turn.

    Parameters
    ----------
    probe_features : array_like
        (n, D) probe template features.
    probe_ids : array_like
        (n,) subject of each probe template.
    gallery_sets : sequence of (features, subject ids)
        Each gallery set; a probe whose subject is not in a set is non-mated there.
    ranks, fpir
        As for :func:`arcface_rs.metrics.identification`.

    Returns
    -------
    list of IdentificationReport
        One report per gallery set (IJB papers report their mean).
    """
    if len(gallery_sets) == 0:
        raise ValueError("gallery_sets: give at least one (features, ids) gallery")
    return [
        identification(probe_features, probe_ids, g, ids, ranks=ranks, fpir=fpir)
        for g, ids in gallery_sets
    ]


def all_pairs_tar_at_far(
    features: Any, labels: Any, far: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3)
) -> dict[float, float]:
    """TAR at each FAR over all N(N-1)/2 pairs of a set, exactly, without storing them
    (InsightFace's MFR protocol).

    The rows are L2-normalised and scored by cosine; a pair is positive when its labels are
    equal. A blocked GEMM walks the upper triangle of the score matrix, keeping every
    positive and only the k + 1 largest negatives, k = ⌊max(far)·negatives⌋. TAR at a FAR
    is the highest TPR over thresholds whose FPR ≤ far, as :func:`arcface_rs.metrics.
    verification` defines it on the same pairs: the share of positives scoring strictly
    above the (k+1)-th largest negative score (k = ⌊far·negatives⌋), so that at most k
    negatives (ties included) are accepted. Memory O(N·D + k + positives).

    Parameters
    ----------
    features : array_like
        (N, D) float32 or float64 features (others are converted to float64).
    labels : array_like
        (N,) integer identities.
    far : sequence of float
        FARs in (0, 1].

    Returns
    -------
    dict
        {far: tar}.
    """
    x = _matrix("features", features)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise ValueError(f"labels: must be ({x.shape[0]},) integers, got {y.dtype} {y.shape}")
    fars = np.asarray(list(far), dtype=np.float64).reshape(-1)
    out = _core.all_pairs_tar_at_far(np.ascontiguousarray(x), y.astype(np.int64), fars)
    return {float(f): float(t) for f, t in zip(fars, out["tar"])}
