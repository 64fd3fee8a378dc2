"""The Python side of the CUDA path on the fake driver (tests/cuda/fake_cuda/): the real
bindings, driver code and kernels (on the CPU emulator) behind ``Gallery(device="cuda")``
and the torch head's CUDA kernel. "Device memory" is host memory there, so the torch glue
runs on CPU tensors through the real launch.

scripts/test.sh runs this file with a build that has the ``cuda`` feature and
ARCFACE_RS_FAKE_CUDA set to the folder of the fake libcuda.so and libcublas.so; the plain
test run skips it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

FAKE = os.environ.get("ARCFACE_RS_FAKE_CUDA")
if FAKE:  # before arcface_rs first looks for a driver
    for name in ("libcuda.so", "libcublas.so"):
        ctypes.CDLL(os.path.join(FAKE, name), mode=ctypes.RTLD_GLOBAL)

import arcface_rs as afr  # noqa: E402
from _forking import in_forked_child  # noqa: E402
from _reference import all_margins, make_problem  # noqa: E402
from arcface_rs.torch import _cuda as tcuda  # noqa: E402
from arcface_rs.torch import _ops as tops  # noqa: E402
from arcface_rs.torch._plain import plain_loss  # noqa: E402
from arcface_rs.torch._rows import encode, rows_of  # noqa: E402

pytestmark = pytest.mark.skipif(not FAKE, reason="scripts/test.sh runs it on the fake driver")


def test_the_fake_driver_is_what_runs():
    assert afr._core.cuda_feature and afr.cuda_available()


def _assert_same_results(gpu, cpu, queries, k, **filt):
    """The GPU's ids are the CPU's except where scores tie to float32 rounding (the two sum
    a dot product in different orders); the CPU's (k+1)-th result shows a tie at the end."""
    got_s, got_i = gpu.search(queries, k=k, **filt)
    want_s, want_i = cpu.search(queries, k=k + 1, **filt)
    np.testing.assert_allclose(got_s, want_s[:, :k], rtol=0, atol=2e-6)
    differ = got_i != want_i[:, :k]
    gaps = np.abs(np.diff(want_s, axis=1))  # (Q, k): the last is the k-th to the (k+1)-th
    near = gaps <= 4e-6
    near[:, 1:] |= gaps[:, :-1] <= 4e-6
    assert not (differ & ~near).any(), np.argwhere(differ & ~near)


def _cpu_and_cuda_galleries(dtype, emb, ids):
    """A CPU gallery and a CUDA one (the fake device) holding the same rows and ids."""
    cpu, gpu = afr.Gallery(emb.shape[1], dtype), afr.Gallery(emb.shape[1], dtype, device="cuda")
    for g in (cpu, gpu):
        g.add(emb, ids=ids)
    return cpu, gpu


