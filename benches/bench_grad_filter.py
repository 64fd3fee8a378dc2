#!/usr/bin/env python3
"""grad_filter="auto" against the exact head, PyTorch's three bare GEMMs and
torch.nn.functional.linear_cross_entropy (both its paths), float32 forward + backward.

usage: python benches/bench_grad_filter.py [--b 256] [--d 512] [--classes 10000,100000]
           [--million] [--threads 2] [--rounds 3]

Batches: "early" (random weights, every probability near 1/C) and "late" (class centres as
the weight, each row a noisy sample of its class, target cosine about 0.8: most
probabilities far below float32's resolution). Each measurement runs in its own process
timing: best step over the rounds, processes alternating; memory: a separate process per
case in which glibc maps every large block afresh (so that reused heap blocks cannot hide
a step's peak; that slows allocation, hence not used for timing), peak = RSS growth during
a step after a warm-up step, gradients included. "error": the largest difference between
auto's gradient and the exact one, relative to the exact one's largest entry. Prints
Markdown tables with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import rss_growth_mib  # noqa: E402
from _runner import cpu_model  # noqa: E402


def make_batch(kind: str, b: int, d: int, c: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, b)
    if kind == "early":
        weight = (0.01 * rng.standard_normal((c, d), dtype=np.float32)).astype(np.float32)
        emb = rng.standard_normal((b, d), dtype=np.float32)
        return emb, weight, labels
    weight = rng.standard_normal((c, d), dtype=np.float32)
    weight /= np.linalg.norm(weight, axis=1, keepdims=True)
    noise = rng.standard_normal((b, d), dtype=np.float32) * np.float32(0.75 / np.sqrt(d))
    return (weight[labels] + noise).astype(np.float32), weight, labels


def worker(what: str, kind: str, b: int, d: int, c: int) -> None:
    import numpy as np
    import torch

    import arcface_rs as afr
    from arcface_rs import _core

    emb, weight, labels = make_batch(kind, b, d, c)
    out: dict = {}
    if what in ("exact", "auto", "softmax"):
        spec = (afr.Softmax(s=64.0) if what == "softmax" else afr.ArcFace(s=64.0, m=0.5)).spec
        filt = "auto" if what == "auto" else None

        def step() -> None:
            out["skipped"] = _core.margin_loss(emb, weight, labels, spec, "mean", grad_filter=filt)[
                4
            ]

    elif what == "gemms":
        x, w = torch.from_numpy(emb), torch.from_numpy(weight)

        def step() -> None:
            z = x @ w.T
            z @ w, z.T @ x  # noqa: B018  (the two backward GEMMs)

    else:  # linear_cross_entropy on the Softmax head's inputs: s * x_hat against w_hat
        xn = emb / np.linalg.norm(emb, axis=1, keepdims=True) * np.float32(64.0)
        wn = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        x = torch.from_numpy(xn).requires_grad_()
        w = torch.from_numpy(wn).requires_grad_()
        y = torch.from_numpy(labels)
        options = torch.nn.LinearCrossEntropyOptions() if what == "lce-chunked" else None

        def step() -> None:
            loss = torch.nn.functional.linear_cross_entropy(x, w, y, options=options)
            loss.backward()

    if what == "auto" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # how far the filtered gradients are from the exact ones, relative to their largest
        exact = _core.margin_loss(emb, weight, labels, spec, "mean")
        got = _core.margin_loss(emb, weight, labels, spec, "mean", grad_filter="auto")
        for name, i in (("err_emb", 2), ("err_w", 3)):
            out[name] = float(np.abs(got[i] - exact[i]).max() / np.abs(exact[i]).max())

    times: list[float] = []

    def timed() -> None:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)

    peaks = []
    for _ in range(3):
        if what.startswith("lce"):
            x.grad = w.grad = None  # last step's gradients are not this step's memory
        peaks.append(rss_growth_mib(timed))
    out.update(ms=1e3 * min(times[1:]), peak_mb=max(peaks[1:]))
    print(json.dumps(out))


def run(what: str, kind: str, b: int, d: int, c: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, kind, str(b), str(d), str(c)]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(text.strip().splitlines()[-1])


# glibc: blocks above 128 KiB get fresh pages and go back on free
FRESH_PAGES = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def best_of(cases: list[tuple[str, str, int]], b: int, d: int, rounds: int, env) -> dict:
    """Best time over the rounds (alternating), and the peak of a separate memory run."""
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(rounds):
        for what, kind, c in cases:
            runs[(what, kind, c)].append(run(what, kind, b, d, c, env))
    best = {}
    for case, rs in runs.items():
        memory = run(*case[:2], b, d, case[2], {**env, **FRESH_PAGES})
        best[case] = dict(rs[0], ms=min(r["ms"] for r in rs), peak_mb=memory["peak_mb"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", default="10000,100000")
    ap.add_argument("--million", action="store_true", help="add the late batch at C=1M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        what, kind, *dims = args.worker
        worker(what, kind, *(int(v) for v in dims))
        return
    import arcface_rs

    env = dict(os.environ)
    n = str(args.threads)
    env.update(RAYON_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    b, d = args.b, args.d
    classes = [int(v) for v in args.classes.split(",")]
    print(
        f"{cpu_model()}, SIMD {arcface_rs.simd_level()}, threads={n}, float32, B={b} D={d}, "
        f"ArcFace s=64 m=0.5, forward + backward, best of 2 steps x {args.rounds} rounds"
    )
    print()
    print(
        "| C | batch | exact ms | auto ms | 3 GEMMs ms | exact / GEMMs | auto / GEMMs "
        "| auto / exact | backward work skipped | auto's error grad_emb | auto's error "
        "grad_weight | peak MiB exact | peak MiB auto |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [(c, kind) for c in classes for kind in ("early", "late")]
    if args.million:
        rows.append((1_000_000, "late"))
    for c, kind in rows:
        rounds = 1 if c >= 1_000_000 else args.rounds
        cases = [(w, kind, c) for w in ("exact", "auto", "gemms")]
        best = best_of(cases, b, d, rounds, env)
        ex, au, gm = (best[(w, kind, c)] for w in ("exact", "auto", "gemms"))
        print(
            f"| {c} | {kind} | {ex['ms']:.0f} | {au['ms']:.0f} | {gm['ms']:.0f} "
            f"| {ex['ms'] / gm['ms']:.3f} | {au['ms'] / gm['ms']:.3f} "
            f"| {au['ms'] / ex['ms']:.3f} | {100 * au['skipped']:.1f}% "
            f"| {au['err_emb']:.1e} | {au['err_w']:.1e} "
            f"| {ex['peak_mb']:.0f} | {au['peak_mb']:.0f} |",
            flush=True,
        )
    c = classes[-1]
    print()
    print(
        f"Softmax head vs torch.nn.functional.linear_cross_entropy at C={c} (early batch, "
        "normalised inputs scaled by s=64: the same logits)"
    )
    print()
    print("| path | ms | peak MiB | vs Softmax head (time) | vs Softmax head (memory) |")
    print("| --- | --- | --- | --- | --- |")
    cases = [(w, "early", c) for w in ("softmax", "lce-reference", "lce-chunked")]
    best = best_of(cases, b, d, args.rounds, env)
    ours = best[("softmax", "early", c)]
    for what, _, _ in cases:
        r = best[(what, "early", c)]
        name = {
            "softmax": "arcface_rs Softmax head",
            "lce-reference": "linear_cross_entropy, reference path",
            "lce-chunked": "linear_cross_entropy, chunked path",
        }[what]
        print(
            f"| {name} | {r['ms']:.0f} | {r['peak_mb']:.0f} | {r['ms'] / ours['ms']:.2f}x "
            f"| {r['peak_mb'] / max(ours['peak_mb'], 1e-9):.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
