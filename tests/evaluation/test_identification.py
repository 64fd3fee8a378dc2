"""Identification (CMC, TPIR@FPIR) against a NumPy brute force written here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import arcface_rs as afr
from _reference import unit
from arcface_rs import metrics
from arcface_rs.metrics import identification


def brute_ranks(probes, probe_labels, gallery, gallery_labels, distractors, max_rank):
    s = unit(probes) @ unit(gallery).T
    d = (
        unit(probes) @ unit(distractors).T
        if distractors is not None
        else np.zeros((len(probes), 0))
    )
    ranks = []
    for i, y in enumerate(probe_labels):
        mates = gallery_labels == y
        if not mates.any():
            continue
        best = s[i, mates].max()
        above = (s[i, ~mates] >= best).sum() + (d[i] >= best).sum()
        ranks.append(min(above + 1, max_rank + 1))
    return np.array(ranks)


def make(seed, ids=40, per_id=3, probes_per_id=2, d=16, unknown=30, noise=0.8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids + unknown, d))
    gallery = np.repeat(centres[:ids], per_id, axis=0) + noise * rng.standard_normal(
        (ids * per_id, d)
    )
    gallery_labels = np.repeat(np.arange(ids), per_id)
    probe_ids = np.r_[np.repeat(np.arange(ids), probes_per_id), ids + np.arange(unknown)]
    probes = centres[probe_ids] + noise * rng.standard_normal((len(probe_ids), d))
    return probes, probe_ids, gallery, gallery_labels


@pytest.mark.parametrize("with_distractors", [False, True])
def test_cmc_equals_brute_force_ranking(with_distractors):
    probes, plab, gallery, glab = make(0)
    rng = np.random.default_rng(1)
    distractors = rng.standard_normal((500, 16)) if with_distractors else None
    with pytest.warns(RuntimeWarning, match="non-mated"):  # 30 cannot resolve FPIR 1e-3
        rep = identification(probes, plab, gallery, glab, distractors, ranks=(1, 2, 5, 10))
    want = brute_ranks(probes, plab, gallery, glab, distractors, 10)
    np.testing.assert_array_equal(np.sort(rep.ranks), np.sort(want))
    for r in (1, 2, 5, 10):
        assert rep.cmc[r] == np.mean(want <= r)
    assert rep.rank1 == rep.cmc[1]
    assert rep.mated_probes == 80 and rep.non_mated_probes == 30


def test_tpir_at_fpir_matches_its_definition():
    probes, plab, gallery, glab = make(2, unknown=200)
    rep = identification(probes, plab, gallery, glab, fpir=(0.01, 0.1, 0.5))
    s = unit(probes) @ unit(gallery).T
    top = s.argmax(axis=1)
    top_score = s.max(axis=1)
    enrolled = np.isin(plab, glab)
    non = np.sort(top_score[~enrolled])[::-1]
    for f, tpir in rep.tpir_at_fpir.items():
        t = non[int(np.floor(f * len(non)))]
        assert np.mean(top_score[~enrolled] > t) <= f
        hit = (glab[top[enrolled]] == plab[enrolled]) & (top_score[enrolled] > t)
        assert tpir == pytest.approx(np.mean(hit))


def test_tpir_nan_when_too_few_non_mated_probes():
    probes, plab, gallery, glab = make(3, unknown=5)
    with pytest.warns(RuntimeWarning, match="non-mated"):
        rep = identification(probes, plab, gallery, glab, fpir=(1e-3, 0.5))
    assert np.isnan(rep.tpir_at_fpir[1e-3]) and not np.isnan(rep.tpir_at_fpir[0.5])


def test_bad_input():
    probes, plab, gallery, glab = make(4)
    with pytest.raises(ValueError, match="probe_labels must be 1-D"):
        identification(probes, plab[:3], gallery, glab)
    with pytest.raises(TypeError, match="gallery_labels must be integers"):
        identification(probes, plab, gallery, glab.astype(float))
    with pytest.raises(ValueError, match="ranks"):
        identification(probes, plab, gallery, glab, ranks=(0,))
    with pytest.raises(ValueError, match="gallery: has 8 columns"):
        identification(probes, plab, gallery[:, :8], glab)


def test_closed_set_has_no_tpir_and_no_warning(recwarn):
    probes, plab, gallery, glab = make(5, unknown=0)
    rep = identification(probes, plab, gallery, glab)
    assert all(np.isnan(v) for v in rep.tpir_at_fpir.values())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_gallery_objects_give_the_same_report_as_arrays():
    probes, plab, gallery, glab = make(5)
    rng = np.random.default_rng(6)
    distractors = rng.standard_normal((300, 16))
    g = afr.Gallery(16)
    ids = rng.permutation(10**5)[: len(gallery)]  # ids in no particular order
    g.add(gallery, ids=ids)
    dg = afr.Gallery(16)
    dg.add(distractors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f32 = np.float32
        want = identification(
            probes.astype(f32), plab, gallery.astype(f32), glab, distractors.astype(f32)
        )
        got = identification(probes, plab, g, glab, dg)
    assert got.cmc == pytest.approx(want.cmc)
    assert got.tpir_at_fpir == pytest.approx(want.tpir_at_fpir, nan_ok=True)
    np.testing.assert_array_equal(got.ranks, want.ranks)


def test_a_gallery_without_labels_uses_its_ids_as_identities():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((20, 8))
    g = afr.Gallery(8)
    g.add(centres, ids=np.arange(100, 120))
    probes = centres + 0.05 * rng.standard_normal((20, 8))
    rep = identification(probes, np.arange(100, 120), g, ranks=(1,), fpir=())
    assert rep.rank1 == 1.0 and rep.mated_probes == 20
    with pytest.raises(ValueError, match="gallery_labels: required"):
        identification(probes, np.arange(20), centres)


def test_identification_ranks_far_beyond_the_candidates():
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((12, 16))
    labels = np.arange(12)
    probes = gallery[[0, 3, 5]] + 0.5 * rng.standard_normal((3, 16))
    distractors = rng.standard_normal((7, 16))
    huge = metrics.identification(
        probes, [0, 3, 5], gallery, labels, distractors=distractors, ranks=(1, 10**12)
    )
    exact = metrics.identification(
        probes, [0, 3, 5], gallery, labels, distractors=distractors, ranks=(1, 19)
    )
    assert huge.cmc[1] == exact.cmc[1]
    # beyond every candidate (12 + 7 rows), every mate ranks within
    assert huge.cmc[10**12] == exact.cmc[19] == 1.0
    with pytest.raises(ValueError, match="ranks"):
        metrics.identification(probes, [0, 3, 5], gallery, labels, ranks=(1, 2**64))


def test_identification_with_a_gallery_object_equals_arrays():
    rng = np.random.default_rng(15)
    rows = rng.standard_normal((40, 16))
    ids = rng.permutation(1000)[:40]
    g = afr.Gallery(16)
    g.add(rows, ids=ids)
    probes = rows[:10] + 0.8 * rng.standard_normal((10, 16))
    a = metrics.identification(probes, ids[:10], rows, ids)
    b = metrics.identification(probes, ids[:10], g)
    assert a.cmc == b.cmc and a.cmc[1] > 0
