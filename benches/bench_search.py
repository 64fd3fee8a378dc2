#!/usr/bin/env python3
"""arcface_rs.cosine_topk vs the peers of benches/peer_search.py (faiss-cpu
IndexFlatIP, numpy matmul + argpartition, usearch exact), float32, k=10, 2 threads.

usage: python benches/bench_search.py [N,D,Q ...] [--peer PATH] [--simd avx512|avx2|neon|scalar]
  default workloads: 1000000,512,1  100000,512,32  1000000,512,256  100000,512,1024
The peers run in their own process (peer_search.py); arcface_rs runs on the same data (same
generator and seed) in this one, best of 3, and its ids are compared with faiss's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEER = Path(__file__).resolve().parent / "peer_search.py"


def ours(n: int, d: int, q: int, k: int) -> tuple[float, np.ndarray]:
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n, d), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    x = rng.standard_normal((q, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    afr.cosine_topk(x, g, k)
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        _, ids = afr.cosine_topk(x, g, k)
        best = min(best, time.perf_counter() - t)
    # faiss's ids for the recall column
    import faiss

    index = faiss.IndexFlatIP(d)
    index.add(g)
    ref = index.search(x, k)[1]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, ref)])
    return 1e3 * best, recall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "workloads",
        nargs="*",
        default=["1000000,512,1", "100000,512,32", "1000000,512,256", "100000,512,1024"],
    )
    ap.add_argument("--peer", default=str(PEER))
    ap.add_argument(
        "--simd", choices=("avx512", "avx2", "neon", "scalar"), help="cap the SIMD level"
    )
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS="2", OMP_NUM_THREADS="2")
    os.environ.update(RAYON_NUM_THREADS="2", OMP_NUM_THREADS="2")
    from bench_gallery import cpu_model

    print(f"{cpu_model()}, SIMD level {afr.simd_level()}")
    print("float32, k=10, 2 threads; ms (lower is better); ratio = peer ms / arcface_rs ms")
    print()
    print(
        "| N, D, Q | arcface_rs | faiss flat IP | numpy | usearch exact | vs faiss | vs numpy "
        "| vs usearch | ids = faiss's |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in args.workloads:
        n, d, q = (int(v) for v in w.split(","))
        out = subprocess.run(
            [sys.executable, args.peer, str(n), str(d), str(q), "10"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        peers = {}
        for line in out.splitlines():
            rec = json.loads(line)
            if "peer" in rec:
                peers[rec["peer"]] = rec["ms"]
        ms, recall = ours(n, d, q, 10)

        def cell(name, peers=peers):
            return f"{peers[name]:.0f}" if name in peers else "-"

        def ratio(name, peers=peers, ms=ms):
            return f"{peers[name] / ms:.2f}x" if name in peers else "-"

        names = ("faiss_flat_ip", "numpy_matmul_argpartition", "usearch_exact")
        print(
            f"| {n}, {d}, {q} | {ms:.0f} | "
            + " | ".join(cell(p) for p in names)
            + " | "
            + " | ".join(ratio(p) for p in names)
            + f" | {recall:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    if "--simd" in sys.argv[:-1]:  # read by arcface_rs at first use: set before the import
        os.environ["ARCFACE_RS_SIMD"] = sys.argv[sys.argv.index("--simd") + 1]
    import numpy as np

    import arcface_rs as afr

    main()
