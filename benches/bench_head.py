#!/usr/bin/env python3
"""arcface_rs.margin_loss vs the PyTorch eager head (benches/peer_head.py), one run.

usage: python benches/bench_head.py [B,D,C ...] [--peer PATH] [--threads N]
  default configs: 256,512,10000 256,512,100000 256,512,1000000

Each configuration runs in its own process (so peak RSS belongs to it alone) for the peer
and for arcface_rs, with the same thread count, and prints a Markdown table of times and
ratios. Times are the best of 5 steps after one warm-up; peak RSS growth is measured from
after the inputs exist, as peer_head.py does. The machine's speed drifts by ±10% over
minutes, so peer and arcface_rs processes alternate for `--rounds` rounds (1 round at
C >= 1M, where the peer alone takes minutes) and each side keeps its best time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import run_json  # noqa: E402

DEFAULT_PEER = Path(__file__).resolve().parent / "peer_head.py"


def worker(b: int, d: int, c: int) -> None:
    import numpy as np

    import arcface_rs as afr

    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, d), dtype=np.float32)
    w = rng.standard_normal((c, d), dtype=np.float32)
    w *= 0.01  # in place: no temporary inflating the baseline RSS
    y = rng.integers(0, c, size=b)
    margin = afr.ArcFace(s=64.0, m=0.5)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    afr.margin_loss(x, w, y, margin)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        out = afr.margin_loss(x, w, y, margin)
        times.append(time.perf_counter() - t)
        del out
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(
        json.dumps(
            {
                "ms": 1e3 * min(times),
                "ms_median": 1e3 * sorted(times)[2],
                "peak_mb": round(peak, 1),
                "threads": afr.num_threads(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "configs", nargs="*", default=["256,512,10000", "256,512,100000", "256,512,1000000"]
    )
    ap.add_argument("--peer", default=str(DEFAULT_PEER))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    env = dict(os.environ)
    n = str(args.threads)
    env.update(RAYON_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    print(f"threads={n}, float32, ArcFace s=64 m=0.5, loss + both gradients; best of 5 steps")
    print()
    print(
        "| B, D, C | torch eager ms | torch 3 GEMMs ms | arcface_rs ms | speed-up vs eager "
        "| vs 3 GEMMs | peak MB torch | peak MB arcface_rs | RSS ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg in args.configs:
        b, d, c = (int(v) for v in cfg.split(","))
        rounds = args.rounds if c < 1_000_000 else 1
        peers, ours_runs = [], []
        for _ in range(rounds):
            peers.append(run_json([sys.executable, args.peer, str(b), str(d), str(c)], env))
            ours_runs.append(
                run_json([sys.executable, __file__, "--worker", str(b), str(d), str(c)], env)
            )
        peer = {k: min(p[k] for p in peers) for k in ("ms", "gemm_ms", "peak_mb")}
        ours = {k: min(o[k] for o in ours_runs) for k in ("ms", "peak_mb")}
        print(
            f"| {b}, {d}, {c} | {peer['ms']:.0f} | {peer['gemm_ms']:.0f} | {ours['ms']:.0f} "
            f"| {peer['ms'] / ours['ms']:.2f}x | {peer['gemm_ms'] / ours['ms']:.2f}x "
            f"| {peer['peak_mb']:.0f} | {ours['peak_mb']:.0f} "
            f"| {ours['peak_mb'] / max(peer['peak_mb'], 1e-9):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
