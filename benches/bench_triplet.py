#!/usr/bin/env python3
"""arcface_rs.torch.TripletLoss against pytorch-metric-learning's TripletMarginLoss with
its miner, forward + backward, float32, in one run.

usage: python benches/bench_triplet.py [B,D ...] [--mining batch_hard|semi_hard|all]
       [--distance cosine|euclidean] [--threads 2] [--rounds 3]
  default: 512,512 with batch-hard mining and cosine similarity (64 identities of 8)

Each side runs in its own processes, alternating for `--rounds` rounds: one times it (best of
7 steps after a warm-up), one measures its memory: the most one step raises resident memory
above what was resident before it (glibc's thresholds fixed so that freed buffers leave the
resident set, the peak reset before each step; see `_runner.step_peak_mb`). Each side keeps
its best time and its largest peak.
PML's side is the loss with BatchHardMiner / TripletMarginMiner("semihard") / no miner and
the matching reducer (MeanReducer), on the same data and distance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import MEMORY_ENV, best, cpu_model, run_json, step_peak_mb  # noqa: E402


def worker(side: str, b: int, d: int, mining: str, distance: str, measure: str) -> None:
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

    if measure == "time":
        print(json.dumps({"ms": best(step)}))
    else:
        print(json.dumps({"peak_mb": step_peak_mb(step)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["512,512"])
    ap.add_argument("--mining", default="batch_hard")
    ap.add_argument("--distance", default="cosine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, b, d, measure = args.worker
        worker(side, int(b), int(d), args.mining, args.distance, measure)
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
        ms: dict[str, list[float]] = {"pml": [], "arcface_rs": []}
        peaks: dict[str, list[float]] = {"pml": [], "arcface_rs": []}
        for _ in range(args.rounds):
            for side in ms:
                cmd = [sys.executable, __file__, "--mining", args.mining]
                cmd += ["--distance", args.distance, "--worker", side, str(b), str(d)]
                ms[side].append(run_json([*cmd, "time"], env)["ms"])
                peak = run_json([*cmd, "memory"], env | MEMORY_ENV)["peak_mb"]
                peaks[side] += [] if peak is None else [peak]
        peer, ours = min(ms["pml"]), min(ms["arcface_rs"])
        if peaks["pml"] and peaks["arcface_rs"]:
            peer_mb, ours_mb = max(peaks["pml"]), max(peaks["arcface_rs"])
            memory = f"{peer_mb:.1f} | {ours_mb:.1f} | {ours_mb / peer_mb:.2f}"
        else:
            memory = "n/a | n/a | n/a (no /proc/self/clear_refs)"
        print(
            f"| {b}, {d} | {peer:.2f} | {ours:.2f} | {peer / ours:.2f}x | {memory} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
