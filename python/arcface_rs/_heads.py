"""NumPy API of the heads: argument checks here, the work in the Rust core."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _core
from ._margins import AdaFace, Margin
from ._validate import floats as _floats
from ._validate import grad_filter as _grad_filter
from ._validate import interclass_filter as _interclass_filter
from ._validate import labels as _labels
from ._validate import reduction as _reduction
from ._validate import same_dtype as _same_dtype
from ._validate import sub_centers as _sub_centers
from ._validate import unit_rows

__all__ = [
    "apply_margin",
    "center_loss",
    "apply_margin_backward",
    "margin_logits",
    "margin_logits_backward",
    "margin_loss",
]


def _margin(value: Any) -> _core.Margin:
    if not isinstance(value, Margin):
        raise TypeError(
            "margin must be an arcface_rs margin (ArcFace, CosFace, SphereFace, CombinedMargin, "
            "Softmax, AdaFace, MagFace, ElasticFace, CurricularFace, MVSoftmax), got "
            f"{type(value).__name__}"
        )
    return value.spec


def _refuse_norm_margins(margin: Any) -> _core.Margin:
    """The core margin of ``margin`` for a cosine matrix, which carries no feature norm:
    AdaFace's margin follows the norm (the core refuses MagFace and SphereFace(s=None))."""
    spec = _margin(margin)
    if isinstance(margin, AdaFace):
        raise ValueError(
            "margin: AdaFace's margin follows each row's feature norm, which a cosine matrix "
            "does not carry; use margin_loss or margin_logits on the embeddings"
        )
    return spec


def target_cosines(
    emb: np.ndarray, weight: np.ndarray, labels: np.ndarray, sub_centers: int = 1
) -> np.ndarray:
    """(B,) float64 cosine of each row to its label's centre (its closest of the label's
    ``sub_centers`` centres), NaN for ignored rows."""
    out = np.full(len(labels), np.nan)
    rows = np.nonzero(labels >= 0)[0]
    if rows.size:
        # norms taken safely: every finite non-zero magnitude gives its exact cosine (a bad
        # row gives NaN here, and the core names it next)
        x, _ = unit_rows(emb[rows])
        best = np.full(rows.size, -np.inf)
        for a in range(sub_centers):
            w, _ = unit_rows(weight[labels[rows] * sub_centers + a])
            best = np.maximum(best, np.einsum("ij,ij->i", x, w))
        out[rows] = np.clip(best, -1.0, 1.0)
    return out


def _row_blocks(
    margin: Margin,
    emb: np.ndarray,
    weight: np.ndarray,
    labels: np.ndarray,
    sub_centers: int = 1,
    step: bool = True,
) -> np.ndarray | None:
    """The margin's per-row parameter blocks for this batch (None: one for all rows);
    ``step``: a loss call, which moves running statistics (applied by ``margin.commit()``
    once the call has been accepted)."""
    _margin(margin)
    if labels.shape[0] != emb.shape[0]:
        # refused here, as the core words it, before a margin reads the batch row by row
        raise ValueError(f"labels: has {labels.shape[0]} entries but emb has {emb.shape[0]} rows")

    def target_cos() -> np.ndarray:
        if emb.shape[1] != weight.shape[1] or weight.shape[0] % sub_centers:
            return np.full(len(labels), np.nan)  # the core refuses the shapes next
        classes = weight.shape[0] // sub_centers
        if labels.size and (labels.max() >= classes or labels.min() < -1):
            return np.full(len(labels), np.nan)  # the core names the bad label next
        return target_cosines(emb, weight, labels, sub_centers)

    def norms() -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.linalg.norm(emb.astype(np.float64), axis=1)

    return margin.batch_rows(norms, target_cos, step)


def _head_options(sub_centers: Any, interclass_filter: Any) -> dict[str, Any]:
    return {
        "sub_centers": _sub_centers(sub_centers),
        "interclass_filter": _interclass_filter(interclass_filter),
    }


