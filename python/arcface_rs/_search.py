"""Exact cosine search (NumPy API); the work in the Rust core."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._validate import count as _count
from ._validate import floats as _floats
from ._validate import same_dtype as _same_dtype

__all__ = ["cosine_topk"]


def cosine_topk(
    queries: Any, gallery: Any, k: int = 10, normalized: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` gallery rows by cosine similarity for each query.

    Never builds the Q×N score matrix; the GIL is released. Ties go to the lower index.

    Parameters
    ----------
    queries : array_like
        (Q, D) float32 or float64, or one query (D,).
    gallery : array_like
        (N, D) rows of the same dtype; any finite non-zero magnitude (denormal to 1e300)
        gives the cosines of the rescaled rows.
    k : int
        Results per query, >= 1. Beyond N the extra columns are padded with score -inf
        and index -1 (an empty gallery pads every column); a ``k`` whose padded output
        would not fit in half the memory available raises ValueError.
    normalized : bool
        Promise that every row and query is a unit vector, skipping the division (NaN/inf
        and zero rows are still refused).

    Returns
    -------
    scores : numpy.ndarray
        (Q, k) cosines best first, in the inputs' dtype, clamped to [-1, 1] ((k,) for one
        1-D query).
    indices : numpy.ndarray
        (Q, k) int64 gallery rows, -1 for padding.
    """
    single = np.ndim(queries) == 1
    if single:
        queries = np.asarray(queries)[None, :]
    queries, gallery = _floats("queries", queries), _floats("gallery", gallery)
    _same_dtype(queries=queries, gallery=gallery)
    k = _count("k", k)
    scores, indices = _core.cosine_topk(queries, gallery, k, bool(normalized))
    return (scores[0], indices[0]) if single else (scores, indices)
