"""arcface_rs.torch's AdaFaceHead, MagFaceHead, ElasticFaceHead and grad= against the float64
references of test_adaptive_margins.py (from the papers' definitions): two steps with the
running statistics, state_dict round trips, gradcheck, torch.compile(fullgraph) == eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcface_rs as afr
import arcface_rs.torch as aft
from _papers import adaface_reference, float64_head, head_step, magface_reference
from _reference import make_problem
from arcface_rs.torch import functional

TOL = 1e-9


def _close(got, want, tol=TOL):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert float(np.abs(got - want).max()) <= tol * max(1.0, float(np.abs(want).max()))


def test_adaface_head_two_steps_and_buffers_equal_the_papers_head():
    emb, weight, labels = make_problem(12, 16, 40, seed=3)
    emb = emb * 12.0
    head = float64_head(aft.AdaFaceHead, weight)
    assert set(head.state_dict()) == {"weight", "batch_mean", "batch_std"}
    state = [20.0, 100.0]
    for step in range(2):
        e = emb * (1.0 + 0.5 * step)
        got = head_step(head, e, labels)
        want = adaface_reference(e, weight, labels, state)
        for a, b in zip(got, want):
            _close(a, b)
        assert abs(float(head.batch_mean) - state[0]) <= 1e-12 * state[0]
        assert abs(float(head.batch_std) - state[1]) <= 1e-12 * state[1]
    # a state_dict round trip carries the statistics: the next step agrees
    again = float64_head(aft.AdaFaceHead, weight)
    again.load_state_dict(head.state_dict())
    for a, b in zip(head_step(again, emb, labels), head_step(head, emb, labels)):
        _close(a, b, 1e-12)
    # eval mode uses the statistics unchanged
    head.eval()
    frozen = (float(head.batch_mean), float(head.batch_std))
    head_step(head, emb * 3.0, labels)
    assert (float(head.batch_mean), float(head.batch_std)) == frozen


@pytest.mark.parametrize("easy", [True, False])
def test_magface_head_equals_the_papers_head_with_its_regulariser(easy):
    emb, weight, labels = make_problem(12, 16, 40, seed=4)
    emb = emb * 15.0
    head = float64_head(aft.MagFaceHead, weight, easy_margin=easy)
    got = head_step(head, emb, labels)
    want = magface_reference(emb, weight, labels, easy=easy)
    for a, b in zip(got, want):
        _close(a, b)
    # float32 to 2e-3
    head32 = aft.MagFaceHead(16, 40, easy_margin=easy)
    with torch.no_grad():
        head32.weight.copy_(torch.from_numpy(weight).float())
    e32 = torch.tensor(emb, dtype=torch.float32, requires_grad=True)
    loss32 = head32(e32, torch.tensor(labels))
    loss32.backward()
    _close(loss32.item(), want[0], 2e-3)
    _close(e32.grad.numpy(), want[1], 2e-3)


def test_straight_through_head_equals_the_numpy_api_and_differs_from_exact():
    emb, weight, labels = make_problem(12, 16, 40, seed=2)
    st = head_step(float64_head(aft.ArcFaceHead, weight, grad="straight_through"), emb, labels)
    want = afr.margin_loss(emb, weight, labels, afr.ArcFace(grad="straight_through"))
    for a, b in zip(st, want):
        _close(a, b, 1e-12)
    exact = head_step(float64_head(aft.ArcFaceHead, weight), emb, labels)
    assert abs(exact[0] - st[0]) < 1e-12 and np.abs(exact[1] - st[1]).max() > 1e-6
    head = float64_head(aft.CombinedMarginHead, weight, grad="straight_through")
    assert head.margin.grad == "straight_through"


def test_elastic_face_head_is_reproducible_from_its_seed():
    emb, weight, labels = make_problem(16, 8, 30, seed=5)
    a = [head_step(float64_head(aft.ElasticFaceHead, weight, seed=3, std=0.05), emb, labels)[0]]
    b = [head_step(float64_head(aft.ElasticFaceHead, weight, seed=3, std=0.05), emb, labels)[0]]
    assert a == b


@pytest.mark.parametrize(
    "margin",
    [afr.MagFace(l_a=1.0, u_a=6.0, lambda_g=3.0), afr.MagFace(l_a=1.0, u_a=6.0, easy_margin=False)],
    ids=repr,
)
def test_gradcheck_float64_norm_dependent(margin):
    emb, weight, labels = make_problem(5, 4, 7, seed=7)
    e = torch.tensor(emb * 2.0, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    y = torch.tensor(labels)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda e, w, r=reduction: aft.margin_loss(e, w, y, margin, r),
            (e, w),
            eps=1e-6,
            atol=1e-5,
        )


def test_gradcheck_float64_adaface_at_fixed_scalers():
    """z is detached in AdaFace (as in the paper), so central differences in emb would see it
    move: check the gradient at fixed per-row scalers instead."""
    emb, weight, labels = make_problem(5, 4, 7, seed=8)
    margin = afr.AdaFace()
    rows = torch.tensor([margin._block] * 5, dtype=torch.float64)
    rows[:, 3] = torch.tensor([-0.9, -0.3, 0.0, 0.4, 1.0])
    e = torch.tensor(emb, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    y = torch.tensor(labels)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda e, w, r=reduction: functional.fused_loss(e, w, y, margin, r, rows),
            (e, w),
            eps=1e-6,
            atol=1e-5,
        )


@pytest.mark.parametrize("cls", [aft.AdaFaceHead, aft.MagFaceHead])
def test_compiled_heads_equal_eager_without_graph_breaks(cls):
    torch._dynamo.reset()
    emb, weight, labels = make_problem(16, 8, 40, seed=9)
    eager, compiled_head = float64_head(cls, weight), float64_head(cls, weight)
    compiled = torch.compile(compiled_head, backend="aot_eager", fullgraph=True)
    for step in range(2):
        e = emb * (4.0 + step)
        want = head_step(eager, e, labels)
        got = head_step(compiled, e, labels)
        for a, b in zip(got, want):
            _close(a, b, 1e-12)
    assert torch.equal(eager.state_dict()["weight"], compiled_head.state_dict()["weight"])
    if cls is aft.AdaFaceHead:
        assert float(eager.batch_mean) == pytest.approx(float(compiled_head.batch_mean), rel=1e-14)


# ---------------------------------------------------------------------------------------
# Buffers and refused calls (hostile testing, round three).


def test_a_refused_batch_leaves_the_adaface_buffers_and_state_dict_alone():
    torch.manual_seed(0)
    head = aft.AdaFaceHead(8, 5, batch_mean=21.0, batch_std=90.0, dtype=torch.float64)
    emb = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    nan = emb.clone()
    nan[2] = float("nan")
    for e, y in ((emb[:0], labels[:0]), (nan, labels), (emb, torch.tensor([0, 1, 2, 3, 4, 5]))):
        with pytest.raises(ValueError):
            head(e, y)
        state = head.state_dict()
        assert state["batch_mean"].item() == 21.0 and state["batch_std"].item() == 90.0
    head(emb, labels).backward()
    n = emb.norm(dim=1).clamp(1e-3, 100)
    assert head.batch_mean.item() == pytest.approx(0.01 * n.mean().item() + 0.99 * 21.0)


def test_elasticface_draws_are_in_the_state_dict_and_resume():
    import io

    torch.manual_seed(0)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    head = aft.ElasticFaceHead(8, 5, seed=3)
    head(emb, labels)  # the draws have moved on
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    resumed = aft.ElasticFaceHead(8, 5, seed=3)  # same seed: would repeat the first draws
    resumed.load_state_dict(torch.load(buf))
    assert torch.equal(resumed(emb, labels), head(emb, labels))
    fresh = aft.ElasticFaceHead(8, 5, seed=3)
    fresh.load_state_dict(head.state_dict() | {"weight": head.weight})
    assert not torch.equal(aft.ElasticFaceHead(8, 5, seed=3)(emb, labels), head(emb, labels))


@pytest.mark.parametrize(
    "margin, reads",
    [
        (afr.ElasticFace(), False),  # draws: only the row count
        (afr.AdaFace(), True),  # the norms move its statistics
        (afr.ArcFace(), False),  # one block for every row
    ],
    ids=repr,
)
def test_the_batch_values_are_read_on_the_host_only_by_margins_that_use_them(
    monkeypatch, margin, reads
):
    """A GPU batch's norms are copied to the host only when a margin reads their values (a
    wait for the GPU): counting rows does not."""
    from arcface_rs.torch import _rows

    read = []
    real = _rows.ReadLater.__array__

    def counted(self, *args, **kwargs):
        read.append(len(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_rows.ReadLater, "__array__", counted)
    emb, weight, labels = (torch.tensor(a) for a in make_problem(6, 5, 8, seed=2))
    blocks = _rows.rows_of(margin, emb, weight, labels)
    assert bool(read) == reads
    if margin.varies_per_batch:
        assert blocks is not None and blocks.shape[0] == 6
    eager = _rows.ReadLater(emb.norm(dim=1))
    assert len(eager) == 6
    values = np.asarray(eager, dtype=np.float32)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, emb.norm(dim=1).numpy().astype(np.float32))


def test_adaface_statistics_skip_a_batch_with_a_non_finite_row():
    """The next statistics of a batch with a NaN or inf row are the current ones (on CUDA
    the loss refuses such a batch only at the next call, after the buffers are written)."""
    head = aft.AdaFaceHead(4, 6, dtype=torch.float64, batch_mean=5.0, batch_std=2.0)
    emb = torch.randn(3, 4, dtype=torch.float64)
    moved = head._next_statistics(emb)
    assert float(moved[0]) != 5.0 and float(moved[1]) != 2.0
    for bad in (float("nan"), float("inf")):
        spoiled = emb.clone()
        spoiled[1, 2] = bad
        mean, std = head._next_statistics(spoiled)
        assert (float(mean), float(std)) == (5.0, 2.0)


def _numpy_target_cos(emb, weight, labels):
    """Target cosines from the definition in float64 NumPy, NaN for ignored rows."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.einsum("bd,bd->b", x, w[np.maximum(labels, 0)])
    return np.where(labels >= 0, cos, np.nan)


