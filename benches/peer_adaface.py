#!/usr/bin/env python3
"""Peer runner: the AdaFace head as the AdaFace paper defines it, in PyTorch eager ops
(written here from the paper's formulas), forward and backward on CPU.

usage: python benches/peer_adaface.py B D C
prints one JSON object: {"ms", "ms_median", "peak_mb", "threads"}

Feature norms detached and clipped to [1e-3, 100], running statistics updated from the batch
before use (t_alpha = 0.01), margin scaler clip(h (n - mean) / (std + 1e-3), -1, 1), cosines
clamped to 1 -+ 1e-3, target logit cos(clip(theta - m z, eps, pi - eps)) - (m + m z), all
logits times s, cross-entropy. The B x C logits exist whole, several times over (cosines,
clamp, the one-hot margin tensors, the scaled logits, softmax and their gradients). Runs
alone in its process; peak RSS growth is measured from after the inputs exist.
"""

from __future__ import annotations

import json
import math
import resource
import sys

import torch
import torch.nn.functional as F
from peer_head import best_ms  # (the same timing as the other head peers)


class PaperAdaFace(torch.nn.Module):
    def __init__(self, d: int, c: int, m=0.4, h=0.333, s=64.0, t_alpha=0.01) -> None:
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(d, c).mul_(0.01))
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, 1e-3
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norms = emb.norm(dim=1, keepdim=True)
        x = emb / norms
        kernel = F.normalize(self.kernel, dim=0)
        cosine = (x @ kernel).clamp(-1 + self.eps, 1 - self.eps)
        safe = norms.clip(min=0.001, max=100).detach()
        with torch.no_grad():
            self.batch_mean = safe.mean() * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = safe.std() * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        scaler = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clip(-1, 1)
        onehot = torch.zeros_like(cosine).scatter_(1, labels[:, None], 1.0)
        g_angular = onehot * (-self.m * scaler)
        theta = cosine.acos()
        theta_m = (theta + g_angular).clip(self.eps, math.pi - self.eps)
        g_add = onehot * (self.m + self.m * scaler)
        logits = (theta_m.cos() - g_add) * self.s
        return F.cross_entropy(logits, labels)


def main() -> None:
    b, d, c = (int(v) for v in sys.argv[1:4])
    torch.manual_seed(0)
    head = PaperAdaFace(d, c)
    x = torch.randn(b, d).mul_(20.0).requires_grad_()
    labels = torch.randint(0, c, (b,))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        x.grad, head.kernel.grad = None, None
        head(x, labels).backward()

    step()
    ms, ms_median = best_ms(step)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    out = {"ms": ms, "ms_median": ms_median, "peak_mb": round(peak_mb, 1)}
    print(json.dumps({**out, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
