"""arcface_rs.ray.ShardedGallery on a local Ray runtime (ray.init(num_cpus=2)): equal to one
Gallery holding the same rows (ids and scores, ties included) after adds and removes,
save + load into another shard count, a killed actor, concurrent callers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import arcface_rs as afr

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'arcface_rs[ray]')")

OPTIONS = {"num_cpus": 0}  # no CPU reserved: the actors of several tests share 2 CPUs


@pytest.fixture(scope="module")
def runtime():
    try:
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    except Exception as e:  # pragma: no cover - only where Ray cannot start at all
        pytest.skip(f"Ray cannot start here: {e}")
    yield
    ray.shutdown()


def _data(n=600, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[50] = x[10]  # exact ties across shards (ids 10 and 50 land on different shards)
    x[51] = x[10]
    return x, rng


def _same(sharded, one, q, k):
    s1, i1 = sharded.search(q, k)
    s2, i2 = one.search(q, k)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_three_shards_equal_one_gallery_after_adds_and_removes(runtime):
    from arcface_rs.ray import ShardedGallery

    x, rng = _data()
    sg = ShardedGallery(32, "float32", shards=3, actor_options=OPTIONS)
    one = afr.Gallery(32, "float32")
    np.testing.assert_array_equal(sg.add(x[:400]), one.add(x[:400]))
    np.testing.assert_array_equal(sg.add(x[400:]), one.add(x[400:]))
    q = np.vstack([x[10], rng.standard_normal((6, 32)).astype(np.float32)])
    _same(sg, one, q, 5)
    drop = np.array([3, 10, 77, 401])
    assert sg.remove(drop) == one.remove(drop) == 4
    _same(sg, one, q, 12)
    assert len(sg) == len(one) == 596
    ids = sg.add(x[:5], ids=[1000, 1001, 1002, 1003, 1004])
    one.add(x[:5], ids=ids)
    _same(sg, one, q, 8)
    allow = np.array([50, 51, 1000, 7])
    np.testing.assert_array_equal(sg.search(q, 3, allow=allow)[1], one.search(q, 3, allow=allow)[1])
    np.testing.assert_array_equal(sg.identify(q, 0.5)[0], one.identify(q, 0.5)[0])
    a, b = sg.range_search(q, 0.2), one.range_search(q, 0.2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="already in the gallery"):
        sg.add(x[:1], ids=[1000])
    with pytest.raises(ValueError, match="not in the gallery"):
        sg.remove([123456])
    assert len(sg) == len(one)  # the refused calls changed nothing


def test_save_and_load_into_another_shard_count(runtime, tmp_path):
    from arcface_rs.ray import ShardedGallery

    x, rng = _data(seed=1)
    sg = ShardedGallery(32, "float32", shards=3, actor_options=OPTIONS)
    sg.add(x)
    sg.remove(np.arange(0, 600, 7))
    sg.save(tmp_path / "g")
    q = rng.standard_normal((5, 32)).astype(np.float32)
    want = sg.search(q, 10)
    back = ShardedGallery.load(tmp_path / "g", shards=2, actor_options=OPTIONS)
    assert back.shards == 2 and len(back) == len(sg)
    got = back.search(q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(back.add(x[:1]), sg.add(x[:1]))  # next_id carried over


def test_a_killed_actor_is_reported_by_shard_in_bounded_time(runtime):
    from arcface_rs.ray import ShardedGallery

    x, _ = _data(n=60)
    sg = ShardedGallery(32, shards=2, actor_options=OPTIONS)
    sg.add(x)
    ray.kill(sg.actors[1])
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="shard 1"):
        sg.search(x[:2], 3)
    assert time.perf_counter() - t < 60


def test_concurrent_callers_see_whole_batches(runtime):
    from arcface_rs.ray import ShardedGallery

    x, rng = _data(n=400, seed=2)
    sg = ShardedGallery(32, shards=2, actor_options=OPTIONS)
    sg.add(x[:200])
    q = rng.standard_normal((3, 32)).astype(np.float32)
    errors = []

    def reader():
        try:
            for _ in range(10):
                s, i = sg.search(q, 5)
                assert (i >= 0).all() and np.all(np.diff(s, axis=1) <= 0)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    sg.add(x[200:])
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(sg) == 400


# ---------------------------------------------------------------------------------------
# Hostile testing, round three: all-or-nothing adds, ids under one lock, the Gallery's own
# conversions and checks on the caller's side, shard errors as the Gallery raises them.


def test_a_refused_add_leaves_every_shard_as_it_was(runtime):
    from arcface_rs.ray import ShardedGallery

    x, _ = _data(d=16, seed=3)
    sg = ShardedGallery(16, "float32", shards=2, actor_options=OPTIONS)
    sg.add(x[:2])
    bad = x[2:6].copy()
    bad[3] = np.nan  # its home shard would refuse it, the other would take its rows
    with pytest.raises(ValueError, match="emb: row 3"):
        sg.add(bad)
    zero = x[2:6].copy()
    zero[1] = 0.0
    with pytest.raises(ValueError, match="emb: row 1"):
        sg.add(zero)
    assert len(sg) == 2
    np.testing.assert_array_equal(sg.add(x[2:6]), [2, 3, 4, 5])  # no clash on ids


def test_concurrent_adds_never_collide_on_automatic_ids(runtime):
    from arcface_rs.ray import ShardedGallery

    x, _ = _data(d=16, seed=4)
    sg = ShardedGallery(16, "float32", shards=3, actor_options=OPTIONS)
    got, errors = [], []

    def add(part):
        try:
            got.append(sg.add(part))
        except Exception as e:  # collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(x[i * 8 : (i + 1) * 8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = np.concatenate(got)
    assert sorted(ids.tolist()) == list(range(64)) and len(sg) == 64


def test_float64_queries_give_the_gallerys_answer_on_near_ties(runtime):
    from arcface_rs.ray import ShardedGallery

    rng = np.random.default_rng(5)
    base = rng.standard_normal(32)
    # rows that differ from each other below float32's resolution of the queries' values
    rows = base + 1e-9 * rng.standard_normal((40, 32))
    sg = ShardedGallery(32, "float32", shards=3, actor_options=OPTIONS)
    one = afr.Gallery(32, "float32")
    sg.add(rows)
    one.add(rows)
    q = base[None, :] * 1e200 + 1e-9 * rng.standard_normal((12, 32)) * 1e200  # float64 only
    _same(sg, one, q, 5)
    np.testing.assert_array_equal(sg.identify(q, 0.5)[0], one.identify(q, 0.5)[0])


def test_caller_side_checks_and_clean_shard_errors(runtime, tmp_path):
    from arcface_rs.ray import ShardedGallery

    x, _ = _data(d=16, seed=6)
    x = x[:20]
    sg = ShardedGallery(16, "float32", shards=2, actor_options=OPTIONS)
    sg.add(x)
    with pytest.raises(TypeError, match="k"):
        sg.search(x[0], k=2.5)
    with pytest.raises(ValueError, match="k"):
        sg.search(x[0], k=0)
    with pytest.raises(ValueError, match="queries"):
        sg.search(np.ones(7), k=2)
    with pytest.raises(TypeError, match="threshold"):
        sg.identify(x[0], threshold="high")
    with pytest.raises(ValueError, match="allow"):
        sg.search(x[0], k=2, allow=[1.5])
    # empty filters: nothing / everything
    assert (sg.search(x[:2], k=3, allow=[])[1] == -1).all()
    np.testing.assert_array_equal(sg.search(x[:2], k=3, deny=[])[1], sg.search(x[:2], k=3)[1])
    # an error raised inside a shard arrives as the Gallery's own exception
    with pytest.raises(ValueError) as info:
        sg.search(x[0], k=10**12)
    assert type(info.value) is ValueError and "\x1b[" not in str(info.value)
    sg.save(tmp_path / "g")
    with pytest.raises(ValueError, match="shards"):
        ShardedGallery.load(tmp_path / "g", shards=0, actor_options=OPTIONS)
