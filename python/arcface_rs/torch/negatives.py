"""The heads that re-weight hard negatives: CurricularFace (its running t a buffer) and
MV-Softmax. The non-target rule runs inside the fused kernel's tiles. Re-exported by
``arcface_rs.torch``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._margins import CurricularFace, MVSoftmax
from ._cuda import margin_values_on
from ._rows import unit_rows
from .functional import check_inputs
from .heads import MarginHead

__all__ = ["CurricularFaceHead", "MVSoftmaxHead"]


class CurricularFaceHead(MarginHead, margin=CurricularFace):
    """CurricularFace head: ArcFace's target, and hard negatives ``c (t + c)`` whose weight
    grows with t, the running mean of the target cosines.

    ``t`` is a float64 buffer (saved in the state_dict), updated from each batch before use
    in ``train()`` mode (``t <- alpha mean(target cos) + (1 - alpha) t`` over the rows not
    ignored) and used unchanged in ``eval()`` mode; the formulas are those of
    :class:`arcface_rs.CurricularFace`. The update is torch ops, so ``torch.compile`` keeps
    one graph.

    Parameters
    ----------
    s, m, alpha, t
        As for :class:`arcface_rs.CurricularFace` (``t``: the buffer's initial value).
    embedding_size, num_classes, **keywords
        As for :class:`arcface_rs.torch.MarginHead` (reduction, device, dtype,
        sub_centers, interclass_filter, grad_filter).
    """

    t: Tensor

    def _set_up(self) -> None:
        t = float(self.margin.t)  # the running mean starts from the margin's
        self.register_buffer("t", torch.full((), t, dtype=torch.float64, device=self.weight.device))

    def target_cosines(self, emb: Tensor, labels: Tensor) -> Tensor:
        """(B,) float64 cosine of each row to its class (its closest sub-centre), 0 for rows
        labelled -1 and for rows that cannot be normalised (no gradient). Norms are taken
        safely: rows of any finite non-zero magnitude give their exact cosine."""
        with torch.no_grad():
            k = self.sub_centers
            y = labels.clamp(0, self.num_classes - 1)
            # the rows' own centres only (a float64 copy of the whole weight would be 400 MB
            # at 100k classes)
            w = unit_rows(self.weight.detach().view(self.num_classes, k, -1)[y])
            x = unit_rows(emb.detach())
            cos = (x[:, None, :] * w).sum(dim=2).amax(dim=1).clamp(-1.0, 1.0)
            keep = (labels >= 0) & torch.isfinite(cos)
            return torch.where(keep, cos, torch.zeros_like(cos))

    def _next_t(self, emb: Tensor, labels: Tensor) -> Tensor:
        """t after this batch (the buffer is not touched here)."""
        with torch.no_grad():
            valid = (labels >= 0).to(torch.float64)
            n = valid.sum()
            mean = (self.target_cosines(emb, labels) * valid).sum() / n.clamp(min=1.0)
            a = self.margin.alpha
            # no valid row: t stays (a where, not a branch: one graph under torch.compile)
            return torch.where(n > 0, a * mean + (1.0 - a) * self.t, self.t)

    def _row_blocks(self, emb: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            block = margin_values_on(self.margin.block, emb.device)
            blocks = block.expand(emb.shape[0], block.shape[0]).clone()
            blocks[:, 3] = t.clamp(-1.0, 1.0)
        return blocks

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``emb`` (B, embedding_size) with ``labels`` (B,)."""
        labels = check_inputs(emb, self.weight, labels)
        if not self.training:
            return self._loss_with_rows(emb, labels, self._row_blocks(emb, self.t))
        # t moves before use, as the paper's head does, but into the buffer only once the
        # loss has accepted the batch (a refused batch leaves t as it was)
        t = self._next_t(emb, labels)
        loss = self._loss_with_rows(emb, labels, self._row_blocks(emb, t))
        with torch.no_grad():
            self.t.copy_(t)
        return loss

    def logits(self, emb: Tensor, labels: Tensor) -> Tensor:
        """The (B, num_classes) margin logits with the current t (no update)."""
        labels = check_inputs(emb, self.weight, labels)
        return self._logits_with_rows(emb, labels, self._row_blocks(emb, self.t))


class MVSoftmaxHead(MarginHead, margin=MVSoftmax):
    """MV-Softmax head: a cosine (``kind="cos"``) or angular (``"arc"``) margin on the
    target, and misclassified non-targets weighted up to ``t c + t - 1``.

    Parameters
    ----------
    s, m, t, kind
        As for :class:`arcface_rs.MVSoftmax`.
    embedding_size, num_classes, **keywords
        As for :class:`arcface_rs.torch.MarginHead` (reduction, device, dtype,
        sub_centers, interclass_filter, grad_filter).
    """
