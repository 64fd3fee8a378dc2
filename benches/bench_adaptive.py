#!/usr/bin/env python3
"""AdaFaceHead and MagFaceHead against the fused ArcFaceHead and the AdaFace paper's PyTorch
head (benches/peer_adaface.py), forward + backward, float32, one run.

usage: python benches/bench_adaptive.py [B,D,C ...] [--threads N] [--rounds R]
  default config: 256,512,100000 (add 256,512,1000000 for the memory at a million classes)

Each head runs in its own process (peak RSS growth is its own, measured from after the
inputs exist); processes alternate over the rounds and each keeps its best time (the
machine drifts by ±10% over minutes). Prints a Markdown table with the ratios.
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

PEER = Path(__file__).resolve().parent / "peer_adaface.py"
HEADS = ("ArcFaceHead", "AdaFaceHead", "MagFaceHead")


def worker(name: str, b: int, d: int, c: int) -> None:
    import torch

    import arcface_rs.torch as aft

    torch.manual_seed(0)
    head = getattr(aft, name)(embedding_size=d, num_classes=c)
    x = torch.randn(b, d).mul_(20.0).requires_grad_()  # norms inside MagFace's [10, 110]
    labels = torch.randint(0, c, (b,))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        x.grad, head.weight.grad = None, None
        head(x, labels).backward()

    step()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(json.dumps({"ms": 1e3 * min(times), "peak_mb": round(peak, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["256,512,100000"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, *dims = args.worker
        worker(name, *(int(v) for v in dims))
        return
    env = dict(os.environ)
    n = str(args.threads)
    env.update(RAYON_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    print(f"threads={n}, float32, forward + backward, best of 5 steps; ||x|| about 20 sqrt(D)")
    print()
    print(
        "| B, D, C | ArcFaceHead ms | AdaFaceHead ms | MagFaceHead ms | AdaFace paper head ms "
        "| Ada / Arc | Mag / Arc | paper / AdaFaceHead | peak MB AdaFaceHead | peak MB paper "
        "| memory ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg in args.configs:
        b, d, c = (int(v) for v in cfg.split(","))
        rounds = args.rounds if c < 1_000_000 else 1
        runs: dict[str, list[dict]] = {k: [] for k in (*HEADS, "paper")}
        for _ in range(rounds):
            runs["paper"].append(run_json([sys.executable, str(PEER), str(b), str(d), str(c)], env))
            for name in HEADS:
                cmd = [sys.executable, __file__, "--worker", name, str(b), str(d), str(c)]
                runs[name].append(run_json(cmd, env))
        best = {k: {f: min(r[f] for r in v) for f in ("ms", "peak_mb")} for k, v in runs.items()}
        arc, ada, mag, paper = (best[k] for k in (*HEADS, "paper"))
        print(
            f"| {b}, {d}, {c} | {arc['ms']:.0f} | {ada['ms']:.0f} | {mag['ms']:.0f} "
            f"| {paper['ms']:.0f} | {ada['ms'] / arc['ms']:.3f} | {mag['ms'] / arc['ms']:.3f} "
            f"| {paper['ms'] / ada['ms']:.2f}x | {ada['peak_mb']:.0f} | {paper['peak_mb']:.0f} "
            f"| {ada['peak_mb'] / max(paper['peak_mb'], 1e-9):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