def margin_logits(
    emb: Any,
    weight: Any,
    labels: Any,
    margin: Margin,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
) -> np.ndarray:
    """The (B, C) margin logits: ``s * cos`` with ``s * psi(cos)`` at each row's label.

    Parameters
    ----------
    emb : array_like
        (B, D) float32 or float64 embeddings, L2-normalised inside.
    weight : array_like
        (C, D) class centres of the same dtype, one row per class (as ``nn.Linear``).
    labels : array_like
        (B,) integers in [0, C), or -1 for a row without margin.
    margin : Margin
        Any margin; hard-negative margins (CurricularFace, MVSoftmax) change the non-target
        logits too.
    sub_centers : int
        Centres per class K: ``weight`` is (C*K, D), class j owns rows j*K .. j*K+K-1 and
        its cosine is the largest of theirs.
    interclass_filter : float or None
        Non-target cosines above it become 0 before the margin (InsightFace's inter-class
        filtering); None for none.

    Returns
    -------
    numpy.ndarray
        (B, C) logits in the inputs' dtype.
    """
    emb, weight = _floats("emb", emb), _floats("weight", weight)
    _same_dtype(emb=emb, weight=weight)
    labels = _labels(labels)
    head = _head_options(sub_centers, interclass_filter)
    rows = _row_blocks(margin, emb, weight, labels, head["sub_centers"], step=False)
    out = _core.margin_logits(emb, weight, labels, _margin(margin), row_margins=rows, **head)
    margin.commit()
    return out


