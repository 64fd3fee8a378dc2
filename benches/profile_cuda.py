"""Where a step of the fused CUDA head spends its time: torch.profiler over three
forward + backward steps (ArcFace, B=512, D=512), kernels sorted by device time, with the
bytes each pass over (C, D) or (B, C) would move at the card's bandwidth for comparison.

    python benches/profile_cuda.py [--classes 1000000] [--mode autocast|bf16|fp32|tf32]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import arcface_rs as afr
import arcface_rs.torch as aft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=("autocast", "bf16", "fp32", "tf32"), default="autocast")
    args = parser.parse_args()
    b, d, c = 512, 512, args.classes
    dtype = torch.bfloat16 if args.mode == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = args.mode == "tf32"
    emb = torch.randn(b, d, device="cuda", dtype=dtype).requires_grad_()
    weight = (0.01 * torch.randn(c, d, device="cuda")).to(dtype).requires_grad_()
    labels = torch.randint(0, c, (b,), device="cuda")
    margin = afr.ArcFace(s=64.0, m=0.5)

    def step() -> None:
        emb.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.mode == "autocast"):
            loss = aft.margin_loss(emb, weight, labels, margin)
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()} | mode {args.mode} | C={c} | per 3 steps")
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=22, max_name_column_width=40
    )
    print(table)
    mib = c * d / 2**20
    print(f"(C, D): {mib:.0f} Mi elements, one pass {4 * mib:.0f} MiB fp32, {2 * mib:.0f} bf16")


if __name__ == "__main__":
    main()
