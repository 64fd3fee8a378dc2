"""The head's three GEMM shapes: the project's kernel and matrixmultiply (from
``cargo bench --bench gemm_crates``) beside PyTorch's ``torch.mm`` (MKL on x86-64) on the
same shapes and thread count, in GFLOP/s, with the CPU model and SIMD level.

    python benches/bench_gemm.py [--threads 2]

B=256, D=512, C=100k, float32: X·Wᵀ (forward logits), G·W (dX), Gᵀ·X (dW). The Rust side
runs one single-threaded GEMM per 512-class tile on each thread (what the head does);
torch.mm runs each product whole, with MKL's own threading, into preallocated outputs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
B, D, C = 256, 512, 100_000


def torch_rates(threads: int) -> list[float]:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, D, generator=g) - 0.5
    w = torch.rand(C, D, generator=g) - 0.5
    grad = torch.rand(B, C, generator=g) - 0.5
    flops = 2.0 * B * D * C
    # into preallocated outputs, warm: MKL's kernel speed, without the page faults of a
    # fresh output (which the first call pays once)
    o1, o2, o3 = torch.empty(B, C), torch.empty(B, D), torch.empty(C, D)
    calls = [
        lambda: torch.mm(x, w.T, out=o1),
        lambda: torch.mm(grad, w, out=o2),
        lambda: torch.mm(grad.T, x, out=o3),
    ]
    rates = []
    for call in calls:
        call()
        best = min(_timed(call) for _ in range(3))
        rates.append(flops / best / 1e9)
    return rates


def _timed(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def rust_rates(threads: int) -> tuple[str, list[list[float]]]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        ["cargo", "bench", "--quiet", "--bench", "gemm_crates"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    caption = next(line for line in out.splitlines() if line.startswith("cpu="))
    rows = []
    for line in out.splitlines():
        if line.startswith("| ") and "GEMM" not in line and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append([_number(c) for c in cells[1:]])
    return caption, rows


def _number(cell: str) -> float:
    return float(cell) if re.fullmatch(r"[\d.]+", cell) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    caption, rows = rust_rates(args.threads)
    mkl = torch_rates(args.threads)
    print(caption)
    print("| GEMM | arcface_rs | matrixmultiply | gemm crate | torch.mm | arcface_rs / torch.mm |")
    print("| --- | --- | --- | --- | --- | --- |")
    names = ["X·Wᵀ (forward)", "G·W (dX)", "Gᵀ·X (dW)"]
    for name, row, peer in zip(names, rows, mkl):
        own, mm, gm = row
        print(f"| {name} | {own:.0f} | {mm:.0f} | {gm:.0f} | {peer:.0f} | {own / peer:.2f} |")


if __name__ == "__main__":
    main()