@pytest.mark.parametrize("device", ["cuda:2", "cuda:7", "cuda:99999999999999999999"])
def test_a_device_the_machine_lacks_is_refused_when_named(device, tmp_path):
    """The fake machine has two devices: naming a third is a ValueError at construction
    (and at load), saying how many there are, not a driver error at the first search."""
    assert afr._core.cuda_device_count() == 2
    want = rf"device='{device}': this process sees 2 CUDA device\(s\), cuda:0 to cuda:1"
    with pytest.raises(ValueError, match=want):
        afr.Gallery(4, device=device)
    afr.Gallery(4).save(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match=want):
        afr.Gallery.load(tmp_path / "g.safetensors", device=device)
    assert afr.Gallery(4, device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_gallery_on_cuda_equals_the_cpu_gallery(dtype, tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((600, 20)).astype(np.float32)
    queries = np.vstack([emb[:3], rng.standard_normal((5, 20))]).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries(dtype, emb[:500], np.arange(1000, 1500))
    assert gpu.device == "cuda:0" and "cuda:0" in repr(gpu)
    # 100 and 300: the large-k selection; 1100: past the GPU's 1024, the CPU search
    for k in (1, 7, 64, 100, 300, 1100):
        _assert_same_results(gpu, cpu, queries, k)
    single = gpu.search(queries[0], k=3)
    assert single[1].shape == (3,) and single[1][0] == 1000
    np.testing.assert_array_equal(
        gpu.identify(queries, threshold=0.9)[0], cpu.identify(queries, threshold=0.9)[0]
    )
    for g in (cpu, gpu):  # the GPU copy follows changes
        g.add(emb[500:])
        g.remove([1001])
    _assert_same_results(gpu, cpu, queries, 9)
    with pytest.raises(ValueError, match="queries"):
        gpu.search(np.zeros(20), k=3)
    gpu.save(tmp_path / "g.safetensors")
    back = afr.Gallery.load(tmp_path / "g.safetensors", device="cuda")
    _assert_same_results(back, cpu, queries, 5)


def test_gallery_filters_run_on_cuda_and_equal_the_cpu_gallery():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((400, 16)).astype(np.float32)
    queries = np.vstack([emb[:2], rng.standard_normal((3, 16))]).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries("float32", emb, np.arange(5000, 5400))
    allow = np.arange(5000, 5400, 3)  # 134 ids
    deny = np.concatenate([np.arange(5000, 5200), [77, 5001]])  # with an id not stored
    for k in (1, 10, 100, 200):  # 200: more than the allow-list holds, padded
        _assert_same_results(gpu, cpu, queries, k, allow=allow)
        _assert_same_results(gpu, cpu, queries, k, deny=deny)
    ids = gpu.search(queries, k=200, allow=allow)[1]
    assert set(ids[ids >= 0].ravel()) <= set(allow) and (ids[:, 134:] == -1).all()
    np.testing.assert_array_equal(
        gpu.identify(queries, threshold=0.5, deny=[5000, 5001])[0],
        cpu.identify(queries, threshold=0.5, deny=[5000, 5001])[0],
    )
    with pytest.raises(ValueError, match="allow, deny"):
        gpu.search(queries, k=3, allow=allow, deny=deny)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_many_queries_equal_the_cpu_gallery_sure_or_not(dtype):
    # more than 16 queries: one GEMM on tensor cores (16-bit or TF32) and an exact rescore
    # of the candidates; rows 100..160 are one row repeated, so a query equal to it has more
    # near-ties than spare candidates and is searched again by the exact route
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    emb[100:160] = emb[100]
    queries = np.vstack([emb[100], emb[:3], rng.standard_normal((16, 16))]).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries(dtype, emb, np.arange(500))
    for k in (1, 10, 40, 100, 300):  # 300: more candidates than rows, the exact route
        _assert_same_results(gpu, cpu, queries, k)
        # the tied rows in row order, as the CPU gallery gives them
        np.testing.assert_array_equal(
            gpu.search(queries, k=k)[1][0, : min(k, 60)], np.arange(100, 100 + min(k, 60))
        )
    allow = np.arange(0, 500, 2)
    _assert_same_results(gpu, cpu, queries, 10, allow=allow)


@pytest.fixture
def cpu_stream(monkeypatch):
    """torch's stream queries answer for the fake device (the tensors are CPU tensors)."""
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


class _DeviceTensorSearch:
    """A CUDA gallery searched with "device" tensors (host memory on the fake driver) through
    the torch glue, answering as ``Gallery.search`` does (NumPy in, NumPy out)."""

    def __init__(self, gallery):
        self.gallery = gallery

    def search(self, queries, k, **filt):
        from arcface_rs._gallery_torch import search_on_device

        filt = {name: np.asarray(v, dtype=np.int64) for name, v in filt.items()}
        rows = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        scores, ids = search_on_device(self.gallery._core, 0, torch, rows, k, filt)
        return scores.numpy(), ids.numpy()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_device_tensor_queries_search_in_place_through_the_real_launch(cpu_stream, dtype):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    queries = np.vstack([emb[:2], rng.standard_normal((3, 16))]).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries(dtype, emb[:200], np.arange(100, 300))
    tensors = _DeviceTensorSearch(gpu)
    for k in (1, 10, 100, 250):  # 250: more than the rows, padded
        _assert_same_results(tensors, cpu, queries, k)
    for g in (cpu, gpu):  # the copy follows: appended rows, removed ones masked
        g.add(emb[200:])
        g.remove([100, 150, 301])
    for k in (5, 80):
        _assert_same_results(tensors, cpu, queries, k)
        _assert_same_results(tensors, cpu, queries, k, allow=np.arange(100, 400, 7))
    # a zero or non-finite query finds nothing (no error: that would wait for the GPU)
    bad = queries.copy()
    bad[1] = 0.0
    bad[3, 2] = np.nan
    scores, ids = tensors.search(bad, 4)
    assert (ids[[1, 3]] == -1).all() and np.isneginf(scores[[1, 3]]).all()
    np.testing.assert_array_equal(ids[[0, 2, 4]], cpu.search(bad[[0, 2, 4]], k=4)[1])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_many_device_tensor_queries_are_rescored_and_redone_on_the_device(cpu_stream, dtype):
    # more than 16 device queries are rescored too; the query among 60 equal rows cannot be
    # vouched for and is searched again on the device (its flag never reaches the host);
    # a zero query finds nothing
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    emb[100:160] = emb[100]
    queries = np.vstack([emb[100], emb[:3], rng.standard_normal((16, 16))]).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries(dtype, emb, np.arange(1000, 1500))
    tensors = _DeviceTensorSearch(gpu)
    for k in (10, 70):
        _assert_same_results(tensors, cpu, queries, k)
        want = np.arange(1100, 1100 + min(k, 60))
        np.testing.assert_array_equal(tensors.search(queries, k)[1][0, : len(want)], want)
    _assert_same_results(tensors, cpu, queries, 10, allow=np.arange(1000, 1500, 3))
    bad = queries.copy()
    bad[5] = 0.0
    scores, ids = tensors.search(bad, 10)
    assert (ids[5] == -1).all() and np.isneginf(scores[5]).all()
    np.testing.assert_array_equal(ids[0], np.arange(1100, 1110))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", all_margins()[::2], ids=repr)
def test_torch_head_through_the_real_launch(cpu_stream, margin, reduction, dtype):
    emb, weight, labels = (torch.tensor(a) for a in make_problem(9, 6, 30, seed=1, ignore=2))
    emb, weight = emb.to(dtype), weight.to(dtype)
    kind, params = encode(margin)
    want = tops.loss_op(emb, weight, labels, kind, params, 1, None, None, reduction, True, True)
    got = tcuda._loss_cuda(emb, weight, labels, kind, params, 1, None, None, reduction, True, True)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    if reduction == "none":
        up = torch.linspace(-1, 1, 9, dtype=torch.float64)
        want = tops.loss_backward_op(
            emb, weight, labels, kind, params, 1, None, None, "none", up, True, True
        )
        got = tcuda._loss_backward_cuda(
            emb, weight, labels, kind, params, 1, None, None, "none", up, True, True
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("upstream", [1.0, -2.5, 1024.0])
def test_the_upstream_gradient_scales_in_place_through_the_real_launch(cpu_stream, dtype, upstream):
    """The backward's scaling of the fused gradients (the kernel, not a torch product):
    exactly torch's product, in place, and untouched when the upstream is 1."""
    g = torch.linspace(-3, 5, 3001, dtype=torch.float64).to(dtype)
    before = g.clone()
    up = torch.tensor(upstream, dtype=torch.float32)
    out = tcuda.scale_unless_one(g, up)
    assert out.data_ptr() == g.data_ptr()
    if upstream == 1.0:
        assert torch.equal(g, before)
    elif dtype in (torch.float64, torch.float32):
        assert torch.equal(g, before * up.to(dtype))
    else:  # in float32, rounded once: torch's 16-bit product rounds the same way
        assert torch.equal(g, (before.float() * upstream).to(dtype))


@pytest.mark.parametrize(
    "margin",
    [afr.ArcFace(), afr.CurricularFace(s=30.0, t=0.4), afr.MVSoftmax(), afr.MVSoftmax(kind="arc")],
    ids=repr,
)
@pytest.mark.parametrize("interclass_filter", [None, 0.1])
def test_hard_negatives_and_the_filter_through_the_real_launch(
    cpu_stream, margin, interclass_filter
):
    emb, weight, labels = (torch.tensor(a) for a in make_problem(9, 6, 30, seed=5, ignore=2))
    kind, params = encode(margin)
    args = (emb, weight, labels, kind, params, 1, interclass_filter, None, "mean", True, True)
    for g, w in zip(tcuda._loss_cuda(*args), tops.loss_op(*args)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    # sub-centres: 30 rows, 10 classes of 3 centres
    args = (emb, weight, labels % 10, kind, params, 3, interclass_filter, None, "mean", True, True)
    for g, w in zip(tcuda._loss_cuda(*args), tops.loss_op(*args)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not a multiple of sub_centers = 4"):
        tcuda._loss_cuda(emb, weight, labels % 7, kind, params, 4, None, None, "mean", True, True)


@pytest.mark.parametrize(
    "margin",
    [
        afr.AdaFace(batch_mean=4.0, batch_std=1.0),
        afr.MagFace(s=30.0, l_a=1.0, u_a=8.0, lambda_g=3.0),
        afr.MagFace(s=30.0, l_a=1.0, u_a=8.0, easy_margin=False),
        afr.ArcFace(m=np.linspace(0.1, 0.8, 9)),
        afr.ArcFace(grad="straight_through"),
        afr.ElasticFace(std=0.1, plus=True, seed=0),
    ],
    ids=repr,
)
def test_per_row_and_norm_margins_through_the_real_launch(cpu_stream, margin):
    emb, weight, labels = (torch.tensor(a) for a in make_problem(9, 6, 30, seed=4, ignore=2))
    emb = emb * 3.0
    block, _ = encode(margin)
    rows = rows_of(margin, emb, weight, labels)  # once: AdaFace's statistics move
    for reduction in ("mean", "none"):
        want = tops.loss_op(emb, weight, labels, block, rows, 1, None, None, reduction, True, True)
        got = tcuda._loss_cuda(
            emb, weight, labels, block, rows, 1, None, None, reduction, True, True
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_f32", [True, False], ids=["f32 weight", "16-bit weight"])
@pytest.mark.parametrize("margin", all_margins()[::3], ids=repr)
def test_half_precision_head_through_the_real_launch(cpu_stream, margin, weight_f32, gemm):
    # 16-bit GEMM operands and stash, on the emulator: within their rounding of float64
    emb, weight, labels = (torch.tensor(a) for a in make_problem(9, 16, 30, seed=6, ignore=2))
    block, _ = encode(margin)
    rows = rows_of(margin, emb, weight, labels)
    args = (labels, block, rows, 1, None, None, "mean", True, True)
    want = tops.loss_op(emb, weight, labels, block, rows, 1, None, None, "mean", True, True)
    w = weight.float() if weight_f32 else weight.to(gemm)
    got = tcuda._loss_cuda(emb.to(gemm), w, *args)
    assert got[1].dtype == gemm and got[2].dtype == w.dtype
    bound = 2e-2 if gemm == torch.bfloat16 else 3e-3
    assert abs(float(got[0]) - float(want[0])) <= bound * abs(float(want[0]))
    for g, ref in zip(got[1:], want[1:]):
        assert float((g.double() - ref).abs().max()) <= bound * float(ref.abs().max())


def _every_margin():
    """The classic margins, the modern ones and per-row margins (one test each)."""
    return all_margins() + [
        afr.AdaFace(batch_mean=4.0, batch_std=1.0),
        afr.MagFace(s=30.0, l_a=1.0, u_a=8.0, lambda_g=3.0),
        afr.CurricularFace(),
        afr.MVSoftmax(),
        afr.ElasticFace(std=0.05, plus=True, seed=0),
        afr.ArcFace(m=np.linspace(0.1, 0.8, 32)),
    ]


@pytest.mark.parametrize("gemm", [torch.bfloat16, torch.float16])
def test_half_precision_head_is_as_accurate_as_torch_autocast(cpu_stream, gemm):
    """Under autocast the fused head's GEMMs are 16-bit (the embeddings cast as F.linear's
    operand would be; the float32 weight is the master copy). Against the float64 op, for
    every margin, side by side with PyTorch's own head (the same margins in plain torch ops)
    under autocast: the loss within 5e-3 relative, and each gradient's error, relative to
    its largest entry, within PyTorch's on average over the margins (a case may lose to
    rounding noise, by at most 2x)."""
    ours, theirs = {"emb": [], "weight": []}, {"emb": [], "weight": []}

    def error(got, want):
        return float((got.double() - want).abs().max()) / float(want.abs().max())

    for margin in _every_margin():
        emb, weight, labels = (torch.tensor(a) for a in make_problem(32, 64, 500, seed=6, ignore=2))
        block, _ = encode(margin)
        rows = rows_of(margin, emb, weight, labels)  # once: AdaFace's statistics move
        args = (labels, block, rows, 1, None, None, "mean", True, True)
        want = tops.loss_op(emb, weight, *args)
        got = tcuda._loss_cuda(emb.float().to(gemm), weight.float(), *args)
        assert got[1].dtype == gemm and got[2].dtype == torch.float32
        e, w = emb.float().requires_grad_(), weight.float().requires_grad_()
        with torch.autocast("cpu", dtype=gemm):
            blocks = None if rows is None else rows.float()
            loss = plain_loss(e, w, labels, margin, "mean", blocks)
        loss.backward()
        reference = float(want[0])
        assert abs(float(got[0]) - reference) <= 5e-3 * abs(reference), repr(margin)
        for name, g, peer, ref in (
            ("emb", got[1], e.grad, want[1]),
            ("weight", got[2], w.grad, want[2]),
        ):
            ours[name].append(error(g, ref))
            theirs[name].append(error(peer, ref))
            assert ours[name][-1] <= 2.0 * theirs[name][-1], (repr(margin), name)
    for name in ours:
        assert np.mean(ours[name]) <= np.mean(theirs[name]), (name, ours[name], theirs[name])


def test_bad_labels_raise_through_the_real_launch(cpu_stream):
    emb, weight, labels = (torch.tensor(a) for a in make_problem(5, 4, 8, seed=2))
    kind, params = encode(afr.CosFace())
    for bad in (8, -2):
        with pytest.raises(ValueError, match=f"labels: .* found {bad} \\(row 3\\)"):
            tcuda._loss_cuda(
                emb, weight, torch.where(torch.arange(5) == 3, bad, labels), kind, params,
                1, None, None, "mean", True, True,
            )  # fmt: skip


def test_torch_head_bad_rows_raise_through_the_real_launch(cpu_stream):
    emb, weight, labels = (torch.tensor(a) for a in make_problem(5, 4, 8, seed=2))
    kind, params = encode(afr.ArcFace())

    def loss(emb, weight):
        return tcuda._loss_cuda(
            emb, weight, labels, kind, params, 1, None, None, "mean", True, True
        )

    with pytest.raises(ValueError, match="emb: row 2"):
        loss(emb.index_fill(0, torch.tensor([2]), 0.0), weight)
    with pytest.raises(ValueError, match="weight: row 6"):
        loss(emb, weight.index_fill(0, torch.tensor([6]), float("inf")))


def test_the_private_launch_entry_checks_its_addresses_and_shape():
    spec = afr.ArcFace().spec
    block = [1 << 20, False]  # the margin blocks' address, and not per row
    good = [1 << 20] * 9  # aligned, non-zero; never dereferenced: the checks come first
    with pytest.raises(ValueError, match="emb: device address 0x0"):
        afr._core._cuda_margin_loss(0, 0, 4, 4, 4, "float32", spec, *block, 0, *good[1:])
    with pytest.raises(ValueError, match="weight: .* not aligned to 8"):
        afr._core._cuda_margin_loss(0, 0, 4, 4, 4, "float64", spec, *block, good[0], 12, *good[2:])
    with pytest.raises(ValueError, match="margins: device address 0x0"):
        afr._core._cuda_margin_loss(0, 0, 4, 4, 4, "float32", spec, 0, False, *good)
    with pytest.raises(ValueError, match="shape"):
        afr._core._cuda_margin_loss(0, 0, 0, 4, 4, "float32", spec, *block, *good)
    assert not hasattr(afr._core, "cuda_margin_loss")


def test_the_fused_sharded_head_equals_the_cpu_sharded_head(tmp_path):
    """ShardedMarginHead on the fused CUDA path (two gloo ranks, the fake driver) equals the
    CPU sharded head: loss and both gradients, 1e-10 in float64 and 2e-4 in float32; with
    16-bit GEMM operands (autocast's) 3e-2 in bf16 (a sub-centre that wins by less than
    bf16's rounding may be another) and 3e-3 in f16, the loss 2e-3; with sub-centres,
    Partial FC and row chunks. A bad centre on one rank makes every rank raise."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "_sharded_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(r), "2", str(port), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for results in ranks:
        for name, result in results.items():
            if name == "bad weight":
                continue
            dtype, errors = result
            # 16-bit GEMM operands and stash (autocast's: bf16 keeps 8 bits, f16 11) against
            # the CPU head in float32; the loss is far closer than the gradients
            tol = {"torch.float64": 1e-10, "torch.float32": 2e-4, "torch.float16": 3e-3}
            assert max(errors) <= tol.get(dtype, 3e-2), (name, errors)
            if dtype in ("torch.bfloat16", "torch.float16"):
                assert errors[0] <= 2e-3, (name, errors)
        assert len(results) == 23
    assert ranks[1]["bad weight"].startswith("ValueError: weight: the centre of class 7")
    assert ranks[0]["bad weight"] == (
        "RuntimeError: another rank of the sharded head failed; see its error"
    )


_TILED_HEAD = """
import ctypes, os, sys, types
for name in ("libcuda.so", "libcublas.so"):
    ctypes.CDLL(os.path.join(os.environ["ARCFACE_RS_FAKE_CUDA"], name), mode=ctypes.RTLD_GLOBAL)
import torch
torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(cuda_stream=0)
torch.cuda.current_device = lambda: 0
try:
    import arcface_rs as afr
except ValueError as e:
    print(e)
    sys.exit(3)
from _reference import make_problem
from arcface_rs.torch import _cuda as tcuda, _ops as tops
from arcface_rs.torch._rows import encode
emb, weight, labels = (torch.tensor(a) for a in make_problem(8, 16, 600, seed=3, ignore=1))
kind, params = encode(afr.ArcFace(s=30.0, m=0.5))
args = (kind, params, 1, None, None, "mean", True, True)
want = tops.loss_op(emb, weight, labels, *args)
got = tcuda._loss_cuda(emb, weight, labels, *args)
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
print("ok", afr._core.cuda_head_workspace_bytes(8, 600, 16, "float64", True))
"""


def _tiled_head(**variables: str) -> subprocess.CompletedProcess[str]:
    """_TILED_HEAD run in a new process with these environment variables."""
    tests = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join([tests, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", _TILED_HEAD], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("tile", ["256", "100", "16384.0"])
def test_the_class_tile_comes_from_the_environment(tile):
    """ARCFACE_RS_CUDA_CLASS_TILE=256 cuts 600 classes into tiles of 256, 256 and 88 (the
    stash in the next tile's rows, then in scratch) with the CPU head's results; a value out
    of range or not a whole number is refused at import, with the variable's name."""
    run = _tiled_head(ARCFACE_RS_CUDA_CLASS_TILE=tile)
    if tile == "256":
        assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
        # three tiles' statistics and two spill slots, not one tile's: the tile is in force
        default = afr._core.cuda_head_workspace_bytes(8, 600, 16, "float64", True)
        assert int(run.stdout.split()[1]) != default
    else:
        assert run.returncode == 3, run.stdout + run.stderr
        want = f'ARCFACE_RS_CUDA_CLASS_TILE: "{tile}" is not a multiple of 256 from 256 to'
        assert run.stdout.startswith(want), run.stdout + run.stderr


@pytest.mark.parametrize("batch", ["1", "0", "2.5"])
def test_the_dx_batch_comes_from_the_environment(batch):
    """ARCFACE_RS_CUDA_DX_BATCH=1 gives each of the three tiles of 256 classes its own dX̂
    GEMM (not one batched GEMM of three) with the CPU head's results and a smaller
    workspace (one tile's products, not three); a value out of range or not a whole number
    is refused at import, with the variable's name."""
    run = _tiled_head(ARCFACE_RS_CUDA_CLASS_TILE="256", ARCFACE_RS_CUDA_DX_BATCH=batch)
    if batch == "1":
        assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
        batched = _tiled_head(ARCFACE_RS_CUDA_CLASS_TILE="256")
        assert batched.returncode == 0, batched.stdout + batched.stderr
        # two float64 products of 8 rows of 16 fewer, each buffer on a 256-byte boundary
        fewer = int(batched.stdout.split()[1]) - int(run.stdout.split()[1])
        assert abs(fewer - 2 * 8 * 16 * 8) < 256, (batched.stdout, run.stdout)
    else:
        assert run.returncode == 3, run.stdout + run.stderr
        want = f'ARCFACE_RS_CUDA_DX_BATCH: "{batch}" is not a whole number from 1 to 4096'
        assert run.stdout.startswith(want), run.stdout + run.stderr


def test_a_forked_child_searches_a_cuda_gallery_on_the_cpu():
    """CUDA does not survive fork(): a child forked after the parent used the GPU gets
    cuda_available() False, searches of a CUDA gallery it inherited on the CPU (the same
    results, a RuntimeWarning naming fork), its changes kept, a new CUDA gallery refused
    with a ValueError, and the driver entry points a RuntimeError rather than a failing
    driver call or a lock its parent held; the parent's gallery searches on as before."""
    rng = np.random.default_rng(31)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries("float16", emb, np.arange(300))
    _assert_same_results(gpu, cpu, queries, 5)  # the parent's GPU copy exists
    live = ctypes.CDLL(os.path.join(FAKE, "libcuda.so")).fake_live_allocations

    def child():
        assert afr._core.cuda_forked() and not afr.cuda_available()
        for change in (None, "add and remove"):
            if change:
                for g in (cpu, gpu):
                    g.add(emb[:20] + 0.5, ids=np.arange(1000, 1020))
                    g.remove([3, 1004])
            with pytest.warns(RuntimeWarning, match="searching on the CPU.*fork"):
                got = gpu.search(queries, k=7)
            want = cpu.search(queries, k=7)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_allclose(got[0], want[0], rtol=0, atol=0)
            with pytest.warns(RuntimeWarning, match="fork"):
                found = gpu.identify(queries, threshold=0.2)
            np.testing.assert_array_equal(found[0], cpu.identify(queries, threshold=0.2)[0])
        with pytest.raises(RuntimeError, match="forked"):
            gpu._core.search_cuda(queries, 7, 0)
        with pytest.raises(RuntimeError, match="forked"):
            afr._core._cuda_scale_unless_one(0, 0, "float32", 1 << 20, 4, 1 << 20)
        for make in (
            lambda: afr.Gallery(16, device="cuda"),
            lambda: afr.Gallery.load(b"x", device="cuda:0"),
        ):
            with pytest.raises(ValueError, match="device='cuda.*forked"):
                make()
        before = live()
        del gpu._core  # the parent's device memory is not freed from here
        assert live() == before

    report = in_forked_child(child, limit=120.0)
    assert report is None, report
    assert afr.cuda_available() and not afr._core.cuda_forked()
    _assert_same_results(gpu, cpu, queries, 5)


def test_a_gpu_copy_or_scratch_the_device_cannot_hold_is_a_memory_error():
    """Device memory sized by the caller (the gallery's GPU copy, a search's scratch) that
    the device cannot allocate is a MemoryError naming the argument, the bytes and the bytes
    free, not a driver error; nothing leaks, and the gallery searches on the GPU again once
    the memory is there."""
    fake = ctypes.CDLL(os.path.join(FAKE, "libcuda.so"))
    fake.fake_set_memory_limit.argtypes = [ctypes.c_longlong]
    rng = np.random.default_rng(32)
    emb = rng.standard_normal((3000, 64)).astype(np.float32)
    queries = rng.standard_normal((2000, 64)).astype(np.float32)
    cpu, gpu = _cpu_and_cuda_galleries("float32", emb, np.arange(3000))
    before = fake.fake_live_allocations()
    try:
        # the copy: (3000 rows + 1024 of room) x 64 x 4 bytes
        fake.fake_set_memory_limit(512 << 10)
        want = (
            r"device: the GPU copy of 3000 rows \(room for 4024\) on cuda:0 would need "
            r"1\.030e6 bytes.*\(5\.243e5 bytes"
        )
        for _ in range(2):  # refused again, not half made
            with pytest.raises(MemoryError, match=want):
                gpu.search(queries[:3], k=5)
            assert fake.fake_live_allocations() == before
        # room for the copy, not for the (2000, 1000) results of 2000 queries
        fake.fake_set_memory_limit(4 << 20)
        with pytest.raises(MemoryError, match="queries: the scratch of 2000 queries with k=1000"):
            gpu.search(queries, k=1000)
        _assert_same_results(gpu, cpu, queries[:20], 5)  # a smaller search fits
    finally:
        fake.fake_set_memory_limit(0)
    _assert_same_results(gpu, cpu, queries[:3], 50)
    assert len(gpu) == 3000


def test_results_beyond_host_memory_are_refused_before_any_device_memory():
    """The GPU search's (Q, k) results come back to the host: a Q whose k results would not
    fit in half the memory available is the CPU search's ValueError naming k, raised before
    the device's scratch is asked for (the fake device is limited so that asking for it
    would be a MemoryError instead)."""
    with open("/proc/meminfo") as info:
        kib = next(int(line.split()[1]) for line in info if line.startswith("MemAvailable:"))
    q = kib * 1024 // (1024 * 12) + 1  # all of it, twice the limit: it may grow meanwhile
    if q > 20_000_000:
        pytest.skip("too much memory available for a small query array")
    fake = ctypes.CDLL(os.path.join(FAKE, "libcuda.so"))
    fake.fake_set_memory_limit.argtypes = [ctypes.c_longlong]
    gpu = afr.Gallery(2, device="cuda")
    gpu.add(np.eye(2, dtype=np.float32))
    queries = np.ones((q, 2), dtype=np.float32)
    try:
        fake.fake_set_memory_limit(1 << 30)
        for g in (gpu, afr.Gallery(2)):
            with pytest.raises(ValueError, match=f"k: 1024 results for each of {q} queries"):
                g.search(queries, k=1024)
    finally:
        fake.fake_set_memory_limit(0)
