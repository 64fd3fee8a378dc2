"""A model-parallel margin head over torch.distributed (Partial FC style).

Rank r owns the contiguous block ``shard_range`` of the class centres. Each step gathers the
embeddings and labels of every rank (an autograd-aware gather), runs the fused Rust kernel
on the rank's block, and all-reduces the per-row max, sum-exp and target logits between the
kernel's two passes, so the loss is exactly the softmax loss over all classes. The backward
pass needs no communication beyond the gather's own (an all-reduce of the embeddings'
gradient, of which each rank keeps its rows). No rank ever holds B_global × C.

CPU tensors run the Rust kernel; CUDA tensors the fused CUDA kernel with the exchange done
by collectives on the device, or, without the fused kernels, the same math in torch ops
(``_sharded_device``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _core
from .._cuda import cuda_available
from .._margins import KINDS_WITH_HARD_NEGATIVES, Margin
from .._validate import count as check_count
from .._validate import grad_filter as check_grad_filter
from .._validate import interclass_filter as check_filter
from .._validate import sub_centers as check_sub_centers
from ._collectives import GatherRows, ShardedCpuLoss, all_gather_rows, gather_sizes
from ._cuda import autocast_operand, margin_values_on
from ._plain import note_exact_on_cuda, warn_cuda_once
from ._rows import ReadLater, unit_rows
from ._sharded_device import FusedShardLoss, plain_shard_loss

__all__ = ["ShardedMarginHead", "ddp_sum_hook", "merge_shards", "shard_range", "split_weight"]

_REMOTE = _core.REMOTE_TARGET  # the label of a row whose target class another rank holds
_PATHS = ("cpu", "fused", "plain")


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the (C, D) class centres that ``rank`` owns: contiguous blocks
    whose sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return num_classes * rank // world_size, num_classes * (rank + 1) // world_size


def merge_shards(shards: Sequence[Tensor]) -> Tensor:
    """One (C, D) weight from the ranks' shards, in rank order (e.g. from their checkpoints)."""
    shards = list(shards)
    if not shards or len({s.shape[1:] for s in shards}) != 1 or shards[0].dim() != 2:
        raise ValueError("shards must be 2-D tensors with the same embedding size, in rank order")
    return torch.cat([s.detach() for s in shards], dim=0)


def split_weight(weight: Tensor, world_size: int, sub_centers: int = 1) -> list[Tensor]:
    """The shards a (C*K, D) weight gives to each of ``world_size`` ranks (see
    ``shard_range``; with ``sub_centers=K`` each class's K rows stay together)."""
    k = check_sub_centers(sub_centers)
    if weight.dim() != 2 or weight.shape[0] % k:
        raise ValueError(f"weight must be 2-D (C*{k}, D), got shape {tuple(weight.shape)}")
    c = weight.shape[0] // k
    if world_size < 1 or world_size > c:
        raise ValueError(f"world_size must be in [1, {c}], got {world_size}")
    bounds = (shard_range(c, world_size, r) for r in range(world_size))
    return [weight[lo * k : hi * k].clone() for lo, hi in bounds]


