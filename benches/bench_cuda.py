"""GPU benchmarks of the CUDA path (needs a GPU and a build with the `cuda` feature).

Head: ArcFace forward + backward at B=512, D=512, C=100k and 1M, arcface_rs under bf16
autocast, on bf16 tensors, in fp32 with and without TF32, against the three GEMMs alone in
cuBLAS (bf16, TF32, fp32: the floors), an InsightFace-style PyTorch head eager and under
torch.compile (bf16 autocast), and cut-cross-entropy / Liger-Kernel when installed; all in
this process, timed with CUDA events, with the extra device memory each takes.
Search: Gallery(device="cuda") in every storage dtype at N=1M, D=512, Q=1..1024, with NumPy
and with CUDA tensor queries, against torch's matmul + topk on the same GPU, rows and dtype
and the CPU Gallery; its device memory; the host copies a tensor search makes (profiler);
float16 at N=10M against the card's copy bandwidth. Prints ratios measured in one run.

    python benches/bench_cuda.py [--classes 1000000] [--rows 1000000] [--big-rows 10000000]
                                 [--part head|search]
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


def bench_head(b: int, d: int, c: int, compile_peer: bool = True, ours_only: bool = False) -> None:
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
    ]
    if not ours_only:
        cases += [
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


def bench_search(n: int, d: int, big_rows: int) -> None:
    """Every storage dtype at N=n (NumPy queries, then CUDA tensor queries), then float16
    at N=big_rows; then whether a tensor search copies anything to or from the host."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((n, d), dtype=np.float32)
    print(f"\nGallery search, N={n} D={d} k=10: median wall ms, NumPy queries in and results")
    print("back on the host; the peer is torch matmul + topk on the same rows in the same dtype")
    print("(int8: its decoded rows in float16, torch has no float x int8 product)")
    print(
        f"{'dtype':8s} {'Q':>5s} {'gpu':>8s} {'torch mm+topk':>14s} {'peer / gpu':>10s} "
        f"{'cpu':>9s} {'ids = cpu':>10s} {'GB/s':>7s}"
    )
    tensor_rows, memory = [], []
    for dtype in ("float16", "float32", "bfloat16", "int8"):
        gpu, cpu = afr.Gallery(d, dtype, device="cuda"), afr.Gallery(d, dtype)
        gpu.add(emb)
        cpu.add(emb)
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        for q in (1, 1024):  # the GPU copy, then the scratch of the largest batch
            gpu.search(rng.standard_normal((q, d), dtype=np.float32), k=10)
        used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        peer = peer_rows(gpu.vectors(), dtype)
        for q in (1, 32, 256, 1024):
            queries = rng.standard_normal((q, d), dtype=np.float32)
            print(search_row(dtype, gpu, cpu, peer, queries))
        rows_mib = gpu.nbytes / 2**20
        memory.append(
            f"{dtype:8s} {rows_mib:9.0f} {used:12.0f} {used - rows_mib:12.0f} {rows_mib / 32:9.0f}"
        )
        for q in (1, 32, 1024):
            qt = torch.randn(q, d, device="cuda")
            tensor_rows.append(tensor_row(dtype, gpu, peer, qt))
        del gpu, cpu, peer
        torch.cuda.empty_cache()
    print("\nDevice memory of the GPU search after Q=1 and Q=1024 (MiB; the copy has room for")
    print("1/32 more rows, at least 1024; the rest is scratch kept between searches)")
    print(f"{'dtype':8s} {'rows':>9s} {'used':>12s} {'beyond rows':>12s} {'room':>9s}")
    print("\n".join(memory))
    print("\nCUDA tensor queries, results as CUDA tensors (wall ms, synchronised after each)")
    print(f"{'dtype':8s} {'Q':>5s} {'gpu':>8s} {'torch mm+topk':>14s} {'peer / gpu':>10s}")
    print("\n".join(tensor_rows))
    host_copies(d, emb[: min(n, 100_000)])
    if big_rows:
        bench_big(big_rows, d, rng)


