"""Torch tensors in, torch tensors out, for ``Gallery``: CUDA queries on a CUDA gallery are
searched where they are (torch's current stream and allocator, nothing copied to the host);
other tensors go through the NumPy path and come back on their own device. torch is only
imported by callers that pass tensors."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# The most k the GPU selection keeps (search::MAX_K in the Rust crate).
GPU_MAX_K = 1024


def torch_of(queries: Any) -> Any:
    """The torch module when ``queries`` is a torch tensor, else None (torch not imported)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(queries, torch.Tensor):
        return torch
    return None


def query_rows(torch: Any, queries: Any, dim: int) -> tuple[Any, bool]:
    """(Q, dim) float32 contiguous rows of a tensor and whether it was one (dim,) query."""
    if not (queries.is_floating_point() and queries.dim() in (1, 2)):
        raise ValueError(
            f"queries must be a (Q, {dim}) or ({dim},) floating-point tensor, got "
            f"{tuple(queries.shape)} {queries.dtype}"
        )
    if queries.shape[-1] != dim or queries.numel() == 0:
        raise ValueError(
            f"queries has shape {tuple(queries.shape)}, expected (Q >= 1, {dim}) or ({dim},)"
        )
    single = queries.dim() == 1
    rows = queries.detach().reshape(-1, dim).to(torch.float32).contiguous()
    return rows, single


def search_on_device(
    core: Any, device: int, torch: Any, rows: Any, k: int, filt: dict[str, np.ndarray]
) -> tuple[Any, Any]:
    """The GPU search of (Q, dim) float32 ``rows`` in device memory: (Q, k) scores and ids
    as tensors on the rows' device, queued on torch's current stream. A zero or non-finite
    query finds nothing (ids -1, scores -inf): saying so would make the host wait."""
    q = rows.shape[0]
    nbytes, kept = core.search_cuda_workspace(q, k, device, bool(filt))
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=rows.device)
    scores = torch.empty((q, kept), dtype=torch.float32, device=rows.device)
    ids = torch.empty((q, kept), dtype=torch.int64, device=rows.device)
    stream = torch.cuda.current_stream(rows.device).cuda_stream
    core.search_cuda_device(
        rows.data_ptr(), q, k, device, stream, workspace.data_ptr(), nbytes,
        scores.data_ptr(), ids.data_ptr(), **filt,
    )  # fmt: skip
    if kept < k:  # more than the copy's rows: padding, as the CPU search pads
        scores = torch.cat([scores, scores.new_full((q, k - kept), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((q, k - kept), -1)], dim=1)
    return scores, ids


def to_device(torch: Any, like: Any, *arrays: np.ndarray) -> tuple[Any, ...]:
    """NumPy results as tensors on ``like``'s device."""
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(like.device) for a in arrays)
