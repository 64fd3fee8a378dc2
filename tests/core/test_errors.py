"""Bad input raises a clear ValueError/TypeError naming the argument, never a crash."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import arcface_rs as afr
from _reference import make_problem
from arcface_rs import metrics

EMB, WEIGHT, LABELS = make_problem(6, 5, 10, seed=0)


def loss(emb=EMB, weight=WEIGHT, labels=LABELS, margin=None, **kw):
    return afr.margin_loss(emb, weight, labels, margin or afr.ArcFace(), **kw)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"emb": EMB[0]}, ValueError, "emb must be 2-D"),
        ({"weight": WEIGHT[None]}, ValueError, "weight must be 2-D"),
        ({"emb": EMB[:0], "labels": LABELS[:0]}, ValueError, "emb: empty batch"),
        ({"weight": WEIGHT[:, :4]}, ValueError, "weight: has 4 columns but emb has 5"),
        ({"weight": WEIGHT[:0]}, ValueError, "weight: has no classes"),
        ({"labels": LABELS[:5]}, ValueError, "labels: has 5 entries but emb has 6 rows"),
        (
            {"labels": np.r_[LABELS[:5], 10]},
            ValueError,
            r"labels: value 10 at index 5 is outside \[-1, 10\)",
        ),
        ({"labels": np.r_[LABELS[:5], -2]}, ValueError, "labels: value -2"),
        ({"labels": LABELS.astype(float)}, TypeError, "labels must be an integer array"),
        ({"labels": LABELS[:, None]}, ValueError, "labels must be 1-D"),
        ({"emb": EMB.astype(np.float32)}, TypeError, "must share one dtype"),
        ({"emb": EMB.astype(np.int64)}, TypeError, "emb must have dtype float32 or float64"),
        ({"emb": EMB.astype(np.float16)}, TypeError, "emb must have dtype float32 or float64"),
        (
            {"emb": np.where(np.arange(5) == 2, np.nan, EMB)},
            ValueError,
            "emb: row 0 contains NaN or inf",
        ),
        (
            {"weight": np.where(np.arange(5) == 2, np.inf, WEIGHT)},
            ValueError,
            "weight: row 0 contains NaN or inf",
        ),
        (
            {"emb": np.vstack([EMB[:3], np.zeros(5), EMB[4:]])},
            ValueError,
            "emb: row 3 is all zeros",
        ),
        (
            {"weight": np.vstack([WEIGHT[:7], np.zeros(5), WEIGHT[8:]])},
            ValueError,
            "weight: row 7 is all zeros",
        ),
        ({"margin": "arcface"}, TypeError, "margin must be an arcface_rs margin"),
        ({"reduction": "avg"}, ValueError, "reduction must be"),
    ],
)
def test_margin_loss_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        loss(**kwargs)


def test_other_entry_points_reject_bad_input():
    with pytest.raises(ValueError, match=r"grad_logits: has shape \(6, 9\), expected \(6, 10\)"):
        afr.margin_logits_backward(np.zeros((6, 9)), EMB, WEIGHT, LABELS, afr.ArcFace())
    with pytest.raises(ValueError, match="grad_logits: row 1 contains NaN"):
        g = np.zeros((6, 10))
        g[1, 3] = np.nan
        afr.margin_logits_backward(g, EMB, WEIGHT, LABELS, afr.ArcFace())
    with pytest.raises(ValueError, match="cos: row 0 has a value"):
        afr.apply_margin(np.full((2, 3), 1.5), [0, 1], afr.ArcFace())
    with pytest.raises(ValueError, match="cos: row 1 has a value"):
        afr.apply_margin(np.array([[0.1, 0.2], [np.nan, 0.0]]), [0, 1], afr.ArcFace())
    with pytest.raises(ValueError, match="SphereFace"):
        afr.apply_margin(np.zeros((2, 3)), [0, 1], afr.SphereFace())
    with pytest.raises(ValueError, match="labels: value 3"):
        afr.apply_margin(np.zeros((2, 3)), [0, 3], afr.ArcFace())
    with pytest.raises(ValueError, match="cos: empty batch"):
        afr.apply_margin(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), afr.ArcFace())
    with pytest.raises(TypeError, match="share one dtype"):
        afr.apply_margin_backward(
            np.zeros((2, 3), np.float32), np.zeros((2, 3)), [0, 1], afr.CosFace()
        )


def test_native_module_refuses_what_it_cannot_read():
    from arcface_rs import _core

    spec = afr.ArcFace().spec
    with pytest.raises(TypeError, match="emb must be a 2-D numpy array of float32 or float64"):
        _core.margin_loss(EMB.astype(np.float16), WEIGHT, LABELS, spec, "mean")
    with pytest.raises(TypeError):
        _core.margin_loss(EMB, WEIGHT, LABELS.astype(np.int32), spec, "mean")
    with pytest.raises(ValueError, match="reduction"):
        _core.margin_loss(EMB, WEIGHT, LABELS, spec, "avg")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: afr.ArcFace(m=-0.1), "m: must be in"),
        (lambda: afr.ArcFace(s=0), "s: must be a finite number > 0"),
        (lambda: afr.ArcFace(s=float("nan")), "s: must be"),
        (lambda: afr.CosFace(m=-1), "m: must be"),
        (lambda: afr.SphereFace(m=5), "m: must be an integer in 1..=4"),
        (lambda: afr.SphereFace(m=2.5), "m: must be an integer"),
        (lambda: afr.SphereFace(m=0), "m: must be an integer"),
        (lambda: afr.SphereFace(s=-3.0), "s: must be"),
        (lambda: afr.SphereFace(lambda_=-1), "lambda_: must be"),
        (lambda: afr.CombinedMargin(m1=0), "m1: must be"),
        (lambda: afr.CombinedMargin(m2=4), "m2: must be"),
        (lambda: afr.CombinedMargin(m3=-0.1), "m3: must be"),
        (lambda: afr.Softmax(s=-1), "s: must be"),
    ],
)
def test_margin_constructors_validate(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_margin_constructor_type_errors():
    with pytest.raises(TypeError, match="s must be a real number"):
        afr.ArcFace(s="64")
    with pytest.raises(TypeError, match="m must be an integer"):
        afr.SphereFace(m=True)


def test_margin_objects_are_values():
    m = afr.ArcFace(s=32.0, m=0.4)
    assert repr(m) == "ArcFace(s=32.0, m=0.4, easy_margin=False)"
    assert repr(afr.SphereFace()) == "SphereFace(m=4, s=None, lambda_=0.0)"
    assert m == afr.ArcFace(s=32, m=0.4) and m != afr.ArcFace() and m != afr.CosFace()
    assert hash(m) == hash(afr.ArcFace(s=32.0, m=0.4))
    clone = pickle.loads(pickle.dumps(m))
    assert clone == m and clone.psi(0.3) == m.psi(0.3)
    with pytest.raises(AttributeError):
        m.s = 10.0
    assert afr.SphereFace(m=4.0).m == 4
    assert afr.SphereFace().scale is None and afr.CosFace(s=30).scale == 30.0


# ---------------------------------------------------------------------------------------
# Sizes a caller can claim without holding them (a broadcast array) or that the address
# space cannot take: a MemoryError naming the argument, never an abort in the allocator.


def test_a_weight_of_more_rows_than_memory_holds_is_a_memory_error(run_isolated):
    out = run_isolated(
        """
        import numpy as np, arcface_rs as afr
        emb = np.ones((2, 8), np.float32)
        weight = np.broadcast_to(np.ones(8, np.float32), (2**33, 8))
        for call in (afr.margin_loss, afr.margin_logits):
            try:
                call(emb, weight, [0, 1], afr.ArcFace())
            except MemoryError as e:
                assert "weight" in str(e), e
            else:
                raise AssertionError("no error")
        cos = np.broadcast_to(np.float32(0.5), (2**20, 2**20))
        try:
            afr.apply_margin(cos, np.zeros(2**20, np.int64), afr.CosFace())
        except MemoryError as e:
            assert "cos" in str(e), e
        # and the library still works
        afr.margin_loss(emb, np.ones((3, 8), np.float32), [0, 1], afr.ArcFace())
        print("ok")
        """
    )
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("classes", [2**28, 2**30])
def test_outputs_beyond_the_address_space_limit_are_memory_errors(classes, run_isolated):
    """Under ``ulimit -v`` (3 GiB here) MemAvailable still says the machine has room; the
    address space left is what decides."""
    out = run_isolated(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import numpy as np, arcface_rs as afr
        emb = np.ones((4, 8), np.float32)
        weight = np.broadcast_to(np.arange(1, 9, dtype=np.float32), ({classes}, 8))
        for call in (afr.margin_logits, afr.margin_loss):
            try:
                call(emb, weight, [0, 1, 2, 3], afr.ArcFace())
            except MemoryError as e:
                assert "weight" in str(e), e
            else:
                raise AssertionError("no error")
        print("ok")
        """
    )
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_a_rust_panic_is_a_runtime_error_not_panic_exception():
    with pytest.raises(RuntimeError, match="boom"):
        afr._core._panic_for_tests("boom")
    # and the pool keeps working
    afr.cosine_topk(np.ones((20, 4)), np.eye(4), k=2)


