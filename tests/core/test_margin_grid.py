"""The one definition of each margin (margin.rs) and the places that read it.

A margin is encoded once, as the core's parameter block; the plain-PyTorch path evaluates
psi from that block with torch ops, and the CUDA kernels with kernels.cu's switch. Here the
plain path must agree with the core on a dense grid of cosines for every margin; the CUDA
side of the same grid runs on the kernel emulator in Rust
(`cuda::tests::kernel_margins_equal_the_core_on_a_dense_grid`, `cargo test --features cuda`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcface_rs as afr
from _reference import all_margins, make_problem
from arcface_rs import _core
from arcface_rs.torch import _plain as tplain

GRID_MARGINS = all_margins() + [
    afr.ArcFace(m=2.6),
    afr.ArcFace(s=64.0, m=0.5, easy_margin=True),
    afr.CosFace(m=0.0),
    afr.SphereFace(m=1, s=10.0),
    afr.SphereFace(m=4, lambda_=0.0),
    afr.CombinedMargin(m1=0.9, m2=0.4, m3=0.1),
    afr.ArcFace(m=0.5, grad="straight_through"),
    afr.CombinedMargin(m1=1.0, m2=0.3, m3=0.2, grad="straight_through"),
    afr.AdaFace(m=0.4),
    afr.MagFace(),
    afr.MagFace(l_a=10.0, u_a=60.0, u_m=1.2, easy_margin=False),
    afr.CurricularFace(m=0.5, t=0.3),
    afr.MVSoftmax(s=32.0, m=0.35, t=1.2),
    afr.MVSoftmax(s=32.0, m=0.5, t=1.12, kind="arc"),
]
ADAFACE_SCALERS = [-1.0, -0.4, 0.0, 0.7, 1.0]
MAGFACE_NORMS = [5.0, 10.0, 33.3, 60.0, 109.0, 200.0]


def _grid() -> np.ndarray:
    theta = np.linspace(0.0, np.pi, 20001)
    ends = [-1.0, -0.9999999, -1e-300, 0.0, 1e-300, 0.9999999, 1.0]
    return np.concatenate([np.linspace(-1.0, 1.0, 20001), np.cos(theta), ends])


def test_every_margin_kind_is_on_the_grid():
    kinds = {int(m._block[0]) for m in GRID_MARGINS}
    assert kinds == set(_core.MARGIN_KINDS.values())


@pytest.mark.parametrize("margin", GRID_MARGINS, ids=repr)
def test_plain_torch_margin_agrees_with_the_core_on_a_dense_grid(margin):
    c = _grid()
    psi, dpsi = tplain._psi_dpsi(margin, torch.from_numpy(c))
    np.testing.assert_allclose(psi.numpy(), margin.psi(c), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dpsi.numpy(), margin.dpsi(c), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("z", ADAFACE_SCALERS)
def test_plain_torch_adaface_agrees_with_the_core_at_every_scaler(z):
    c = _grid()
    core = afr._core.Margin.adaface(64.0, 0.4, z)
    blocks = torch.tensor([core.encode()] * len(c), dtype=torch.float64)
    psi, dpsi = tplain._psi_dpsi(afr.AdaFace(), torch.from_numpy(c), blocks)
    np.testing.assert_allclose(psi.numpy(), core.psi(c), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dpsi.numpy(), core.dpsi(c), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", MAGFACE_NORMS)
def test_plain_torch_magface_agrees_with_the_core_at_every_norm(norm):
    c = _grid()
    for margin in (afr.MagFace(), afr.MagFace(u_m=1.2, easy_margin=False)):
        n = torch.full((len(c),), norm, dtype=torch.float64)
        psi, dpsi = tplain._psi_dpsi(margin, torch.from_numpy(c), norm=n)
        np.testing.assert_allclose(psi.numpy(), margin.psi(c, norm), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dpsi.numpy(), margin.dpsi(c, norm), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("margin", GRID_MARGINS, ids=repr)
def test_the_parameter_block_round_trips_through_the_core(margin):
    block = margin.spec.encode()
    assert len(block) == _core.MARGIN_PARAMS and tuple(block) == margin._block
    again = _core.Margin.decode(block)
    c = _grid()
    np.testing.assert_array_equal(again.psi(c), margin.psi(c))
    assert again.encode() == block


def test_decode_refuses_bad_blocks_by_name():
    block = afr.ArcFace().spec.encode()
    with pytest.raises(ValueError, match="margin: unknown margin kind"):
        _core.Margin.decode([99.0] + block[1:])
    with pytest.raises(ValueError, match="margin: a parameter block has"):
        _core.Margin.decode(block[:3])
    with pytest.raises(ValueError, match="s: must be a finite number > 0"):
        _core.Margin.decode(block[:1] + [-1.0] + block[2:])


def test_per_row_blocks_give_each_row_its_own_margin():
    """One block per row: the plain path per element, and the fused core per row, equal the
    same margins applied one row at a time."""
    ms = [0.0, 0.2, 0.35, 0.5, 0.7]
    margins = [afr.ArcFace(s=30.0, m=m) for m in ms]
    blocks = np.array([m._block for m in margins])
    c = np.linspace(-0.95, 0.95, len(ms))
    psi, _ = tplain._psi_dpsi(margins[0], torch.from_numpy(c), torch.from_numpy(blocks))
    np.testing.assert_allclose(psi.numpy(), [m.psi(v) for m, v in zip(margins, c)], rtol=1e-12)

    emb, weight, labels = make_problem(len(ms), 8, 11, seed=3)
    spec = margins[0]._spec
    loss, rows, ge, gw, _ = _core.margin_loss(emb, weight, labels, spec, "sum", row_margins=blocks)
    for i, m in enumerate(margins):
        _, row, ge_i, _, _ = _core.margin_loss(
            emb[i : i + 1], weight, labels[i : i + 1], m._spec, "sum"
        )
        np.testing.assert_allclose(rows[i], row[0], rtol=1e-12)
        np.testing.assert_allclose(ge[i : i + 1], ge_i, rtol=1e-10, atol=1e-14)
    z = _core.margin_logits(emb, weight, labels, spec, row_margins=blocks)
    z_plain = tplain.plain_logits(
        torch.from_numpy(emb),
        torch.from_numpy(weight),
        torch.from_numpy(labels),
        margins[0],
        torch.from_numpy(blocks),
    )
    np.testing.assert_allclose(z, z_plain.numpy(), rtol=1e-12, atol=1e-12)


def test_per_row_blocks_are_checked():
    emb, weight, labels = make_problem(3, 4, 5)
    spec = afr.ArcFace().spec
    block = np.array([afr.ArcFace()._block] * 3)
    with pytest.raises(ValueError, match="row_margins: must have"):
        _core.margin_loss(emb, weight, labels, spec, "mean", row_margins=block[:, :4])
    with pytest.raises(ValueError, match="margin: has 2 per-row margins but emb has 3 rows"):
        _core.margin_loss(emb, weight, labels, spec, "mean", row_margins=block[:2])
    cos = np.array([afr.CosFace()._block] * 3)
    with pytest.raises(ValueError, match="row_margins: row 0 has another kind"):
        _core.margin_loss(emb, weight, labels, spec, "mean", row_margins=cos)
    bad = block.copy()
    bad[1, 2] = -0.5
    with pytest.raises(ValueError, match="m: must be in"):
        _core.margin_logits(emb, weight, labels, spec, row_margins=bad)
