"""Gallery against a NumPy brute force written here: every storage dtype, both search paths,
ties, k = N, k > N, Q = 1, N = 1, odd dims; add/remove/identify; bad input; threads."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import arcface_rs as afr
from _forking import in_forked_child
from _reference import unit

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def brute(queries, vectors, ids, k, stored=False):
    """Top-k by cosine in float64, ties to the earlier row; ids -1 / -inf pad past N.

    ``stored=True``: ``vectors`` are a gallery's stored rows, unit vectors up to the storage's
    rounding, and the score is the unit query's dot product with them as they are, clamped
    to [-1, 1] as reported cosines are."""
    rows = np.asarray(vectors, dtype=np.float64) if stored else unit(vectors)
    s = np.clip(unit(queries) @ rows.T, -1.0, 1.0)
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
    scores = np.take_along_axis(s, order, 1)
    got_ids = np.asarray(ids)[order]
    pad = k - order.shape[1]
    if pad > 0:
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        got_ids = np.pad(got_ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, got_ids


def clustered(identities, per_identity, dim, noise, seed):
    """Face-like data: a centre per identity and noisy samples around it."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((identities, dim)))
    samples = np.repeat(centres, per_identity, axis=0)
    samples += noise * rng.standard_normal(samples.shape) / np.sqrt(dim)
    return samples.astype(np.float32), centres


def assert_same_topk(scores, ids, want_scores, want_ids, atol):
    """Ids equal the reference's except where reference scores are tied within `atol`.

    The reference holds k + 1 columns, so that the k-th result may also swap with the
    first one past the list (a float64 GEMM can order exact duplicates either way)."""
    k = ids.shape[1]
    assert want_scores.shape[1] == k + 1, "pass brute(..., k + 1)"
    np.testing.assert_allclose(scores, want_scores[:, :k], rtol=0, atol=atol)
    differ = ids != want_ids[:, :k]
    if differ.any():
        # a swap is only allowed between scores the storage precision cannot tell apart
        # (q, k): gap j is between j and j + 1; two -inf paddings (k >= N) give NaN, no tie
        with np.errstate(invalid="ignore"):
            gaps = np.abs(np.diff(want_scores, axis=1))
        near_tie = gaps <= 2 * atol
        near_tie[:, 1:] |= gaps[:, :-1] <= 2 * atol
        assert not (differ & ~near_tie).any(), np.argwhere(differ & ~near_tie)[:5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 8, 9, 40, 300])  # 300: the int8 first pass