def margin_logits_backward(
    grad_logits: Any,
    emb: Any,
    weight: Any,
    labels: Any,
    margin: Margin,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of any loss of :func:`margin_logits`' output.

    Parameters
    ----------
    grad_logits : array_like
        (B, C) dL/dlogits, the dtype of ``emb``.
    emb, weight, labels, margin, sub_centers, interclass_filter
        As for :func:`margin_logits` (a margin with per-call state, AdaFace, ElasticFace or
        CurricularFace, uses the per-row values of its last forward call).

    Returns
    -------
    grad_emb : numpy.ndarray
        (B, D) dL/demb.
    grad_weight : numpy.ndarray
        (C, D) dL/dweight.
    """
    grad_logits = _floats("grad_logits", grad_logits)
    emb, weight = _floats("emb", emb), _floats("weight", weight)
    _same_dtype(grad_logits=grad_logits, emb=emb, weight=weight)
    spec = _margin(margin)
    head = _head_options(sub_centers, interclass_filter)
    rows = margin.last_rows()
    return _core.margin_logits_backward(
        grad_logits, emb, weight, _labels(labels), spec, row_margins=rows, **head
    )


def margin_loss(
    emb: Any,
    weight: Any,
    labels: Any,
    margin: Margin,
    reduction: Literal["mean", "sum", "none"] = "mean",
    sub_centers: int = 1,
    interclass_filter: float | None = None,
    grad_filter: str | float | None = None,
) -> tuple[np.floating | np.ndarray, np.ndarray, np.ndarray]:
    """Fused softmax cross-entropy of the margin logits, with both gradients.

    Never holds the whole (B, C) logits. Every finite non-zero row is accepted, whatever
    its magnitude; the GIL is released during the work.

    Parameters
    ----------
    emb : array_like
        (B, D) float32 or float64 embeddings.
    weight : array_like
        (C, D) class centres of the same dtype.
    labels : array_like
        (B,) integers in [0, C); -1 marks a row that adds no loss and gets zero gradient.
    margin : Margin
        The head's margin object.
    reduction : {"mean", "sum", "none"}
        ``mean`` divides by the rows that are not ignored (0 if all are); ``none`` returns
        the per-row losses, with the gradients of their sum.
    sub_centers : int
        Centres per class K (sub-center ArcFace): ``weight`` is (C*K, D), class j owns rows
        j*K .. j*K+K-1, its cosine is the largest of theirs and its gradient goes to that
        centre only. Never more than a tile of the (B, C*K) cosines is held.
    interclass_filter : float or None
        Non-target cosines above it become 0, without gradient, before the margin
        (InsightFace's inter-class filtering; its filtered configs use 0.4).
    grad_filter : None, "auto" or float
        None (default): the exact gradient. A float f drops from dL/dcos the entries whose
        softmax probability is below f (times |h'(cos)| for CurricularFace and MV-Softmax;
        the target's entry is always kept) and skips the backward work of what drops;
        ``"auto"`` is the dtype's eps/32 (2**-28 for float32, 2**-57 for float64), Cut
        Cross-Entropy's choice. The loss stays exact. Each row's change of dL/dcos is at
        most (its dropped entries) * f * s * (its weight in the reduction): an
        approximation, visible when rows are classified with great confidence (the whole
        gradient is then small).

    Returns
    -------
    loss : numpy.floating or numpy.ndarray
        A scalar (or (B,) for ``none``) of the inputs' dtype, computed in float64.
    grad_emb : numpy.ndarray
        (B, D) dloss/demb.
    grad_weight : numpy.ndarray
        (C, D) dloss/dweight.
    """
    emb, weight = _floats("emb", emb), _floats("weight", weight)
    _same_dtype(emb=emb, weight=weight)
    _reduction(reduction)
    labels = _labels(labels)
    head = _head_options(sub_centers, interclass_filter)
    blocks = _row_blocks(margin, emb, weight, labels, head["sub_centers"])
    loss, rows, g_emb, g_w, _ = _core.margin_loss(
        emb,
        weight,
        labels,
        _margin(margin),
        reduction,
        row_margins=blocks,
        grad_filter=_grad_filter(grad_filter),
        **head,
    )
    margin.commit()  # the call was accepted: running statistics and draws move on
    out = rows.astype(emb.dtype) if reduction == "none" else emb.dtype.type(loss)
    return out, g_emb, g_w


def apply_margin(cos: Any, labels: Any, margin: Margin) -> np.ndarray:
    """The margin on a (B, C) cosine matrix from any GEMM.

    Parameters
    ----------
    cos : array_like
        (B, C) float32 or float64 cosines; they may overshoot [-1, 1] by 1e-3 (rounding)
        and are clamped.
    labels : array_like
        (B,) integers in [0, C), -1 for no margin.
    margin : Margin
        Any margin with a fixed ``s`` (a cosine matrix carries no feature norm, so
        ``SphereFace(s=None)`` is refused).

    Returns
    -------
    numpy.ndarray
        (B, C) logits ``s * cos``, ``s * psi(cos)`` on each row's label.
    """
    cos = _floats("cos", cos)
    spec = _refuse_norm_margins(margin)
    return _core.apply_margin(cos, _labels(labels), spec, row_margins=margin.row_blocks)


def apply_margin_backward(grad_logits: Any, cos: Any, labels: Any, margin: Margin) -> np.ndarray:
    """dL/dcos from dL/dlogits of :func:`apply_margin`.

    Parameters
    ----------
    grad_logits : array_like
        (B, C) dL/dlogits, the dtype of ``cos``.
    cos, labels, margin
        As for :func:`apply_margin`.

    Returns
    -------
    numpy.ndarray
        (B, C) dL/dcos.
    """
    grad_logits, cos = _floats("grad_logits", grad_logits), _floats("cos", cos)
    _same_dtype(grad_logits=grad_logits, cos=cos)
    spec = _refuse_norm_margins(margin)
    return _core.apply_margin_backward(
        grad_logits, cos, _labels(labels), spec, row_margins=margin.row_blocks
    )


def center_loss(
    emb: Any, centers: Any, labels: Any, lambda_c: float = 0.003, alpha: float = 0.5
) -> tuple[np.floating, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Center loss (Wen et al. 2016), fused: its loss, embedding gradient and centre update.

    ``loss = lambda_c / 2 * mean_i ||x_i - c_{y_i}||^2`` over the rows whose label is not -1,
    ``grad_emb_i = lambda_c (x_i - c_{y_i}) / n``; the centres move by the paper's rule
    ``c_j -= alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``, computed from the centres
    as they were for the loss.

    Parameters
    ----------
    emb : array_like
        (B, D) float32 or float64 embeddings (used as given, not normalised).
    centers : array_like
        (C, D) class centres, the dtype of ``emb``.
    labels : array_like
        (B,) classes in [0, C), -1 for rows that take no part.
    lambda_c, alpha : float
        Loss weight and centre learning rate, >= 0.

    Returns
    -------
    loss : numpy.floating
        In the inputs' dtype (computed in float64).
    grad_emb : numpy.ndarray
        (B, D) dloss/demb.
    update : (numpy.ndarray, numpy.ndarray)
        ``(classes, delta)``: ``centers[classes] += delta`` applies the update.
    """
    emb, centers = _floats("emb", emb), _floats("centers", centers)
    _same_dtype(emb=emb, centers=centers)
    loss, grad, classes, delta = _core.center_loss(
        emb, centers, _labels(labels), float(lambda_c), float(alpha)
    )
    return emb.dtype.type(loss), grad, (classes, delta)
