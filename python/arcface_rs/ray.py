"""A gallery sharded over Ray actors: ``arcface_rs.ray.ShardedGallery`` (needs Ray:
``pip install "arcface_rs[ray]"``; ``import arcface_rs`` alone never does).

Each shard is a Ray actor owning one :class:`arcface_rs.Gallery`. A row with id ``i``
lives on shard ``i % shards``, so an id always has one home. A query is put once into Ray's
object store (zero-copy NumPy for the actors on this node), every shard searches it in
parallel, and the per-shard exact top-k lists are merged on the caller. Results equal one
Gallery holding the same rows, ties included: every row carries the global order in which
it was added, and ties go to the row added first, as in a Gallery.

Point it at a cluster with ``ray.init(address=...)`` before building it: the actors are
placed by Ray (``actor_options`` are passed to ``.options()``, e.g. ``{"num_cpus": 2}`` or
a scheduling strategy).
"""

from __future__ import annotations

import json
import numbers
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ._gallery import Gallery, id_list
from ._gallery import _rows as _float32_rows
from ._validate import count as _count

__all__ = ["ShardedGallery"]

#: Seconds a call waits for a shard before it is reported as unreachable.
TIMEOUT_S = 30.0


class _Shard:
    """One shard: a Gallery and, per row, the global order in which it was added."""

    def __init__(self, dim: int, dtype: str) -> None:
        self.gallery = Gallery(dim, dtype)
        self.order: dict[int, int] = {}

    def missing(self, ids: np.ndarray) -> np.ndarray:
        have = self.gallery.ids()
        return ids[~np.isin(ids, have)]

    def present(self, ids: np.ndarray) -> np.ndarray:
        return ids[np.isin(ids, self.gallery.ids())]

    def add(self, emb: np.ndarray, ids: np.ndarray, order: np.ndarray) -> None:
        self.gallery.add(emb, ids=ids)
        self.order.update(zip(ids.tolist(), order.tolist()))

    def remove(self, ids: np.ndarray) -> int:
        n = self.gallery.remove(ids)
        for i in ids.tolist():
            self.order.pop(i, None)
        return n

    def _orders(self, ids: np.ndarray) -> np.ndarray:
        get = self.order.get
        return np.array([get(i, -1) for i in ids.reshape(-1).tolist()], dtype=np.int64).reshape(
            ids.shape
        )

    def search(self, queries: np.ndarray, k: int, allow: Any, deny: Any):
        scores, ids = self.gallery.search(queries, k, allow=allow, deny=deny)
        return scores, ids, self._orders(ids)

    def range_search(self, queries: np.ndarray, threshold: float):
        lims, scores, ids = self.gallery.range_search(queries, threshold)
        return lims, scores, ids, self._orders(ids)

    def size(self) -> int:
        return len(self.gallery)

    def save(self, path: str) -> np.ndarray:
        self.gallery.save(path)
        return self._orders(self.gallery.ids())

    def snapshot(self):
        ids, vectors = self.gallery.snapshot()
        return ids, vectors, self._orders(ids)


def _ids_array(name: str, value: Any) -> np.ndarray:
    return id_list(name, np.asarray(value).reshape(-1) if np.ndim(value) == 0 else value)


def _threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"threshold must be a number, got {type(value).__name__}")
    if not np.isfinite(value):
        raise ValueError(f"threshold must be finite, got {value}")
    return float(value)


