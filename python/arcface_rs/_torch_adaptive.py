"""The heads whose margin follows each row: AdaFace (feature-norm quality, running
statistics as buffers), MagFace (margin and regulariser of the norm, all in the fused
kernel) and ElasticFace (a margin drawn per row). Re-exported by ``arcface_rs.torch``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._margins import AdaFace, ElasticFace, MagFace
from .torch import _check, _MarginHead

__all__ = ["AdaFaceHead", "ElasticFaceHead", "MagFaceHead"]


class AdaFaceHead(_MarginHead):
    """AdaFace head: the margin adapts to each row's feature norm (image quality).

    The running statistics ``batch_mean`` and ``batch_std`` are float64 buffers (saved in
    the state_dict), updated from each batch before use in ``train()`` mode and used
    unchanged in ``eval()`` mode; the formulas are those of :class:`arcface_rs.AdaFace`.
    Everything here is torch ops, so ``torch.compile(fullgraph=True)`` keeps one graph.

    Parameters
    ----------
    embedding_size, num_classes : int
        The shape (num_classes, embedding_size) of ``weight``, initialised N(0, 0.01).
    s, m, h, t_alpha, batch_mean, batch_std
        As for :class:`arcface_rs.AdaFace` (the last two: the buffers' initial values).
    reduction : {"mean", "sum", "none"}
        Over the rows whose label is not -1.
    device, dtype
        Of ``weight``.
    sub_centers, interclass_filter, grad_filter
        Centres per class, the inter-class filter and the gradient filter (see
        :func:`arcface_rs.margin_loss`).
    """

    batch_mean: Tensor
    batch_std: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        batch_mean: float = 20.0,
        batch_std: float = 100.0,
        reduction: str = "mean",
        device: Any = None,
        dtype: Any = None,
        sub_centers: int = 1,
        interclass_filter: float | None = None,
        grad_filter: str | float | None = None,
    ) -> None:
        margin = AdaFace(s=s, m=m, h=h, t_alpha=t_alpha, batch_mean=batch_mean, batch_std=batch_std)
        super().__init__(
            embedding_size,
            num_classes,
            reduction,
            device,
            dtype,
            sub_centers,
            interclass_filter,
            grad_filter,
        )
        self.margin = margin
        stats = {"dtype": torch.float64, "device": device}
        self.register_buffer("batch_mean", torch.full((), float(batch_mean), **stats))
        self.register_buffer("batch_std", torch.full((), float(batch_std), **stats))

    def margin_scaler(self, emb: Tensor) -> Tensor:
        """z_i of each row of ``emb`` with the current statistics (no update)."""
        return self._scaler(emb, self.batch_mean, self.batch_std)

    def _scaler(self, emb: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        n = emb.detach().to(torch.float64).norm(dim=1).clamp(1e-3, 100.0)
        return (self.margin.h * (n - mean) / (std + 1e-3)).clamp(-1.0, 1.0)

    def _row_blocks(self, emb: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """Each row's parameter block, its scaler from the statistics (mean, std)."""
        with torch.no_grad():
            block = torch.tensor(self.margin._block, dtype=torch.float64, device=emb.device)
            blocks = block.expand(emb.shape[0], block.shape[0]).clone()
            blocks[:, 3] = self._scaler(emb, mean, std)
        return blocks

    def _next_statistics(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics after this batch (the buffers are not touched here)."""
        with torch.no_grad():
            n = emb.detach().to(torch.float64).norm(dim=1).clamp(1e-3, 100.0)
            std = n.std() if n.numel() > 1 else torch.zeros_like(self.batch_std)
            a = self.margin.t_alpha
            return (1.0 - a) * self.batch_mean + a * n.mean(), (1.0 - a) * self.batch_std + a * std

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, embedding_size) with ``labels`` (B,)."""
        labels = _check(emb, self.weight, labels)
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
        labels = _check(emb, self.weight, labels)
        return self._logits_with_rows(emb, labels, self._row_blocks(emb, *self.stats))


class MagFaceHead(_MarginHead):
    """MagFace head: ArcFace whose margin grows with the feature norm, with the norm
    regulariser in the loss (both, and their gradients, in the fused kernel).

    Parameters
    ----------
    embedding_size, num_classes : int
        The shape (num_classes, embedding_size) of ``weight``, initialised N(0, 0.01).
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

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
        reduction: str = "mean",
        device: Any = None,
        dtype: Any = None,
        sub_centers: int = 1,
        interclass_filter: float | None = None,
        grad_filter: str | float | None = None,
    ) -> None:
        margin = MagFace(s, l_a, u_a, l_m, u_m, lambda_g, easy_margin)
        super().__init__(
            embedding_size,
            num_classes,
            reduction,
            device,
            dtype,
            sub_centers,
            interclass_filter,
            grad_filter,
        )
        self.margin = margin


class ElasticFaceHead(_MarginHead):
    """ElasticFace head: a margin drawn per row and per step (see
    :class:`arcface_rs.ElasticFace`; the draws are made on the host, from ``seed``).

    Parameters
    ----------
    embedding_size, num_classes : int
        The shape (num_classes, embedding_size) of ``weight``, initialised N(0, 0.01).
    s, m, std, kind, plus, seed
        As for :class:`arcface_rs.ElasticFace`.
    reduction : {"mean", "sum", "none"}
        Over the rows whose label is not -1.
    device, dtype
        Of ``weight``.
    sub_centers, interclass_filter, grad_filter
        Centres per class, the inter-class filter and the gradient filter (see
        :func:`arcface_rs.margin_loss`).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.0125,
        kind: str = "arc",
        plus: bool = False,
        seed: int | None = None,
        reduction: str = "mean",
        device: Any = None,
        dtype: Any = None,
        sub_centers: int = 1,
        interclass_filter: float | None = None,
        grad_filter: str | float | None = None,
    ) -> None:
        margin = ElasticFace(s=s, m=m, std=std, kind=kind, plus=plus, seed=seed)
        super().__init__(
            embedding_size,
            num_classes,
            reduction,
            device,
            dtype,
            sub_centers,
            interclass_filter,
            grad_filter,
        )
        self.margin = margin

    def get_extra_state(self) -> dict[str, Any]:
        """The draws' position, saved in the state_dict: a resumed run continues the
        sequence instead of repeating it."""
        return {"rng_state": self.margin.rng_state}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "rng_state" not in state:
            raise ValueError("ElasticFaceHead: the saved extra state has no 'rng_state'")
        self.margin.rng_state = state["rng_state"]
