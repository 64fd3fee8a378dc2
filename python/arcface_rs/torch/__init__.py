"""PyTorch heads on the fused Rust kernels: ``import arcface_rs.torch`` (needs torch).

``ArcFaceHead``, ``CosFaceHead``, ``SphereFaceHead``, ``CombinedMarginHead`` and
``SoftmaxHead`` own the class centres ``weight`` (C, D) and a ``margin``; ``head(emb, labels)``
returns the loss, ``head.logits(emb, labels)`` the (B, C) logits. The work runs in
``torch.library`` custom ops (with fake implementations, so ``torch.compile`` keeps one
graph); CPU tensors are shared with the Rust core without copies. float32 and float64 keep
their dtype; float16/bfloat16 (autocast) are computed in float32 and their gradients come
back in the input dtype.

``ShardedMarginHead`` splits the class centres across the ranks of a torch.distributed
process group (model parallel, Partial FC style); see its docstring.

CUDA tensors run the fused CUDA kernels when arcface_rs was built with the ``cuda`` feature
and a device is present (``arcface_rs.cuda_available()``): on torch's current stream, over
the tensors' own memory, with scratch from torch's allocator. Otherwise they run a plain
PyTorch implementation of the same math (same margins, same exact gradient) and warn once.
``margin_logits`` on CUDA tensors always runs the plain implementation.
"""

from __future__ import annotations

from ._cuda import check_cuda_errors
from .adaptive import AdaFaceHead, ElasticFaceHead, MagFaceHead
from .center import CenterLoss
from .functional import margin_logits, margin_loss
from .heads import (
    HEAD_KEYWORDS,
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    MarginHead,
    SoftmaxHead,
    SphereFaceHead,
)
from .negatives import CurricularFaceHead, MVSoftmaxHead
from .sharded import ShardedMarginHead, ddp_sum_hook, merge_shards, shard_range, split_weight
from .triplet import TripletLoss

__all__ = [
    "HEAD_KEYWORDS",
    "AdaFaceHead",
    "ArcFaceHead",
    "CenterLoss",
    "CombinedMarginHead",
    "CosFaceHead",
    "CurricularFaceHead",
    "ElasticFaceHead",
    "MagFaceHead",
    "MVSoftmaxHead",
    "MarginHead",
    "ShardedMarginHead",
    "SoftmaxHead",
    "SphereFaceHead",
    "TripletLoss",
    "check_cuda_errors",
    "ddp_sum_hook",
    "margin_logits",
    "margin_loss",
    "merge_shards",
    "shard_range",
    "split_weight",
]
