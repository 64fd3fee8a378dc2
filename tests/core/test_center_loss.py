"""Center loss (Wen et al. 2016): the fused NumPy center_loss and arcface_rs.torch.CenterLoss
against a float64 reference written here from the paper (loss, gradient, centre update, two
steps), labels -1, gradcheck, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcface_rs as afr
import arcface_rs.torch as aft


def _reference(emb, centers, labels, lambda_c, alpha):
    """loss, grad_emb and the new centres, by the paper's formulas, with loops."""
    valid = [i for i, y in enumerate(labels) if y >= 0]
    n = len(valid)
    loss = 0.0
    grad = np.zeros_like(emb)
    for i in valid:
        diff = emb[i] - centers[labels[i]]
        loss += diff @ diff
        grad[i] = lambda_c * diff / n
    loss = lambda_c / 2 * loss / n if n else 0.0
    new = centers.copy()
    for j in set(labels[valid]):
        members = [i for i in valid if labels[i] == j]
        new[j] = centers[j] - alpha * sum(centers[j] - emb[i] for i in members) / (1 + len(members))
    return loss, grad, new


def _problem(seed=0, b=20, c=6, d=8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, b)
    labels[::7] = -1
    return rng.standard_normal((b, d)), rng.standard_normal((c, d)), labels


def test_numpy_center_loss_equals_the_paper_over_two_steps():
    emb, centers, labels = _problem()
    for step in range(2):
        e = emb + step
        loss, grad, (classes, delta) = afr.center_loss(e, centers, labels, lambda_c=0.1, alpha=0.5)
        want_loss, want_grad, want_new = _reference(e, centers, labels, 0.1, 0.5)
        assert abs(loss - want_loss) <= 1e-12 * max(1.0, want_loss)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
        centers = centers.copy()
        centers[classes] += delta
        np.testing.assert_allclose(centers, want_new, rtol=1e-12, atol=1e-15)
        assert np.all(np.diff(classes) > 0) and -1 not in classes
    l32, g32, _ = afr.center_loss(emb.astype(np.float32), centers.astype(np.float32), labels)
    want = _reference(emb, centers, labels, 0.003, 0.5)
    assert abs(l32 - want[0]) <= 2e-3 * max(1.0, want[0])
    np.testing.assert_allclose(g32, want[1], atol=2e-3 * np.abs(want[1]).max())


def test_the_torch_module_equals_the_paper_over_two_steps_and_saves_its_centres():
    emb, centers, labels = _problem(seed=1)
    module = aft.CenterLoss(6, 8, lambda_c=0.2, alpha=0.3, dtype=torch.float64)
    with torch.no_grad():
        module.centers.copy_(torch.from_numpy(centers))
    for step in range(2):
        e = torch.tensor(emb * (1 + step), requires_grad=True)
        loss = module(e, torch.tensor(labels))
        loss.backward()
        want_loss, want_grad, want_new = _reference(e.detach().numpy(), centers, labels, 0.2, 0.3)
        assert abs(loss.item() - want_loss) <= 1e-12 * max(1.0, want_loss)
        np.testing.assert_allclose(e.grad.numpy(), want_grad, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(module.centers.numpy(), want_new, rtol=1e-12, atol=1e-15)
        centers = want_new
    again = aft.CenterLoss(6, 8, dtype=torch.float64)
    again.load_state_dict(module.state_dict())
    assert torch.equal(again.centers, module.centers)
    module.eval()
    frozen = module.centers.clone()
    module(torch.tensor(emb), torch.tensor(labels))
    assert torch.equal(module.centers, frozen)


def test_center_loss_gradcheck_and_beside_a_head():
    emb, centers, labels = _problem(seed=2, b=6, c=3, d=4)
    module = aft.CenterLoss(3, 4, lambda_c=0.5, dtype=torch.float64).eval()
    e = torch.tensor(emb, requires_grad=True)
    y = torch.tensor(labels)
    assert torch.autograd.gradcheck(lambda e: module(e, y), (e,))
    head = aft.ArcFaceHead(4, 3, dtype=torch.float64)
    total = head(e, y) + module(e, y)
    total.backward()
    assert torch.isfinite(e.grad).all()


def test_bad_input_is_named():
    emb, centers, labels = _problem()
    with pytest.raises(ValueError, match="labels"):
        afr.center_loss(emb, centers, np.full(len(emb), 9))
    with pytest.raises(ValueError, match="centers"):
        afr.center_loss(emb, centers[:, :3], labels)
    with pytest.raises(ValueError, match="alpha"):
        afr.center_loss(emb, centers, labels, alpha=-1.0)
    with pytest.raises(ValueError, match="labels"):
        aft.CenterLoss(6, 8)(torch.zeros(3, 8), torch.tensor([0, 6, 1]))
    none = afr.center_loss(emb, centers, np.full(len(emb), -1))
    assert none[0] == 0.0 and not none[1].any() and len(none[2][0]) == 0


def test_center_loss_module_refuses_what_the_numpy_one_refuses():
    torch.manual_seed(0)
    module = aft.CenterLoss(4, 3, dtype=torch.float64)
    before = module.centers.clone()
    emb = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, -1])
    nan = emb.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="emb"):
        module(nan, labels)
    with pytest.raises(ValueError, match="emb"):
        afr.center_loss(nan.numpy(), before.numpy(), labels.numpy())
    with pytest.raises(TypeError, match="labels"):
        module(emb[:2], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="emb"):
        module(emb[:0], labels[:0])
    assert torch.equal(module.centers, before)  # nothing moved
    # an ignored row may hold anything, as in the NumPy version
    ignored = emb.clone()
    ignored[4] = float("nan")
    loss = module(ignored, labels)
    want, _, _ = afr.center_loss(ignored.numpy(), before.numpy(), labels.numpy(), 0.003, 0.5)
    assert loss.item() == pytest.approx(float(want), rel=1e-12)
    assert torch.isfinite(module.centers).all()
    for name in ("lambda_c", "alpha"):
        for value in (float("inf"), float("nan"), -1.0):
            with pytest.raises(ValueError, match=name):
                aft.CenterLoss(4, 3, **{name: value})
