"""One rank of the fused CUDA sharded head on the fake driver (run by
test_python_on_fake_driver.py, not collected by pytest).

usage: python _sharded_worker.py RANK WORLD PORT OUT_DIR
Each case runs twice in one gloo group: ShardedMarginHead forced onto the fused CUDA path
(the real bindings, launch sequence and kernels, on the fake driver's emulator over CPU
tensors) and on the CPU kernel, from the same weights, batch and margin state. Saves this
rank's largest relative differences per case, and what a bad weight row raised, to
OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import copy
import ctypes
import os
import sys
import types
from datetime import timedelta

for name in ("libcuda.so", "libcublas.so"):  # before arcface_rs first looks for a driver
    ctypes.CDLL(os.path.join(os.environ["ARCFACE_RS_FAKE_CUDA"], name), mode=ctypes.RTLD_GLOBAL)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import arcface_rs as afr  # noqa: E402
from arcface_rs.torch import ShardedMarginHead, sharded  # noqa: E402

# torch's stream queries answer for the fake device (the tensors are CPU tensors)
torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(cuda_stream=0)
torch.cuda.current_device = lambda: 0
real_cast = sharded.autocast_operand

CASES = [
    ("arcface", afr.ArcFace(), {}),
    ("softmax", afr.Softmax(s=30.0), {}),
    ("elasticface", afr.ElasticFace(std=0.1, plus=True, seed=3), {}),
    ("straight-through", afr.ArcFace(grad="straight_through"), {}),
    ("cosface uneven", afr.CosFace(s=30.0, m=0.35), {"c": 37}),
    ("sphereface feature norm", afr.SphereFace(m=4, s=None, lambda_=1.0), {}),
    ("adaface", afr.AdaFace(batch_mean=3.0, batch_std=1.0, t_alpha=0.3), {}),
    ("magface", afr.MagFace(l_a=2.0, u_a=6.0, lambda_g=3.0), {}),
    ("per-row arcface", afr.ArcFace(m=np.linspace(0.1, 0.6, 21)), {}),
    ("curricularface", afr.CurricularFace(s=30.0, alpha=0.3, t=0.1), {}),
    ("mv-softmax", afr.MVSoftmax(s=32.0, m=0.4, kind="arc"), {}),
    ("filter", afr.ArcFace(), {"interclass_filter": 0.1}),
    ("partial fc", afr.ArcFace(), {"sample_rate": 0.4, "c": 60}),
    ("batch above dim", afr.CombinedMargin(30.0, 1.0, 0.3, 0.1), {"d": 4}),
    ("float32", afr.ArcFace(), {"dtype": torch.float32}),
    ("sub-centres", afr.ArcFace(), {"sub_centers": 3}),
    ("sub-centres batch above dim", afr.CosFace(), {"sub_centers": 2, "d": 4, "c": 37}),
    ("sub-centres partial fc", afr.ArcFace(), {"sub_centers": 2, "sample_rate": 0.4, "c": 60}),
    ("sub-centres mv-softmax", afr.MVSoftmax(s=32.0, m=0.3), {"sub_centers": 2}),
    ("bfloat16 operands", afr.ArcFace(), {"autocast": torch.bfloat16}),
    ("float16 operands batch above dim", afr.CosFace(), {"autocast": torch.float16, "d": 4}),
    (
        "bfloat16 operands sub-centres",
        afr.ArcFace(),
        {"autocast": torch.bfloat16, "sub_centers": 2},
    ),
]


def run(case, world, rank, path):
    _, margin, opts = case
    b, d, c = 21, opts.get("d", 12), opts.get("c", 45)
    dtype = opts.get("dtype", torch.float64)
    rng = np.random.default_rng(len(case[0]))
    k = opts.get("sub_centers", 1)
    weight = torch.tensor(rng.standard_normal((c * k, d)), dtype=dtype)
    labels = torch.tensor(rng.integers(0, c, b))
    labels[::4] = -1
    emb_all = torch.tensor(rng.standard_normal((b, d)) * 2.0, dtype=dtype)
    torch.manual_seed(rank)  # Partial FC's draws, alike on both paths
    head = ShardedMarginHead(
        d, c, copy.deepcopy(margin), sample_rate=opts.get("sample_rate", 1.0), dtype=dtype,
        interclass_filter=opts.get("interclass_filter"), sub_centers=k,
    )  # fmt: skip
    head.load_full_weight(weight)
    head._path = path
    # what torch.autocast("cuda") does to a CUDA batch: 16-bit GEMM operands from the float32
    # rows and the float32 master weight (the fake device's tensors are CPU tensors)
    half = opts.get("autocast")
    sharded.autocast_operand = (lambda e, w: e.to(half)) if half and path == "fused" else real_cast
    sizes = [b // world + (r < b % world) for r in range(world)]
    lo = sum(sizes[:rank])
    emb = emb_all[lo : lo + sizes[rank]].clone().requires_grad_(True)
    loss = head(emb, labels[lo : lo + sizes[rank]])
    (2.5 * loss).backward()
    return loss.detach(), emb.grad, head.weight.grad


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    out_dir = sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    results = {}
    for case in CASES:
        fused = run(case, world, rank, "fused")
        cpu = run(case, world, rank, None)
        label = str(case[2].get("autocast") or fused[0].dtype)
        results[case[0]] = (label, [rel(f, c) for f, c in zip(fused, cpu)])
    # a bad centre on rank 1's shard: it names the class, every other rank says why it stops
    head = ShardedMarginHead(8, 10, afr.ArcFace(), dtype=torch.float64)
    head._path = "fused"
    with torch.no_grad():
        head.weight.normal_()
        if rank == 1:
            head.weight[2] = float("nan")
    try:
        head(torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 3, 6, 9]))
        results["bad weight"] = "no error"
    except (ValueError, RuntimeError) as e:
        results["bad weight"] = f"{type(e).__name__}: {e}"
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the teardown where torch's distributed runtime may abort


if __name__ == "__main__":
    main()
