#!/usr/bin/env python3
"""arcface_rs.Gallery (float32, float16, bfloat16, int8 storage) vs usearch exact and
faiss-cpu IndexFlatIP (both float32) on clustered, face-like data: identities with several
noisy samples each. D=512, k=10, 2 threads; every figure in this one process and run.

usage: python benches/bench_gallery.py [--n 1000000] [--per-identity 5] [--big-q 256]
                                      [--simd avx512|avx2|neon|scalar]

`--simd` caps the kernels' instruction set (ARCFACE_RS_SIMD) to measure a lower level.

Columns: Q=1 search time (best of 7) and its ratio to usearch and faiss; recall@10 against
the exact float32 search (faiss) over 64 probes; the time for Q=big-q queries and its ratio
to faiss; and the growth of resident memory during that search (peak minus before, read
from /proc after resetting the peak), next to the size of the output.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
if "--simd" in sys.argv[:-1]:  # read by arcface_rs at first use: set before the import
    os.environ["ARCFACE_RS_SIMD"] = sys.argv[sys.argv.index("--simd") + 1]

import numpy as np  # noqa: E402
from _memory import rss_growth_mib  # noqa: E402
from _runner import best, cpu_model  # noqa: E402

import arcface_rs as afr  # noqa: E402

D, K = 512, 10


def clustered(n: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n samples of n/per identities (noise as large as the centre: same-identity cosine
    about 0.5) and 64 fresh probes of enrolled identities, all unit float32."""
    rng = np.random.default_rng(seed)
    ids = n // per
    centres = rng.standard_normal((ids, D), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    g = np.repeat(centres, per, axis=0)
    for lo in range(0, n, 100_000):  # in slices, to keep the temporaries small
        noise = rng.standard_normal((min(100_000, n - lo), D), dtype=np.float32)
        g[lo : lo + len(noise)] += noise / np.sqrt(D, dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    probes = centres[rng.integers(0, ids, 64)]
    probes = probes + rng.standard_normal(probes.shape, dtype=np.float32) / np.sqrt(D)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    return g, probes.astype(np.float32)


def read_bandwidth_gbs(a: np.ndarray, threads: int = 2) -> float:
    """Streaming read bandwidth: the best time of summing ``a`` in ``threads`` slices."""
    parts = np.array_split(a.reshape(-1).view(np.int32), threads)
    with ThreadPoolExecutor(threads) as pool:
        t_best = best(lambda: list(pool.map(np.bitwise_or.reduce, parts)), reps=5)
    return a.nbytes / (t_best / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--per-identity", type=int, default=5)
    ap.add_argument("--big-q", type=int, default=256)
    ap.add_argument(
        "--simd", choices=("avx512", "avx2", "neon", "scalar"), help="cap the SIMD level"
    )
    args = ap.parse_args()
    import faiss
    from usearch.index import MetricKind
    from usearch.index import search as usearch_search

    g, probes = clustered(args.n, args.per_identity)
    rng = np.random.default_rng(1)
    big = g[rng.integers(0, args.n, args.big_q)] + rng.standard_normal(
        (args.big_q, D), dtype=np.float32
    ) / np.float32(np.sqrt(D))
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    one = probes[:1]

    index = faiss.IndexFlatIP(D)
    index.add(g)
    exact = index.search(probes, K)[1]
    t_faiss = best(lambda: index.search(one, K))
    t_faiss_big = best(lambda: index.search(big, K), reps=2)
    t_usearch = best(lambda: usearch_search(g, one, K, MetricKind.IP, exact=True, threads=2))
    index.reset()  # frees its copy of the gallery
    bandwidth = read_bandwidth_gbs(g)

    print(
        f"{cpu_model()}, SIMD level {afr.simd_level()}; read bandwidth {bandwidth:.1f} GB/s "
        "(2 threads; measured again next to each storage's search, whose limit uses that)"
    )
    print(
        f"N={args.n}, D={D}, k={K}, {args.per_identity} samples per identity, 2 threads; "
        "ms, lower is better; ratio = peer ms / arcface_rs ms; limit = stored bytes / bandwidth"
    )
    print(
        f"usearch exact f32 Q=1: {t_usearch:.1f} ms; faiss flat IP Q=1: {t_faiss:.1f} ms, "
        f"Q={args.big_q}: {t_faiss_big:.0f} ms"
    )
    print()
    print(
        f"| storage | MiB | Q=1 ms | limit ms | vs limit | vs usearch f32 | vs faiss | recall@10 "
        f"| Q={args.big_q} ms | vs faiss | RSS growth (output) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        gal = afr.Gallery(D, dtype)
        for lo in range(0, args.n, 100_000):
            gal.add(g[lo : lo + 100_000])
        # the bandwidth drifts with the machine: measured next to the search it bounds,
        # alternating with it, best of each
        bw, t1 = 0.0, 1e9
        for _ in range(3):
            bw = max(bw, read_bandwidth_gbs(g))
            t1 = min(t1, best(lambda gal=gal: gal.search(one, K), reps=3))
        found = np.vstack([gal.search(probes[i : i + 8], K)[1] for i in range(0, 64, 8)])
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)])
        t_big = best(lambda gal=gal: gal.search(big, K), reps=2)
        growth = rss_growth_mib(lambda gal=gal: gal.search(big, K))
        out_mib = args.big_q * K * 12 / 2**20
        limit = gal.nbytes / (bw * 1e9) * 1e3
        print(
            f"| {dtype} | {gal.nbytes / 2**20:.0f} | {t1:.1f} | {limit:.1f} | {t1 / limit:.2f} "
            f"| {t_usearch / t1:.2f}x "
            f"| {t_faiss / t1:.2f}x | {recall:.4f} | {t_big:.0f} | {t_faiss_big / t_big:.2f}x "
            f"| {growth:.1f} MiB ({out_mib:.2f}) |",
            flush=True,
        )
        del gal


if __name__ == "__main__":
    main()
