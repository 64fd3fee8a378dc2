"""The heads whose margin follows each row: AdaFace (feature-norm quality, running
statistics as buffers), MagFace (margin and regulariser of the norm, all in the fused
kernel) and ElasticFace (a margin drawn per row). Re-exported by ``arcface_rs.torch``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._margins import AdaFace, ElasticFace, MagFace
from ._cuda import margin_values_on
from .functional import check_inputs
from .heads import MarginHead

__all__ = ["AdaFaceHead", "ElasticFaceHead", "MagFaceHead"]


class AdaFaceHead(MarginHead, margin=AdaFace):
    """AdaFace head: the margin adapts to each row's feature norm (image quality).

    The running statistics ``batch_mean`` and ``batch_std`` are float64 buffers (saved in
    the state_dict), updated from each batch before use in ``train()`` mode and used
    unchanged in ``eval()`` mode; the formulas are those of :class:`arcface_rs.AdaFace`.
    Everything here is torch ops, so ``torch.compile(fullgraph=True)`` keeps one graph.

    Parameters
    ----------
    s, m, h, t_alpha, batch_mean, batch_std
        As for :class:`arcface_rs.AdaFace` (the last two: the buffers' initial values).
    embedding_size, num_classes, **keywords
        As for :class:`arcface_rs.torch.MarginHead` (reduction, device, dtype,
        sub_centers, interclass_filter, grad_filter).
    """

    batch_mean: Tensor
    batch_std: Tensor

    def _set_up(self) -> None:
        # the running statistics start from the margin's
        stats = {"dtype": torch.float64, "device": self.weight.device}
        self.register_buffer("batch_mean", torch.full((), float(self.margin.batch_mean), **stats))
        self.register_buffer("batch_std", torch.full((), float(self.margin.batch_std), **stats))

    def margin_scaler(self, emb: Tensor) -> Tensor:
        """z_i of each row of ``emb`` with the current statistics (no update)."""
        return self._scaler(emb, self.batch_mean, self.batch_std)

    def _scaler(self, emb: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        n = emb.detach().to(torch.float64).norm(dim=1).clamp(1e-3, 100.0)
        return (self.margin.h * (n - mean) / (std + 1e-3)).clamp(-1.0, 1.0)

    def _row_blocks(self, emb: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """Each row's parameter block, its scaler from the statistics (mean, std)."""
        with torch.no_grad():
            block = margin_values_on(self.margin.block, emb.device)
            blocks = block.expand(emb.shape[0], block.shape[0]).clone()
            blocks[:, 3] = self._scaler(emb, mean, std)
        return blocks

    def _next_statistics(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics after this batch (the buffers are not touched here). A batch with
        a NaN or inf row leaves them as they were: on CUDA the loss reports such a batch at
        the next call (it does not wait for the GPU), after the buffers took these values,
        and NaN statistics would spoil every later step."""
        with torch.no_grad():
            raw = emb.detach().to(torch.float64).norm(dim=1)
            ok = torch.isfinite(raw).all()  # a where, not a branch: no wait, one graph
            n = raw.clamp(1e-3, 100.0)
            std = n.std() if n.numel() > 1 else torch.zeros_like(self.batch_std)
            a = self.margin.t_alpha
            mean = torch.where(ok, (1.0 - a) * self.batch_mean + a * n.mean(), self.batch_mean)
            std = torch.where(ok, (1.0 - a) * self.batch_std + a * std, self.batch_std)
            return mean, std

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, embedding_size) with ``labels`` (B,)."""
        labels = check_inputs(emb, self.weight, labels)
        if not self.training:
            return self._loss_with_rows(emb, labels, self._row_blocks(emb, *self.stats))
        # The statistics move before use, as the paper's head does, but into the buffers
        # only once the loss has accepted the batch: an empty batch or a NaN row is refused
        # and leaves them (and the state_dict) as they were.
        mean, std = self._next_statistics(emb)
        loss = self._loss_with_rows(emb, labels, self._row_blocks(emb, mean, std))
        with torch.no_grad():
            self.batch_mean.copy_(mean)
            self.batch_std.copy_(std)
        return loss

    @property
    def stats(self) -> tuple[Tensor, Tensor]:
        """The running statistics (batch_mean, batch_std)."""
        return self.batch_mean, self.batch_std

    def logits(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The (B, num_classes) margin logits with the current statistics (no update)."""
        labels = check_inputs(emb, self.weight, labels)
        return self._logits_with_rows(emb, labels, self._row_blocks(emb, *self.stats))


class MagFaceHead(MarginHead, margin=MagFace):
    """MagFace head: ArcFace whose margin grows with the feature norm, with the norm
    regulariser in the loss (both, and their gradients, in the fused kernel).

    Parameters
    ----------
    s, l_a, u_a, l_m, u_m, lambda_g, easy_margin
        As for :class:`arcface_rs.MagFace`.
    reduction : {"mean", "sum", "none"}
        Over the rows whose label is not -1 (the regulariser too).
    device, dtype
        Of ``weight``.
    sub_centers, interclass_filter, grad_filter
        Centres per class, the inter-class filter and the gradient filter (see
        :func:`arcface_rs.margin_loss`).
    """


class ElasticFaceHead(MarginHead, margin=ElasticFace):
    """ElasticFace head: a margin drawn per row and per step (see
    :class:`arcface_rs.ElasticFace`; the draws are made on the host, from ``seed``).

    Parameters
    ----------
    s, m, std, kind, plus, seed
        As for :class:`arcface_rs.ElasticFace`.
    embedding_size, num_classes, **keywords
        As for :class:`arcface_rs.torch.MarginHead` (reduction, device, dtype,
        sub_centers, interclass_filter, grad_filter).
    """

    def get_extra_state(self) -> dict[str, Any]:
        """The draws' position, saved in the state_dict: a resumed run continues the
        sequence instead of repeating it."""
        return {"rng_state": self.margin.rng_state}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "rng_state" not in state:
            raise ValueError("ElasticFaceHead: the saved extra state has no 'rng_state'")
        self.margin.rng_state = state["rng_state"]