def test_messages_say_what_is_really_wrong():
    g = np.ones((3, 4))
    g[1] = 0.0
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        afr.cosine_topk(np.ones((1, 4)), g, k=2)
    g[1] = np.inf
    with pytest.raises(ValueError, match="row 1 contains NaN or inf"):
        afr.cosine_topk(np.ones((1, 4)), g, k=2)


def test_friendly_errors():
    rng = np.random.default_rng(17)
    scores, same = rng.standard_normal(100), rng.random(100) < 0.5
    with pytest.raises(ValueError, match="folds"):
        metrics.verification(scores, same, folds=-1)
    with pytest.raises(ValueError, match="far"):
        metrics.verification(scores, same, far=(float("nan"),))
    probes = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match="fpir"):
        metrics.identification(probes, [0, 1, 2], probes, [0, 1, 2], fpir=(float("nan"),))
    with pytest.raises(ValueError, match="gallery"):
        metrics.identification(probes, [0, 1, 2], np.zeros((0, 4)), np.zeros(0, np.int64))


def test_big_endian_arrays_are_converted():
    rng = np.random.default_rng(18)
    q, g = rng.standard_normal((2, 8)), rng.standard_normal((30, 8))
    want = afr.cosine_topk(q, g, k=3)
    got = afr.cosine_topk(q.astype(">f8"), g.astype(">f8"), k=3)
    np.testing.assert_array_equal(got[1], want[1])
    emb, weight, labels = make_problem(3, 8, 4, seed=19)
    a = afr.margin_loss(emb, weight, labels, afr.ArcFace())
    b = afr.margin_loss(
        emb.astype(">f8"), weight.astype(">f8"), labels.astype(">i8"), afr.ArcFace()
    )
    assert a[0] == b[0]
