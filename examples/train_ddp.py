#!/usr/bin/env python3
"""Data-parallel backbone + model-parallel margin head, on CPU with gloo.

    torchrun --nproc_per_node=2 examples/train_ddp.py [--steps 60] [--check]

Each rank trains on its slice of every global batch. The backbone is wrapped in
DistributedDataParallel; the head is an arcface_rs ShardedMarginHead, each rank holding a
block of the class centres. The head's loss is the mean over the global batch and each
rank's backward already gives that loss's exact gradient for its own samples, so the
backbone's gradients must be *summed* over ranks, not averaged as DDP does by default:
``ddp_sum_hook`` does that. Then training is step for step the same as one process on the
global batch. ``--check`` proves it on the first step (float64): rank 0 recomputes the step
in one process with the plain fused head and compares every backbone gradient.

The data are synthetic identities (a centre per class, noisy samples), made with NumPy from
a fixed seed: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import arcface_rs as afr
from arcface_rs.torch import ShardedMarginHead, ddp_sum_hook, margin_loss


def data(classes: int, per_class: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    x = np.repeat(centres, per_class, axis=0) + 0.7 * rng.standard_normal(
        (classes * per_class, dim)
    )
    y = np.repeat(np.arange(classes), per_class)
    order = rng.permutation(len(y))
    return torch.tensor(x[order]), torch.tensor(y[order])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--check", action="store_true", help="verify step 1 against one process")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same backbone init everywhere (DDP also broadcasts rank 0's)
    torch.set_num_threads(1)
    dtype = torch.float64 if args.check else torch.float32

    x_all, y_all = data(args.classes, 8, 64)
    x_all = x_all.to(dtype)
    backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).to(dtype)
    model = DDP(backbone)
    model.register_comm_hook(None, ddp_sum_hook)
    margin = afr.ArcFace(s=32.0, m=0.3)
    head = ShardedMarginHead(
        embedding_size=32, num_classes=args.classes, margin=margin, dtype=dtype
    )
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)

    per_rank = args.global_batch // world
    first_loss = last_loss = float("nan")
    for step in range(args.steps):
        lo = (step * args.global_batch) % (len(y_all) - args.global_batch)
        xb, yb = x_all[lo : lo + args.global_batch], y_all[lo : lo + args.global_batch]
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        if args.check and step == 0:
            # one process on the global batch, from the same parameters
            solo, solo_w = copy.deepcopy(backbone), head.full_weight().clone().requires_grad_()
            solo_loss = margin_loss(
                solo(xb[: per_rank * world]), solo_w, yb[: per_rank * world], margin
            )
            solo_loss.backward()
        opt.zero_grad()
        loss = head(model(xb[mine]), yb[mine])
        loss.backward()
        if args.check and step == 0:
            worst = max(
                float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                for p, q in zip(backbone.parameters(), solo.parameters())
            )
            lo_c, hi_c = head.shard_range
            worst_head = float(
                (head.weight.grad - solo_w.grad[lo_c:hi_c]).abs().max() / solo_w.grad.abs().max()
            )
            ok = worst < 1e-9 and worst_head < 1e-9 and abs(loss.item() - solo_loss.item()) < 1e-9
            print(
                f"rank {rank}: check {'passed' if ok else 'FAILED'}: backbone gradient max rel "
                f"err {worst:.1e}, head shard {worst_head:.1e}",
                flush=True,
            )
        opt.step()
        last_loss = loss.item()
        if step == 0:
            first_loss = last_loss
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {last_loss:.4f}", flush=True)
    if rank == 0:
        print(f"loss {first_loss:.4f} -> {last_loss:.4f} over {args.steps} steps on {world} ranks")
    # Tear down in order: every rank done, then DDP's reducer (it holds the process group
    # and its communication threads) before the group itself.
    dist.barrier()
    del model, opt
    dist.destroy_process_group()
    # Skip the interpreter's teardown: about one run in a dozen, PyTorch's distributed
    # runtime aborts in its static destructors ("terminate called without an active
    # exception") after all the work is done. Everything is printed and flushed here.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
