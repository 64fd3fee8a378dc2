"""cosine_topk against a NumPy brute force written here: ties, k = N, k > N, Q = 1, N = 1,
odd dimensions, both code paths (few queries stream, many use GEMM tiles), bad input."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arcface_rs as afr
from _reference import brute_topk


def brute(queries, gallery, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    s = q.astype(np.float64) @ g.astype(np.float64).T
    # best first, ties to the lower index
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("q", [1, 2, 8, 9, 33, 64, 300])  # 64: AVX2 int8 pass, 300: any
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_brute_force(q, dtype):
    rng = np.random.default_rng(q)
    gallery = rng.standard_normal((5000, 33)).astype(dtype)
    queries = rng.standard_normal((q, 33)).astype(dtype)
    scores, idx = afr.cosine_topk(queries, gallery, k=10)
    want_s, want_i = brute(queries, gallery, 10)
    assert scores.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-7)


@pytest.mark.parametrize("q", [1, 20])
def test_exact_ties_go_to_the_lower_index(q):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 16))
    gallery = np.repeat(base, 4, axis=0)  # 4 identical copies of each row: exact ties
    queries = base[:q] + 0.0
    _, idx = afr.cosine_topk(queries, gallery, k=8)
    _, want = brute(queries, gallery, 8)
    # the four copies of row i score exactly alike: indices 4i..4i+3, in order, first
    for r in range(q):
        assert list(idx[r, :4]) == [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3]
    assert idx.shape == want.shape


def test_int8_pass_keeps_exact_ties_and_near_duplicates():
    """300 queries take the int8 first pass, whose exact scores are computed inside the
    scan: copies of a row tie exactly (lower index first) and near-copies, closer together
    than the int8 bounds can tell apart, still come out in exact order."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((400, 64))
    near = base + 1e-4 * rng.standard_normal(base.shape)
    gallery = np.concatenate([np.repeat(base, 3, axis=0), near])
    queries = base[:300] + 0.01 * rng.standard_normal((300, 64))
    scores, idx = afr.cosine_topk(queries, gallery, k=5)
    want_s, want_i = brute(queries, gallery, 5)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("q", [1, 12])
def test_k_equal_and_beyond_gallery_size(q):
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((7, 5))
    queries = rng.standard_normal((q, 5))
    s, i = afr.cosine_topk(queries, gallery, k=7)
    np.testing.assert_array_equal(i, brute(queries, gallery, 7)[1])
    s, i = afr.cosine_topk(queries, gallery, k=10)
    assert np.all(i[:, 7:] == -1) and np.all(np.isneginf(s[:, 7:]))
    np.testing.assert_array_equal(i[:, :7], brute(queries, gallery, 7)[1])


def test_single_row_gallery_and_single_query_vector():
    s, i = afr.cosine_topk(np.array([1.0, 0.0]), np.array([[0.0, 2.0]]), k=3)
    assert s.shape == (3,) and list(i) == [0, -1, -1] and s[0] == 0.0


def test_normalized_skips_the_division():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((300, 8))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:4]
    a = afr.cosine_topk(q, g, k=5)
    b = afr.cosine_topk(q, g, k=5, normalized=True)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 40),
    q=st.integers(1, 20),
    k=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([0, 3]),
)
def test_property_matches_brute_force(n, d, q, k, seed, levels):
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n, d))
    queries = rng.standard_normal((q, d))
    if levels:  # coarse values: many exactly tied scores
        gallery, queries = np.round(gallery * levels), np.round(queries * levels) + 0.5
        gallery[np.all(gallery == 0, axis=1)] = 1.0
    s, i = afr.cosine_topk(queries, gallery, k=k)
    want_s, want_i = brute(queries, gallery, min(k, n))
    np.testing.assert_allclose(s[:, : min(k, n)], want_s, atol=1e-9)
    # ids may differ only between scores tied to within rounding
    diff = i[:, : min(k, n)] != want_i
    assert np.all(np.abs(s[:, : min(k, n)][diff] - want_s[diff]) < 1e-12)


def test_many_threads_at_once_get_the_same_answer():
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((20_000, 64)).astype(np.float32)
    queries = rng.standard_normal((6, 64)).astype(np.float32)
    want = afr.cosine_topk(queries, gallery, k=5)
    results = [None] * 8

    def work(t):
        results[t] = afr.cosine_topk(queries, gallery, k=5)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r[1], want[1])


