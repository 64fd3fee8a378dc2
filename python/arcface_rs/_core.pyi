"""Typed stubs of the native module (checked against it by mypy's stubtest). The stubs of
related functions repeat their keyword lists by necessity: each stub is its function's
signature, and stubtest checks every one against the module."""

from collections.abc import Callable, Sequence
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "GALLERY_MAX_DIM",
    "Gallery",
    "GalleryFileError",
    "MARGIN_KINDS",
    "MARGIN_PARAMS",
    "CUDA_FORKED",
    "MAX_THREADS_PER_CPU",
    "REMOTE_TARGET",
    "Margin",
    "__version__",
    "_cuda_margin_loss",
    "_cuda_scale_unless_one",
    "_fork_gate_close",
    "_fork_gate_open",
    "_panic_for_tests",
    "all_pairs_tar_at_far",
    "apply_margin",
    "apply_margin_backward",
    "center_loss",
    "cuda_available",
    "cuda_device_count",
    "cuda_forked",
    "cuda_feature",
    "cuda_head_workspace_bytes",
    "cosine_topk",
    "margin_logits",
    "margin_logits_backward",
    "margin_loss",
    "margin_loss_shard",
    "num_threads",
    "pair_dots",
    "simd_level",
    "triplet_loss",
    "verification",
]

__version__: str

MARGIN_PARAMS: int
CUDA_FORKED: str
REMOTE_TARGET: int
GALLERY_MAX_DIM: int
MAX_THREADS_PER_CPU: int
MARGIN_KINDS: dict[str, int]

class GalleryFileError(ValueError): ...

@final
class Margin:
    @staticmethod
    def softmax(s: float) -> Margin: ...
    @staticmethod
    def arcface(s: float, m: float, easy_margin: bool) -> Margin: ...
    @staticmethod
    def cosface(s: float, m: float) -> Margin: ...
    @staticmethod
    def sphereface(m: int, s: float | None, lambda_: float) -> Margin: ...
    @staticmethod
    def combined(s: float, m1: float, m2: float, m3: float) -> Margin: ...
    @staticmethod
    def adaface(s: float, m: float, z: float) -> Margin: ...
    @staticmethod
    def magface(
        s: float, l_a: float, u_a: float, l_m: float, u_m: float, easy_margin: bool, lambda_g: float
    ) -> Margin: ...
    @staticmethod
    def curricularface(s: float, m: float, t: float) -> Margin: ...
    @staticmethod
    def mvsoftmax(s: float, m: float, t: float, arc: bool) -> Margin: ...
    def with_straight_through(self, on: bool) -> Margin: ...
    @staticmethod
    def decode(block: Sequence[float]) -> Margin: ...
    def encode(self) -> list[float]: ...
    @property
    def scale(self) -> float | None: ...
    def psi(
        self, c: npt.NDArray[np.float64], norm: float | None = None
    ) -> npt.NDArray[np.float64]: ...
    def dpsi(
        self, c: npt.NDArray[np.float64], norm: float | None = None
    ) -> npt.NDArray[np.float64]: ...

def margin_loss(
    emb: npt.NDArray[np.floating],
    weight: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: Margin,
    reduction: str,
    grad_emb: bool = True,
    grad_weight: bool = True,
    upstream: npt.NDArray[np.float64] | None = None,
    row_margins: npt.NDArray[np.float64] | None = None,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
    grad_filter: str | float | None = None,
) -> tuple[
    float,
    npt.NDArray[np.float64],
    npt.NDArray[np.floating] | None,
    npt.NDArray[np.floating] | None,
    float,
]: ...
def margin_loss_shard(
    emb: npt.NDArray[np.floating],
    weight: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: Margin,
    reduction: str,
    stash_classes: int,
    first_shard: bool,
    combine: Callable[[npt.NDArray[np.float64], bool], npt.NDArray[np.float64]],
    row_margins: npt.NDArray[np.float64] | None = None,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
    target_cos: npt.NDArray[np.float64] | None = None,
    grad_filter: str | float | None = None,
) -> tuple[
    float,
    npt.NDArray[np.float64],
    npt.NDArray[np.floating],
    npt.NDArray[np.floating],
    float,
]: ...
def margin_logits(
    emb: npt.NDArray[np.floating],
    weight: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: Margin,
    row_margins: npt.NDArray[np.float64] | None = None,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
) -> npt.NDArray[np.floating]: ...
def margin_logits_backward(
    grad_logits: npt.NDArray[np.floating],
    emb: npt.NDArray[np.floating],
    weight: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: Margin,
    row_margins: npt.NDArray[np.float64] | None = None,
    sub_centers: int = 1,
    interclass_filter: float | None = None,
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]]: ...
def apply_margin(
    cos: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: Margin,
    row_margins: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.floating]: ...
