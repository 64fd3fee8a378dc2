#!/usr/bin/env python3
"""Peer runner: exact top-k inner-product search over unit rows (= cosine) with faiss-cpu's
flat index, NumPy (matmul + argpartition) and usearch's exact search.

usage: python benches/peer_search.py N D Q K
prints one JSON line per peer: {"peer", "ms", "qps", "recall_vs_faiss", ...}

The data come from numpy's default_rng(0) as in bench_search.py, so arcface_rs can run on
the same rows in another process. Times are the best of 3 after one warm-up.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    a = rng.standard_normal((n, d), dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def best(fn, reps: int = 3):
    out = fn()
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, out


def main() -> None:
    n, d, q, k = (int(v) for v in sys.argv[1:5])
    rng = np.random.default_rng(0)
    gallery = unit_rows(rng, n, d)
    queries = unit_rows(rng, q, d)
    found: dict[str, tuple[float, np.ndarray]] = {}

    import faiss

    index = faiss.IndexFlatIP(d)
    index.add(gallery)
    t, (_, ids) = best(lambda: index.search(queries, k))
    found["faiss_flat_ip"] = (t, ids)

    if q * n <= 250_000_000:  # the Q x N score matrix must fit in about 1 GB

        def numpy_search() -> np.ndarray:
            scores = queries @ gallery.T
            top = np.argpartition(-scores, k, axis=1)[:, :k]
            return top

        found["numpy_matmul_argpartition"] = best(numpy_search)

    try:
        from usearch.index import MetricKind
        from usearch.index import search as usearch_search

        t, matches = best(
            lambda: usearch_search(gallery, queries, k, MetricKind.IP, exact=True, threads=2)
        )
        found["usearch_exact"] = (t, np.asarray(matches.keys).reshape(q, -1))
    except Exception as err:  # usearch is optional
        print(json.dumps({"usearch_error": str(err)}))

    reference = found["faiss_flat_ip"][1]
    for name, (t, ids) in found.items():
        ids = np.asarray(ids).reshape(q, -1)[:, :k]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, reference)])
        print(
            json.dumps(
                {
                    "peer": name,
                    "N": n,
                    "D": d,
                    "Q": q,
                    "K": k,
                    "ms": round(1e3 * t, 2),
                    "qps": round(q / t, 1),
                    "recall_vs_faiss": round(float(recall), 4),
                }
            )
        )


if __name__ == "__main__":
    main()
