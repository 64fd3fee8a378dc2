"""Gallery: enrolled embeddings with ids, searchable and kept on disk (safetensors)."""

from __future__ import annotations

import numbers
import os
import warnings
from typing import Any

import numpy as np

from . import _core
from ._cuda import FORKED, device_ordinal
from ._gallery_torch import GPU_MAX_K, query_rows, search_on_device, to_device, torch_of
from ._validate import count as _count
from ._validate import floats as _floats
from ._validate import labels as _labels

__all__ = ["Gallery"]

_DTYPES = ("float32", "float16", "bfloat16", "int8")


def _rows(name: str, value: Any, dim: int) -> np.ndarray:
    """(N, dim) float32 rows from float32/float64 input; one 1-D vector becomes (1, dim)."""
    value = np.asarray(value)
    if value.ndim == 1:
        # one vector, or an empty list (no rows at all)
        value = value.reshape(0, dim) if value.size == 0 else value[None, :]
    value = _floats(name, value)
    if value.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (the gallery's dim), got {value.shape}")
    if value.dtype == np.float64:
        # Scale each row into float32's range first: a huge or tiny but finite float64 row
        # must not turn into inf or zero on the cast. NaN/inf rows pass through to be refused.
        peak = np.max(np.abs(value), axis=1, keepdims=True) if value.size else None
        if peak is not None:
            ok = np.isfinite(peak) & (peak > 0)
            value = value / np.where(ok, peak, 1.0)
        value = value.astype(np.float32)
    return value


def _ids(value: Any) -> np.ndarray:
    ids = np.asarray(value)
    return _labels(ids[None] if ids.ndim == 0 else ids, "ids")


def id_list(name: str, value: Any) -> np.ndarray:
    """A 1-D int64 array of ids; an empty list (which NumPy reads as float64) is no id."""
    a = np.asarray(value)
    if a.ndim == 1 and a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D array of integer ids, got {a.dtype} {a.shape}")
    if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: ids exceed the int64 range")
    return np.ascontiguousarray(a, dtype=np.int64)


class Gallery:
    """Enrolled face embeddings with int64 ids, for exact cosine search.

    ``Gallery(dim, dtype="float32")``; ``dtype`` is how vectors are stored: ``"float32"``
    (exact), ``"float16"`` (half the memory and bandwidth), ``"bfloat16"`` or ``"int8"``
    (a quarter, with one scale per vector). Vectors are L2-normalised on ``add``.
    Safe to use from many threads: searches run side by side, ``add`` and ``remove`` wait
    for them and run alone; the GIL is released during the work.

    ``device="cuda"`` (or ``"cuda:N"``; needs a build with the ``cuda`` feature) searches on
    the GPU: a copy of the rows in the storage dtype is made there on the first search and
    brought up to date after each change; results are the CPU search's,
    up to the order of scores equal to float32 rounding. ``k`` up to 1024 and ``allow`` /
    ``deny`` filters are selected on the GPU; a larger ``k`` searches on the CPU. CUDA does
    not survive ``fork()``: a child forked after its parent used the GPU searches an
    inherited CUDA gallery on the CPU (the same results, with a RuntimeWarning) and cannot
    make a new one; start workers with the "spawn" method to search on the GPU there.
    """

    __slots__ = ("_core", "_device")

    def __init__(self, dim: int, dtype: str = "float32", device: Any = "cpu") -> None:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim <= 0:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dim > _core.GALLERY_MAX_DIM:
            raise ValueError(f"dim must be at most {_core.GALLERY_MAX_DIM} (2**24), got {dim}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self._device = device_ordinal(device)
        self._core = _core.Gallery(int(dim), dtype)

    @property
    def device(self) -> str:
        """Where searches run: ``"cpu"`` or ``"cuda:N"``."""
        return "cpu" if self._device is None else f"cuda:{self._device}"

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self._core.dim

    @property
    def dtype(self) -> str:
        """Storage dtype: float32, float16, bfloat16 or int8."""
        return self._core.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored vectors (and int8 scales)."""
        return self._core.nbytes

    def __len__(self) -> int:
        return len(self._core)

    def __repr__(self) -> str:
        where = ", mapped" if self.mapped else ""
        if self._device is not None:
            where += f", device={self.device!r}"
        return (
            f"Gallery(dim={self.dim}, dtype={self.dtype!r}, len={len(self)}, "
            f"vectors={self.nbytes / 2**20:.1f} MiB{where})"
        )

    def add(self, emb: Any, ids: Any = None) -> np.ndarray:
        """Adds embeddings, L2-normalised and stored in the gallery's dtype.

        All or nothing: on an error nothing is added.

        Parameters
        ----------
        emb : array_like
            (N, dim) or one (dim,) float32 or float64 embeddings; an empty input adds
            nothing.
        ids : array_like, optional
            (N,) integers >= 0, each new to the gallery (-1 is the "no result" and
            "unknown" marker of ``search`` and ``identify``); ``None`` numbers them on from
            one past the largest id ever added.

        Returns
        -------
        numpy.ndarray
            The (N,) int64 ids of the added rows.
        """
        emb = _rows("emb", emb, self.dim)
        if ids is not None:
            ids = _ids(ids)
            if ids.shape[0] != emb.shape[0]:
                raise ValueError(f"ids has {ids.shape[0]} entries for {emb.shape[0]} embeddings")
        return self._core.add(emb, ids)

    def remove(self, ids: Any) -> int:
        """Removes the vectors with these ids (the others keep their order).

        Parameters
        ----------
        ids : array_like
            Integers, each present and given once (else nothing is removed and ValueError
            names the id); an empty list removes nothing.

        Returns
        -------
        int
            How many vectors were removed.
        """
        return self._core.remove(_ids(ids))

    def _on_gpu(self) -> bool:
        """Whether a search of host queries runs on the GPU: a CUDA gallery with rows, in a
        process that can use CUDA. In a child forked after CUDA was initialised (CUDA does
        not survive fork(); the GPU copy is the parent's) it runs on the CPU, with the same
        results, and says so with a RuntimeWarning."""
        if self._device is None or len(self) == 0:
            return False
        if _core.cuda_forked():
            warnings.warn(
                f"Gallery on {self.device}: searching on the CPU. {FORKED}",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    def _queries(self, queries: Any) -> tuple[np.ndarray, bool]:
        single = np.ndim(queries) == 1
        return _rows("queries", queries, self.dim), single

    def _search_tensor(self, torch: Any, queries: Any, k: int, filt: dict) -> tuple[Any, Any]:
        """``search`` of a torch tensor: on the GPU where both are there, else on the CPU
        path with the results moved to the queries' device."""
        rows, single = query_rows(torch, queries, self.dim)
        if self._device is not None and rows.is_cuda and len(self) > 0 and k <= GPU_MAX_K:
            if rows.device.index != self._device:
                raise ValueError(f"queries are on {rows.device}, the gallery on {self.device}")
            scores, ids = search_on_device(self._core, self._device, torch, rows, k, filt)
        else:
            scores, ids = to_device(torch, rows, *self.search(rows.cpu().numpy(), k, **filt))
        return (scores[0], ids[0]) if single else (scores, ids)

    def _filter(self, allow: Any, deny: Any) -> dict[str, np.ndarray]:
        if allow is not None and deny is not None:
            raise ValueError("allow, deny: give one of them, not both")
        out = {}
        for name, value in (("allow", allow), ("deny", deny)):
            if value is not None:
                out[name] = id_list(name, value)
        return out

    def search(
        self, queries: Any, k: int = 10, allow: Any = None, deny: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` stored vectors by cosine for each query.

        Parameters
        ----------
        queries : array_like or torch.Tensor
            (Q, dim) or one (dim,) float32 or float64 queries. A CUDA tensor on a CUDA
            gallery is searched in place on torch's current stream and the results are
            CUDA tensors, with nothing copied to the host (a zero or non-finite query row
            then finds nothing: ids -1, scores -inf, since raising would wait for the GPU);
            other tensors get tensors on their device.
        k : int
            Results per query, >= 1. Beyond ``len(self)`` (or the rows a filter lets
            through) the extra columns hold score -inf and id -1 (all of them for an empty
            gallery); a ``k`` whose padded output would not fit in half the memory available
            raises ValueError.
        allow, deny : array_like of int, optional
            Search only the rows with these ids / all rows but these (at most one of the
            two; ids the gallery lacks are ignored). The search stays exact over those rows
            and reads the gallery once, as without a filter: each row that reaches a query's
            running threshold is checked against the sorted list.

        Returns
        -------
        scores : numpy.ndarray
            (Q, k) float32 best first ((k,) for one 1-D query): the unit query's dot
            products with the stored unit vectors, clamped to [-1, 1]; exact cosines for
            float32 storage, within its rounding (about 1e-3 for float16) otherwise.
        ids : numpy.ndarray
            (Q, k) int64; ties go to the vector added first.
        """
        k = _count("k", k)
        filt = self._filter(allow, deny)
        torch = torch_of(queries)
        if torch is not None:
            return self._search_tensor(torch, queries, k, filt)
        q, single = self._queries(queries)
        if not self._on_gpu():
            scores, ids = self._core.search(q, k, **filt)
        else:
            scores, ids = self._core.search_cuda(q, k, self._device, **filt)
        return (scores[0], ids[0]) if single else (scores, ids)

    def identify(
        self, queries: Any, threshold: float, allow: Any = None, deny: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Open-set identification: each query's best match, or "unknown".

        Parameters
        ----------
        queries : array_like or torch.Tensor
            (Q, dim) or one (dim,) queries (tensors as for :meth:`search`).
        threshold : float
            A best score below it means the face is not enrolled.
        allow, deny : array_like of int, optional
            As for :meth:`search`.

        Returns
        -------
        ids : numpy.ndarray
            (Q,) int64 best ids, -1 (unknown) where the score is below ``threshold``.
        scores : numpy.ndarray
            (Q,) float32 best scores (-inf for an empty gallery).
        """
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        filt = self._filter(allow, deny)
        torch = torch_of(queries)
        if torch is not None:
            best, top = self._search_tensor(torch, queries, 1, filt)
            best, top = best[..., 0], top[..., 0]
            return torch.where(best >= threshold, top, torch.full_like(top, -1)), best
        q, single = self._queries(queries)
        if not self._on_gpu():
            ids, scores = self._core.identify(q, float(threshold), **filt)
        else:
            best, top = self._core.search_cuda(q, 1, self._device, **filt)
            scores = best[:, 0]
            ids = np.where(scores >= threshold, top[:, 0], -1)
        return (ids[0], scores[0]) if single else (ids, scores)

    def range_search(
        self, queries: Any, threshold: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every stored vector scoring above ``threshold``, for each query (faiss's layout).

        Parameters
        ----------
        queries : array_like or torch.Tensor
            (Q, dim) or one (dim,) queries; a tensor is searched on the CPU (the result's
            length is not known in advance) and gets tensors on its device.
        threshold : float
            Rows with cosine > threshold are returned.

        Returns
        -------
        lims : numpy.ndarray
            (Q + 1,) int64 offsets: query i's results are at ``lims[i]:lims[i + 1]``.
        scores : numpy.ndarray
            float32 scores, best first within each query (ties: the vector added first).
        ids : numpy.ndarray
            int64 ids.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        torch = torch_of(queries)
        if torch is not None:  # a variable-length result: found on the CPU
            rows, _ = query_rows(torch, queries, self.dim)
            return to_device(torch, rows, *self.range_search(rows.cpu().numpy(), threshold))
        q, _ = self._queries(queries)
        lims, scores, ids = self._core.range_search(q, float(threshold))
        return lims.astype(np.int64), scores, ids

    def get(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids``, decoded to float32 unit rows, in the order asked.

        Parameters
        ----------
        ids : array_like of int
            (n,) ids; an id the gallery lacks raises ValueError naming it.

        Returns
        -------
        numpy.ndarray
            (n, dim) float32.
        """
        return self._core.get(id_list("ids", ids))

    def ids(self) -> np.ndarray:
        """The ids, int64, in gallery order."""
        return self._core.ids()

    def vectors(self) -> np.ndarray:
        """The stored vectors decoded to float32 unit rows (N, dim), in gallery order."""
        return self._core.vectors()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` read together under one lock.

        Returns
        -------
        ids : numpy.ndarray
            int64 (N,), in gallery order.
        vectors : numpy.ndarray
            float32 (N, dim) unit rows, row i belonging to ``ids[i]``; unlike separate
            ``ids()`` and ``vectors()`` calls, they match even while other threads add or
            remove.
        """
        return self._core.snapshot()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the gallery to ``path`` in the safetensors format, atomically.

        A crash mid-save leaves any old file intact (a new file is written, synced and
        renamed over the path; stale temporaries of killed saves are deleted by the next
        save). Tensors: ``ids`` int64, ``vectors`` and, for int8, ``scales``
        (``vectors * scales[:, None]`` are the unit rows); bfloat16 vectors are stored as
        their uint16 bits.

        Parameters
        ----------
        path : str or os.PathLike
            Where to write; a file system failure raises the matching ``OSError``
            subclass (a missing folder: ``FileNotFoundError``).
        """
        self._core.save(os.fspath(path))

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as the bytes of its file (checked again on unpickling), searched where it
        # was: a pickled GPU gallery unpickles on the same device
        return (_from_bytes, (self._core.to_bytes(), self.device))

    def __copy__(self) -> Gallery:
        # a copy owns its rows: adding to or removing from it leaves this gallery alone
        return _from_bytes(self._core.to_bytes(), self.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> Gallery:
        return self.__copy__()

    @property
    def mapped(self) -> bool:
        """Whether the vectors are read in place from the file (``load(..., mmap=True)``)."""
        return self._core.mapped

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False, device: Any = "cpu") -> Gallery:
        """Reads a gallery written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
            The file. A path that cannot be read raises the matching ``OSError`` subclass
            (``FileNotFoundError``, ``PermissionError``, ...); a truncated, damaged,
            wrong-version or wrong-shape file raises :class:`arcface_rs.GalleryFileError`
            (a ValueError; checked by shape, CRC-32 and unit norms).
        mmap : bool
            Leave the vectors in a read-only mapping of the file instead of copying them
            (several processes then share one copy in the page cache); they are copied the
            first time the gallery changes. Do not modify or truncate the file in place
            meanwhile: reading a page another program cut off kills the process with
            SIGBUS (as with ``numpy.memmap``). ``save`` never does that: it renames a new
            file over the path, so the mapping keeps reading the old, intact inode.
        device : str
            As for ``Gallery``.

        Returns
        -------
        Gallery
        """
        path = os.fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if "\0" in path:
            raise ValueError(f"path: contains a NUL byte, which no file name can: {path!r}")
        g = cls.__new__(cls)
        g._device = device_ordinal(device)
        g._core = _core.Gallery.load(path, bool(mmap))
        return g


def _from_bytes(data: bytes, device: Any = "cpu") -> Gallery:
    """A gallery from the bytes of its file (unpickling and copies)."""
    g = Gallery.__new__(Gallery)
    g._device = device_ordinal(device)
    g._core = _core.Gallery.from_bytes(data)
    return g