def test_search_equals_brute_force_over_the_stored_vectors(dtype, q):
    rng = np.random.default_rng(q)
    emb = rng.standard_normal((3000, 33)).astype(np.float32)
    queries = rng.standard_normal((q, 33)).astype(np.float32)
    g = afr.Gallery(33, dtype)
    ids = rng.permutation(10**6)[:3000]
    g.add(emb, ids=ids)
    scores, got = g.search(queries, k=10)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (q, 10)
    # The stored (possibly compressed) vectors are what is searched, exactly.
    want_s, want_i = brute(queries, g.vectors(), g.ids(), 11, stored=True)
    assert_same_topk(scores, got, want_s, want_i, atol=2e-6)
    if dtype == "float32":
        # and a float32 gallery is the exact search over what was added
        want_s, want_i = brute(queries, emb, ids, 11)
        assert_same_topk(scores, got, want_s, want_i, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compressed_galleries_keep_recall_on_clustered_data(dtype):
    emb, centres = clustered(400, 5, 128, noise=0.8, seed=1)
    rng = np.random.default_rng(2)
    probes = centres[rng.integers(0, 400, 50)] + 0.8 * rng.standard_normal((50, 128)) / 11.3
    g = afr.Gallery(128, dtype)
    g.add(emb)
    _, got = g.search(probes.astype(np.float32), k=10)
    _, want = brute(probes, emb, np.arange(len(emb)), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= {"float32": 1.0, "float16": 0.998, "bfloat16": 0.98, "int8": 0.99}[dtype]


@pytest.mark.parametrize("q", [1, 20])
def test_exact_ties_go_to_the_row_added_first(q):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((30, 16)).astype(np.float32)
    g = afr.Gallery(16)
    ids = np.array([900 - i for i in range(120)])  # descending: ties must not go to low ids
    g.add(np.repeat(base, 4, axis=0), ids=ids)
    _, got = g.search(base[:q], k=4)
    for r in range(q):
        assert list(got[r]) == list(ids[4 * r : 4 * r + 4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_equal_to_and_beyond_the_gallery(dtype):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((5, 7)).astype(np.float32)
    g = afr.Gallery(7, dtype)
    g.add(emb)
    for k in (5, 9):
        scores, ids = g.search(emb[:2], k=k)
        want_s, want_i = brute(emb[:2], g.vectors(), g.ids(), k, stored=True)
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, atol=2e-6)
    assert list(ids[0, 5:]) == [-1] * 4 and np.all(np.isneginf(scores[:, 5:]))


def test_single_query_and_single_row():
    g = afr.Gallery(3)
    g.add(np.array([1.0, 2.0, 2.0]), ids=[42])
    scores, ids = g.search(np.array([2.0, 4.0, 4.0]), k=3)
    assert scores.shape == (3,) and list(ids) == [42, -1, -1]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    who, score = g.identify(np.array([0.0, 0.0, 1.0]), threshold=0.5)
    assert who == 42 and score == pytest.approx(2 / 3, abs=1e-6)
    who, _ = g.identify(np.array([0.0, 1.0, -1.0]), threshold=0.5)
    assert who == -1


@given(
    n=st.integers(1, 60),
    d=st.integers(1, 40),
    q=st.integers(1, 12),
    k=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
@example(n=22, d=34, q=9, k=9, dtype="bfloat16", seed=0)  # duplicates at ranks k and k + 1
def test_property_search_equals_brute_force(n, d, q, k, dtype, seed):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    # some exact duplicates, to exercise ties
    emb[n // 2 :: 3] = emb[0]
    queries = rng.standard_normal((q, d)).astype(np.float32)
    g = afr.Gallery(d, dtype)
    g.add(emb)
    scores, ids = g.search(queries, k=k)
    want_s, want_i = brute(queries, g.vectors(), g.ids(), k + 1, stored=True)
    assert_same_topk(scores, ids, want_s, want_i, atol=2e-6)


def test_identify_matches_brute_force_top1():
    emb, centres = clustered(50, 3, 32, noise=0.5, seed=4)
    g = afr.Gallery(32)
    g.add(emb, ids=np.arange(1000, 1150))
    rng = np.random.default_rng(5)
    probes = np.vstack([centres[:10], rng.standard_normal((10, 32))]).astype(np.float32)
    who, scores = g.identify(probes, threshold=0.6)
    want_s, want_i = brute(probes, emb, np.arange(1000, 1150), 1)
    np.testing.assert_allclose(scores, want_s[:, 0], atol=2e-6)
    np.testing.assert_array_equal(who, np.where(want_s[:, 0] >= 0.6, want_i[:, 0], -1))
    assert (who[:10] >= 1000).all() and (who[10:] == -1).all()


def test_add_remove_and_automatic_ids():
    rng = np.random.default_rng(6)
    g = afr.Gallery(8, "int8")
    first = g.add(rng.standard_normal((4, 8)))
    assert list(first) == [0, 1, 2, 3] and first.dtype == np.int64
    assert list(g.add(rng.standard_normal((2, 8)), ids=[100, 7])) == [100, 7]
    assert list(g.add(rng.standard_normal((1, 8)))) == [101]
    with pytest.raises(ValueError, match="ids.*already in the gallery or given twice"):
        g.add(rng.standard_normal((2, 8)), ids=[200, 3])
    with pytest.raises(ValueError, match="given twice"):
        g.add(rng.standard_normal((2, 8)), ids=[300, 300])
    assert len(g) == 7  # all or nothing
    with pytest.raises(ValueError, match="id 55 is not in the gallery"):
        g.remove([1, 55])
    assert len(g) == 7
    assert g.remove([1, 100]) == 2
    assert list(g.ids()) == [0, 2, 3, 7, 101]
    vecs = g.vectors()
    _, ids = g.search(vecs, k=5)
    assert not np.isin(ids, [1, 100]).any()
    assert list(ids[:, 0]) == [0, 2, 3, 7, 101]
    assert list(g.add(rng.standard_normal(8))) == [102]  # never reuses a removed id


def test_repr_and_properties():
    g = afr.Gallery(512, "float16")
    g.add(np.ones((3, 512)))
    assert repr(g) == "Gallery(dim=512, dtype='float16', len=3, vectors=0.0 MiB)"
    assert (g.dim, g.dtype, len(g), g.nbytes) == (512, "float16", 3, 3 * 512 * 2)
    assert afr.Gallery(4, "int8").add(np.ones((2, 4))).tolist() == [0, 1]


def test_layouts_are_read_through_their_strides():
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((40, 12))
    queries = rng.standard_normal((5, 24))[:, ::2]  # non-contiguous
    a, b = afr.Gallery(12), afr.Gallery(12)
    a.add(np.asfortranarray(emb))
    b.add(np.ascontiguousarray(emb))
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    ra, rb = a.search(queries, 3), b.search(np.ascontiguousarray(queries), 3)
    np.testing.assert_array_equal(ra[1], rb[1])
    np.testing.assert_array_equal(ra[0], rb[0])


def test_float64_rows_of_any_magnitude_are_normalised_not_overflowed():
    g = afr.Gallery(3)
    g.add(np.array([[1e300, 0.0, 0.0], [0.0, 1e-300, 0.0]]))
    np.testing.assert_allclose(g.vectors(), [[1, 0, 0], [0, 1, 0]], atol=1e-7)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda g: g.search(np.ones((1, 4)), k=0), ValueError, "k must be >= 1"),
        (lambda g: g.search(np.ones((1, 4)), k=2.0), TypeError, "k must be an int"),
        (lambda g: g.search(np.ones((1, 5)), k=1), ValueError, "queries must have 4 columns"),
        (lambda g: g.search(np.full((1, 4), np.nan), k=1), ValueError, "queries: row 0.*NaN"),
        (lambda g: g.search(np.zeros((2, 4)), k=1), ValueError, "queries: row 0.*zeros"),
        (lambda g: g.search(np.ones((0, 4)), k=1), ValueError, "queries: empty"),
        (lambda g: g.search(np.ones((1, 4), dtype=int), k=1), TypeError, "queries.*float"),
        (lambda g: g.add(np.ones((1, 3))), ValueError, "emb must have 4 columns"),
        (lambda g: g.add([[1.0, np.inf, 0, 0]]), ValueError, "emb: row 0.*NaN or inf"),
        (lambda g: g.add(np.zeros((1, 4))), ValueError, "emb: row 0.*zeros"),
        (lambda g: g.add(np.ones((2, 4)), ids=[1.0, 2.0]), TypeError, "ids must be an integer"),
        (lambda g: g.add(np.ones((2, 4)), ids=[1]), ValueError, "ids has 1 entries for 2"),
        (lambda g: g.add(np.ones((1, 4), dtype=np.complex64)), TypeError, "emb.*float"),
        (lambda g: g.identify(np.ones(4), threshold=np.nan), ValueError, "threshold"),
        (lambda g: g.identify(np.ones(4), threshold="0.3"), TypeError, "threshold"),
        (lambda g: g.remove([[1]]), ValueError, "ids must be 1-D"),
    ],
)
def test_bad_input_is_a_clear_error(call, exc, match):
    g = afr.Gallery(4)
    g.add(np.eye(4))
    with pytest.raises(exc, match=match):
        call(g)
    assert len(g) == 4


def test_bad_construction_and_empty_gallery():
    with pytest.raises(ValueError, match="dim must be >= 1"):
        afr.Gallery(0)
    with pytest.raises(TypeError, match="dim must be an int"):
        afr.Gallery(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be one of"):
        afr.Gallery(4, "float64")
    g = afr.Gallery(4)  # an empty gallery searches as padding, as faiss does
    scores, ids = g.search(np.ones(4), 1)
    assert ids.tolist() == [-1] and np.isneginf(scores).all()
    who, best = g.identify(np.ones(4), 0.5)
    assert who == -1 and np.isneginf(best)


def test_many_threads_never_see_a_half_done_add_or_remove():
    """Batches are added and removed whole while other threads search: a search finds all
    of a batch or none of it, never part."""
    dim, batch = 64, 50
    g = afr.Gallery(dim)
    rng = np.random.default_rng(8)
    g.add(rng.standard_normal((20000, dim)) * 0.01 + np.ones(dim))  # background rows
    errors: list[str] = []
    stop = threading.Event()

    def direction(b):
        v = np.zeros(dim, dtype=np.float32)
        v[b] = 1.0
        return v

    def writer(offset):
        for rep in range(15):
            for b in range(offset, dim, 4):
                ids = np.arange(batch) + 10**6 * (b + 1) + 10**4 * rep
                g.add(np.tile(direction(b), (batch, 1)), ids=ids)
                g.remove(ids)
        stop.set()

    def searcher(seed):
        r = np.random.default_rng(seed)
        while not stop.is_set():
            b = int(r.integers(0, dim))
            scores, ids = g.search(direction(b)[None, :].repeat(12 if seed % 2 else 1, 0), batch)
            hits = ids[0][scores[0] > 0.999]
            if len(hits) not in (0, batch):
                errors.append(f"saw {len(hits)} of batch {b}")
            elif len(hits) and len({int(i) // 10**4 for i in hits}) != 1:
                errors.append(f"mixed batches for {b}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]
    assert len(g) == 20000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_while_other_threads_use_the_gallery_finds_it_free():
    """A fork waits for the gallery calls in flight in other threads (they hold its lock
    without the GIL), so the child can add, remove and search; a child forked in the
    middle of one used to wait forever on the lock of a thread it does not have."""
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((100000, 64)).astype(np.float32)
    g = afr.Gallery(64)
    g.add(rows)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            ids = g.add(rows[:20000])
            g.remove(ids)

    def searcher():
        while not stop.is_set():
            g.search(rows[:64], k=5)

    def child():
        n = len(g)  # the writers' rows may be in, as the fork found them
        ids = g.add(rows[:3])
        assert g.search(rows[:3], k=1)[1][:, 0].tolist() == list(range(3))
        assert g.remove(ids) == 3 and len(g) == n

    threads = [threading.Thread(target=f) for f in (writer, writer, searcher)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            time.sleep(0.05)
            report = in_forked_child(child, limit=30.0)
            assert report is None, report
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(g) == 100000


# ---------------------------------------------------------------------------------------
# Sizes from the caller, filters given as lists, copies (hostile testing, round three).


@pytest.mark.parametrize("dim", [2**24 + 1, 2**61, 2**62, 2**64 + 3])
def test_dims_no_row_could_hold_are_refused_before_anything_runs(dim, run_isolated):
    """A dim of 2**61 used to build a gallery whose vectors()/snapshot()/get([]) segfaulted
    (the row size overflowed); run in a fresh process so a crash fails only this test."""
    out = run_isolated(
        f"""
        import arcface_rs as afr
        try:
            g = afr.Gallery({dim})
        except ValueError as e:
            assert "dim" in str(e), e
            print("refused")
        else:
            g.vectors(); g.snapshot(); g.get([])
            print("built")
        """
    )
    assert out.returncode == 0 and "refused" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_the_largest_dim_is_accepted():
    g = afr.Gallery(afr._core.GALLERY_MAX_DIM, "int8")
    assert g.dim == 2**24 and g.vectors().shape == (0, 2**24)
    assert g.get([]).shape == (0, 2**24)


def test_adding_more_rows_than_memory_holds_is_a_memory_error_and_adds_nothing(run_isolated):
    """np.broadcast_to claims 2**34 rows in 32 bytes; the add used to abort the interpreter
    in the allocator ("memory allocation of 137438953472 bytes failed")."""
    out = run_isolated(
        """
        import numpy as np, arcface_rs as afr
        g = afr.Gallery(8)
        g.add(np.ones((3, 8), np.float32))
        row = np.ones(8, np.float32)
        try:
            g.add(np.broadcast_to(row, (2**34, 8)))
        except MemoryError as e:
            assert "emb" in str(e), e
        assert len(g) == 3, len(g)
        assert g.search(row, k=2)[1].tolist() == [0, 1]
        print("ok")
        """
    )
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_lists_are_filters_that_let_nothing_or_everything_through(dtype):
    rng = np.random.default_rng(11)
    g = afr.Gallery(16, dtype)
    g.add(rng.standard_normal((30, 16)))
    q = rng.standard_normal((2, 16))
    scores, ids = g.search(q, k=4, allow=[])
    assert (ids == -1).all() and np.isneginf(scores).all()
    np.testing.assert_array_equal(g.search(q, k=4, deny=[])[1], g.search(q, k=4)[1])
    ids, best = g.identify(q, threshold=-1.0, allow=[])
    assert (ids == -1).all()
    np.testing.assert_array_equal(g.identify(q, 0.0, deny=[])[0], g.identify(q, 0.0)[0])
    assert g.get([]).shape == (0, 16) and g.get([]).dtype == np.float32
    assert g.get(np.array([], dtype=np.uint8)).shape == (0, 16)
    with pytest.raises(ValueError, match="allow"):
        g.search(q, k=2, allow=[1.5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pickle_and_copies_are_independent_galleries(dtype):
    import copy
    import pickle

    rng = np.random.default_rng(12)
    g = afr.Gallery(12, dtype)
    g.add(rng.standard_normal((25, 12)), ids=np.arange(100, 125))
    g.remove([103, 117])
    q = rng.standard_normal((4, 12))
    want = g.search(q, k=5)
    for clone in (pickle.loads(pickle.dumps(g)), copy.deepcopy(g), copy.copy(g)):
        assert type(clone) is afr.Gallery and clone.dtype == dtype and clone.dim == 12
        np.testing.assert_array_equal(clone.ids(), g.ids())
        np.testing.assert_array_equal(clone.vectors(), g.vectors())
        got = clone.search(q, k=5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        # automatic ids continue where the original's would
        assert clone.add(rng.standard_normal(12))[0] == 125
        clone.remove([100])
        assert len(g) == 23 and 100 in g.ids() and 125 not in g.ids()
    with pytest.raises(afr.GalleryFileError):
        afr._core.Gallery.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


# sizes beyond any gallery (from the reliability rounds)
BIG_KS = [10**12, 2**62, 2**63 - 1]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("k", BIG_KS)
def test_gallery_search_huge_k_is_a_value_error(dtype, k):
    g = afr.Gallery(8, dtype)
    g.add(np.random.default_rng(3).standard_normal((30, 8)))
    with pytest.raises(ValueError, match="k"):
        g.search(np.ones(8), k=k)
    # still usable afterwards
    assert g.search(np.ones(8), k=3)[1].shape == (3,)


def test_negative_ids_are_refused_and_nothing_is_added():
    g = afr.Gallery(4)
    with pytest.raises(ValueError, match="negative"):
        g.add(np.eye(4), ids=[0, 1, -5, 3])
    assert len(g) == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_empty_gallery_searches_as_padding(dtype):
    g = afr.Gallery(4, dtype)
    scores, ids = g.search(np.ones((2, 4)), k=3)
    assert ids.shape == (2, 3) and (ids == -1).all() and np.isneginf(scores).all()
    who, best = g.identify(np.ones(4), threshold=0.0)
    assert who == -1 and np.isneginf(best)
    scores, idx = afr.cosine_topk(np.ones((1, 4)), np.zeros((0, 4)), k=2)
    assert (idx == -1).all()


def test_remove_refuses_duplicates_and_empty_input_is_a_no_op():
    g = afr.Gallery(4)
    g.add(np.eye(4) + 0.1)
    with pytest.raises(ValueError, match="twice"):
        g.remove([1, 1])
    assert len(g) == 4
    assert g.remove([]) == 0
    assert len(g.add([], ids=[])) == 0
    assert len(g.add(np.zeros((0, 4)))) == 0
    assert len(g) == 4


def test_snapshot_is_consistent_under_concurrent_writers():
    rng = np.random.default_rng(20)
    g = afr.Gallery(8)
    rows = rng.standard_normal((400, 8))
    g.add(rows[:200], ids=np.arange(200))
    want = {i: r / np.linalg.norm(r) for i, r in enumerate(rows)}
    stop = threading.Event()

    def writer():
        i = 200
        while not stop.is_set() and i < 400:
            g.add(rows[i], ids=[i])
            g.remove([i - 200])
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(50):
            ids, vectors = g.snapshot()
            assert len(ids) == len(vectors)
            for i, v in zip(ids[:20], vectors[:20]):
                np.testing.assert_allclose(v, want[int(i)], atol=1e-6)
    finally:
        stop.set()
        t.join()
