"""The collectives of the sharded head: rows gathered from every rank (with a backward that
sums the ranks' gradients), every rank's batch size, and the CPU kernel's row statistics merged
across ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import _core
from ._sharded_device import kernel_grads


def gathers_by_all_reduce(x: Tensor, group: Any) -> bool:
    """Whether the group cannot all_gather ``x``: gloo has all_reduce and broadcast for GPU
    tensors but no all_gather (e.g. two ranks on one GPU, where NCCL refuses)."""
    return x.device.type != "cpu" and dist.get_backend(group) == "gloo"


def gather_sizes(n: int, group: Any, device: Any) -> list[int]:
    """Every rank's batch size (an all_reduce: every backend has it for every device)."""
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
    sizes[dist.get_rank(group)] = n
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    return [int(s) for s in sizes.tolist()]


def all_gather_rows(x: Tensor, sizes: list[int], group: Any) -> Tensor:
    """Rows of every rank, in rank order (padded to the largest batch for the collective)."""
    most = max(sizes)
    if gathers_by_all_reduce(x, group):
        # each rank fills its own slot of a zeroed buffer; the sum is the gather, exactly
        slots = torch.zeros((len(sizes), most, *x.shape[1:]), dtype=x.dtype, device=x.device)
        slots[dist.get_rank(group), : x.shape[0]] = x
        dist.all_reduce(slots, op=dist.ReduceOp.SUM, group=group)
        parts = list(slots)
    else:
        padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class GatherRows(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], group: Any) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return all_gather_rows(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        lo = sum(ctx.sizes[: ctx.rank])
        return grad[lo : lo + ctx.sizes[ctx.rank]], None, None


def combine_over(group: Any):
    """The kernel's `combine`: per-row statistics of every rank merged into global ones."""

    def combine(parts: np.ndarray, failed: bool) -> np.ndarray:
        t = torch.from_numpy(parts)
        # one MAX all-reduce carries the row maxima and whether any rank failed
        head = torch.cat([t[:, 0], torch.tensor([1.0 if failed else 0.0], dtype=t.dtype)])
        dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)
        if failed:
            return parts  # this rank raises its own error next
        if head[-1] > 0:
            raise RuntimeError("another rank of the sharded head failed; see its error")
        gmax = head[:-1]
        rescale = torch.exp(t[:, 0] - gmax)
        sums = torch.stack([t[:, 1] * rescale, t[:, 2] * rescale, t[:, 3]], dim=1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return torch.cat([gmax[:, None], sums], dim=1).numpy()

    return combine


class ShardedCpuLoss(torch.autograd.Function):
    """The sharded loss on the CPU kernel: each rank's row statistics merged by `combine_over`."""

    @staticmethod
    def forward(
        ctx: Any,
        emb_all: Tensor,
        weight: Tensor,
        targets: Tensor,
        spec: _core.Margin,
        rows: np.ndarray | None,
        stash_classes: int,
        first: bool,
        group: Any,
        head: tuple[int, float | None],
        target_cos: np.ndarray | None,
        grad_filter: str | float | None,
    ) -> Tensor:
        e = emb_all.detach().contiguous().numpy()
        w = weight.detach().contiguous().numpy()
        combine = combine_over(group)
        loss, _, g_emb, g_w, _ = _core.margin_loss_shard(
            e,
            w,
            targets.numpy(),
            spec,
            "mean",
            stash_classes,
            first,
            combine,
            row_margins=rows,
            sub_centers=head[0],
            interclass_filter=head[1],
            target_cos=target_cos,
            grad_filter=grad_filter,
        )
        ctx.grads = (torch.from_numpy(g_emb), torch.from_numpy(g_w))
        return torch.tensor(loss, dtype=emb_all.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        return kernel_grads(ctx, grad, 9)
