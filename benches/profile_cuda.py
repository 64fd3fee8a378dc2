"""Where a step of the fused CUDA head spends its time: torch.profiler over three
forward + backward steps (ArcFace, B=512, D=512), kernels sorted by device time, then each
of arcface_rs's passes over (C, D) or (B, C) with the bytes it moves per step (from the
types in its name) and the bandwidth it achieved. With --search Q, the same for three
searches of Q NumPy queries (k=10) in a float16 Gallery(device="cuda") of --classes rows:
the scoring and selection passes over the rows and the (Q, N) scores.

    python benches/profile_cuda.py [--classes 1000000] [--mode autocast|bf16|fp32|tf32]
    python benches/profile_cuda.py --search 1024 [--classes 1000000]
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import arcface_rs as afr
import arcface_rs.torch as aft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=("autocast", "bf16", "fp32", "tf32"), default="autocast")
    parser.add_argument("--search", type=int, default=0, metavar="Q")
    args = parser.parse_args()
    if args.search:
        profile_search(args.classes, 512, args.search)
        return
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
    report(prof, "step", lambda kernel: bytes_moved(kernel, b, c, d))


def profile_search(n: int, d: int, q: int) -> None:
    """Three searches of q NumPy queries, k=10, in a float16 GPU gallery of n random rows."""
    rng = np.random.default_rng(1)
    gallery = afr.Gallery(d, "float16", device="cuda")
    gallery.add(rng.standard_normal((n, d), dtype=np.float32))
    queries = rng.standard_normal((q, d), dtype=np.float32)

    def three_searches() -> None:
        for _ in range(3):
            gallery.search(queries, k=10)  # results come back to the host: it waits
        torch.cuda.synchronize()

    three_searches()  # the GPU copy, the kernels' compilation, the scratch
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        three_searches()
    start = time.perf_counter()
    three_searches()
    wall = (time.perf_counter() - start) / 3 * 1e3
    print(f"{torch.cuda.get_device_name()} | float16 search | N={n} Q={q} k=10 | per 3 searches")
    report(prof, "search", lambda kernel: search_bytes_moved(kernel, n, d, q))
    print(f"wall time per search, unprofiled: {wall:.3f} ms")


def report(prof, unit: str, moved_by: Callable[[str], int | None]) -> None:
    """The profile's kernels by device time, then the bytes and bandwidth of each kernel
    that `moved_by` knows (bytes per `unit`, of the three profiled), then how much of a
    `unit` the device sat idle."""
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=22, max_name_column_width=40
    )
    print(table)
    print(f"{'pass (per ' + unit + ')':34s} {'ms':>8s} {'MB moved':>9s} {'GB/s':>7s}")
    for event in prof.key_averages():
        moved = moved_by(event.key)
        if moved is None:
            continue
        ms = _device_us(event) / 3 / 1e3
        gbs = moved / ms / 1e6 if ms > 0 else float("nan")
        print(f"{event.key:34s} {ms:8.3f} {moved / 1e6:9.0f} {gbs:7.0f}")
    try:
        kernels, busy, span = device_timeline(prof)
        print(
            f"device timeline per {unit}: {kernels / 3:.0f} kernels and copies, busy "
            f"{busy / 3e3:.3f} ms of {span / 3e3:.3f} ms from the first start to the last end "
            f"({100 * (1 - busy / span):.1f}% idle: the gaps between them, launch latency or "
            "the host falling behind)"
        )
    except Exception as e:  # a profiler without these fields must not hide the table above
        print(f"device timeline: not available ({type(e).__name__}: {e})")


SIZES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2}


def bytes_moved(kernel: str, b: int, c: int, d: int) -> int | None:
    """The bytes one step's launches of a head kernel read and write in all (each element
    once), from the element types in its name; None for other kernels. The tile passes
    share launches: `logits_and_weights` is the logits pass (reading the float32 logits
    tile of the 16-bit path, the GEMM's output, or on the exact paths the logits in place of
    the stash, and writing the stash) and the weights pass (the weight read for its norms,
    and a float32 weight's 16-bit copy written); `between_tiles` is mostly the projection of
    dW (read and written, the centres read) beside the B x D row factors."""
    m = re.fullmatch(r"(logits_and_weights|between_tiles)_(\w+?)_(\w+)", kernel)
    if m is None:
        return None
    w, s = SIZES[m[2]], SIZES[m[3]]
    if m[1] == "logits_and_weights":
        logits = b * c * ((4 if s == 2 else s) + s)
        return logits + c * d * (w + (s if m[2] != m[3] else 0))
    return c * d * (2 * w + s)


def search_bytes_moved(kernel: str, n: int, d: int, q: int) -> int | None:
    """The bytes one float16 search's launches of a search kernel read and write: the rows
    read once by the few-query scan, which writes float32 scores; the selection reading the
    score tiles (float16 where the many-query GEMMs write them). None for other kernels."""
    if kernel == "score_rows_f16":
        return n * d * 2 + q * n * 4
    if kernel == "topk_tile":
        return q * n * 4
    if kernel == "topk_tile_f16":
        return q * n * 2
    return None


def device_timeline(prof) -> tuple[int, float, float]:
    """(count, busy us, span us) of the device's kernels and copies in a profile: how many
    ran, how long at least one was running, and the time from the first start to the last
    end. span - busy is the device's idle time between them."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    # sorted by start: the last to start need not be the last to end
    return len(spans), busy_us(spans), max(end for _, end in spans) - spans[0][0]


def busy_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals sorted by start."""
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _device_us(event) -> float:
    """An event's total device time in microseconds (its name changed across torch releases)."""
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


if __name__ == "__main__":
    main()