@pytest.mark.parametrize(
    "queries, gallery, k, exc, match",
    [
        (np.ones((2, 3)), np.ones((4, 3)), 0, ValueError, "k must be >= 1"),
        (np.ones((2, 3)), np.ones((4, 3)), -2, ValueError, "k must be >= 1"),
        (np.ones((2, 3)), np.ones((4, 3)), 2.5, TypeError, "k must be an int"),
        (np.ones((2, 3)), np.ones((4, 4)), 2, ValueError, "gallery: has 4 columns"),
        (np.ones((0, 3)), np.ones((4, 3)), 2, ValueError, "queries: empty"),
        (
            np.ones((2, 3)),
            np.vstack([np.ones((2, 3)), np.zeros((1, 3))]),
            2,
            ValueError,
            "gallery: row 2 is all zeros",
        ),
        (
            np.ones((2, 3)),
            np.vstack([np.ones((2, 3)), [[np.nan, 1, 1]]]),
            2,
            ValueError,
            "gallery: row 2 contains NaN",
        ),
        (np.zeros((1, 3)), np.ones((4, 3)), 2, ValueError, "queries: row 0 is all zeros"),
        (np.full((1, 3), np.inf), np.ones((4, 3)), 2, ValueError, "queries: row 0 contains NaN"),
        (np.ones((2, 3), np.float32), np.ones((4, 3)), 2, TypeError, "share one dtype"),
        (np.ones((2, 3), np.int64), np.ones((4, 3), np.int64), 2, TypeError, "float32 or float64"),
        (np.ones((2, 3, 1)), np.ones((4, 3)), 2, ValueError, "queries must be 2-D"),
    ],
)
def test_bad_input(queries, gallery, k, exc, match):
    with pytest.raises(exc, match=match):
        afr.cosine_topk(queries, gallery, k=k)


def test_non_contiguous_inputs_are_read_correctly():
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((400, 24))
    queries = rng.standard_normal((3, 24))
    want = afr.cosine_topk(queries, gallery, k=6)
    for g in (np.asfortranarray(gallery), np.repeat(gallery, 2, axis=1)[:, ::2]):
        got = afr.cosine_topk(np.asfortranarray(queries), g, k=6)
        np.testing.assert_array_equal(got[1], want[1])


# sizes beyond any gallery (from the reliability rounds)
BIG_KS = [10**12, 2**62, 2**63 - 1]


@pytest.mark.parametrize("k", BIG_KS)
def test_cosine_topk_huge_k_is_a_value_error(k):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((3, 8)), rng.standard_normal((20, 8))
    t = time.perf_counter()
    with pytest.raises(ValueError, match="k"):
        afr.cosine_topk(q, g, k=k)
    assert time.perf_counter() - t < 5.0


def test_k_beyond_int64_and_many_queries_are_refused_before_allocating():
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((1000, 8)), rng.standard_normal((20, 8))
    with pytest.raises(ValueError, match="k"):
        afr.cosine_topk(q, g, k=10**9)  # 1000 x 1e9 x 16 bytes of padding
    with pytest.raises(ValueError, match="k"):
        afr.cosine_topk(q[:1], g, k=2**64)


def test_k_a_little_beyond_n_pads():
    rng = np.random.default_rng(2)
    q, g = rng.standard_normal((2, 8)), rng.standard_normal((5, 8))
    scores, idx = afr.cosine_topk(q, g, k=9)
    assert idx.shape == (2, 9)
    np.testing.assert_array_equal(idx[:, :5], brute_topk(q, g, 5))
    assert (idx[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


@pytest.mark.parametrize(
    "dtype,scale", [(np.float32, 1e-39), (np.float32, 1e-30), (np.float64, 1e-300)]
)
def test_search_with_extreme_queries_and_rows(dtype, scale):
    rng = np.random.default_rng(11)
    q = rng.standard_normal((12, 16))
    g = rng.standard_normal((50, 16))
    want = brute_topk(q, g, 5)
    qs, gs = (q * scale).astype(dtype), (g * scale).astype(dtype)
    for queries in (qs[:1], qs):  # the streaming and the tiled paths
        scores, idx = afr.cosine_topk(queries, gs, k=5)
        assert np.all(np.isfinite(scores)) and (idx >= 0).all()
        np.testing.assert_array_equal(idx, want[: len(queries)])
    gallery = afr.Gallery(16)
    gallery.add(gs)
    scores, ids = gallery.search(qs, k=5)
    assert np.all(np.isfinite(scores))
    np.testing.assert_array_equal(ids, want)
    who, best = gallery.identify(qs, threshold=-1.0)
    np.testing.assert_array_equal(who, want[:, 0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_self_match_scores_are_never_above_one(dtype):
    rng = np.random.default_rng(16)
    rows = rng.standard_normal((200, 64)).astype(np.float32)
    g = afr.Gallery(64, dtype)
    g.add(rows)
    stored = g.vectors()
    scores, _ = g.search(stored, k=1)
    assert scores.max() <= 1.0
    top, _ = afr.cosine_topk(rows, rows, k=1)
    assert top.max() <= 1.0 and top.min() >= -1.0
    if dtype == "float32":
        who, _ = g.identify(stored, threshold=1.0 - 1e-6)
        assert (who >= 0).all()