def peer_rows(vectors: np.ndarray, dtype: str) -> torch.Tensor:
    """The gallery's rows (decoded, unit) on the GPU in the dtype torch's peer multiplies."""
    rows = torch.from_numpy(vectors).cuda()
    return rows.to({"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, torch.half))


def torch_topk(gallery: torch.Tensor, queries, k: int, to_host: bool = True):
    """The peer on the same GPU: normalise, one matmul, torch.topk (results to the host for
    NumPy queries)."""
    qt = torch.as_tensor(queries).cuda()
    qt = torch.nn.functional.normalize(qt, dim=1).to(gallery.dtype)
    s, i = torch.topk((qt @ gallery.T).float(), k, dim=1)
    return (s.cpu(), i.cpu()) if to_host else (s, i)


def search_row(dtype: str, gpu, cpu, gallery: torch.Tensor, queries: np.ndarray) -> str:
    q = len(queries)
    g_ms = wall_ms(functools.partial(gpu.search, queries, k=10))
    p_ms = wall_ms(functools.partial(torch_topk, gallery, queries, 10))
    c_ms = wall_ms(functools.partial(cpu.search, queries, k=10), repeat=2 if q >= 256 else 5)
    same = np.mean(gpu.search(queries, k=10)[1] == cpu.search(queries, k=10)[1])
    gbs = f"{gpu.nbytes / g_ms / 1e6:7.0f}" if q == 1 else ""
    return (
        f"{dtype:8s} {q:5d} {g_ms:8.2f} {p_ms:14.2f} {p_ms / g_ms:10.2f} {c_ms:9.1f} "
        f"{same:10.4f} {gbs}"
    )


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def tensor_row(dtype: str, gpu, gallery: torch.Tensor, queries: torch.Tensor) -> str:
    g_ms = wall_ms(synced(functools.partial(gpu.search, queries, k=10)))
    p_ms = wall_ms(synced(functools.partial(torch_topk, gallery, queries, 10, False)))
    return f"{dtype:8s} {len(queries):5d} {g_ms:8.3f} {p_ms:14.3f} {p_ms / g_ms:10.2f}"


def host_copies(d: int, emb: np.ndarray) -> None:
    """Counts the host <-> device copies torch.profiler records during tensor searches
    (after first searches have made the GPU copy): 4 queries (the scan) and 32 (the
    rescored GEMM route)."""
    gpu = afr.Gallery(d, "float16", device="cuda")
    gpu.add(emb)
    batches = [torch.randn(q, d, device="cuda") for q in (4, 32)]
    for qt in batches:
        gpu.search(qt, k=10)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            for qt in batches:
                gpu.search(qt, k=10)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    copies = [
        x for x in names if "HtoD" in x or "DtoH" in x or "_to_copy" in x or "memcpy" in x.lower()
    ]
    kernels = sorted({x for x in names if x in KERNEL_NAMES})
    found = f"{len(copies)} host copies {sorted(set(copies))}"
    print(f"\n10 tensor searches in torch.profiler: {found}")
    print(f"kernels seen: {kernels}")


KERNEL_NAMES = {
    "unit_queries", "score_rows_f16", "topk_tile", "topk_tile_f16", "topk_merge",
    "finish_results",
    "round_queries_f16", "rescore_f16", "redo_unsure_f16",
}  # fmt: skip


def bench_big(n: int, d: int, rng: np.random.Generator) -> None:
    """float16 at n rows (10M: 10 GB), Q=1, against reading the rows at the card's copy
    bandwidth (a device-to-device copy of 1 GiB reads and writes it)."""
    gpu = afr.Gallery(d, "float16", device="cuda")
    chunks = []
    for start in range(0, n, 1_000_000):
        part = rng.standard_normal((min(1_000_000, n - start), d), dtype=np.float32)
        gpu.add(part)
        chunks.append(torch.nn.functional.normalize(torch.from_numpy(part).cuda()).half())
    peer = torch.cat(chunks)
    del chunks
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = gpu_ms(functools.partial(dst.copy_, src))
    bandwidth = 2 * 2**30 / copy_ms / 1e6  # GB/s, read + write
    del src, dst
    query = rng.standard_normal((1, d), dtype=np.float32)
    g_ms = wall_ms(functools.partial(gpu.search, query, k=10))
    p_ms = wall_ms(functools.partial(torch_topk, peer, query, 10))
    t_ms = wall_ms(synced(functools.partial(gpu.search, torch.from_numpy(query).cuda(), k=10)))
    floor = gpu.nbytes / bandwidth / 1e6
    print(
        f"\nfloat16 N={n} Q=1: gpu {g_ms:.2f} ms NumPy query, {t_ms:.2f} ms CUDA tensor "
        f"({gpu.nbytes / t_ms / 1e6:.0f} GB/s); torch mm+topk {p_ms:.2f} ms; reading "
        f"{gpu.nbytes / 1e9:.1f} GB at the copy bandwidth ({bandwidth:.0f} GB/s) {floor:.2f} ms: "
        f"tensor search / that {t_ms / floor:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--big-rows", type=int, default=10_000_000, help="float16 rows of the large run (0: skip)"
    )
    parser.add_argument("--part", choices=("head", "search", "all"), default="all")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="the head: arcface_rs and the GEMM floors only, no accuracy check (for comparing "
        "settings such as ARCFACE_RS_CUDA_CLASS_TILE and ARCFACE_RS_CUDA_DX_BATCH)",
    )
    args = parser.parse_args()
    if not afr.cuda_available():
        raise SystemExit("needs a GPU and arcface_rs built with the cuda feature")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    if args.part in ("head", "all"):
        if not args.ours_only:
            check_head(512, 512, 100_000)
        for c in sorted({100_000, args.classes}):
            bench_head(512, 512, c, compile_peer=not args.no_compile, ours_only=args.ours_only)
    if args.part in ("search", "all"):
        bench_search(args.rows, 512, args.big_rows)


if __name__ == "__main__":
    main()
