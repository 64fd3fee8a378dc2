"""ShardedMarginHead's two paths for tensors off the CPU (used on CPU tensors by the tests).

Fused: each rank queues the fused CUDA head over its shard on torch's current stream, and
between the kernel's two passes merges the per-row [max, sum-exp, sum-exp * z, target logit]
with the other ranks by torch.distributed collectives on device tensors (NCCL on GPUs):
only B x 4 values travel, never B x shard, and nothing is copied to the host.

Plain: the same sharded math in torch ops (each rank's logits over its shard, a softmax
whose max, sum and target logit are all-reduced), for CUDA tensors when the fused kernels
cannot run (a build without the ``cuda`` feature, or sub-centres).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _core
from .._margins import Margin
from ._cuda import gemm_operands, launch_cuda, margin_values_on, rows_on
from ._ops import core_margin, is_exactly_one, no_double_backward, scale_gradient
from ._plain import KINDS, norm_penalty, plain_logits


def _merge_parts(parts: Tensor, group: Any) -> None:
    """Replaces each row's statistics over this rank's classes, parts (n, 4) float64
    [max, sum, sum_ez, target_logit], by those over every rank's (in place, two
    collectives on the tensors' device)."""
    gmax = parts[:, 0].clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    # a rank whose sum is 0 has no classes for the row (max -inf): it adds nothing
    rescale = torch.where(parts[:, 1] > 0, torch.exp(parts[:, 0] - gmax), 0.0)
    sums = torch.stack([parts[:, 1] * rescale, parts[:, 2] * rescale, parts[:, 3]], dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    parts[:, 0] = gmax
    parts[:, 1:] = sums


def _raise_if_any_failed(error: BaseException | None, bad: Tensor, group: Any, where: Any):
    """Every rank learns whether any failed (one small MAX all-reduce), so that all raise
    together: a rank raises its own error, the others say that another rank failed.
    ``bad``: (3,) int32, one past the last bad row of emb and of the weight, or 0 (the
    labels, the third, were checked before);
    ``where(row)``: the global class of a row of this rank's weight."""
    flags = torch.stack([bad[0].clamp(max=1), bad[1].clamp(max=1)]).to(torch.float64)
    flags = torch.cat([flags, flags.new_tensor([0.0 if error is None else 1.0])])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    bad_emb, bad_weight = (int(v) for v in bad[:2].tolist())
    if error is not None:
        raise error
    if bad_emb:
        raise ValueError(f"emb: global row {bad_emb - 1} is all zeros or contains NaN or inf")
    if bad_weight:
        raise ValueError(
            f"weight: the centre of class {where(bad_weight - 1)} (row {bad_weight - 1} of this "
            "rank's shard) is all zeros or contains NaN or inf"
        )
    if bool((flags > 0).any()):
        raise RuntimeError("another rank of the sharded head failed; see its error")


def kernel_grads(ctx: Any, grad: Tensor, inputs_after: int) -> tuple[Tensor | None, ...]:
    """A fused shard's backward: the gradients its kernel computed in the forward (kept in
    ``ctx.grads``) times the upstream gradient, then None for the ``inputs_after`` other
    inputs. They are ours alone, so they are scaled in place (no second shard-sized tensor),
    and not at all for the usual upstream gradient of 1 (on the GPU a kernel tells, without
    the host reading the value)."""
    no_double_backward()
    g_emb, g_w = ctx.grads
    del ctx.grads
    if not is_exactly_one(grad):
        if g_w.is_cuda:
            g_emb, g_w = scale_gradient(g_emb, grad), scale_gradient(g_w, grad)
        else:
            g_emb.mul_(grad)
            g_w.mul_(grad)
    return (g_emb, g_w) + (None,) * inputs_after


class FusedShardLoss(torch.autograd.Function):
    """The fused CUDA head over this rank's shard; the loss is the mean over the global
    batch. ``targets``: this shard's columns, -1 (ignored) or REMOTE_TARGET. The GEMMs run
    in 16 bits for 16-bit inputs (autocast casts ``emb_all`` before), as the single head's."""

    @staticmethod
    def forward(
        ctx: Any,
        emb_all: Tensor,
        weight: Tensor,
        targets: Tensor,
        margin: Margin,
        row_blocks: Tensor | None,
        stash_classes: int,
        first: bool,
        group: Any,
        interclass_filter: float | None,
        target_cos: Tensor | None,
        class_of_row: Any,
        sub_centers: int,
    ) -> Tensor:
        x, w, operands = gemm_operands(emb_all, weight)
        y = targets.to(torch.int64).contiguous()
        (b, d), c = x.shape, w.shape[0]
        device = x.device
        valid = y != -1
        row_weight = valid.to(torch.float64) / valid.sum().clamp(min=1)
        row_loss = torch.empty(b, dtype=torch.float64, device=device)
        g_emb, g_w = torch.empty_like(x), torch.empty_like(w)
        bad = torch.zeros(3, dtype=torch.int32, device=device)
        parts = torch.empty((b, 4), dtype=torch.float64, device=device)
        per_row = row_blocks is not None
        blocks = (
            rows_on(row_blocks, device)
            if row_blocks is not None
            else margin_values_on(margin.block, device)
        )
        cos = None
        if target_cos is not None:
            cos = target_cos.to(device=device, dtype=torch.float64).contiguous()
        workspace = torch.empty(
            _core.cuda_head_workspace_bytes(
                b,
                c,
                d,
                operands["dtype"],
                True,
                stash_classes,
                weight_dtype=operands["weight_dtype"],
                sub_centers=sub_centers,
            ),
            dtype=torch.uint8,
            device=device,
        )
        error: BaseException | None = None
        try:
            launch_cuda(
                (b, c, d),
                operands["dtype"],
                core_margin(margin.block),
                blocks,
                per_row,
                *(x, w, y, row_weight, row_loss, g_emb, g_w, bad, workspace),
                interclass_filter=interclass_filter,
                combine=lambda start, rows: _merge_parts(parts[start : start + rows], group),
                first_shard=first,
                stash_classes=stash_classes,
                parts=parts.data_ptr(),
                target_cos=0 if cos is None else cos.data_ptr(),
                weight_dtype=operands["weight_dtype"],
                tf32=operands["tf32"],
                sub_centers=sub_centers,
            )
        except (ValueError, RuntimeError) as e:  # the kernel joined every collective first
            error = e
        _raise_if_any_failed(error, bad, group, class_of_row)
        ctx.grads = (g_emb.to(emb_all.dtype), g_w.to(weight.dtype))
        # a float32 loss for 16-bit operands, as autocast's cross-entropy gives
        return (row_loss * row_weight).sum().to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        return kernel_grads(ctx, grad, 10)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Each row's -log softmax of its target over every rank's logits, from this rank's
    (B, shard) logits: the row max, the sum of exponentials and the target logit are
    all-reduced; the gradient needs no communication (each rank's softmax slice)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, targets: Tensor, group: Any) -> Tensor:
        z = z.detach()
        gmax = z.amax(dim=1)
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - gmax[:, None])
        total = e.sum(dim=1)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        mine = targets >= 0
        target = torch.zeros_like(gmax)
        target[mine] = z[mine, targets[mine]]
        dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(e / total[:, None], targets)
        return gmax + torch.log(total) - target

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        p, targets = ctx.saved_tensors
        g = p * grad[:, None]
        mine = torch.nonzero(targets >= 0).flatten()
        g[mine, targets[mine]] -= grad[mine]
        return g, None, None


def plain_shard_loss(
    emb_all: Tensor,
    weight: Tensor,
    targets: Tensor,
    margin: Margin,
    row_blocks: Tensor | None,
    first: bool,
    group: Any,
    sub_centers: int,
    interclass_filter: float | None,
    target_cos: Tensor | None,
) -> Tensor:
    """The sharded head in torch ops: the mean loss over the global batch, differentiable
    in this rank's share of ``emb_all`` (the gather's backward sums the shares) and in
    ``weight``, this rank's (possibly sampled) centres."""
    local = torch.where(targets >= 0, targets, -1)
    remote_cos = None
    if target_cos is not None:
        remote = targets == _core.REMOTE_TARGET
        nan = torch.full_like(target_cos, float("nan"))
        remote_cos = torch.where(remote, target_cos.to(emb_all.device), nan)
    logits = plain_logits(
        emb_all,
        weight,
        local,
        margin,
        row_blocks,
        sub_centers,
        interclass_filter,
        remote_target_cos=remote_cos,
    )
    rows = _ShardedCrossEntropy.apply(logits, local, group)
    if margin.block[0] == KINDS["magface"]:
        penalty = norm_penalty(margin, emb_all.to(logits.dtype).norm(dim=1))
        # every rank returns the whole loss; one rank's backward carries the penalty's share
        rows = rows + (penalty if first else penalty.detach())
    valid = targets != -1
    return torch.where(valid, rows, 0.0).sum() / valid.sum().clamp(min=1)
