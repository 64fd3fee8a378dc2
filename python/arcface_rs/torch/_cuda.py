"""CUDA kernels of the fused ops (the ``cuda`` cargo feature): torch allocates every buffer
and the Rust side queues kernels and cuBLAS GEMMs on torch's current stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _core
from ._ops import compute_dtype, core_margin, loss_backward_op, loss_op

CUDA_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def launch_cuda(
    shape: tuple[int, int, int],
    dtype: str,
    spec: Any,
    blocks: Tensor,
    per_row: bool,
    *tensors: Tensor | None,
    interclass_filter: float | None = None,
    weight_dtype: str | None = None,
    tf32: bool = False,
    sub_centers: int = 1,
    **shard: Any,
):
    """Queues the fused head on torch's current stream over the tensors' memory (in the
    order of ``_core._cuda_margin_loss``; None skips a gradient). ``blocks``: the margin's
    parameter block, or one per row when ``per_row``; ``shard``: one shard's hooks
    (``_core._cuda_margin_loss``'s combine, first_shard, stash_classes, parts, target_cos)."""
    _core._cuda_margin_loss(
        *_stream(blocks.device),
        *shape,
        dtype,
        spec,
        blocks.data_ptr(),
        per_row,
        *(0 if t is None else t.data_ptr() for t in tensors),
        interclass_filter=interclass_filter,
        weight_dtype=weight_dtype,
        tf32=tf32,
        sub_centers=sub_centers,
        **shard,
    )


_HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _stream(device: torch.device) -> tuple[int, int]:
    """The device's index and torch's current stream on it."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return index, torch.cuda.current_stream(device).cuda_stream


def scale_unless_one(g: Tensor, upstream: Tensor) -> Tensor:
    """``g`` times the scalar ``upstream``, in place on torch's current stream, by a kernel
    whose blocks return at once when ``upstream`` is exactly 1: nothing is read on the host.
    Returns ``g`` (a product for layouts the kernel does not take)."""
    dtype = CUDA_DTYPES.get(g.dtype) or _HALF.get(g.dtype)
    if dtype is None or not g.is_contiguous() or upstream.numel() != 1:
        return g * upstream.to(g.dtype)
    scale = upstream.detach().reshape(()).to(torch.float64)
    _core._cuda_scale_unless_one(
        *_stream(g.device), dtype, g.data_ptr(), g.numel(), scale.data_ptr()
    )
    return g


def _gemm_dtype(emb: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the fused head's GEMMs read: float64 if either input is; else the 16-bit
    dtype of either (bfloat16/float16 tensors, or emb cast by autocast: the half-precision
    path); else float32."""
    dtypes = {emb.dtype, weight.dtype}
    if torch.float64 in dtypes:
        return torch.float64
    halves = dtypes & set(_HALF)
    if len(halves) > 1:
        raise TypeError(
            f"emb ({emb.dtype}) and weight ({weight.dtype}): bfloat16 and float16 cannot be "
            "mixed in one head; cast one"
        )
    return halves.pop() if halves else torch.float32


def _tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls run as TF32 (``allow_tf32``, or a float32 matmul
    precision other than "highest"), read when the op runs, as torch's own matmuls do."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


# ---------------------------------------------------------------------------------------
# The bad-input flags. The kernels raise (3,) int32 flags on the device (one past the last
# bad row of emb, of the weight, and of a label outside [0, C)); reading them at once would
# make the host wait for the GPU on every step. Instead each call copies them to pinned
# host memory behind an event, and the next call (or check_cuda_errors) raises for any
# copy that has landed. Inside a CUDA graph capture the flags are kept for
# check_cuda_errors, which waits.


class _Flags:
    """One call's flags on their way to the host."""

    def __init__(self, device_flags: Tensor, labels: Tensor, classes: int, captured: bool):
        self.device_flags, self.labels, self.classes = device_flags, labels, classes
        self.host: Tensor | None = None
        self.event: Any = None
        if not captured:
            self.host = torch.empty(3, dtype=torch.int32, pin_memory=True)
            self.host.copy_(device_flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device_flags.device))

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def values(self) -> list[int]:
        if self.host is None:  # captured in a graph: read what the last replay left
            if self.device_flags.device.type == "cuda":
                torch.cuda.synchronize(self.device_flags.device)
            return [int(v) for v in self.device_flags.cpu().tolist()]
        self.event.synchronize()
        return [int(v) for v in self.host.tolist()]

    def error(self, when: str) -> ValueError | None:
        bad_emb, bad_weight, bad_label = self.values()
        if bad_emb:
            return ValueError(f"emb: row {bad_emb - 1} is all zeros or contains NaN or inf{when}")
        if bad_weight:
            return ValueError(
                f"weight: row {bad_weight - 1} is all zeros or contains NaN or inf{when}"
            )
        if bad_label:
            value = int(self.labels[bad_label - 1])
            return ValueError(
                f"labels: must be -1 (ignored) or a class in [0, {self.classes}), found "
                f"{value} (row {bad_label - 1}){when}"
            )
        return None


