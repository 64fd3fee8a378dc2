"""A margin's arguments to the ops: its parameter block, and for margins that vary per row
(AdaFace, MagFace, ElasticFace, CurricularFace) the blocks of one batch, computed from the
detached batch on its device (norms, target cosines through overflow-safe unit rows)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._margins import ElasticFace, Margin
from ._cuda import margin_values_on, rows_on


def encode(margin: Margin) -> tuple[list[float], Tensor | None]:
    """The op arguments of a margin: its parameter block and its per-row blocks (or None)."""
    if not isinstance(margin, Margin):
        raise TypeError(
            "margin must be ArcFace, CosFace, SphereFace, CombinedMargin or Softmax, "
            f"got {type(margin).__name__}"
        )
    return list(margin.block), None


def rows_of(
    margin: Margin,
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    sub_centers: int = 1,
    step: bool = True,
) -> Tensor | None:
    """The margin's per-row parameter blocks for this batch as a float64 tensor, or None
    when one margin serves every row. Margins with state (AdaFace's statistics,
    ElasticFace's draws) compute them on the host from the detached batch; ``step`` (a
    loss call) lets running statistics move, which the caller applies with
    ``margin.commit()`` once the op has accepted the batch."""
    encode(margin)  # a TypeError for anything but a margin
    if not margin.varies_per_batch:  # fixed values: no batch needed
        blocks = margin.row_blocks
        return None if blocks is None else margin_values_on(blocks, emb.device)
    x, w = emb.detach(), weight.detach()

    def norms() -> ReadLater:
        return ReadLater(x.to(torch.float64).norm(dim=1))

    def target_cos_here() -> Tensor:
        """(B,) float64 target cosines where the batch is, NaN for ignored rows, and for
        every row when a label or the shape is bad (the op names it next)."""
        y = labels.to(torch.int64)
        k = sub_centers
        classes = w.shape[0] // k
        if w.shape[0] % k:
            return torch.full(y.shape, math.nan, dtype=torch.float64, device=x.device)
        centres = unit_rows(w.reshape(classes, k, -1)[y.clamp(0, classes - 1)])
        c = (unit_rows(x)[:, None, :] * centres).sum(dim=2).amax(dim=1).clamp(-1.0, 1.0)
        c = torch.where(y >= 0, c, torch.full_like(c, math.nan))
        # a bad label spoils the batch, as on the host (no test of it here: that would wait)
        bad = ((y < -1) | (y >= classes)).any()
        return torch.where(bad, torch.full_like(c, math.nan), c)

    if isinstance(margin, ElasticFace) and margin.plus:
        # ElasticFace+ ranks its draws by the target cosines where they are: no wait
        return margin._placed_rows(len(x), lambda blocks: placed_here(blocks, target_cos_here()))

    blocks = margin.batch_rows(norms, lambda: target_cos_here().cpu().numpy(), step)
    return None if blocks is None else torch.from_numpy(blocks)


def placed_here(ascending: np.ndarray, cos: Tensor) -> Tensor:
    """``place_by_rank`` (ElasticFace+'s placement) on the cosines' device: the ascending
    blocks go there (from a GPU's host, a pinned copy queued on the stream) and are scattered
    by the stable ranking of the cosines, NaN as 0, as ``place_by_rank`` ranks them."""
    blocks = rows_on(torch.from_numpy(ascending), cos.device)
    order = torch.argsort(-torch.nan_to_num(cos, nan=0.0), stable=True)
    placed = torch.empty_like(blocks)
    placed[order] = blocks
    return placed


class ReadLater:
    """A (B,) tensor that is copied to the host only when its values are read
    (``np.asarray``): margins that only count the rows (ElasticFace's draws, CurricularFace
    outside training) then make their blocks without waiting for the GPU."""

    __slots__ = ("_tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self._tensor = tensor

    def __len__(self) -> int:
        return int(self._tensor.shape[0])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self._tensor.detach().cpu().numpy()
        return values if dtype is None else values.astype(dtype, copy=False)


def unit_rows(t: Tensor) -> Tensor:
    """Rows (along the last axis) over their norms in float64, without overflow or
    underflow: each row is first scaled by its largest magnitude, so rows of norm 1e-300
    or 1e300 give exact cosines. Zero and non-finite rows give NaN."""
    t = t.to(torch.float64)
    peak = t.abs().amax(dim=-1, keepdim=True)
    ok = torch.isfinite(peak) & (peak > 0)
    scaled = t / torch.where(ok, peak, torch.ones_like(peak))
    unit = scaled / scaled.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    return torch.where(ok, unit, torch.full_like(unit, math.nan))