def ddp_sum_hook(process_group: Any, bucket: Any) -> torch.futures.Future[Tensor]:
    """A DistributedDataParallel communication hook that sums gradients instead of averaging.

    The sharded head's loss is the mean over the global batch and every rank's backward
    already gives the exact gradient of that loss for its own samples, so the backbone's
    true gradient is the *sum* over ranks. Register it with
    ``ddp_model.register_comm_hook(None, ddp_sum_hook)``.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP checks the hook's annotations as objects; this module's are postponed strings.
ddp_sum_hook.__annotations__ = {
    "process_group": Any,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


class ShardedMarginHead(nn.Module):
    """Margin-softmax head whose class centres are split across the ranks of a process group.

    ``head(emb, labels)`` takes this rank's batch (any size, labels -1 ignored) and returns
    the mean loss over the global batch — the same value on every rank. Its backward gives
    exactly that loss's gradient for this rank's embeddings and for this rank's shard
    ``weight`` (rows ``shard_range`` of the full (C, D) matrix). Float32 or float64 tensors on
    the CPU (a backend with all_gather and all_reduce on CPU tensors: gloo) or on a GPU (the
    fused CUDA head per shard when ``arcface_rs.cuda_available()``, with the statistics
    exchanged between its passes by collectives on the device, NCCL in practice; else the
    same math in torch ops, warned once). The weight lives on ``device``; inputs must be
    there too.

    ``sub_centers=K`` gives each class K centres (this rank's ``weight`` holds all K rows
    of each of its classes: a class never straddles two ranks); ``interclass_filter`` as
    :func:`arcface_rs.margin_loss`. Hard-negative margins (CurricularFace, MV-Softmax)
    threshold on each row's target cosine, gathered from the rank holding it. ``grad_filter``
    (see :func:`arcface_rs.margin_loss`) filters each rank's own tiles.

    ``sample_rate < 1`` is Partial FC: each step keeps every class centre that is a target in
    the global batch plus uniformly sampled others, up to ``ceil(sample_rate * shard size)``
    per rank; the softmax runs over the kept classes only and gradients reach their rows
    only. ``last_sampled`` holds the kept global class ids of this rank's shard.

    With DistributedDataParallel on the backbone, every rank's backward already gives the
    exact gradient of the global loss for its own samples, so the backbone's gradient must
    be summed, not averaged: ``ddp_model.register_comm_hook(None, ddp_sum_hook)``. The head
    itself is not wrapped in DDP (its shards differ by rank).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin,
        sample_rate: float = 1.0,
        process_group: Any = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        sub_centers: int = 1,
        interclass_filter: float | None = None,
        grad_filter: str | float | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMarginHead needs torch.distributed initialised first")
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be an arcface_rs margin, got {type(margin).__name__}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        embedding_size = check_count("embedding_size", embedding_size)
        num_classes = check_count("num_classes", num_classes)
        if num_classes < self.world_size:
            raise ValueError(
                f"num_classes ({num_classes}) must be at least the world size ({self.world_size})"
            )
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.margin, self.sample_rate = margin, float(sample_rate)
        self.sub_centers = check_sub_centers(sub_centers)
        self.interclass_filter = check_filter(interclass_filter)
        self.grad_filter = check_grad_filter(grad_filter)
        self.shard_range = shard_range(self.num_classes, self.world_size, self.rank)
        lo, hi = self.shard_range
        rows = (hi - lo) * self.sub_centers
        self.weight = nn.Parameter(
            torch.empty(rows, self.embedding_size, dtype=dtype, device=device)
        )
        self.last_sampled: Tensor | None = None
        self._agreed = False  # the ranks' configurations are compared on the first call
        # which implementation runs: None picks by device; the tests force "plain" or
        # "fused" on CPU tensors (the fused one on the fake CUDA driver)
        self._path: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin={self.margin!r}, sample_rate={self.sample_rate}, "
            f"rank={self.rank}/{self.world_size}, shard_range={self.shard_range}, "
            f"sub_centers={self.sub_centers}, interclass_filter={self.interclass_filter}"
        )

    def load_full_weight(self, weight: Tensor) -> None:
        """Copies this rank's rows of a full (C*K, D) weight (e.g. from ``merge_shards``)."""
        k = self.sub_centers
        if tuple(weight.shape) != (self.num_classes * k, self.embedding_size):
            raise ValueError(
                f"weight must have shape ({self.num_classes * k}, {self.embedding_size}), "
                f"got {tuple(weight.shape)}"
            )
        lo, hi = self.shard_range
        with torch.no_grad():
            self.weight.copy_(weight[lo * k : hi * k])

    def full_weight(self) -> Tensor:
        """The whole (C*K, D) weight, gathered from every rank (a collective: call on all)."""
        sizes = [
            (hi - lo) * self.sub_centers
            for lo, hi in (
                shard_range(self.num_classes, self.world_size, r) for r in range(self.world_size)
            )
        ]
        return all_gather_rows(self.weight.detach(), sizes, self.group)

    def _sample(self, labels: Tensor) -> Tensor:
        """Global class ids of this shard kept this step: every target, then random others
        (on the labels' device)."""
        lo, hi = self.shard_range
        positives = torch.unique(labels[(labels >= lo) & (labels < hi)])
        keep = max(1, math.ceil(self.sample_rate * (hi - lo)))
        if len(positives) >= keep:
            return positives
        mask = torch.ones(hi - lo, dtype=torch.bool, device=labels.device)
        mask[positives - lo] = False
        others = torch.nonzero(mask).flatten() + lo
        chosen = others[torch.randperm(len(others), device=labels.device)[: keep - len(positives)]]
        return torch.sort(torch.cat([positives, chosen])).values

    def _target_cos(self, x: Tensor, labels_all: Tensor, local: Tensor) -> Tensor:
        """(B,) float64 target cosine of every global row, NaN for ignored rows: each rank
        knows those of the rows whose class it holds (a collective)."""
        cos = torch.zeros(len(labels_all), dtype=torch.float64, device=x.device)
        k, lo = self.sub_centers, self.shard_range[0]
        if bool(local.any()):
            centres = self.weight.detach().view(-1, k, x.shape[1])
            mine = unit_rows(centres[labels_all[local] - lo])
            # norms taken safely: rows of any finite non-zero magnitude give exact cosines
            cos[local] = (unit_rows(x[local])[:, None, :] * mine).sum(dim=2).amax(dim=1)
        dist.all_reduce(cos, op=dist.ReduceOp.SUM, group=self.group)
        return torch.where(labels_all >= 0, cos, torch.full_like(cos, math.nan))

    def _row_blocks(self, x: Tensor, target_cos: Any) -> Tensor | None:
        """The margin's per-row blocks for the global batch (float64 on x's device),
        identical on every rank: each rank updates its own margin's state from the same
        gathered batch (AdaFace's statistics), then rank 0's blocks are broadcast
        (ElasticFace's draws)."""
        if not self.margin.varies_per_batch:
            blocks = self.margin.row_blocks
            return None if blocks is None else margin_values_on(blocks, x.device)
        blocks = self.margin.batch_rows(lambda: ReadLater(x.norm(dim=1)), target_cos)
        if blocks is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float64)).to(x.device)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(t, src=src, group=self.group)
        return t

    def _implementation(self, emb: Tensor) -> str:
        """ "cpu" (the Rust kernel), "fused" (the CUDA kernel) or "plain" (torch ops)."""
        if self._path is not None:
            if self._path not in _PATHS:
                raise ValueError(f"_path must be one of {_PATHS} or None, got {self._path!r}")
            return self._path
        if emb.device.type == "cpu":
            return "cpu"
        if emb.device.type == "cuda" and cuda_available():
            return "fused"
        warn_cuda_once()
        return "plain"

    def _input_problem(self, emb: Any, labels: Any) -> Exception | None:
        """What is wrong with this rank's inputs, or None (checked locally, raised only
        after every rank has said whether its own inputs are fine)."""
        if not isinstance(emb, Tensor) or not isinstance(labels, Tensor):
            return TypeError("emb and labels must be torch tensors")
        device = self.weight.device
        if emb.device != device or labels.device != device:
            return ValueError(
                f"emb and labels must be on the weight's device {device}, got {emb.device} "
                f"and {labels.device}"
            )
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            return ValueError(
                f"emb must have shape (batch, {self.embedding_size}), got {tuple(emb.shape)}"
            )
        if not emb.is_floating_point():
            return TypeError(f"emb must be a floating-point tensor, got {emb.dtype}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            return TypeError(
                f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.shape[0] != emb.shape[0]:
            return ValueError(f"labels has {labels.shape[0]} entries for {emb.shape[0]} rows")
        return None

    def _configuration(self) -> dict[str, float]:
        """What every rank's head must agree on, as numbers."""
        dtypes = (torch.float32, torch.float64)
        config = {
            "world_size": float(self.world_size),
            "embedding_size": float(self.embedding_size),
            "num_classes": float(self.num_classes),
            "sub_centers": float(self.sub_centers),
            "dtype": float(dtypes.index(self.weight.dtype) if self.weight.dtype in dtypes else -1),
            "sample_rate": self.sample_rate,
            "interclass_filter": math.nan
            if self.interclass_filter is None
            else self.interclass_filter,
        }
        config.update({f"margin[{i}]": float(v) for i, v in enumerate(self.margin.block)})
        return config

    def _agree_on_configuration(self) -> None:
        """Every rank's configuration, compared on every rank (one collective, on the first
        call): ranks that disagree on the shapes would die inside the collectives (gloo
        aborts on mismatched sizes) or leave classes without an owner and compute a wrong
        loss; instead every rank raises the same ValueError."""
        config = self._configuration()
        mine = torch.tensor(list(config.values()), dtype=torch.float64)
        every = all_gather_rows(
            mine[None].to(self.weight.device), [1] * self.world_size, self.group
        ).cpu()
        for j, name in enumerate(config):
            column = every[:, j]
            if not bool((column == column[0]).all() | column.isnan().all()):
                values = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column.tolist()))
                raise ValueError(
                    f"ShardedMarginHead: the ranks disagree on {name} ({values}); every rank "
                    "must build the head with the same arguments"
                )
        self._agreed = True

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        device = self.weight.device
        if not self._agreed:
            self._agree_on_configuration()
        # Each rank's inputs are checked before the first collective that the others would
        # wait in: a rank that refuses its own sends -1 as its batch size, so every rank
        # raises together instead of the others waiting until the group's timeout.
        problem = self._input_problem(emb, labels)
        n = -1 if problem is not None else emb.shape[0]
        sizes = gather_sizes(n, self.group, device)
        if problem is not None:
            raise problem
        refused = [r for r, size in enumerate(sizes) if size < 0]
        if refused:
            raise RuntimeError(
                f"ShardedMarginHead: rank(s) {refused} refused their inputs (see their error); "
                "every rank stops here"
            )
        path = self._implementation(emb)
        if path != "cpu":
            note_exact_on_cuda(self.grad_filter, emb)
        emb = emb.to(self.weight.dtype)
        emb_all = GatherRows.apply(emb, sizes, self.group)
        labels_all = all_gather_rows(labels.long(), sizes, self.group)
        bad = (labels_all < -1) | (labels_all >= self.num_classes)
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"labels: value {int(labels_all[i])} (global row {i}) is outside "
                f"[-1, {self.num_classes})"
            )
        lo, hi = self.shard_range
        k = self.sub_centers
        local = (labels_all >= lo) & (labels_all < hi)
        x = emb_all.detach().to(torch.float64)
        cos_cache: list[Tensor] = []

        def target_cos() -> Tensor:
            if not cos_cache:  # one collective per call, whoever asks first
                cos_cache.append(self._target_cos(x, labels_all, local))
            return cos_cache[0]

        rows = self._row_blocks(x, lambda: target_cos().cpu().numpy())
        hard = self.margin.block[0] in KINDS_WITH_HARD_NEGATIVES
        if self.sample_rate < 1.0:
            kept = self._sample(labels_all)
            self.last_sampled = kept
            centre_rows = ((kept - lo)[:, None] * k + torch.arange(k, device=kept.device)).flatten()
            weight = self.weight[centre_rows]
            columns = torch.searchsorted(kept, labels_all.clamp(lo, hi - 1))
            count = torch.tensor([len(kept)], dtype=torch.int64, device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
            stash_classes = int(count)
        else:
            kept = None
            weight = self.weight
            columns = labels_all - lo
            stash_classes = math.ceil(self.num_classes / self.world_size)
        targets = torch.where(local, columns, torch.where(labels_all == -1, -1, _REMOTE))
        first = self.rank == 0
        cos = target_cos() if hard else None
        if path == "plain":
            loss = plain_shard_loss(
                emb_all, weight, targets, self.margin, rows, first, self.group, k,
                self.interclass_filter, cos,
            )  # fmt: skip
        elif path == "fused":

            def class_of_row(row: int) -> int:
                return int(kept[row // k]) if kept is not None else lo + row // k

            # the kernels size row chunks by centres (weight rows), alike on every rank
            loss = FusedShardLoss.apply(
                autocast_operand(emb_all, weight), weight, targets, self.margin, rows,
                stash_classes * k, first, self.group, self.interclass_filter, cos,
                class_of_row, k,
            )  # fmt: skip
        else:
            loss = self._cpu_loss(emb_all, weight, targets, rows, stash_classes, first, cos)
        self.margin.commit()  # accepted on every rank: running statistics and draws move on
        return loss

    def _cpu_loss(
        self,
        emb_all: Tensor,
        weight: Tensor,
        targets: Tensor,
        rows: Tensor | None,
        stash_classes: int,
        first: bool,
        cos: Tensor | None,
    ) -> Tensor:
        return ShardedCpuLoss.apply(
            emb_all,
            weight,
            targets,
            self.margin.spec,
            None if rows is None else rows.numpy(),
            stash_classes,
            first,
            self.group,
            (self.sub_centers, self.interclass_filter),
            None if cos is None else cos.numpy(),
            self.grad_filter,
        )