def test_elasticface_plus_ranks_its_draws_where_the_batch_is_as_on_the_host(monkeypatch):
    """The torch route places ElasticFace+'s sorted draws with torch ops on the batch's device
    (no copy to the host, so a GPU step does not wait); the blocks equal the host's
    placement from the same generator, ties (equal rows, ignored rows) in row order."""
    from arcface_rs.torch import _rows

    emb, weight, labels = make_problem(16, 8, 5, seed=9, ignore=3)
    emb[10] = emb[4]  # equal rows of one class: equal cosines, kept in row order
    labels[10] = labels[4] if labels[4] >= 0 else 2
    labels[4] = labels[10]
    host = afr.ElasticFace(std=0.2, plus=True, seed=11)
    on_host = host.batch_rows(lambda: np.ones(16), lambda: _numpy_target_cos(emb, weight, labels))
    reads = []
    for name in ("cpu", "numpy", "item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    device = afr.ElasticFace(std=0.2, plus=True, seed=11)
    t = [torch.tensor(a) for a in (emb, weight, labels)]
    blocks = _rows.rows_of(device, *t)
    monkeypatch.undo()
    assert reads == []
    np.testing.assert_array_equal(blocks.numpy(), on_host)
    # the smallest draw to the row closest to its centre, ignored rows ranked as cosine 0
    cos = np.nan_to_num(_numpy_target_cos(emb, weight, labels), nan=0.0)
    assert blocks[int(np.argmax(cos)), 2] == blocks[:, 2].min()
    # both generators moved on alike once accepted
    host.commit(), device.commit()
    assert host.rng_state == device.rng_state
