"""arcface_rs: fused margin-softmax heads (ArcFace, CosFace, SphereFace) in Rust.

NumPy API; ``arcface_rs.torch`` holds the PyTorch modules (needs torch).
"""

from ._core import __version__, num_threads
from ._heads import (
    apply_margin,
    apply_margin_backward,
    margin_logits,
    margin_logits_backward,
    margin_loss,
)
from ._margins import ArcFace, CombinedMargin, CosFace, Margin, Softmax, SphereFace

__all__ = [
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "Margin",
    "Softmax",
    "SphereFace",
    "__version__",
    "apply_margin",
    "apply_margin_backward",
    "margin_logits",
    "margin_logits_backward",
    "margin_loss",
    "num_threads",
]
