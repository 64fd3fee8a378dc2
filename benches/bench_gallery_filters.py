#!/usr/bin/env python3
"""Gallery.search with an allow-list against the unfiltered search, against copying the
allowed rows out and searching them, and against a gallery of only those rows built
beforehand, one query, N=1M D=512 float32 (and float16), 2 threads; and
range_search's time next to search's. One run.

usage: python benches/bench_gallery_filters.py [--n 1000000] [--share 0.1]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import arcface_rs as afr  # noqa: E402

D = 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--share", type=float, default=0.1)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_gallery import best, clustered, cpu_model

    g, probes = clustered(args.n, 5)
    q = probes[:1]
    rng = np.random.default_rng(2)
    allowed = np.sort(rng.choice(args.n, int(args.share * args.n), replace=False)).astype(np.int64)
    print(f"{cpu_model()}, SIMD level {afr.simd_level()}; N={args.n}, D={D}, k=10, Q=1, 2 threads")
    print()
    print(
        "| storage | unfiltered ms | allow 10% ms | ratio | copying the allowed rows out, then "
        "searching them ms | a gallery of only the allowed rows, built beforehand ms "
        "| range_search(0.5) ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in ("float32", "float16"):
        gal = afr.Gallery(D, dtype)
        for lo in range(0, args.n, 100_000):
            gal.add(g[lo : lo + 100_000])
        sub = afr.Gallery(D, dtype)
        sub.add(g[allowed], ids=allowed)
        t_all = best(lambda gal=gal: gal.search(q, 10))
        t_allow = best(lambda gal=gal: gal.search(q, 10, allow=allowed))
        t_sub = best(lambda sub=sub: sub.search(q, 10))
        t_range = best(lambda gal=gal: gal.range_search(q, 0.5), reps=5)

        def copied_out(gal=gal):
            # what a user does without `allow`: the allowed vectors out, then an exact search
            rows = gal.get(allowed)
            return allowed[afr.cosine_topk(q, rows, k=10)[1]]

        t_copy = best(copied_out, reps=5)
        assert np.array_equal(gal.search(q, 10, allow=allowed)[1], sub.search(q, 10)[1])
        assert np.array_equal(copied_out()[0], sub.search(q, 10)[1][0])
        print(
            f"| {dtype} | {t_all:.1f} | {t_allow:.1f} | {t_allow / t_all:.2f} | {t_copy:.1f} "
            f"| {t_sub:.1f} | {t_range:.1f} |",
            flush=True,
        )
        del gal, sub
    # What scattered rows cost on this machine: the same filtered search over as many
    # allowed rows, consecutive ones (the code path is the same, the reads are a stream).
    gal = afr.Gallery(D, "float32")
    for lo in range(0, args.n, 100_000):
        gal.add(g[lo : lo + 100_000])
    first = np.arange(len(allowed), dtype=np.int64)
    t_first = best(lambda: gal.search(q, 10, allow=first))
    t_spread = best(lambda: gal.search(q, 10, allow=allowed))
    print(
        f"\nfloat32, the same allow-list search over {len(allowed)} rows: spread over the "
        f"gallery {t_spread:.1f} ms, the first {len(allowed)} rows {t_first:.1f} ms "
        f"(scattered reads cost {t_spread / t_first:.2f}x here)"
    )


if __name__ == "__main__":
    main()
