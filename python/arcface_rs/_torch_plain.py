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

from ._margins import ArcFace, CosFace, Margin, Softmax, SphereFace
from ._torch_ops import _compute_dtype

_THETA_EPS = 1e-3  # as margin.rs: psi' is evaluated with theta clamped to [eps, pi - eps]
_warned_cuda = False


def _psi_dpsi(margin: Margin, c: Tensor) -> tuple[Tensor, Tensor]:
    """psi(c) and psi'(c) elementwise, the formulas of margin.rs in torch ops."""
    one = torch.ones_like(c)
    if isinstance(margin, Softmax):
        return c, one
    if isinstance(margin, CosFace):
        return c - margin.m, one
    if isinstance(margin, SphereFace):
        m = margin.m
        theta = torch.acos(c)
        k = torch.clamp(torch.floor(m * theta / math.pi), max=m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        t_m = [c, 2 * c**2 - 1, 4 * c**3 - 3 * c, 8 * c**4 - 8 * c**2 + 1][m - 1]
        u_m = [one, 2 * c, 4 * c**2 - 1, 8 * c**3 - 4 * c][m - 1]
        psi, dpsi = sign * t_m - 2 * k, sign * m * u_m
        lam = margin.lambda_
        return (lam * c + psi) / (1 + lam), (lam + dpsi) / (1 + lam)
    if isinstance(margin, ArcFace):
        m1, m2, m3 = 1.0, margin.m, 0.0
    else:
        m1, m2, m3 = margin.m1, margin.m2, margin.m3
    theta = torch.acos(c)
    theta_star = (math.pi - m2) / m1
    shift = max(m2 * math.sin(m2), 1 + math.cos(theta_star))
    t = theta.clamp(_THETA_EPS, math.pi - _THETA_EPS)
    inside = theta <= theta_star
    psi = torch.where(inside, torch.cos(m1 * theta + m2) - m3, c - m3 - shift)
    dpsi = torch.where(inside, m1 * torch.sin(m1 * t + m2) / torch.sin(t), one)
    if isinstance(margin, ArcFace) and margin.easy_margin:
        psi, dpsi = torch.where(c <= 0, c, psi), torch.where(c <= 0, one, dpsi)
    return psi, dpsi


class _Psi(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, c: Tensor, margin: Margin) -> Tensor:
        psi, dpsi = _psi_dpsi(margin, c)
        ctx.save_for_backward(dpsi)
        return psi

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (dpsi,) = ctx.saved_tensors
        return grad * dpsi, None


def _plain_logits(emb: Tensor, weight: Tensor, labels: Tensor, margin: Margin) -> Tensor:
    dtype = _compute_dtype(emb, weight)
    x, w = emb.to(dtype), weight.to(dtype)
    x_norm, w_norm = x.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    for name, norms in (("emb", x_norm), ("weight", w_norm)):
        bad = ~torch.isfinite(norms) | (norms == 0)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{name}: row {row} is all zeros or contains NaN or inf")
    cos = ((x / x_norm) @ (w / w_norm).T).clamp(-1.0, 1.0)
    rows = torch.nonzero(labels >= 0).flatten()
    cols = labels[rows]
    psi = _Psi.apply(cos[rows, cols], margin)
    cos = cos.index_put((rows, cols), psi)
    scale = x_norm if margin.scale is None else margin.scale
    return cos * scale


def _plain_loss(
    emb: Tensor, weight: Tensor, labels: Tensor, margin: Margin, reduction: str
) -> Tensor:
    logits = _plain_logits(emb, weight, labels, margin)
    per_row = F.cross_entropy(logits, labels, ignore_index=-1, reduction="none")
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (labels >= 0).sum().clamp(min=1)  # 0, not NaN, if all ignored


def _warn_cuda_once() -> None:
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
