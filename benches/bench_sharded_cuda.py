"""ShardedMarginHead on GPUs (run by benches/gpu_check.sh): two ranks, one process each.

Ranks use NCCL when the machine has a GPU per rank; on one GPU both ranks share it over
gloo (NCCL refuses two ranks on one device). Prints, in one run:

1. the check: the sharded GPU head (fused, and the plain-PyTorch path) against the sharded
   CPU head on the same weights and batch (a gloo group over CPU tensors), for several
   margins: loss (target 1e-5 relative) and both gradients (1e-3 of their largest entry);
   Partial FC fused against plain on the GPU (the same device draws);
2. speed and memory at C=1M (B=256, D=512, float32, ArcFace): one process with the whole
   head against each rank of the sharded one: forward + backward ms, peak memory above the
   inputs, and the fused kernel's scratch (`_core.cuda_head_workspace_bytes`).

    python benches/bench_sharded_cuda.py [--classes 1000000] [--batch 256] [--dim 512]
    python benches/bench_sharded_cuda.py --cpu   # a smoke run of the script on CPU tensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import arcface_rs as afr
from arcface_rs import _core
from arcface_rs.torch import ArcFaceHead, ShardedMarginHead

WORLD = 2
FUSED = "fused"  # the smoke run on CPU tensors puts the CPU kernel in its place
CHECK_MARGINS = [
    ("ArcFace", afr.ArcFace(s=64.0, m=0.5)),
    ("CosFace", afr.CosFace(s=64.0, m=0.35)),
    ("CurricularFace", afr.CurricularFace(s=64.0, m=0.5)),
    ("MagFace", afr.MagFace(l_a=2.0, u_a=6.0)),
    ("AdaFace", afr.AdaFace(batch_mean=4.0, batch_std=1.0)),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(run, device: torch.device, repeat: int = 5) -> float:
    """Median wall milliseconds of run() (after one warm-up), the device synchronised."""
    run()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mib(device: torch.device, base: int) -> float:
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def scratch_mib(b: int, c: int, d: int, stash_classes: int | None = None) -> float:
    """The fused CUDA head's workspace (NaN in a build without the cuda feature)."""
    if not _core.cuda_feature:
        return float("nan")
    return _core.cuda_head_workspace_bytes(b, c, d, "float32", True, stash_classes) / 2**20


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def problem(b: int, d: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    weight = torch.tensor(rng.standard_normal((c, d)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, c, b))
    labels[::7] = -1
    emb = weight[labels.clamp(min=0)] + 0.8 * torch.randn(
        b, d, generator=torch.Generator().manual_seed(seed)
    )
    return emb * 3.0, weight, labels


def run_head(head, emb_all, labels, rank, device):
    """One step of this rank's part of the global batch; loss and gradients on the CPU."""
    sizes = [len(emb_all) // WORLD + (r < len(emb_all) % WORLD) for r in range(WORLD)]
    lo = sum(sizes[:rank])
    emb = emb_all[lo : lo + sizes[rank]].to(device).clone().requires_grad_()
    head.zero_grad()
    loss = head(emb, labels[lo : lo + sizes[rank]].to(device))
    loss.backward()
    return loss.detach().cpu(), emb.grad.cpu(), head.weight.grad.cpu()


def sharded(d, c, margin, device, group=None, path=None, sample_rate=1.0):
    head = ShardedMarginHead(
        d, c, copy.deepcopy(margin), sample_rate=sample_rate, process_group=group, device=device
    )
    head._path = path
    return head


def check(rank: int, device: torch.device, cpu_group) -> list[dict]:
    b, d, c = 64, 128, 20011
    emb, weight, labels = problem(b, d, c)
    rows = []
    for name, margin in CHECK_MARGINS:
        want = sharded(d, c, margin, torch.device("cpu"), cpu_group, "cpu")
        want.load_full_weight(weight)
        ref = run_head(want, emb, labels, rank, torch.device("cpu"))
        for path in (FUSED, "plain"):
            head = sharded(d, c, margin, device, path=path)
            head.load_full_weight(weight.to(device))
            got = run_head(head, emb, labels, rank, device)
            rows.append(
                {"margin": name, "path": path, "errors": [rel(g, w) for g, w in zip(got, ref)]}
            )
    # Partial FC: both GPU paths draw the same classes from the same device seed
    runs = []
    for path in (FUSED, "plain"):
        torch.manual_seed(rank)
        head = sharded(d, c, afr.ArcFace(), device, path=path, sample_rate=0.3)
        head.load_full_weight(weight.to(device))
        runs.append(run_head(head, emb, labels, rank, device))
    rows.append({"margin": "ArcFace, Partial FC 0.3", "path": f"{FUSED} vs plain",
                 "errors": [rel(g, w) for g, w in zip(*runs)]})  # fmt: skip
    return rows


def speed(rank: int, device: torch.device, b: int, d: int, c: int) -> list[dict]:
    emb, _, labels = problem(b, d, 64)
    labels = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(1))
    rows = []
    for path in (FUSED, "plain"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        head = sharded(d, c, afr.ArcFace(), device, path=path)
        lo, hi = head.shard_range
        try:
            ms = step_ms(lambda h=head: run_head(h, emb, labels, rank, device), device)
        except torch.OutOfMemoryError:
            ms = float("nan")
        shard_bytes = (hi - lo) * d * 4
        workspace = scratch_mib(b, hi - lo, d, math.ceil(c / WORLD))
        rows.append({
            "what": f"rank {rank} of {WORLD}, {path}", "ms": ms, "peak_mib": peak_mib(device, base),
            "weight_and_grad_mib": 2 * shard_bytes / 2**20, "workspace_mib": workspace,
        })  # fmt: skip
        del head
    return rows


def one_process(device: torch.device, b: int, d: int, c: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    head = ArcFaceHead(d, c, device=device)
    emb = torch.randn(b, d, device=device, requires_grad=True)
    labels = torch.randint(0, c, (b,), device=device)

    def run():
        head.zero_grad()
        emb.grad = None
        head(emb, labels).backward()

    ms = step_ms(run, device)
    return {
        "what": "one process, whole head", "ms": ms, "peak_mib": peak_mib(device, base),
        "weight_and_grad_mib": 2 * c * d * 4 / 2**20,
        "workspace_mib": scratch_mib(b, c, d),
    }  # fmt: skip


def worker(rank: int, port: int, backend: str, use_cuda: bool, args, out: str) -> None:
    global FUSED
    FUSED = "fused" if use_cuda else "cpu"
    ngpu = torch.cuda.device_count() if use_cuda else 0
    device = torch.device(f"cuda:{rank % ngpu}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    cpu_group = dist.new_group(backend="gloo")
    result = {"check": check(rank, device, cpu_group)}
    result["speed"] = speed(rank, device, args.batch, args.dim, args.classes)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cpu", action="store_true", help="smoke run on CPU tensors")
    args = parser.parse_args()
    use_cuda = not args.cpu
    if use_cuda and not afr.cuda_available():
        raise SystemExit("needs a GPU and arcface_rs built with the cuda feature (or --cpu)")
    ngpu = torch.cuda.device_count() if use_cuda else 0
    backend = "nccl" if ngpu >= WORLD else "gloo"
    where = torch.cuda.get_device_name() if use_cuda else "CPU tensors (smoke run)"
    print(f"{where} x{max(ngpu, 1)} | {WORLD} ranks over {backend} | torch {torch.__version__}")
    device = torch.device("cuda:0") if use_cuda else torch.device("cpu")
    whole = one_process(device, args.batch, args.dim, args.classes)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(free_port(), backend, use_cuda, args, out), nprocs=WORLD)
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]

    print("\ncheck: sharded GPU head vs sharded CPU head (B=64 D=128 C=20011 float32), worst rank")
    print(f"{'margin':26s} {'path':15s} {'loss':>9s} {'grad_emb':>9s} {'grad_w':>9s}")
    ok = True
    for i, row in enumerate(ranks[0]["check"]):
        errors = [max(r["check"][i]["errors"][j] for r in ranks) for j in range(3)]
        ok &= errors[0] <= 1e-5 and max(errors[1:]) <= 1e-3
        print(f"{row['margin']:26s} {row['path']:15s} " + " ".join(f"{e:9.1e}" for e in errors))
    print("within loss 1e-5, gradients 1e-3:", "yes" if ok else "NO")

    b, d, c = args.batch, args.dim, args.classes
    print(f"\nArcFace forward + backward, B={b} D={d} C={c} float32 (median of 5, wall ms)")
    print("| run | ms | peak MiB | weight + grad MiB | fused scratch MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in [whole] + [r for rank in ranks for r in rank["speed"]]:
        print(
            f"| {row['what']} | {row['ms']:.1f} | {row['peak_mib']:.0f} | "
            f"{row['weight_and_grad_mib']:.0f} | {row['workspace_mib']:.1f} |"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
