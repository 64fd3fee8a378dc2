"""GPU benchmarks of the CUDA path (needs a GPU and a build with the `cuda` feature).

Head: ArcFace forward + backward at B=512, D=512, C=100k and 1M, arcface_rs under bf16
autocast, on bf16 tensors, in fp32 with and without TF32, against the three GEMMs alone in
cuBLAS (bf16, TF32, fp32: the floors), an InsightFace-style PyTorch head eager and under
torch.compile (bf16 autocast), and cut-cross-entropy / Liger-Kernel when installed; all in
this process, timed with CUDA events, with the extra device memory each takes.
Search: Gallery(device="cuda") at N=1M, D=512 against torch's
matmul + topk on the same GPU and the CPU Gallery. Prints ratios measured in one run.

    python benches/bench_cuda.py [--classes 1000000] [--rows 1000000] [--part head|search]
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


def insightface_arcface(emb, weight, labels, s: float = 64.0, m: float = 0.5):
    """The head a PyTorch user writes (InsightFace's arcface_torch recipe): F.linear of the
    normalised rows, cos(theta + m) on the target column in float32, cross-entropy."""
    fn = torch.nn.functional
    cos = fn.linear(fn.normalize(emb), fn.normalize(weight)).float().clamp(-1 + 1e-7, 1 - 1e-7)
    target = cos.gather(1, labels[:, None])
    cos = cos.scatter(1, labels[:, None], torch.cos(torch.acos(target) + m))
    return fn.cross_entropy(s * cos, labels)


def optional_peers(emb, weight, labels):
    """Apple's cut-cross-entropy and Liger-Kernel's fused linear cross-entropy (no margin),
    bf16, when installed."""
    peers = []
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce():
            linear_cross_entropy(emb.bfloat16(), weight.bfloat16(), labels).backward()

        peers.append(("cut-cross-entropy bf16 (no margin)", cce))
    except ImportError:
        print("(cut-cross-entropy not installed: its row is skipped)")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def lig():
            liger(weight.bfloat16(), emb.bfloat16(), labels).backward()

        peers.append(("Liger fused linear CE bf16 (no margin)", lig))
    except ImportError:
        print("(liger-kernel not installed: its row is skipped)")
    return peers


def bench_head(b: int, d: int, c: int, compile_peer: bool = True) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(b, d, device="cuda", generator=gen).requires_grad_()
    weight = (0.01 * torch.randn(c, d, device="cuda", generator=gen)).requires_grad_()
    labels = torch.randint(0, c, (b,), device="cuda", generator=gen)
    margin = afr.ArcFace(s=64.0, m=0.5)

    def step(loss_fn, autocast=None, tf32=False, dtype=None):
        e, w = emb, weight
        if dtype is not None:
            e = emb.detach().to(dtype).requires_grad_()
            w = weight.detach().to(dtype).requires_grad_()

        def run():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            e.grad = w.grad = None
            if autocast is None:
                loss_fn(e, w, labels).backward()
            else:
                with torch.autocast("cuda", dtype=autocast):
                    loss_fn(e, w, labels).backward()

        return run

    def fused(e, w, y):
        return aft.margin_loss(e, w, y, margin)

    x, w = emb.detach(), weight.detach()
    g = torch.randn(b, c, device="cuda", generator=gen)

    def gemms(dtype, tf32):
        xs, ws, gs = x.to(dtype), w.to(dtype), g.to(dtype)

        def run():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.mm(xs, ws.T)  # logits
            torch.mm(gs, ws)  # d emb
            torch.mm(gs.T, xs)  # d weight

        return run

    bf16 = torch.bfloat16
    cases = [
        ("arcface_rs, bf16 autocast", step(fused, autocast=bf16)),
        ("arcface_rs, bf16 tensors", step(fused, dtype=bf16)),
        ("arcface_rs, fp32 TF32", step(fused, tf32=True)),
        ("arcface_rs, fp32", step(fused)),
        ("cuBLAS 3 GEMMs bf16 (AMP floor)", gemms(bf16, False)),
        ("cuBLAS 3 GEMMs fp32 TF32", gemms(torch.float32, True)),
        ("cuBLAS 3 GEMMs fp32", gemms(torch.float32, False)),
        ("eager head, bf16 autocast", step(insightface_arcface, autocast=bf16)),
        ("eager head, fp32 TF32", step(insightface_arcface, tf32=True)),
    ]
    if compile_peer:
        compiled = torch.compile(insightface_arcface)
        cases.append(("torch.compile head, bf16 autocast", step(compiled, autocast=bf16)))
    cases += optional_peers(emb, weight, labels)

    rows = {}
    for name, fn in cases:
        try:
            torch.cuda.synchronize()
            emb.grad = weight.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = gpu_ms(fn, repeat=7)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows[name] = (ms, peak)
        except Exception as e:  # a peer that fails here is reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}")
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = rows.get("arcface_rs, bf16 autocast", (float("nan"),))[0]
    print(f"\nhead forward+backward, ArcFace, B={b} D={d} C={c} (median of 7, CUDA events)")
    print(f"{'':40s} {'ms':>8s} {'extra MiB':>10s} {'this / ours (autocast)':>23s}")
    for name, (ms, peak) in rows.items():
        print(f"{name:40s} {ms:8.2f} {peak:10.0f} {ms / ours:23.2f}")
    fp32 = rows.get("arcface_rs, fp32", (float("nan"),))[0]
    tf32 = rows.get("arcface_rs, fp32 TF32", (float("nan"),))[0]
    floor32 = rows.get("cuBLAS 3 GEMMs fp32", (float("nan"),))[0]
    floor_tf = rows.get("cuBLAS 3 GEMMs fp32 TF32", (float("nan"),))[0]
    print(f"fp32 / its GEMMs {fp32 / floor32:.2f}; TF32 / its GEMMs {tf32 / floor_tf:.2f}")


def check_head(b: int, d: int, c: int) -> None:
    """The bf16 autocast head against a float64 reference on the GPU, beside the eager
    autocast head: the errors each makes."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    emb = torch.randn(b, d, device="cuda", generator=gen)
    weight = 0.01 * torch.randn(c, d, device="cuda", generator=gen)
    labels = torch.randint(0, c, (b,), device="cuda", generator=gen)
    margin = afr.ArcFace(s=64.0, m=0.5)

    def run(fn, e, w, autocast):
        e = e.clone().requires_grad_()
        w = w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(e, w, labels)
        loss.backward()
        return loss.detach().double(), e.grad.double(), w.grad.double()

    def ours(e, w, y):
        return aft.margin_loss(e, w, y, margin)

    want = run(ours, emb.double(), weight.double(), False)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    for name, fn in (("arcface_rs", ours), ("eager InsightFace head", insightface_arcface)):
        got = run(fn, emb, weight, True)
        errors = ", ".join(f"{rel(g, w):.1e}" for g, w in zip(got, want))
        print(f"bf16 autocast vs float64, {name}: loss, grad_emb, grad_weight rel {errors}")


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
    parser.add_argument("--part", choices=("head", "search", "all"), default="all")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = parser.parse_args()
    if not afr.cuda_available():
        raise SystemExit("needs a GPU and arcface_rs built with the cuda feature")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    if args.part in ("head", "all"):
        check_head(512, 512, 100_000)
        for c in sorted({100_000, args.classes}):
            bench_head(512, 512, c, compile_peer=not args.no_compile)
    if args.part in ("search", "all"):
        bench_search(args.rows, 512)


if __name__ == "__main__":
    main()
