"""arcface_rs: fused margin-softmax heads (ArcFace, CosFace, SphereFace) and exact cosine
search, in Rust.

NumPy API; ``arcface_rs.torch`` holds the PyTorch modules (needs torch), and
``arcface_rs.metrics`` the verification metrics.
"""

from ._core import GalleryFileError, __version__, num_threads, simd_level
from ._cuda import cuda_available
from ._gallery import Gallery
from ._heads import (
    apply_margin,
    apply_margin_backward,
    center_loss,
    margin_logits,
    margin_logits_backward,
    margin_loss,
)
from ._margins import (
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticFace,
    MagFace,
    Margin,
    MVSoftmax,
    Softmax,
    SphereFace,
)
from ._search import cosine_topk
from ._subcenters import dominant_centers, find_outliers

__all__ = [
    "AdaFace",
    "ElasticFace",
    "MagFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "MVSoftmax",
    "Gallery",
    "GalleryFileError",
    "Margin",
    "Softmax",
    "SphereFace",
    "__version__",
    "apply_margin",
    "center_loss",
    "apply_margin_backward",
    "cosine_topk",
    "cuda_available",
    "dominant_centers",
    "find_outliers",
    "margin_logits",
    "margin_logits_backward",
    "margin_loss",
    "num_threads",
    "simd_level",
]
