"""Float64 PyTorch references of the papers' heads (AdaFace, MagFace, CurricularFace,
MV-Softmax and their building blocks), written from each paper's definition with autograd for
the gradients; shared by the NumPy tests (tests/core) and the torch tests (tests/torch)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def autograd_reference(emb, weight, labels, target_logit, extra=None):
    """Mean CE of s*cos with target logits from ``target_logit(cos_target, norms)`` and the
    gradients by autograd; ``extra(norms)`` adds a per-row loss term."""
    x = torch.tensor(emb, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    y = torch.tensor(labels)
    norms = x.norm(dim=1)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    rows = torch.arange(len(y))
    logits, s = target_logit(cos, cos[rows, y], norms)
    logits = logits.clone()
    loss = F.cross_entropy(logits, y, reduction="none")
    if extra is not None:
        loss = loss + extra(norms)
    loss = loss.mean()
    loss.backward()
    return loss.item(), x.grad.numpy(), w.grad.numpy()


def scatter_target(cos, y, target, s):
    onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    return s * (cos * (1 - onehot) + onehot * target[:, None])


def adaface_reference(emb, weight, labels, state, s=64.0, m=0.4, h=0.333, t_alpha=0.01):
    """One step of the AdaFace paper's head; updates ``state`` (mean, std) in place."""
    eps = 1e-3

    def target(cos, ct, norms):
        safe = norms.detach().clamp(0.001, 100)
        state[0] = safe.mean().item() * t_alpha + (1 - t_alpha) * state[0]
        state[1] = safe.std().item() * t_alpha + (1 - t_alpha) * state[1]
        z = ((safe - state[0]) / (state[1] + eps) * h).clamp(-1, 1)
        cos = cos.clamp(-1 + eps, 1 - eps)
        ct = ct.clamp(-1 + eps, 1 - eps)
        theta = torch.acos(ct)
        theta_m = (theta - m * z).clamp(eps, math.pi - eps)
        psi = torch.cos(theta_m) - (m + m * z)
        return scatter_target(cos, torch.tensor(labels), psi, s), s

    return autograd_reference(emb, weight, labels, target)


def magface_reference(
    emb, weight, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy=True
):
    def target(cos, ct, norms):
        a = norms.clamp(l_a, u_a)
        mm = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        theta = torch.acos(ct.clamp(-1, 1))
        psi = torch.cos(theta + mm)
        if easy:
            psi = torch.where(ct > 0, psi, ct)
        else:
            psi = torch.where(theta + mm <= math.pi, psi, ct - mm * torch.sin(mm))
        return scatter_target(cos, torch.tensor(labels), psi, s), s

    def regulariser(norms):
        a = norms.clamp(l_a, u_a)
        return lambda_g * (a / u_a**2 + 1 / a)

    return autograd_reference(emb, weight, labels, target, regulariser)


def spread_problem(b=12, d=16, c=40, seed=0, spread=0.0):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(c, d))
    labels = rng.integers(0, c, size=b)
    emb = rng.normal(size=(b, d))
    # pull rows towards their centre so the margins' regions are all visited
    emb += spread * weight[labels] / np.linalg.norm(weight[labels], axis=1, keepdims=True)
    return emb, weight, labels


def cosines(emb, weight, k=1):
    x = F.normalize(emb, dim=1)
    w = F.normalize(weight, dim=1)
    cos = (x @ w.T).clamp(-1, 1)
    if k > 1:
        cos = cos.view(len(emb), -1, k).max(dim=2).values
    return cos


def arc_target(t, m):
    """ArcFace's target as the reference heads write it (the fallback beyond pi - m)."""
    sin = torch.sqrt(1.0 - t * t)
    ctm = t * math.cos(m) - sin * math.sin(m)
    return torch.where(t > math.cos(math.pi - m), ctm, t - math.sin(math.pi - m) * m), ctm


def cross_entropy(logits, labels):
    return F.cross_entropy(logits, torch.as_tensor(labels), reduction="mean")


def grads_of(loss_fn, emb, weight):
    e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(e, w)
    loss.backward()
    return loss.item(), e.grad.numpy(), w.grad.numpy()


def curricular_reference(s, m, alpha, t0, emb, weight, labels):
    """HuangYG123/CurricularFace's head: t updated before use, hard negatives c (t + c)."""
    state = {"t": t0}

    def loss(e, w):
        cos = cosines(e, w)
        rows = torch.arange(len(labels))
        target = cos[rows, labels].view(-1, 1)
        final, ctm = arc_target(target, m)
        with torch.no_grad():
            state["t"] = target.mean().item() * alpha + (1 - alpha) * state["t"]
        mask = cos > ctm
        t = state["t"]
        cos = torch.where(mask, cos * (t + cos), cos)
        cos = cos.scatter(1, torch.as_tensor(labels).view(-1, 1), final)
        return cross_entropy(s * cos, labels)

    out = grads_of(loss, emb, weight)
    return out, state["t"]


def mv_reference(s, m, t, kind, emb, weight, labels):
    """FaceX-Zoo's MV-Softmax (adaptive): misclassified non-targets become t c + t - 1."""

    def loss(e, w):
        cos = cosines(e, w)
        gt = cos[torch.arange(len(labels)), labels].view(-1, 1)
        if kind == "cos":
            mask = cos > gt - m
            final = torch.where(gt > m, gt - m, gt)
        else:
            ctm = gt * math.cos(m) - torch.sqrt(1.0 - gt * gt) * math.sin(m)
            mask = cos > ctm
            final = torch.where(gt > 0, ctm, gt)
        cos = torch.where(mask, t * cos + t - 1.0, cos)
        cos = cos.scatter(1, torch.as_tensor(labels).view(-1, 1), final)
        return cross_entropy(s * cos, labels)

    return grads_of(loss, emb, weight)


def float64_head(cls, weight, k=1, **kw):
    """A float64 head of ``cls`` whose centres are ``weight`` ((C*k, D), k sub-centres)."""
    head = cls(
        embedding_size=weight.shape[1],
        num_classes=weight.shape[0] // k,
        dtype=torch.float64,
        sub_centers=k,
        **kw,
    )
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    return head


def head_step(head, emb, labels):
    """One loss and backward: (loss, dL/demb, dL/dweight) as NumPy."""
    e = torch.tensor(emb, requires_grad=True)
    head.weight.grad = None
    loss = head(e, torch.tensor(labels))
    loss.backward()
    return loss.item(), e.grad.numpy(), head.weight.grad.numpy().copy()
