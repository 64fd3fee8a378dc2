#!/usr/bin/env python3
"""arcface_rs.evaluation: lfw_protocol against a transcription of InsightFace's
``evaluate()`` (a Python loop over thresholds, as the script runs), and all_pairs_tar_at_far
at scale against the time of its GEMM work alone. One run, 2 threads.

usage: python benches/bench_evaluation.py [--pairs 6000] [--n 100000] [--d 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _memory import rss_growth_mib  # noqa: E402

import arcface_rs as afr  # noqa: E402
from arcface_rs import evaluation as ev  # noqa: E402


def transcription(emb: np.ndarray, issame: np.ndarray, folds: int = 10) -> None:
    """InsightFace's calculate_roc + calculate_val loops (same work, same order)."""
    from sklearn.model_selection import KFold

    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    idx = np.arange(len(issame))
    for grid in (np.arange(0, 4, 0.01), np.arange(0, 4, 0.001)):
        for train, test in KFold(n_splits=folds, shuffle=False).split(idx):
            for th in grid:
                p = np.less(dist[train], th)
                np.sum(np.logical_and(p, issame[train]))
                np.sum(np.logical_and(p, np.logical_not(issame[train])))
            if len(grid) == 400:
                for th in grid:
                    p = np.less(dist[test], th)
                    np.sum(np.logical_and(p, issame[test]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_gallery import cpu_model

    print(f"{cpu_model()}, SIMD level {afr.simd_level()}, 2 threads")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2 * args.pairs, 128))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    same = rng.random(args.pairs) < 0.5
    t = time.perf_counter()
    transcription(emb, same)
    t_ref = time.perf_counter() - t
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        ev.lfw_protocol(emb, same)
        best = min(best, time.perf_counter() - t)
    print(
        f"lfw_protocol, {args.pairs} pairs: {1e3 * best:.1f} ms; InsightFace evaluate() "
        f"transcription {1e3 * t_ref:.0f} ms: {t_ref / best:.0f}x faster"
    )

    n, d = args.n, args.d
    ids = rng.integers(0, n // 5, n)
    centres = rng.standard_normal((n // 5, d), dtype=np.float32)
    x = centres[ids] + 3.0 * rng.standard_normal((n, d), dtype=np.float32)  # same-identity cos ~0.1
    del centres
    # the GEMM rate of this machine: float32 4096x512 @ 512x4096 products (numpy's BLAS)
    a = rng.standard_normal((4096, d), dtype=np.float32)
    a @ a.T
    t = time.perf_counter()
    for _ in range(5):
        a @ a.T
    rate = 5 * 2 * 4096 * 4096 * d / (time.perf_counter() - t)
    gemm_s = n * (n - 1) / 2 * d * 2 / rate
    out = {}

    def run() -> None:
        out.update(ev.all_pairs_tar_at_far(x, ids))

    t = time.perf_counter()
    growth = rss_growth_mib(run)
    took = time.perf_counter() - t
    tar = ", ".join(f"{f:g}: {v:.4f}" for f, v in out.items())
    print(
        f"all_pairs_tar_at_far, N={n} D={d} float32 ({n * (n - 1) // 2:.2e} pairs): {took:.1f} s; "
        f"GEMM work alone at {rate / 1e9:.0f} GFLOP/s (numpy float32): {gemm_s:.1f} s; "
        f"ratio {took / gemm_s:.2f}; memory growth {growth:.0f} MiB beyond the "
        f"{x.nbytes / 2**20:.0f} MiB features; TAR {{{tar}}}"
    )


if __name__ == "__main__":
    main()
