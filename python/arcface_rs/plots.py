"""ROC (log-FAR axis) and CMC figures with matplotlib (an optional extra: ``.[demo]``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from .metrics import IdentificationReport, VerificationReport

__all__ = ["cmc", "roc"]

Reports = Union[VerificationReport, Mapping[str, VerificationReport]]


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.6, 4.2))[1]


def roc(reports: Reports, ax: Any = None, title: str = "ROC") -> Any:
    """TAR against FAR on a log axis, one curve per report (a dict labels them)."""
    ax = _axes(ax)
    items = reports.items() if isinstance(reports, Mapping) else [("", reports)]
    for name, rep in items:
        keep = rep.fpr > 0
        label = f"{name} (AUC {rep.auc:.4f})" if name else f"AUC {rep.auc:.4f}"
        ax.step(rep.fpr[keep], rep.tpr[keep], where="post", label=label, lw=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def cmc(
    reports: IdentificationReport | Mapping[str, IdentificationReport],
    ax: Any = None,
    title: str = "CMC",
) -> Any:
    """Identification rate against rank, one curve per report."""
    ax = _axes(ax)
    items = reports.items() if isinstance(reports, Mapping) else [("", reports)]
    for name, rep in items:
        ranks = np.array(sorted(rep.cmc))
        ax.plot(ranks, [rep.cmc[r] for r in ranks], marker="o", ms=3, lw=1.5, label=name or None)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if isinstance(reports, Mapping):
        ax.legend(fontsize=8, loc="lower right")
    return ax
