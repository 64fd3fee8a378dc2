#!/usr/bin/env python3
"""cosine_topk's many-query path on a hard gallery, in three row orders.

usage: python benches/bench_search_order.py [N Q]   (default N=100,000 rows, Q=256 queries,
D=512, float32, k=10, 2 threads)

Every gallery row is a random unit vector plus a growing multiple of one direction, and the
queries lie close to that direction, so scores climb steadily from one end of the gallery to
the other and many rows sit within the int8 pass's error bound of each other. Stored in
ascending order the running k-th score keeps rising as the scan goes (the most rows pass the
bound), in descending order it is high from the start. The same rows shuffled are the
baseline. Best of 3 per order; the ids are checked against NumPy's exact top k.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _runner import best, cpu_model  # noqa: E402

import arcface_rs as afr  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    q = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    d, k = 512, 10
    rng = np.random.default_rng(0)
    base = rng.standard_normal(d).astype(np.float32)
    base /= np.linalg.norm(base)
    g = rng.standard_normal((n, d), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g += np.linspace(0.0, 1.5, n, dtype=np.float32)[:, None] * base
    queries = (base + 0.3 * rng.standard_normal((q, d), dtype=np.float32) / np.sqrt(d)).astype(
        np.float32
    )
    orders = {
        "ascending": np.arange(n),
        "descending": np.arange(n)[::-1],
        "shuffled": rng.permutation(n),
    }
    print(f"{cpu_model()}, SIMD level {afr.simd_level()}; N={n}, D={d}, Q={q}, k={k}, 2 threads")
    print()
    print("| row order | ms | ids = exact |")
    print("| --- | --- | --- |")
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for name, order in orders.items():
        rows = np.ascontiguousarray(g[order])
        ms = best(functools.partial(afr.cosine_topk, queries, rows, k), reps=3)
        _, ids = afr.cosine_topk(queries, rows, k)
        exact = qn.astype(np.float64) @ unit[order].astype(np.float64).T
        want = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        same = np.mean(np.sort(ids, axis=1) == np.sort(want, axis=1))
        print(f"| {name} | {ms:.1f} | {same:.4f} |")


if __name__ == "__main__":
    main()
