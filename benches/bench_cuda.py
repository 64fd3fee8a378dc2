"""GPU benchmarks of the CUDA path (needs a GPU and a build with the `cuda` feature).

Head: ArcFace forward + backward at B=512, D=512, C=1M float32, against (a) the same three
GEMMs alone in cuBLAS (torch.matmul, TF32 off), the floor of any exact head, and (b) a plain
PyTorch eager head (normalise, matmul, margin, cross-entropy), all in this process, timed
with CUDA events. Search: Gallery(device="cuda") at N=1M, D=512 against torch's
matmul + topk on the same GPU and the CPU Gallery. Prints ratios measured in one run.

    python benches/bench_cuda.py [--classes 1000000] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch

import arcface_rs as afr
import arcface_rs.torch as aft
from arcface_rs import _torch_plain as tplain


def gpu_ms(fn, repeat: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_head(b: int, d: int, c: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(b, d, device="cuda", generator=gen).requires_grad_()
    weight = (0.01 * torch.randn(c, d, device="cuda", generator=gen)).requires_grad_()
    labels = torch.randint(0, c, (b,), device="cuda", generator=gen)
    margin = afr.ArcFace(s=64.0, m=0.5)

    def step(loss_fn):
        def run():
            emb.grad = weight.grad = None
            loss_fn(emb, weight, labels, margin, "mean").backward()

        return run

    fused = step(aft.margin_loss)
    eager = step(tplain._plain_loss)
    x, w = emb.detach(), weight.detach()
    g = torch.randn(b, c, device="cuda", generator=gen)

    def gemms():
        torch.mm(x, w.T)  # logits
        torch.mm(g, w)  # d emb
        torch.mm(g.T, x)  # d weight

    # correctness at full size: the fused head against the eager one
    emb.grad = weight.grad = None
    loss = aft.margin_loss(emb, weight, labels, margin)
    loss.backward()
    ge, gw = emb.grad.clone(), weight.grad.clone()
    emb.grad = weight.grad = None
    want = tplain._plain_loss(emb, weight, labels, margin, "mean")
    want.backward()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    print(
        f"head check: loss rel {abs(loss.item() - want.item()) / abs(want.item()):.1e}, "
        f"grad_emb rel {rel(ge, emb.grad):.1e}, grad_weight rel {rel(gw, weight.grad):.1e}"
    )

    rows = []
    for name, fn in (
        ("arcface_rs fused", fused),
        ("cuBLAS GEMMs alone", gemms),
        ("PyTorch eager head", eager),
    ):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = gpu_ms(fn)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append((name, ms, peak))
    fused_ms = rows[0][1]
    print(f"\nhead forward+backward, B={b} D={d} C={c} float32 (median of 10, CUDA events)")
    print(f"{'':22s} {'ms':>8s} {'extra MiB':>10s} {'fused / this':>13s}")
    for name, ms, peak in rows:
        print(f"{name:22s} {ms:8.2f} {peak:10.0f} {fused_ms / ms:13.2f}")


def bench_search(n: int, d: int) -> None:
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((n, d), dtype=np.float32)
    print(f"\nGallery search, N={n} D={d} k=10 (median wall ms, queries from and results to host)")
    print(
        f"{'dtype':8s} {'Q':>5s} {'gpu':>8s} {'torch mm+topk':>14s} {'cpu':>9s} {'ids = cpu':>10s}"
    )
    for dtype in ("float16", "float32"):
        gpu, cpu = afr.Gallery(d, dtype, device="cuda"), afr.Gallery(d, dtype)
        gpu.add(emb)
        cpu.add(emb)
        gt = torch.from_numpy(gpu.vectors()).cuda()
        gt = gt.half() if dtype == "float16" else gt
        for q in (1, 32, 256, 1024):
            queries = rng.standard_normal((q, d), dtype=np.float32)
            print(search_row(dtype, gpu, cpu, gt, queries))


def torch_topk(gallery: torch.Tensor, queries: np.ndarray, k: int):
    """The peer on the same GPU: normalise, one matmul, torch.topk, results to the host."""
    qt = torch.from_numpy(queries).cuda()
    qt = torch.nn.functional.normalize(qt, dim=1).to(gallery.dtype)
    s, i = torch.topk((qt @ gallery.T).float(), k, dim=1)
    return s.cpu(), i.cpu()


def search_row(dtype: str, gpu, cpu, gallery: torch.Tensor, queries: np.ndarray) -> str:
    q = len(queries)
    g_ms = wall_ms(functools.partial(gpu.search, queries, k=10))
    p_ms = wall_ms(functools.partial(torch_topk, gallery, queries, 10))
    c_ms = wall_ms(functools.partial(cpu.search, queries, k=10), repeat=2 if q >= 256 else 5)
    same = np.mean(gpu.search(queries, k=10)[1] == cpu.search(queries, k=10)[1])
    return f"{dtype:8s} {q:5d} {g_ms:8.2f} {p_ms:14.2f} {c_ms:9.1f} {same:10.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if not afr.cuda_available():
        raise SystemExit("needs a GPU and arcface_rs built with the cuda feature")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    bench_head(512, 512, args.classes)
    bench_search(args.rows, 512)


if __name__ == "__main__":
    main()
