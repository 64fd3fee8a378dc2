"""Independent float64 PyTorch reference of the heads, written from the formulas in the paper
and docs/math.md, differentiated by autograd. Shared by the test modules."""

from __future__ import annotations

import math

import numpy as np
import torch

import arcface_rs as afr


def ref_psi(margin: afr.Margin, c: torch.Tensor) -> torch.Tensor:
    """psi(c) for a tensor of target cosines, by the textbook formulas (acos / cos)."""
    if isinstance(margin, afr.Softmax):
        return c
    if isinstance(margin, afr.CosFace):
        return c - margin.m
    if isinstance(margin, (afr.ArcFace, afr.CombinedMargin)):
        if isinstance(margin, afr.ArcFace):
            m1, m2, m3 = 1.0, margin.m, 0.0
        else:
            m1, m2, m3 = margin.m1, margin.m2, margin.m3
        theta = torch.acos(c)
        theta_star = (math.pi - m2) / m1
        shift = max(m2 * math.sin(m2), 1.0 + math.cos(theta_star))
        main = torch.cos(m1 * theta + m2) - m3
        out = torch.where(theta <= theta_star, main, c - m3 - shift)
        if isinstance(margin, afr.ArcFace) and margin.easy_margin:
            out = torch.where(c > 0, main, c)
        return out
    if isinstance(margin, afr.SphereFace):
        m = margin.m
        theta = torch.acos(c)
        k = torch.clamp(torch.floor(m * theta.detach() / math.pi), max=m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        psi = sign * torch.cos(m * theta) - 2.0 * k
        return (margin.lambda_ * c + psi) / (1.0 + margin.lambda_)
    raise TypeError(margin)


def ref_logits(
    emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin
) -> torch.Tensor:
    xn = emb / emb.norm(dim=1, keepdim=True)
    wn = weight / weight.norm(dim=1, keepdim=True)
    cos = (xn @ wn.T).clamp(-1.0, 1.0)
    rows = torch.nonzero(labels >= 0).flatten()
    tgt = cos[rows, labels[rows]]
    cos = cos.index_put((rows, labels[rows]), ref_psi(margin, tgt))
    scale = emb.norm(dim=1, keepdim=True) if margin.scale is None else margin.scale
    return cos * scale


def ref_loss(emb, weight, labels, margin, reduction="mean", dtype=torch.float64):
    """(loss, grad_emb, grad_weight) as numpy arrays, computed in `dtype`."""
    e = torch.tensor(np.asarray(emb), dtype=dtype, requires_grad=True)
    w = torch.tensor(np.asarray(weight), dtype=dtype, requires_grad=True)
    y = torch.tensor(np.asarray(labels), dtype=torch.int64)
    z = ref_logits(e, w, y, margin)
    per_row = torch.nn.functional.cross_entropy(z, y, ignore_index=-1, reduction="none")
    valid = (y >= 0).sum()
    if reduction == "mean":
        loss = per_row.sum() / valid if valid > 0 else per_row.sum() * 0
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row
    loss.sum().backward()
    return loss.detach().numpy(), e.grad.numpy(), w.grad.numpy()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(), 1e-300)
    return float(np.abs(got - want).max() / scale)


def all_margins():
    return [
        afr.Softmax(s=30.0),
        afr.ArcFace(s=64.0, m=0.5),
        afr.ArcFace(s=30.0, m=0.3, easy_margin=True),
        afr.CosFace(s=64.0, m=0.35),
        afr.SphereFace(m=4),
        afr.SphereFace(m=3, s=30.0, lambda_=5.0),
        afr.SphereFace(m=2, lambda_=1.0),
        afr.CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2),
        afr.CombinedMargin(s=32.0, m1=1.3, m2=0.2, m3=0.1),
    ]


def make_problem(b, d, c, seed=0, dtype=np.float64, ignore=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((b, d)) * rng.uniform(0.5, 3.0, size=(b, 1))
    weight = rng.standard_normal((c, d)) * rng.uniform(0.5, 2.0, size=(c, 1))
    labels = rng.integers(0, c, size=b)
    # make some targets close to their centre so the margin matters in the loss
    near = rng.random(b) < 0.5
    emb[near] = weight[labels[near]] + 0.3 * rng.standard_normal((near.sum(), d))
    if ignore:
        labels[rng.choice(b, size=ignore, replace=False)] = -1
    return emb.astype(dtype), weight.astype(dtype), labels


def unit(a: np.ndarray) -> np.ndarray:
    """Rows over their float64 norm, taken without over- or underflow."""
    a = np.asarray(a, dtype=np.float64)
    peak = np.abs(a).max(axis=1, keepdims=True)
    scaled = a / peak
    return scaled / np.linalg.norm(scaled, axis=1, keepdims=True)


def brute_topk(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best cosines per query, ties to the lower index (a full sort)."""
    scores = unit(q) @ unit(g).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
