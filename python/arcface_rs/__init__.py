"""arcface_rs: fused margin-softmax heads (ArcFace, CosFace, SphereFace) and exact cosine
search, in Rust.

NumPy API; ``arcface_rs.torch`` holds the PyTorch modules (needs torch), and
``arcface_rs.metrics`` the verification metrics.
"""

import os as _os
import warnings as _warnings

from . import _core
from ._core import MAX_THREADS_PER_CPU as _MAX_THREADS_PER_CPU
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
from ._triplet import triplet_loss


def _warn_if_threads_capped() -> None:
    """RAYON_NUM_THREADS beyond MAX_THREADS_PER_CPU threads per CPU is capped by the core
    (the pool would only make its threads take turns); say so once, at import."""
    asked = _os.environ.get("RAYON_NUM_THREADS", "").strip()
    if not asked.isdigit():
        return
    cpus = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else _os.cpu_count()
    cap = _MAX_THREADS_PER_CPU * (cpus or 1)
    if int(asked) > cap:
        _warnings.warn(
            f"RAYON_NUM_THREADS={asked}: arcface_rs runs at most {_MAX_THREADS_PER_CPU} threads "
            f"per CPU, {cap} here",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_if_threads_capped()

# A fork waits for the Gallery calls running without the GIL (which hold a gallery's lock)
# to end, and the child finds every lock free: a child forked in the middle of one would
# otherwise wait forever on a lock held by a thread it does not have.
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(
        before=_core._fork_gate_close,
        after_in_parent=_core._fork_gate_open,
        after_in_child=_core._fork_gate_open,
    )

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
    "triplet_loss",
]
