#!/usr/bin/env python3
"""One Gallery against a ShardedGallery of 2 Ray actors on this machine, N=1M D=512
float16 (clustered rows), Q=1 and Q=256, k=10: the time each takes and the bytes a query
moves through Ray (queries in, per-shard top-k out). One run.

usage: python benches/bench_sharded_gallery.py [--n 1000000] [--dtype float16]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import arcface_rs as afr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    import ray
    from bench_gallery import best, clustered, cpu_model

    from arcface_rs.ray import ShardedGallery

    g, probes = clustered(args.n, 5)
    rng = np.random.default_rng(1)
    big = g[rng.integers(0, args.n, 256)] + rng.standard_normal((256, 512), dtype=np.float32) / 23
    one = afr.Gallery(512, args.dtype)
    for lo in range(0, args.n, 100_000):
        one.add(g[lo : lo + 100_000])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # each actor's Rayon pool: one thread per actor, two actors on two cores
    opts = {"num_cpus": 1, "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": "1"}}}
    sg = ShardedGallery(512, args.dtype, shards=2, actor_options=opts)
    for lo in range(0, args.n, 100_000):
        sg.add(g[lo : lo + 100_000])
    del g
    print(f"{cpu_model()}, SIMD level {afr.simd_level()}; N={args.n}, D=512, {args.dtype}, k=10")
    print()
    print("| Q | one Gallery ms | ShardedGallery (2 actors) ms | ratio | bytes moved per call |")
    print("| --- | --- | --- | --- | --- |")
    for q, reps in ((probes[:1], 9), (big, 2)):
        t1 = best(lambda q=q: one.search(q, 10), reps)
        t2 = best(lambda q=q: sg.search(q, 10), reps)
        moved = q.nbytes + 2 * len(q) * 10 * (4 + 8 + 8)  # queries in; scores, ids, order out
        assert np.array_equal(one.search(q, 10)[1], sg.search(q, 10)[1])
        print(f"| {len(q)} | {t1:.1f} | {t2:.1f} | {t2 / t1:.2f} | {moved} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
