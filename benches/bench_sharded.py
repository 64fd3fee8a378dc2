#!/usr/bin/env python3
"""ShardedMarginHead at scale: step time and per-rank memory over gloo on this machine.

usage: python benches/bench_sharded.py [--classes 1000000] [--dim 512] [--global-batch 256]
                                       [--world 2] [--steps 3]

Spawns `--world` processes (one thread each) on 127.0.0.1. Each holds its (C/world, D) shard;
a step is forward + backward of the head on the global batch (each rank contributes its
slice). Reported per rank: the shard's size, the best step time, and the growth of resident
memory from just before the first step to the peak over all steps (the step's own memory:
the shard's gradient plus whatever else the step allocates).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from _memory import rss_growth_mib


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import arcface_rs as afr
    from arcface_rs.torch import ShardedMarginHead

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    head = ShardedMarginHead(
        embedding_size=args.dim, num_classes=args.classes, margin=afr.ArcFace(s=64.0, m=0.5)
    )
    local = args.global_batch // world
    g = torch.Generator().manual_seed(rank)
    emb = torch.randn(local, args.dim, generator=g, requires_grad=True)
    labels = torch.randint(0, args.classes, (local,), generator=g)
    times = []

    def steps() -> None:
        for _ in range(args.steps):
            head.weight.grad = None
            emb.grad = None
            dist.barrier()
            t = time.perf_counter()
            head(emb, labels).backward()
            times.append(time.perf_counter() - t)

    growth = rss_growth_mib(steps)
    best = min(times)
    shard_mb = head.weight.numel() * 4 / 2**20
    print(
        f"| {rank} | {head.shard_range} | {shard_mb:.0f} | {1e3 * best:.0f} | {growth:.0f} |",
        flush=True,
    )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        worker(args.rank, args.world, args.port, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(
        f"C={args.classes}, D={args.dim}, global batch {args.global_batch}, {args.world} ranks "
        "x 1 thread, float32, ArcFace; forward + backward of the head"
    )
    print()
    print("| rank | shard_range | shard MB | best step ms | RSS growth in the step MB |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    env = dict(os.environ, RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *sys.argv[1:], "--rank", str(r), "--port", str(port)],
            env=env,
        )
        for r in range(args.world)
    ]
    for p in procs:
        p.wait()


if __name__ == "__main__":
    main()
