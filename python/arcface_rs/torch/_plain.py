"""The plain PyTorch implementation of the heads, for CUDA tensors when the fused CUDA path
cannot run (and tested against the Rust path on CPU): the same margins and the same exact
gradient, built from torch ops."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _core
from .._margins import Margin
from ._ops import compute_dtype

_THETA_EPS = 1e-3  # as margin.rs: psi' is evaluated with theta clamped to [eps, pi - eps]
KINDS = _core.MARGIN_KINDS
_warned_cuda = False


def _blocks(margin: Margin, c: Tensor, row_blocks: Tensor | None) -> Tensor:
    """The margin's parameter blocks (the core's encoding), one per element of ``c``."""
    if row_blocks is None:
        block = torch.tensor(margin.block, dtype=c.dtype, device=c.device)
        return block.expand(*c.shape, _core.MARGIN_PARAMS)
    return row_blocks.to(dtype=c.dtype, device=c.device)


def _psi_dpsi(
    margin: Margin, c: Tensor, row_blocks: Tensor | None = None, norm: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """psi(c) and psi'(c) elementwise in torch ops, read from the parameter blocks that
    margin.rs encodes (``row_blocks``: one block per element of ``c``, else the margin's;
    ``norm``: the rows' feature norms, for MagFace)."""
    p = _blocks(margin, c, row_blocks)
    kind = int(p.reshape(-1, p.shape[-1])[0, 0]) if p.numel() else KINDS["softmax"]
    a = [p[..., i] for i in range(2, p.shape[-1])]  # the parameters after [kind, s]
    one = torch.ones_like(c)
    if kind == KINDS["softmax"]:
        return c, one
    if kind == KINDS["cosface"]:
        return c - a[0], one
    if kind == KINDS["sphereface"]:
        m, lam = a[0], a[1]
        theta = torch.acos(c)
        k = torch.minimum(torch.floor(m * theta / math.pi), m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        # Chebyshev T_m and U_{m-1} for m = 1..4, picked per element
        t_all = [c, 2 * c**2 - 1, 4 * c**3 - 3 * c, 8 * c**4 - 8 * c**2 + 1]
        u_all = [one, 2 * c, 4 * c**2 - 1, 8 * c**3 - 4 * c]
        t_m, u_m = torch.zeros_like(c), torch.zeros_like(c)
        for order, (t, u) in enumerate(zip(t_all, u_all), start=1):
            t_m, u_m = torch.where(m == order, t, t_m), torch.where(m == order, u, u_m)
        psi, dpsi = sign * t_m - 2 * k, sign * m * u_m
        return (lam * c + psi) / (1 + lam), (lam + dpsi) / (1 + lam)
    if kind == KINDS["adaface"]:
        m, z, eps = a[0], a[1], 1e-3
        cc = c.clamp(-1 + eps, 1 - eps)
        theta = torch.acos(cc)
        shifted = theta - m * z
        t = shifted.clamp(eps, math.pi - eps)
        free = (cc == c) & (t == shifted)
        return torch.cos(t) - (m + m * z), torch.where(free, torch.sin(t) / torch.sin(theta), 0)
    if kind == KINDS["mvsoftmax"] and not bool((a[2] != 0).any()):
        return torch.where(c > a[0], c - a[0], c), one
    straight = torch.zeros_like(c, dtype=torch.bool)
    if kind in (KINDS["curricularface"], KINDS["mvsoftmax"]):
        # ArcFace's target (MV-Softmax's angular kind: psi = c where c <= 0)
        no = torch.zeros_like(c, dtype=torch.bool)
        m1, m2, m3 = one, a[0], torch.zeros_like(c)
        easy = no if kind == KINDS["curricularface"] else torch.ones_like(no)
    elif kind == KINDS["arcface"]:
        m1, m2, m3, easy, straight = one, a[0], torch.zeros_like(c), a[1] != 0, a[2] != 0
    elif kind == KINDS["combined"]:
        m1, m2, m3, easy = a[0], a[1], a[2], torch.zeros_like(c, dtype=torch.bool)
        straight = a[3] != 0
    elif kind == KINDS["magface"]:
        n = torch.ones_like(c) if norm is None else norm.to(c.dtype)
        l_a, u_a, l_m, u_m = a[0], a[1], a[2], a[3]
        m2 = l_m + (u_m - l_m) * (torch.minimum(torch.maximum(n, l_a), u_a) - l_a) / (u_a - l_a)
        m1, m3, easy = one, torch.zeros_like(c), a[4] != 0
    else:
        raise ValueError(f"margin: unknown kind {kind} in a parameter block")
    theta = torch.acos(c)
    theta_star = (math.pi - m2) / m1
    shift = torch.maximum(m2 * torch.sin(m2), 1 + torch.cos(theta_star))
    t = theta.clamp(_THETA_EPS, math.pi - _THETA_EPS)
    inside = theta <= theta_star
    psi = torch.where(inside, torch.cos(m1 * theta + m2) - m3, c - m3 - shift)
    dpsi = torch.where(inside, m1 * torch.sin(m1 * t + m2) / torch.sin(t), one)
    easy = easy & (c <= 0)
    dpsi = torch.where(straight, one, dpsi)
    return torch.where(easy, c, psi), torch.where(easy, one, dpsi)


class _Psi(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, c: Tensor, margin: Margin, row_blocks: Tensor | None) -> Tensor:
        psi, dpsi = _psi_dpsi(margin, c, row_blocks)
        ctx.save_for_backward(dpsi)
        return psi

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (dpsi,) = ctx.saved_tensors
        return grad * dpsi, None, None


def _magface_dpsi_dnorm(margin: Margin, c: Tensor, norm: Tensor) -> Tensor:
    """d psi / d ||x|| of MagFace's target (margin.rs's arc_with_dm times m'(a)): its margin
    m(a) grows with the clamped norm a; the clamp passes no gradient outside [l_a, u_a]."""
    l_a, u_a, l_m, u_m, easy = margin.block[2:7]
    slope = (u_m - l_m) / (u_a - l_a)
    m = l_m + slope * (norm.clamp(l_a, u_a) - l_a)
    theta = torch.acos(c)
    by_m = torch.where(
        theta > math.pi - m,  # the fallback c - k(m), k = max(m sin m, 1 - cos m)
        torch.where(
            m * torch.sin(m) >= 1 - torch.cos(m), -(torch.sin(m) + m * torch.cos(m)), -torch.sin(m)
        ),
        -torch.sin(theta + m),
    )
    if easy:
        by_m = torch.where(c <= 0, 0.0, by_m)
    return torch.where((norm >= l_a) & (norm <= u_a), by_m * slope, 0.0)


class _PsiNorm(torch.autograd.Function):
    """MagFace's target psi(c, ||x||): its margin moves with the feature norm."""

    @staticmethod
    def forward(ctx: Any, c: Tensor, norm: Tensor, margin: Margin) -> Tensor:
        psi, dpsi = _psi_dpsi(margin, c, None, norm)
        ctx.save_for_backward(dpsi, _magface_dpsi_dnorm(margin, c, norm))
        return psi

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        dpsi, dnorm = ctx.saved_tensors
        return grad * dpsi, grad * dnorm, None


def norm_penalty(margin: Margin, norm: Tensor) -> Tensor:
    """Each row's term of the loss besides the softmax (margin.rs's penalty): MagFace's
    lambda_g (a / u_a^2 + 1 / a), a the norm clamped to [l_a, u_a]; zeros for the others."""
    if margin.block[0] != KINDS["magface"]:
        return torch.zeros_like(norm)
    l_a, u_a, lambda_g = margin.block[2], margin.block[3], margin.block[7]
    a = norm.clamp(l_a, u_a)
    return lambda_g * (a / (u_a * u_a) + 1.0 / a)


def _hard_negatives(blocks: Tensor, target: Tensor, cos: Tensor) -> Tensor:
    """CurricularFace's and MV-Softmax's non-target cosines (margin.rs's HardNegatives):
    rows' blocks (n, MARGIN_PARAMS), their target cosines (n,) and cosines (n, C)."""
    kind = int(blocks[0, 0])
    m, t = blocks[:, 2:3], blocks[:, 3:4]
    target = target.detach()[:, None]
    shifted = torch.cos(torch.acos(target) + m)  # cos(theta_y + m), no fallback
    if kind == KINDS["curricularface"]:
        return torch.where(cos > shifted, cos * (t + cos), cos)
    above = torch.where(blocks[:, 4:5] != 0, shifted, target - m)
    return torch.where(cos > above, t * cos + t - 1.0, cos)


def plain_logits(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    row_blocks: Tensor | None = None,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
    remote_target_cos: Tensor | None = None,
) -> Tensor:
    """The (B, C) logits. One shard of a sharded head passes ``remote_target_cos``: the
    target cosine of each row whose target another shard holds (NaN elsewhere), for the
    hard-negative margins' rule; ``labels`` are then this shard's columns or -1."""
    dtype = compute_dtype(emb, weight)
    x, w = emb.to(dtype), weight.to(dtype)
    x_norm, w_norm = x.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    for name, norms in (("emb", x_norm), ("weight", w_norm)):
        bad = ~torch.isfinite(norms) | (norms == 0)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{name}: row {row} is all zeros or contains NaN or inf")
    cos = ((x / x_norm) @ (w / w_norm).T).clamp(-1.0, 1.0)
    if sub_centers > 1:
        if w.shape[0] % sub_centers:
            raise ValueError(
                f"weight: has {w.shape[0]} rows, not a multiple of sub_centers = {sub_centers}"
            )
        cos = cos.view(len(cos), -1, sub_centers).amax(dim=2)  # the gradient: arg-max only
    rows = torch.nonzero(labels >= 0).flatten()
    cols = labels[rows]
    if interclass_filter is not None:
        dirty = (cos > interclass_filter).detach()
        dirty[rows, cols] = False
        cos = cos.masked_fill(dirty, 0.0)
    blocks = None if row_blocks is None else row_blocks[rows]
    target = cos[rows, cols]
    if margin.block[0] in (KINDS["curricularface"], KINDS["mvsoftmax"]):
        hard_rows, hard_target = rows, target
        if remote_target_cos is not None:  # and the rows whose target is elsewhere
            remote = torch.nonzero(~torch.isnan(remote_target_cos)).flatten()
            hard_rows = torch.cat([rows, remote])
            hard_target = torch.cat([target.detach(), remote_target_cos[remote].to(cos.dtype)])
        hard_blocks = None if row_blocks is None else row_blocks[hard_rows]
        every = _blocks(margin, hard_target, hard_blocks).to(cos.dtype)
        cos = cos.index_put((hard_rows,), _hard_negatives(every, hard_target, cos[hard_rows]))
    if margin.block[0] == KINDS["magface"]:
        psi = _PsiNorm.apply(target, x_norm[rows, 0], margin)
    else:
        psi = _Psi.apply(target, margin, blocks)
    cos = cos.index_put((rows, cols), psi)
    scale = x_norm if margin.scale is None else margin.scale
    return cos * scale


def plain_loss(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    reduction: str,
    row_blocks: Tensor | None = None,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
) -> Tensor:
    logits = plain_logits(emb, weight, labels, margin, row_blocks, sub_centers, interclass_filter)
    per_row = F.cross_entropy(logits, labels, ignore_index=-1, reduction="none")
    if margin.block[0] == KINDS["magface"]:
        norm = emb.to(logits.dtype).norm(dim=1)
        per_row = per_row + torch.where(labels >= 0, norm_penalty(margin, norm), 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (labels >= 0).sum().clamp(min=1)  # 0, not NaN, if all ignored


def warn_cuda_once() -> None:
    global _warned_cuda
    if not _warned_cuda:
        _warned_cuda = True
        warnings.warn(
            "arcface_rs: CUDA tensors run a plain PyTorch implementation of the head (same "
            "math, not fused): this build has no CUDA path or no GPU is visible. Build with "
            'MATURIN_PEP517_ARGS="--features python,cuda" pip install . for the fused kernels.',
            RuntimeWarning,
            stacklevel=3,
        )


_warned: set[str] = set()


def note_exact_on_cuda(grad_filter: str | float | None, emb: Tensor) -> None:
    """Warns once that tensors off the CPU get the exact gradient whatever the filter."""
    if grad_filter is not None and emb.device.type != "cpu" and "grad_filter" not in _warned:
        _warned.add("grad_filter")
        warnings.warn(
            "arcface_rs: grad_filter applies to the CPU kernel; CUDA tensors get the exact "
            "gradient",
            RuntimeWarning,
            stacklevel=3,
        )
