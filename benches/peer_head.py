#!/usr/bin/env python3
"""Peer runner: the margin-softmax head as PyTorch users write it (InsightFace-style eager
ops), forward and backward on CPU, plus the three bare GEMMs of one step as the floor.

usage: python benches/peer_head.py B D C [arcface|cosface]
prints one JSON object: {"ms", "ms_median", "peak_mb", "gemm_ms", "gflops_gemm", ...}

Runs alone in its process, so its peak RSS growth (measured from after the inputs exist)
belongs to this configuration only. Times are the best of 5 steps after one warm-up.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F


def eager_loss(x, weight, labels, kind: str, s: float = 64.0) -> torch.Tensor:
    """Cosine logits with the target's margin, then cross-entropy: the B x C logits whole."""
    rows = torch.arange(x.shape[0])
    cos = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1.0, 1.0)
    target = cos[rows, labels]
    if kind == "arcface":
        m = 0.5
        theta = torch.acos(target)
        # beyond theta = pi - m the ArcFace reference code continues linearly
        margined = torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
    elif kind == "cosface":
        margined = target - 0.35
    else:
        raise SystemExit(f"unknown head kind {kind!r}")
    logits = cos.clone()
    logits[rows, labels] = margined
    return F.cross_entropy(s * logits, labels)


def best_ms(fn, reps: int = 5) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[0], 1e3 * times[len(times) // 2]


def main() -> None:
    b, d, c = (int(v) for v in sys.argv[1:4])
    kind = sys.argv[4] if len(sys.argv) > 4 else "arcface"
    torch.manual_seed(0)
    x = torch.randn(b, d, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(c, d).mul_(0.01))
    labels = torch.randint(0, c, (b,))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        x.grad, weight.grad = None, None
        eager_loss(x, weight, labels, kind).backward()

    step()
    ms, ms_median = best_ms(step)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024

    # the floor: logits, dX and dW products of one step, in the same BLAS
    xn, wn = F.normalize(x.detach()), F.normalize(weight.detach())
    grad = torch.randn(b, c)

    def gemms() -> None:
        xn @ wn.T
        grad @ wn
        grad.T @ xn

    gemm_ms, _ = best_ms(gemms)
    print(
        json.dumps(
            {
                "B": b,
                "D": d,
                "C": c,
                "kind": kind,
                "ms": ms,
                "ms_median": ms_median,
                "peak_mb": round(peak_mb, 1),
                "gemm_ms": gemm_ms,
                "gflops_gemm": 3 * 2 * b * d * c / (gemm_ms / 1e3) / 1e9,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
