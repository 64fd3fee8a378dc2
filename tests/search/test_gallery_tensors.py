"""Torch tensors in, torch tensors out (python/arcface_rs/_gallery_torch.py) on a CPU
gallery: the results equal the NumPy path's, come back as tensors, and bad tensors get the
same clear errors. The CUDA side runs on the fake driver (tests/cuda/fake_cuda)."""

from __future__ import annotations

import numpy as np
import pytest

import arcface_rs as afr

torch = pytest.importorskip("torch")


def _gallery(
    dtype: str, n: int = 200, d: int = 24, seed: int = 0
) -> tuple[afr.Gallery, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    g = afr.Gallery(d, dtype=dtype)
    g.add(rows, ids=np.arange(1000, 1000 + n))
    return g, rows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tensor_queries_get_the_numpy_results_as_tensors(dtype, qdtype):
    g, rows = _gallery(dtype)
    q = torch.from_numpy(rows[:7] + 0.1).to(qdtype)
    scores, ids = g.search(q, 5)
    assert isinstance(scores, torch.Tensor) and isinstance(ids, torch.Tensor)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    # The tensor is converted to float32 first, as the NumPy path would see it.
    want_s, want_i = g.search(q.to(torch.float32).numpy(), 5)
    np.testing.assert_array_equal(ids.numpy(), want_i)
    np.testing.assert_array_equal(scores.numpy(), want_s)


def test_one_tensor_query_filters_and_identify():
    g, rows = _gallery("float32")
    one = torch.from_numpy(rows[3].copy())
    scores, ids = g.search(one, 4, deny=[1003])
    assert scores.shape == (4,) and ids.shape == (4,)
    want_s, want_i = g.search(rows[3], 4, deny=[1003])
    np.testing.assert_array_equal(ids.numpy(), want_i)
    assert 1003 not in ids.tolist()

    q = torch.from_numpy(np.stack([rows[5], -rows[5]]))
    found, best = g.identify(q, threshold=0.9)
    want_found, want_best = g.identify(q.numpy(), threshold=0.9)
    np.testing.assert_array_equal(found.numpy(), want_found)
    np.testing.assert_allclose(best.numpy(), want_best, rtol=0, atol=0)
    assert found.tolist()[0] == 1005 and found.tolist()[1] == -1


def test_range_search_of_a_tensor():
    g, rows = _gallery("float16")
    q = torch.from_numpy(rows[:3])
    lims, scores, ids = g.range_search(q, 0.3)
    want = g.range_search(rows[:3], 0.3)
    for got, exp in zip((lims, scores, ids), want):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), exp)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros((2, 3, 24)), "queries must be"),
        (torch.zeros((2, 23)), "queries has shape"),
        (torch.zeros((0, 24)), "queries has shape"),
        (torch.zeros((2, 24), dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_tensors_are_value_errors(bad, match):
    g, _ = _gallery("float32")
    with pytest.raises(ValueError, match=match):
        g.search(bad, 3)


def test_a_zero_tensor_row_is_refused_as_the_numpy_row_is():
    g, rows = _gallery("float32")
    q = torch.from_numpy(rows[:2].copy())
    q[1] = 0
    with pytest.raises(ValueError) as from_tensor:
        g.search(q, 3)
    with pytest.raises(ValueError) as from_numpy:
        g.search(q.numpy(), 3)
    assert str(from_tensor.value) == str(from_numpy.value)
