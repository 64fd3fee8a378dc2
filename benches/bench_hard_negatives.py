#!/usr/bin/env python3
"""CurricularFace, MV-Softmax, inter-class filtering and sub-centres against the fused
ArcFace head in the same run, and sub-center ArcFace against pytorch-metric-learning's
SubCenterArcFaceLoss (which builds the B x C*K logits in PyTorch). Forward + backward,
float32, one run.

usage: python benches/bench_hard_negatives.py [--b 256] [--d 512] [--c 100000] [--k 3]
           [--threads 2] [--rounds 3] [--no-peer]

Each head runs in its own process (its peak RSS growth is its own, from after the inputs
exist); processes alternate over the rounds and each keeps its best time. Prints a Markdown
table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import rss_growth_mib  # noqa: E402
from _runner import cpu_model, run_json  # noqa: E402

# name: (how the head is built, classes it is built for in units of C)
CASES = {
    "ArcFace": "ArcFaceHead",
    "CurricularFace": "CurricularFaceHead",
    "MV-Softmax": "MVSoftmaxHead",
    "ArcFace + filter 0.4": "ArcFaceHead",
    "ArcFace at C*K classes": "ArcFaceHead",
    "sub-center ArcFace K": "ArcFaceHead",
    "pytorch-metric-learning SubCenterArcFaceLoss": None,
}


def build(case: str, d: int, c: int, k: int):
    """The head of ``case`` and the number of classes its labels range over."""
    import arcface_rs.torch as aft

    if case == "pytorch-metric-learning SubCenterArcFaceLoss":
        from pytorch_metric_learning.losses import SubCenterArcFaceLoss

        head = SubCenterArcFaceLoss(
            num_classes=c, embedding_size=d, margin=28.6, scale=64, sub_centers=k
        )
        return head, c
    cls = getattr(aft, CASES[case])
    if case == "ArcFace + filter 0.4":
        return cls(embedding_size=d, num_classes=c, interclass_filter=0.4), c
    if case == "ArcFace at C*K classes":
        return cls(embedding_size=d, num_classes=c * k), c * k
    if case == "sub-center ArcFace K":
        return cls(embedding_size=d, num_classes=c, sub_centers=k), c
    return cls(embedding_size=d, num_classes=c), c


def worker(case: str, b: int, d: int, c: int, k: int) -> None:
    import torch

    torch.manual_seed(0)
    head, classes = build(case, d, c, k)
    x = torch.randn(b, d).requires_grad_()
    labels = torch.randint(0, classes, (b,))
    params = list(head.parameters())
    times, peaks = [], []

    def step() -> None:
        t = time.perf_counter()
        head(x, labels).backward()
        times.append(time.perf_counter() - t)

    for _ in range(4):  # the first step pays one-time costs (thread pools, lazy imports)
        x.grad = None
        for p in params:
            p.grad = None
        peaks.append(rss_growth_mib(step))
    print(json.dumps({"ms": 1e3 * min(times[1:]), "peak_mb": round(max(peaks[1:]), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--c", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip pytorch-metric-learning")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        case, *dims = args.worker
        worker(case, *(int(v) for v in dims))
        return
    import arcface_rs

    env = dict(os.environ)
    n = str(args.threads)
    env.update(RAYON_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    cases = [c for c in CASES if not (args.no_peer and CASES[c] is None)]
    b, d, c, k = args.b, args.d, args.c, args.k
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name in cases:
            cmd = [sys.executable, __file__, "--worker", name, str(b), str(d), str(c), str(k)]
            runs[name].append(run_json(cmd, env))
    best = {name: {f: min(r[f] for r in v) for f in ("ms", "peak_mb")} for name, v in runs.items()}
    arc, wide = best["ArcFace"], best["ArcFace at C*K classes"]
    sub = best["sub-center ArcFace K"]
    print(
        f"{cpu_model()}, SIMD {arcface_rs.simd_level()}, threads={n}, float32, "
        f"B={b} D={d} C={c} K={k}, forward + backward, best of 3 steps x {args.rounds} rounds; "
        "peak: RSS growth during a step (gradients included), MiB"
    )
    print()
    print("| head | ms | vs ArcFace (C) | vs ArcFace (C*K) | peak MiB |")
    print("| --- | --- | --- | --- | --- |")
    for name in cases:
        r = best[name]
        label = name.replace(" K", f" K={k}").replace("C*K", f"{c * k}")
        print(
            f"| {label} | {r['ms']:.0f} | {r['ms'] / arc['ms']:.3f} | "
            f"{r['ms'] / wide['ms']:.3f} | {r['peak_mb']:.0f} |"
        )
    peer = best.get("pytorch-metric-learning SubCenterArcFaceLoss")
    if peer:
        print()
        print(
            f"sub-center K={k}: {peer['ms'] / sub['ms']:.2f}x faster than "
            f"pytorch-metric-learning, {peer['peak_mb'] / max(sub['peak_mb'], 1e-9):.2f}x less "
            "peak memory"
        )


if __name__ == "__main__":
    main()
