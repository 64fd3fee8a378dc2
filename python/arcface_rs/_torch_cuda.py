"""CUDA kernels of the fused ops (the ``cuda`` cargo feature): torch allocates every buffer
and the Rust side queues kernels and cuBLAS GEMMs on torch's current stream."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _core
from ._torch_ops import _compute_dtype, _loss_backward_op, _loss_op, _spec

_CUDA_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _launch_cuda(
    shape: tuple[int, int, int],
    dtype: str,
    spec: Any,
    blocks: Tensor,
    per_row: bool,
    *tensors: Tensor | None,
    interclass_filter: float | None = None,
    **shard: Any,
):
    """Queues the fused head on torch's current stream over the tensors' memory (in the
    order of ``_core._cuda_margin_loss``; None skips a gradient). ``blocks``: the margin's
    parameter block, or one per row when ``per_row``; ``shard``: one shard's hooks
    (``_core._cuda_margin_loss``'s combine, first_shard, stash_classes, parts, target_cos)."""
    device = blocks.device
    index = torch.cuda.current_device() if device.index is None else device.index
    _core._cuda_margin_loss(
        index,
        torch.cuda.current_stream(device).cuda_stream,
        *shape,
        dtype,
        spec,
        blocks.data_ptr(),
        per_row,
        *(0 if t is None else t.data_ptr() for t in tensors),
        interclass_filter=interclass_filter,
        **shard,
    )


def _run_loss_cuda(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: list[float],
    row_margins: Tensor | None,
    reduction: str,
    need_emb: bool,
    need_weight: bool,
    upstream: Tensor | None = None,
    interclass_filter: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Row losses and d loss / d row loss (float64), and the wanted gradients (compute
    dtype) on the GPU."""
    dtype = _compute_dtype(emb, weight)
    x = emb.detach().to(dtype).contiguous()
    w = weight.detach().to(dtype).contiguous()
    y = labels.detach().to(torch.int64).contiguous()
    (b, d), c = x.shape, w.shape[0]
    if b == 0:
        raise ValueError("emb: empty batch: need at least one row")
    if d == 0:
        raise ValueError("emb: embedding size is 0")
    if c == 0:
        raise ValueError("weight: has no classes (0 rows)")
    lo, hi = torch.stack(torch.aminmax(y)).tolist()
    if lo < -1 or hi >= c:
        bad = lo if lo < -1 else hi
        raise ValueError(f"labels: must be -1 (ignored) or a class in [0, {c}), found {bad}")
    valid = y >= 0
    row_weight = valid.to(torch.float64)
    if reduction == "mean":
        row_weight = row_weight / valid.sum().clamp(min=1)
    if upstream is not None:
        row_weight = row_weight * upstream.to(torch.float64)
    device = x.device
    row_loss = torch.empty(b, dtype=torch.float64, device=device)
    g_emb = torch.empty_like(x) if need_emb else None
    g_w = torch.empty_like(w) if need_weight else None
    bad_rows = torch.empty(2, dtype=torch.int32, device=device)
    name = _CUDA_DTYPES[dtype]
    per_row = row_margins is not None
    blocks = (
        row_margins.to(device=device, dtype=torch.float64).contiguous()
        if per_row
        else torch.tensor(margin, dtype=torch.float64, device=device)
    )
    workspace = torch.empty(
        _core.cuda_head_workspace_bytes(b, c, d, name, need_weight),
        dtype=torch.uint8,
        device=device,
    )

    _launch_cuda(
        (b, c, d),
        name,
        _spec(tuple(margin)),
        blocks,
        per_row,
        x,
        w,
        y,
        row_weight,
        row_loss,
        g_emb,
        g_w,
        bad_rows,
        workspace,
        interclass_filter=interclass_filter,
    )
    bad_emb, bad_weight = bad_rows.tolist()
    if bad_emb:
        raise ValueError(f"emb: row {bad_emb - 1} is all zeros or contains NaN or inf")
    if bad_weight:
        raise ValueError(f"weight: row {bad_weight - 1} is all zeros or contains NaN or inf")
    return row_loss, row_weight, g_emb, g_w


def _one_centre_per_class(sub_centers: int) -> None:
    """The CUDA kernels have one centre per class (arcface_rs.torch routes sub-centre heads
    to the plain-PyTorch path before reaching them)."""
    if sub_centers != 1:
        raise ValueError(
            "sub_centers: the fused CUDA kernels have one centre per class; arcface_rs.torch "
            "runs sub-centre heads on CUDA tensors with plain PyTorch"
        )


def _like(g: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if g is None else g.to(like.dtype)


@_loss_op.register_kernel("cuda")
def _loss_cuda(
    emb,
    weight,
    labels,
    margin,
    row_margins,
    sub_centers,
    interclass_filter,
    grad_filter,
    reduction,
    need_emb,
    need_weight,
):
    _one_centre_per_class(sub_centers)
    dtype = _compute_dtype(emb, weight)
    fused = reduction != "none"
    rows, row_weight, g_emb, g_w = _run_loss_cuda(
        emb,
        weight,
        labels,
        margin,
        row_margins,
        reduction,
        need_emb and fused,
        need_weight and fused,
        interclass_filter=interclass_filter,
    )
    # the row weights are 1 (sum) or 1 / valid rows (mean), 0 on ignored rows
    out = rows.to(dtype) if reduction == "none" else (rows * row_weight).sum().to(dtype)
    return out, _like(g_emb, emb), _like(g_w, weight)


@_loss_backward_op.register_kernel("cuda")
def _loss_backward_cuda(
    emb,
    weight,
    labels,
    margin,
    row_margins,
    sub_centers,
    interclass_filter,
    grad_filter,
    reduction,
    upstream,
    need_emb,
    need_weight,
):
    _one_centre_per_class(sub_centers)
    rows = torch.broadcast_to(upstream.to(torch.float64), (emb.shape[0],)).contiguous()
    _, _, g_emb, g_w = _run_loss_cuda(
        emb,
        weight,
        labels,
        margin,
        row_margins,
        reduction,
        need_emb,
        need_weight,
        upstream=rows,
        interclass_filter=interclass_filter,
    )
    return _like(g_emb, emb), _like(g_w, weight)