_pending: list[_Flags] = []
_captured: list[_Flags] = []
_LATER = (
    " (in an earlier call of the fused CUDA head: it checks its inputs on the GPU and "
    "raises at the next call, without waiting; that call's results were not valid)"
)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the device's current stream, where the op
    queues its work. No event may then be queried: under torch.cuda.graph's default capture
    mode cudaEventQuery is refused and invalidates the capture, so earlier calls' flags wait
    for the next call made outside the capture (or check_cuda_errors)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _raise_landed(wait: bool = False) -> None:
    """Raises for the first flagged call whose flags reached the host (all, when ``wait``)."""
    error = None
    keep = []
    for flags in _pending:
        if error is None and (wait or flags.ready()):
            error = flags.error(_LATER)
        elif error is None:
            keep.append(flags)
    _pending[:] = keep if error is None else []
    if error is not None:
        raise error


def check_cuda_errors() -> None:
    """Waits for the fused CUDA head's queued calls and raises for bad inputs they met.

    The CUDA head checks its inputs (zero, NaN or inf rows of ``emb`` or ``weight``,
    labels outside ``[0, C)`` and not -1) on the GPU, so that a training step never waits
    for the device. A flagged call raises ``ValueError`` at the next call of the head, or
    here. Inside ``torch.cuda.graph`` capture the flags stay on the device: call this after
    a replay to check them.

    Raises
    ------
    ValueError
        Naming the argument and row of the first flagged call.
    """
    _raise_landed(wait=True)
    for flags in _captured:
        error = flags.error(" (in a captured CUDA graph's last replay)")
        if error is not None:
            raise error


_uploaded: dict[tuple[bytes, tuple[int, ...], torch.device], Tensor] = {}
# what a captured CUDA graph reads stays allocated as long as the graph may replay
_read_by_graphs: list[Tensor] = []


def margin_values_on(values: Any, device: torch.device) -> Tensor:
    """Fixed margin parameters (a margin's block, or its per-row blocks) as a float64 tensor
    on the device, uploaded once per content and device: a copy from the host on every step
    would stage through pinned memory each time, and a CUDA graph must replay a copy made
    before its capture (a copy captured from a staging buffer would read whatever that
    buffer holds later). Off the GPU, a fresh tensor; traced by torch.compile, a constant of
    the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float64, device=device)
    array = np.ascontiguousarray(values, dtype=np.float64)
    if device.type != "cuda":
        return torch.from_numpy(array.copy()).to(device)
    key = (array.tobytes(), array.shape, device)
    if key not in _uploaded:
        if len(_uploaded) > 64:
            _uploaded.clear()
        _uploaded[key] = rows_on(torch.from_numpy(array.copy()), device)
    values_on = _uploaded[key]
    if _capturing(device) and not any(t is values_on for t in _read_by_graphs):
        _read_by_graphs.append(values_on)  # never freed under a graph that reads it
    return values_on


def autocast_operand(emb: Tensor, weight: Tensor) -> Tensor:
    """Under ``torch.autocast("cuda")`` the fused CUDA head's GEMMs run in the autocast
    dtype, as ``F.linear``'s would: the (B, D) embeddings are cast here, in the graph, so
    that their gradient flows back through the cast; the float32 weight stays the master
    copy (the op rounds it one class tile at a time and returns a float32 gradient)."""
    if emb.device.type != "cuda" or emb.dtype != torch.float32 or weight.dtype != torch.float32:
        return emb
    try:
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
    except TypeError:  # torch < 2.4 spells them for CUDA only
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return emb.to(dtype) if enabled and dtype in (torch.bfloat16, torch.float16) else emb


def gemm_operands(emb: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The fused head's inputs as its kernels take them, and how its GEMMs run: float64 and
    float32 in their own type (float32 as TF32 where torch allows it); 16-bit GEMM operands
    from float32 rows and a float32 (master) or 16-bit weight. Returns x, w and the launch's
    ``dtype``, ``weight_dtype`` and ``tf32``."""
    gemm = _gemm_dtype(emb, weight)
    half = gemm in _HALF
    dtype = torch.float32 if half else gemm
    x = emb.detach().to(dtype).contiguous()
    w_dtype = weight.dtype if half and weight.dtype == gemm else dtype
    w = weight.detach().to(w_dtype).contiguous()
    return (
        x,
        w,
        {
            "dtype": _HALF[gemm] if half else CUDA_DTYPES[gemm],
            "weight_dtype": CUDA_DTYPES.get(w_dtype) or _HALF[w_dtype],
            "tf32": gemm == torch.float32 and _tf32_allowed(),
        },
    )


def rows_on(rows: Tensor, device: torch.device) -> Tensor:
    """Per-row margin blocks (made on the host for most margins) on the device. From host
    memory through a pinned copy queued on the stream: a copy from pageable memory would
    wait for the GPU's queued work first."""
    rows = rows.to(torch.float64).contiguous()
    if rows.device == device or device.type != "cuda":
        return rows.to(device)
    return rows.pin_memory().to(device, non_blocking=True)


