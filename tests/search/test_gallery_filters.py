"""Gallery.search/identify with allow and deny lists, range_search and get, against brute
force over the same rows, for every storage dtype and on every search path (one query,
a few, and the many-query int8 pass)."""

from __future__ import annotations

import numpy as np
import pytest

import arcface_rs as afr

DTYPES = ("float32", "float16", "bfloat16", "int8")


def _gallery(dtype, n=3000, d=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # unsorted, sparse ids
    g = afr.Gallery(d, dtype)
    g.add(x, ids=ids)
    return g, ids, rng


def _brute(g, q, k, keep):
    ids, v = g.snapshot()
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ v.T
    scores[:, ~keep(ids)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries", [1, 5, 50, 300])  # stream, tiles, int8 pass
def test_allow_and_deny_equal_brute_force_over_the_same_rows(dtype, queries):
    g, ids, rng = _gallery(dtype)
    q = rng.standard_normal((queries, 48)).astype(np.float32)
    allowed = rng.choice(ids, 300, replace=False)
    for kw, keep in (
        ({"allow": allowed}, lambda i: np.isin(i, allowed)),
        ({"deny": allowed}, lambda i: ~np.isin(i, allowed)),
    ):
        scores, got = g.search(q, k=7, **kw)
        want_scores, want = _brute(g, q, 7, keep)
        assert np.all(np.isin(got, allowed) == ("allow" in kw))
        if dtype == "float32":
            np.testing.assert_array_equal(got, want)
        else:  # compare the scores: the storage rounds, so near-ties may swap
            np.testing.assert_allclose(scores, want_scores, atol=2e-2)
        best, s1 = g.identify(q, threshold=-1.0, **kw)
        np.testing.assert_array_equal(best, got[:, 0])


def test_an_allow_list_smaller_than_k_pads_and_unknown_ids_are_ignored():
    g, ids, rng = _gallery("float32", n=500)
    q = rng.standard_normal((2, 48)).astype(np.float32)
    scores, got = g.search(q, k=5, allow=np.array([ids[3], ids[9], -77, 10**12]))
    assert set(got[0, :2]) == {ids[3], ids[9]} and (got[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()
    with pytest.raises(ValueError, match="allow, deny"):
        g.search(q, k=3, allow=ids[:3], deny=ids[3:6])
    with pytest.raises(ValueError, match="allow: must be a 1-D array of integer ids"):
        g.search(q, k=3, allow=np.zeros((2, 2), dtype=np.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_range_search_returns_exactly_the_rows_above_the_threshold(dtype):
    g, ids, rng = _gallery(dtype)
    q = rng.standard_normal((4, 48)).astype(np.float32)
    lims, scores, got = g.range_search(q, 0.3)
    assert lims.shape == (5,) and lims[0] == 0 and lims[-1] == len(got) == len(scores)
    _, v = g.snapshot()
    exact = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ v.T
    for i in range(4):
        s, r = scores[lims[i] : lims[i + 1]], got[lims[i] : lims[i + 1]]
        assert np.all(np.diff(s) <= 0) and np.all(s > 0.3)
        # the same set as brute force on the decoded vectors (the storage's own scores)
        want = set(ids[exact[i] > 0.3])
        if dtype == "float32":
            assert set(r) == want
        else:
            assert len(set(r) ^ want) <= max(2, len(want) // 50)
    empty = g.range_search(q, 0.999)
    assert empty[0].tolist() == [0, 0, 0, 0, 0]


def test_get_returns_the_stored_vectors_in_the_order_asked():
    g, ids, _ = _gallery("float16", n=200)
    all_ids, v = g.snapshot()
    pick = all_ids[[5, 0, 199, 5]]
    np.testing.assert_array_equal(g.get(pick), v[[5, 0, 199, 5]])
    with pytest.raises(ValueError, match=r"ids: not in the gallery: \[-3\]"):
        g.get(np.array([all_ids[0], -3]))


def test_allow_with_counted_ids_and_after_a_removal():
    """Ids counted up from 0 are their own rows (no lookups); after a removal they are not."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((800, 24)).astype(np.float32)
    g = afr.Gallery(24, "float32")
    g.add(x)
    q = rng.standard_normal((3, 24)).astype(np.float32)
    allowed = rng.choice(800, 90, replace=False)

    def check(allowed):
        _, got = g.search(q, k=6, allow=allowed)
        _, want = _brute(g, q, 6, lambda i: np.isin(i, allowed))
        np.testing.assert_array_equal(got, want)

    check(allowed)
    g.remove(allowed[:1])  # ids and rows part: lookups from now on
    check(allowed[1:])
    check(allowed)  # a removed id in the list is ignored
