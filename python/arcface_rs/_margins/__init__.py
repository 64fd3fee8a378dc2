"""Margin objects: the target-logit function psi of each head, validated by the Rust core.

One module per family: ``base`` (the base classes and argument checks), ``classic``,
``adaptive`` (per-row margins), ``negatives`` (hard-negative re-weighting)."""

from .adaptive import AdaFace, ElasticFace, MagFace
from .base import KINDS_WITH_HARD_NEGATIVES, Margin
from .classic import ArcFace, CombinedMargin, CosFace, Softmax, SphereFace
from .negatives import CurricularFace, MVSoftmax

__all__ = [
    "KINDS_WITH_HARD_NEGATIVES",
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "MagFace",
    "MVSoftmax",
    "Margin",
    "SphereFace",
    "Softmax",
]