class ShardedGallery:
    """A :class:`arcface_rs.Gallery` split over ``shards`` Ray actors.

    Parameters
    ----------
    dim : int
        Embedding size.
    dtype : {"float32", "float16", "bfloat16", "int8"}
        Storage of every shard.
    shards : int
        Number of actors, >= 1.
    actor_options : dict, optional
        Passed to each actor's ``.options()`` (resources, placement).
    """

    def __init__(
        self,
        dim: int,
        dtype: str = "float32",
        shards: int = 2,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
            raise ValueError(f"shards: must be an integer >= 1, got {shards!r}")
        Gallery(dim, dtype)  # checks dim and dtype here, before any actor starts
        if not ray.is_initialized():
            ray.init()
        self.dim, self.dtype, self.shards = int(dim), dtype, int(shards)
        remote = ray.remote(_Shard).options(**(actor_options or {}))
        self._actors = [remote.remote(self.dim, dtype) for _ in range(self.shards)]
        self._next_id = 0
        self._next_order = 0
        # adds and removes run one at a time: automatic ids and the add order are assigned
        # under it, so concurrent callers never collide on an id
        self._lock = threading.Lock()

    @property
    def actors(self) -> list[Any]:
        """The Ray actor handles, shard i at index i."""
        return list(self._actors)

    def _get(self, refs: list[Any]) -> list[Any]:
        """Results of one call per shard; a dead or unreachable shard raises RuntimeError
        naming it (within ``TIMEOUT_S``)."""
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=TIMEOUT_S))
            except ray.exceptions.GetTimeoutError as e:
                raise RuntimeError(
                    f"ShardedGallery: shard {i} did not answer in {TIMEOUT_S} s"
                ) from e
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"ShardedGallery: shard {i} is dead or unreachable ({e})") from e
            except ray.exceptions.RayTaskError as e:
                # the shard's own exception (ValueError, MemoryError, ...), as a Gallery
                # would raise it, not Ray's wrapper with its coloured remote traceback
                cause = getattr(e, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise RuntimeError(f"ShardedGallery: shard {i} failed: {e}") from None
        return out

    def _route(self, ids: np.ndarray) -> list[np.ndarray]:
        home = ids % self.shards
        return [np.nonzero(home == s)[0] for s in range(self.shards)]

    def __len__(self) -> int:
        return int(sum(self._get([a.size.remote() for a in self._actors])))

    def __repr__(self) -> str:
        return f"ShardedGallery(dim={self.dim}, dtype={self.dtype!r}, shards={self.shards})"

    def add(self, emb: Any, ids: Any = None) -> np.ndarray:
        """Enrols rows (all or nothing, as :meth:`Gallery.add`); returns their ids.

        Parameters
        ----------
        emb : array_like
            (n, dim) or (dim,) embeddings.
        ids : array_like of int, optional
            Ids >= 0, new and distinct; by default ``next_id, next_id + 1, ...``.

        Returns
        -------
        numpy.ndarray
            (n,) int64 ids.
        """
        # The whole batch is checked here, as Gallery.add checks it, before any shard sees
        # it (float64 rows are scaled into float32's range first, as a Gallery does).
        x = _float32_rows("emb", emb, self.dim)
        norms = np.linalg.norm(x.astype(np.float64), axis=1) if len(x) else np.zeros(0)
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            i = int(np.argmax(bad))
            what = "is all zeros" if norms[i] == 0 else "contains NaN or inf"
            raise ValueError(f"emb: row {i} {what}")
        given = None
        if ids is not None:
            given = _ids_array("ids", ids)
            if len(given) != len(x):
                raise ValueError(f"ids: {len(given)} ids for {len(x)} rows")
            if (given < 0).any():
                raise ValueError("ids: must be >= 0 (-1 means 'no result')")
            if len(np.unique(given)) != len(given):
                raise ValueError("ids: contains duplicates")
        with self._lock:
            if given is None:
                ids_a = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
            else:
                ids_a = given
            parts = self._route(ids_a)
            taken = self._get([a.present.remote(ids_a[p]) for a, p in zip(self._actors, parts)])
            clash = np.concatenate(taken)
            if len(clash):
                raise ValueError(f"ids: already in the gallery: {clash[:5].tolist()}")
            order = np.arange(self._next_order, self._next_order + len(x), dtype=np.int64)
            self._add_all_or_nothing(x, ids_a, order, parts)
            self._next_order += len(x)
            if len(ids_a):
                self._next_id = max(self._next_id, int(ids_a.max()) + 1)
        return ids_a

    def _add_all_or_nothing(
        self, x: np.ndarray, ids: np.ndarray, order: np.ndarray, parts: list[np.ndarray]
    ) -> None:
        """Adds each shard's part; if any shard fails (out of memory, dead), the parts the
        others took are removed again before the error is raised."""
        refs = {s: self._actors[s].add.remote(x[p], ids[p], order[p]) for s, p in enumerate(parts)}
        done, error = [], None
        for s, ref in refs.items():
            try:
                self._get([ref])
                done.append(s)
            except Exception as e:  # re-raised below, after the rollback
                error = error or e
        if error is not None:
            for s in done:
                if len(parts[s]):
                    try:
                        self._get([self._actors[s].remove.remote(ids[parts[s]])])
                    except Exception:  # the first error is the one to report
                        pass
            raise error

    def remove(self, ids: Any) -> int:
        """Removes rows by id (all must be present); returns how many."""
        ids_a = _ids_array("ids", ids)
        if len(np.unique(ids_a)) != len(ids_a):
            raise ValueError("ids: contains duplicates")
        with self._lock:
            parts = self._route(ids_a)
            gone = self._get([a.missing.remote(ids_a[p]) for a, p in zip(self._actors, parts)])
            missing = np.concatenate(gone)
            if len(missing):
                raise ValueError(f"ids: not in the gallery: {missing[:5].tolist()}")
            refs = [a.remove.remote(ids_a[p]) for a, p in zip(self._actors, parts) if len(p)]
            return int(sum(self._get(refs)))

    def search(
        self, queries: Any, k: int = 10, allow: Any = None, deny: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over every shard, as :meth:`Gallery.search` (same results, ties
        included): each shard's exact top-k, merged here."""
        k = _count("k", k)
        single = np.ndim(queries) == 1
        # the Gallery's own conversion (float64 queries scaled into float32's range)
        q = _float32_rows("queries", queries, self.dim)
        ref = ray.put(np.ascontiguousarray(q))
        if allow is not None and deny is not None:
            raise ValueError("allow, deny: give one of them, not both")
        allow_a = None if allow is None else _ids_array("allow", allow)
        deny_a = None if deny is None else _ids_array("deny", deny)
        parts = self._get([a.search.remote(ref, k, allow_a, deny_a) for a in self._actors])
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.concatenate([p[2] for p in parts], axis=1).astype(np.float64)
        order[ids < 0] = np.inf  # padding sorts last
        key = np.lexsort((order, -scores.astype(np.float64)), axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, key, 1), np.take_along_axis(ids, key, 1)
        return (scores[0], ids[0]) if single else (scores, ids)

    def identify(
        self, queries: Any, threshold: float, allow: Any = None, deny: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query's best id, -1 below ``threshold`` (as :meth:`Gallery.identify`)."""
        threshold = _threshold(threshold)
        scores, ids = self.search(queries, 1, allow=allow, deny=deny)
        best, top = scores[..., 0], ids[..., 0]
        return np.where(best >= threshold, top, -1), best

    def range_search(self, queries: Any, threshold: float):
        """Every row scoring above ``threshold``, as :meth:`Gallery.range_search`."""
        threshold = _threshold(threshold)
        q = _float32_rows("queries", queries, self.dim)
        ref = ray.put(np.ascontiguousarray(q))
        parts = self._get([a.range_search.remote(ref, threshold) for a in self._actors])
        lims, all_scores, all_ids = [0], [], []
        for i in range(len(q)):
            s = np.concatenate([p[1][p[0][i] : p[0][i + 1]] for p in parts])
            d = np.concatenate([p[2][p[0][i] : p[0][i + 1]] for p in parts])
            o = np.concatenate([p[3][p[0][i] : p[0][i + 1]] for p in parts])
            key = np.lexsort((o, -s.astype(np.float64)))
            all_scores.append(s[key])
            all_ids.append(d[key])
            lims.append(lims[-1] + len(key))
        empty_f, empty_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
        return (
            np.array(lims, dtype=np.int64),
            np.concatenate(all_scores) if all_scores else empty_f,
            np.concatenate(all_ids) if all_ids else empty_i,
        )

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Writes one safetensors file per shard and ``manifest.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [str(folder / f"shard_{i}.safetensors") for i in range(self.shards)]
        orders = self._get([a.save.remote(p) for a, p in zip(self._actors, paths)])
        for i, o in enumerate(orders):
            np.save(folder / f"shard_{i}.order.npy", o)
        manifest = {
            "format": "arcface_rs.ShardedGallery",
            "version": 1,
            "dim": self.dim,
            "dtype": self.dtype,
            "shards": self.shards,
            "next_id": self._next_id,
            "next_order": self._next_order,
        }
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, folder / "manifest.json")

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        shards: int | None = None,
        actor_options: dict[str, Any] | None = None,
    ) -> ShardedGallery:
        """Reads a :meth:`save` into ``shards`` new actors (by default as many as saved),
        each row on shard ``id % shards``, in the order the rows were added."""
        if shards is not None and (
            isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1
        ):
            raise ValueError(f"shards: must be None (as saved) or an integer >= 1, got {shards!r}")
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != "arcface_rs.ShardedGallery" or manifest.get("version") != 1:
            raise ValueError(f"{folder}: not a ShardedGallery save (manifest {manifest})")
        saved = manifest.get("shards")
        if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
            raise ValueError(f"{folder}: the manifest's shard count {saved!r} is not >= 1")
        out = cls(manifest["dim"], manifest["dtype"], saved if shards is None else shards,
                  actor_options)  # fmt: skip
        ids, vectors, orders = [], [], []
        for i in range(manifest["shards"]):
            g = Gallery.load(folder / f"shard_{i}.safetensors")
            gi, gv = g.snapshot()
            ids.append(gi)
            vectors.append(gv)
            orders.append(np.load(folder / f"shard_{i}.order.npy"))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        all_vecs = np.concatenate(vectors) if vectors else np.zeros((0, out.dim), np.float32)
        all_order = np.concatenate(orders) if orders else np.zeros(0, np.int64)
        by_order = np.argsort(all_order, kind="stable")
        if len(by_order):
            out._add_in_order(all_vecs[by_order], all_ids[by_order], all_order[by_order])
        out._next_id = int(manifest["next_id"])
        out._next_order = int(manifest["next_order"])
        return out

    def _add_in_order(self, vectors: np.ndarray, ids: np.ndarray, order: np.ndarray) -> None:
        parts = self._route(ids)
        self._get(
            [
                a.add.remote(vectors[p], ids[p], order[p])
                for a, p in zip(self._actors, parts)
                if len(p)
            ]
        )
