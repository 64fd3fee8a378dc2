"""``arcface_rs.torch.CenterLoss``: Center loss beside any head (re-exported there)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CenterLoss"]


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): ``lambda_c / 2 * mean_i ||x_i - c_{y_i}||^2``
    over the rows whose label is not -1, added beside any head:
    ``loss = head(x, y) + center(x, y)``.

    The centres are a buffer (saved in the state_dict, no gradient). Each forward in
    ``train()`` mode moves the classes of the batch by the paper's rule
    ``c_j -= alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``, after the loss (and so its
    gradient) used the centres as they were. The fused NumPy version is
    :func:`arcface_rs.center_loss`.

    Parameters
    ----------
    num_classes, embedding_size : int
        Shape of ``centers``, initialised N(0, 1).
    lambda_c : float
        Weight of the loss, >= 0.
    alpha : float
        Centre learning rate, >= 0.
    device, dtype
        Of ``centers``.
    """

    centers: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        lambda_c: float = 0.003,
        alpha: float = 0.5,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("lambda_c", lambda_c), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.lambda_c, self.alpha = float(lambda_c), float(alpha)
        self.register_buffer(
            "centers",
            torch.randn(self.num_classes, self.embedding_size, device=device, dtype=dtype),
        )

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, embedding_size) with ``labels`` (B,); -1 rows take no part.

        Checked as :func:`arcface_rs.center_loss` checks: an empty batch, a NaN or inf
        embedding, or a label outside [-1, num_classes) raises ValueError before the
        centres move (one bad batch would otherwise turn its classes' centres NaN for good).
        """
        for name, t in (("emb", emb), ("labels", labels)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not emb.is_floating_point():
            raise TypeError(f"emb must be a floating-point tensor, got {emb.dtype}")
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size or emb.shape[0] == 0:
            raise ValueError(
                f"emb must have shape (B >= 1, {self.embedding_size}), got {tuple(emb.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.dim() != 1 or len(labels) != len(emb):
            raise ValueError(
                f"labels must be ({len(emb)},) integers, got {labels.dtype} {tuple(labels.shape)}"
            )
        y = labels.to(device=emb.device, dtype=torch.int64)
        if bool(((y < -1) | (y >= self.num_classes)).any()):
            raise ValueError(f"labels: must be -1 (ignored) or a class in [0, {self.num_classes})")
        valid = y >= 0
        yc = y.clamp(min=0)
        centres = self.centers[yc].to(emb.dtype)
        diff = emb - centres
        bad = valid & ~torch.isfinite(diff.detach()).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"emb: row {int(bad.nonzero()[0])} (or its centre) contains NaN or inf"
            )
        # ignored rows take no part, whatever they hold (a where, not a product: NaN * 0)
        per_row = torch.where(valid, (diff * diff).sum(1), torch.zeros((), dtype=emb.dtype))
        loss = self.lambda_c / 2 * per_row.sum() / valid.sum().clamp(min=1)
        if self.training and bool(valid.any()):
            with torch.no_grad():
                classes, inverse = torch.unique(y[valid], return_inverse=True)
                pull = (centres - emb.detach())[valid].to(self.centers.dtype)
                sums = torch.zeros(
                    len(classes), self.embedding_size, dtype=self.centers.dtype, device=pull.device
                )
                sums.index_add_(0, inverse, pull)
                counts = torch.bincount(inverse, minlength=len(classes)).to(self.centers.dtype)
                self.centers.index_add_(0, classes, -self.alpha * sums / (1 + counts)[:, None])
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"lambda_c={self.lambda_c}, alpha={self.alpha}"
        )
