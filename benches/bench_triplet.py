#!/usr/bin/env python3
"""arcface_rs.torch.TripletLoss against pytorch-metric-learning's TripletMarginLoss with
its miner, forward + backward, float32, in one run.

usage: python benches/bench_triplet.py [B,D ...] [--mining batch_hard|semi_hard|all]
       [--distance cosine|euclidean] [--threads 2] [--rounds 3]
  default: 512,512 with batch-hard mining and cosine similarity (64 identities of 8)

Each side runs in its own process (so its peak RSS growth is its own), alternating for
`--rounds` rounds; each keeps its best time (of 7 steps after a warm-up) and its peak.
PML's side is the loss with BatchHardMiner / TripletMarginMiner("semihard") / no miner and
the matching reducer (MeanReducer), on the same data and distance.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import best, cpu_model, run_json  # noqa: E402


def worker(side: str, b: int, d: int, mining: str, distance: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(b) % max(1, b // 8)
    emb = torch.randn(b, d, generator=g)
    if side == "arcface_rs":
        import arcface_rs.torch as aft

        loss_fn = aft.TripletLoss(0.2, mining, distance, "mean")

        def step():
            x = emb.clone().requires_grad_(True)
            loss_fn(x, labels).backward()

    else:
        from pytorch_metric_learning import distances, losses, miners, reducers

        dist = distances.CosineSimilarity() if distance == "cosine" else distances.LpDistance()
        loss_fn = losses.TripletMarginLoss(
            margin=0.2, distance=dist, reducer=reducers.MeanReducer()
        )
        miner = {
            "batch_hard": miners.BatchHardMiner(distance=dist),
            "semi_hard": miners.TripletMarginMiner(
                margin=0.2, type_of_triplets="semihard", distance=dist
            ),
            "all": None,
        }[mining]

        def step():
            x = emb.clone().requires_grad_(True)
            triplets = miner(x, labels) if miner is not None else None
            loss_fn(x, labels, triplets).backward()

    step()  # first-call set-up (lazy imports, the thread pool) is not the loss's memory
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms = best(step)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(json.dumps({"ms": ms, "peak_mb": round(peak, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["512,512"])
    ap.add_argument("--mining", default="batch_hard")
    ap.add_argument("--distance", default="cosine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, b, d = args.worker
        worker(side, int(b), int(d), args.mining, args.distance)
        return
    env = dict(os.environ)
    n = str(args.threads)
    env.update(RAYON_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    print(
        f"{cpu_model()}; threads={n}, float32, {args.mining} mining, {args.distance}, "
        "loss + gradient; best of 7 steps"
    )
    print()
    print("| B, D | PML ms | arcface_rs ms | speed-up | PML peak MB | arcface_rs peak MB | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cfg in args.configs:
        b, d = (int(v) for v in cfg.split(","))
        runs: dict[str, list[dict]] = {"pml": [], "arcface_rs": []}
        for _ in range(args.rounds):
            for side in runs:
                cmd = [sys.executable, __file__, "--worker", side, str(b), str(d)]
                cmd += ["--mining", args.mining, "--distance", args.distance]
                runs[side].append(run_json(cmd, env))
        peer = {k: min(r[k] for r in runs["pml"]) for k in ("ms", "peak_mb")}
        ours = {k: min(r[k] for r in runs["arcface_rs"]) for k in ("ms", "peak_mb")}
        print(
            f"| {b}, {d} | {peer['ms']:.2f} | {ours['ms']:.2f} | {peer['ms'] / ours['ms']:.2f}x "
            f"| {peer['peak_mb']:.1f} | {ours['peak_mb']:.1f} "
            f"| {ours['peak_mb'] / max(peer['peak_mb'], 1e-9):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