def _run_loss_cuda(
    emb: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: list[float],
    row_margins: Tensor | None,
    reduction: str,
    need_emb: bool,
    need_weight: bool,
    upstream: Tensor | None = None,
    interclass_filter: float | None = None,
    sub_centers: int = 1,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Row losses and d loss / d row loss (float64), and the wanted gradients (emb's in
    float32 on the half-precision path, the weight's in its dtype; else in the compute
    dtype) on the GPU, without waiting for it."""
    capturing = _capturing(emb.device)
    if not capturing:
        _raise_landed()
    x, w, operands = gemm_operands(emb, weight)
    y = labels.detach().to(torch.int64).contiguous()
    (b, d), c = x.shape, w.shape[0]
    if b == 0:
        raise ValueError("emb: empty batch: need at least one row")
    if d == 0:
        raise ValueError("emb: embedding size is 0")
    if c == 0:
        raise ValueError("weight: has no classes (0 rows)")
    if c % sub_centers:
        raise ValueError(f"weight: has {c} rows, not a multiple of sub_centers = {sub_centers}")
    classes = c // sub_centers
    valid = y >= 0
    row_weight = valid.to(torch.float64)
    if reduction == "mean":
        row_weight = row_weight / valid.sum().clamp(min=1)
    if upstream is not None:
        row_weight = row_weight * upstream.to(torch.float64)
    device = x.device
    row_loss = torch.empty(b, dtype=torch.float64, device=device)
    g_emb = torch.empty_like(x) if need_emb else None
    # dW in the weight's dtype: a float32 master weight's float32, a 16-bit weight's own
    g_w = torch.empty_like(w) if need_weight else None
    bad = torch.zeros(3, dtype=torch.int32, device=device)
    name, weight_name = operands["dtype"], operands["weight_dtype"]
    per_row = row_margins is not None
    blocks = rows_on(row_margins, device) if per_row else margin_values_on(margin, device)
    workspace = torch.empty(
        _core.cuda_head_workspace_bytes(
            b, c, d, name, need_weight, weight_dtype=weight_name, sub_centers=sub_centers
        ),
        dtype=torch.uint8,
        device=device,
    )

    launch_cuda(
        (b, c, d),
        name,
        core_margin(tuple(margin)),
        blocks,
        per_row,
        x,
        w,
        y,
        row_weight,
        row_loss,
        g_emb,
        g_w,
        bad,
        workspace,
        interclass_filter=interclass_filter,
        weight_dtype=weight_name,
        tf32=operands["tf32"],
        sub_centers=sub_centers,
    )
    if device.type != "cuda":  # the fake driver of the tests: host memory, nothing to wait for
        error = _Flags(bad, y, classes, captured=True).error("")
        if error is not None:
            raise error
    elif capturing:
        _captured.append(_Flags(bad, y, classes, captured=True))
    else:
        _pending.append(_Flags(bad, y, classes, captured=False))
    return row_loss, row_weight, g_emb, g_w


def _like(g: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if g is None else g.to(like.dtype)


# The two kernels below restate their ops' parameter lists (_ops.py) by necessity:
# torch.library calls a device's kernel with the op's arguments, in the op's order.
@loss_op.register_kernel("cuda")
def _loss_cuda(
    emb,
    weight,
    labels,
    margin,
    row_margins,
    sub_centers,
    interclass_filter,
    grad_filter,
    reduction,
    need_emb,
    need_weight,
):
    dtype = compute_dtype(emb, weight)
    fused = reduction != "none"
    rows, row_weight, g_emb, g_w = _run_loss_cuda(
        emb,
        weight,
        labels,
        margin,
        row_margins,
        reduction,
        need_emb and fused,
        need_weight and fused,
        interclass_filter=interclass_filter,
        sub_centers=sub_centers,
    )
    # the row weights are 1 (sum) or 1 / valid rows (mean), 0 on ignored rows
    out = rows.to(dtype) if reduction == "none" else (rows * row_weight).sum().to(dtype)
    return out, _like(g_emb, emb), _like(g_w, weight)


@loss_backward_op.register_kernel("cuda")
def _loss_backward_cuda(
    emb,
    weight,
    labels,
    margin,
    row_margins,
    sub_centers,
    interclass_filter,
    grad_filter,
    reduction,
    upstream,
    need_emb,
    need_weight,
):
    rows = torch.broadcast_to(upstream.to(torch.float64), (emb.shape[0],)).contiguous()
    _, _, g_emb, g_w = _run_loss_cuda(
        emb,
        weight,
        labels,
        margin,
        row_margins,
        reduction,
        need_emb,
        need_weight,
        upstream=rows,
        interclass_filter=interclass_filter,
        sub_centers=sub_centers,
    )
    return _like(g_emb, emb), _like(g_w, weight)
