"""One rank of the sharded-head tests (run by tests/torch/test_sharded.py, not collected by pytest).

usage: python _sharded_worker.py RANK WORLD PORT CASES_FILE OUT_DIR
Runs every case of CASES_FILE (a torch.save'd list) in one gloo process group and saves this
rank's loss and gradients per case to OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from arcface_rs.torch import ShardedMarginHead, _collectives, split_weight


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    cases_file, out_dir = sys.argv[4:6]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results = []
    for case in torch.load(cases_file, weights_only=False):
        torch.manual_seed(case["seed"] + rank)
        weight, k = case["weight"], case["sub_centers"]
        head = ShardedMarginHead(
            embedding_size=weight.shape[1],
            num_classes=weight.shape[0] // k,
            margin=case["margin"],
            sample_rate=case["sample_rate"],
            dtype=weight.dtype,
            sub_centers=k,
            interclass_filter=case["interclass_filter"],
            grad_filter=case["grad_filter"],
        )
        head.load_full_weight(weight)
        head._path = case.get("path")  # None: the CPU kernel; "plain": torch ops
        # the plain path is what GPUs run; there a gloo group gathers by all_reduce
        by_all_reduce = case.get("path") == "plain"
        _collectives.gathers_by_all_reduce = lambda x, group, yes=by_all_reduce: yes
        sizes = case["splits"][world]
        lo = sum(sizes[:rank])
        emb = case["emb"][lo : lo + sizes[rank]].clone().requires_grad_(True)
        labels = case["labels"][lo : lo + sizes[rank]]
        loss = head(emb, labels)
        (loss * case["upstream"]).backward()
        results.append(
            {
                "loss": loss.detach(),
                "grad_emb": emb.grad,
                "grad_weight": head.weight.grad,
                "shard_range": head.shard_range,
                "margin_stats": tuple(
                    getattr(head.margin, name, None) for name in ("batch_mean", "batch_std", "t")
                ),
                "sampled": head.last_sampled,
                "path": head._implementation(emb),
                "state": {k: v.clone() for k, v in head.state_dict().items()},
                "full_weight": head.full_weight(),
                "split_matches": bool(
                    torch.equal(head.weight.detach(), split_weight(weight, world, k)[rank])
                ),
            }
        )
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown, where PyTorch's distributed runtime now and then
    # aborts after all the work is done (see examples/train_ddp.py).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