def apply_margin_backward(
    grad_logits: npt.NDArray[np.floating],
    cos: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: Margin,
    row_margins: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.floating]: ...
def triplet_loss(
    emb: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    margin: float,
    mining: str,
    distance: str,
    reduction: str,
    upstream: npt.NDArray[np.float64] | None = None,
) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.floating], int, int]: ...
def center_loss(
    emb: npt.NDArray[np.floating],
    centers: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    lambda_c: float,
    alpha: float,
) -> tuple[float, npt.NDArray[np.floating], npt.NDArray[np.int64], npt.NDArray[np.floating]]: ...
def num_threads() -> int: ...
def pair_dots(
    features: npt.NDArray[np.floating], t1: npt.NDArray[np.int64], t2: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]: ...
def all_pairs_tar_at_far(
    features: npt.NDArray[np.floating], labels: npt.NDArray[np.int64], fars: npt.NDArray[np.float64]
) -> dict[str, Any]: ...
def simd_level() -> str: ...
def _panic_for_tests(message: str) -> None: ...
def _fork_gate_close() -> None: ...
def _fork_gate_open() -> None: ...
def cuda_available() -> bool: ...
def cuda_forked() -> bool: ...
def cuda_device_count() -> int: ...
def cuda_head_workspace_bytes(
    b: int,
    c: int,
    d: int,
    dtype: str,
    grad_weight: bool,
    stash_classes: int | None = None,
    weight_dtype: str | None = None,
    sub_centers: int = 1,
) -> int: ...
def _cuda_margin_loss(
    device: int,
    stream: int,
    b: int,
    c: int,
    d: int,
    dtype: str,
    margin: Margin,
    margins: int,
    per_row_margins: bool,
    emb: int,
    weight: int,
    labels: int,
    row_weight: int,
    row_loss: int,
    grad_emb: int,
    grad_weight: int,
    bad: int,
    workspace: int,
    interclass_filter: float | None = None,
    combine: Callable[[int, int], object] | None = None,
    first_shard: bool = True,
    stash_classes: int | None = None,
    parts: int = 0,
    target_cos: int = 0,
    weight_dtype: str | None = None,
    tf32: bool = False,
    sub_centers: int = 1,
) -> None: ...
def _cuda_scale_unless_one(
    device: int, stream: int, dtype: str, grad: int, n: int, scale: int
) -> None: ...

cuda_feature: bool

def cosine_topk(
    queries: npt.NDArray[np.floating],
    gallery: npt.NDArray[np.floating],
    k: int,
    normalized: bool,
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.int64]]: ...
def verification(
    scores: npt.NDArray[np.float64],
    is_same: npt.NDArray[np.bool_],
    fars: npt.NDArray[np.float64],
    folds: int,
) -> dict[str, Any]: ...

@final
class Gallery:
    def __new__(cls, dim: int, dtype: str) -> Gallery: ...
    def add(
        self, emb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64] | None = None
    ) -> npt.NDArray[np.int64]: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> Gallery: ...
    def remove(self, ids: npt.NDArray[np.int64]) -> int: ...
    def search(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        allow: npt.NDArray[np.int64] | None = None,
        deny: npt.NDArray[np.int64] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    def range_search(
        self, queries: npt.NDArray[np.float32], threshold: float
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    def get(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]: ...
    def search_cuda(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        device: int,
        allow: npt.NDArray[np.int64] | None = None,
        deny: npt.NDArray[np.int64] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    def search_cuda_workspace(
        self, q: int, k: int, device: int, filtered: bool
    ) -> tuple[int, int]: ...
    def search_cuda_device(
        self,
        queries: int,
        q: int,
        k: int,
        device: int,
        stream: int,
        workspace: int,
        workspace_bytes: int,
        out_scores: int,
        out_ids: int,
        allow: npt.NDArray[np.int64] | None = None,
        deny: npt.NDArray[np.int64] | None = None,
    ) -> None: ...
    def identify(
        self,
        queries: npt.NDArray[np.float32],
        threshold: float,
        allow: npt.NDArray[np.int64] | None = None,
        deny: npt.NDArray[np.int64] | None = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def ids(self) -> npt.NDArray[np.int64]: ...
    def vectors(self) -> npt.NDArray[np.float32]: ...
    def snapshot(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
    def save(self, path: str) -> None: ...
    @staticmethod
    def load(path: str, mmap: bool = False) -> Gallery: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def mapped(self) -> bool: ...
    def __len__(self) -> int: ...
