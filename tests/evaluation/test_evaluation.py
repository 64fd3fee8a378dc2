"""arcface_rs.evaluation against transcriptions, written here, of the published scripts:
InsightFace's eval/verification.py evaluate() (loops over thresholds, scikit-learn KFold),
the IJB 1:1 scripts' template aggregation and pair scores, brute force over all pairs."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

import arcface_rs as afr
from arcface_rs import evaluation as ev


def _pairs(p=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((p, d))
    same = rng.random(p) < 0.5
    noise = rng.standard_normal((p, d))
    b = np.where(same[:, None], a + 0.9 * noise, noise)
    emb = np.empty((2 * p, d))
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, same


# --- a float64 transcription of InsightFace's evaluate() (verification.py) ---------------


def _accuracy(threshold, dist, issame):
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, issame))
    fp = np.sum(np.logical_and(predict, np.logical_not(issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict), issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def _val_far(threshold, dist, issame):
    predict = np.less(dist, threshold)
    ta = np.sum(np.logical_and(predict, issame))
    fa = np.sum(np.logical_and(predict, np.logical_not(issame)))
    return float(ta) / float(np.sum(issame)), float(fa) / float(np.sum(np.logical_not(issame)))


def _interp_first_exceeding(far_train, thresholds, target):
    # the meaning of interp1d(far_train, thresholds, kind="slinear")(target), written out
    for i in range(len(far_train)):
        if far_train[i] > target:
            if i == 0:
                return thresholds[0]
            f0, f1 = far_train[i - 1], far_train[i]
            return thresholds[i - 1] + (target - f0) * (thresholds[i] - thresholds[i - 1]) / (
                f1 - f0
            )
    return thresholds[int(np.argmax(far_train >= target))]


def _insightface_evaluate(embeddings, issame, nrof_folds=10):
    from sklearn.model_selection import KFold

    e1, e2 = embeddings[0::2], embeddings[1::2]
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    thresholds = np.arange(0, 4, 0.01)
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    indices = np.arange(len(issame))
    accuracy, best = np.zeros(nrof_folds), np.zeros(nrof_folds)
    tprs = np.zeros((nrof_folds, len(thresholds)))
    for f, (train, test) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros(len(thresholds))
        for t, th in enumerate(thresholds):
            _, _, acc_train[t] = _accuracy(th, dist[train], issame[train])
        b = np.argmax(acc_train)
        for t, th in enumerate(thresholds):
            tprs[f, t], _, _ = _accuracy(th, dist[test], issame[test])
        _, _, accuracy[f] = _accuracy(thresholds[b], dist[test], issame[test])
        best[f] = thresholds[b]
    thresholds = np.arange(0, 4, 0.001)
    val, far = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(k_fold.split(indices)):
        far_train = np.zeros(len(thresholds))
        for t, th in enumerate(thresholds):
            _, far_train[t] = _val_far(th, dist[train], issame[train])
        if np.max(far_train) >= 1e-3:
            threshold = _interp_first_exceeding(far_train, thresholds, 1e-3)
        else:
            threshold = 0.0
        val[f], far[f] = _val_far(threshold, dist[test], issame[test])
    return accuracy, best, np.mean(val), np.std(val), np.mean(far), np.mean(tprs, 0)


def test_lfw_protocol_equals_insightface_evaluate_on_3000_pairs():
    emb, same = _pairs(3000)
    got = ev.lfw_protocol(emb, same)
    acc, best, val, val_std, far, tpr = _insightface_evaluate(emb, same)
    np.testing.assert_array_equal(got.accuracy, acc)
    np.testing.assert_array_equal(got.thresholds, best)
    assert got.accuracy_mean == pytest.approx(np.mean(acc), abs=1e-15)
    assert got.accuracy_std == pytest.approx(np.std(acc), abs=1e-15)
    assert abs(got.val - val) <= 1e-9 and abs(got.val_std - val_std) <= 1e-9
    assert abs(got.far - far) <= 1e-9
    np.testing.assert_allclose(got.tpr, tpr, atol=1e-15)
    assert 0.0 < got.val < 1.0 and 0.0 < got.far <= 2e-3


def test_lfw_protocol_checks_its_arguments():
    emb, same = _pairs(40)
    with pytest.raises(ValueError, match="even number of rows"):
        ev.lfw_protocol(emb[:-1], same)
    with pytest.raises(ValueError, match="issame: needs one entry per pair"):
        ev.lfw_protocol(emb, same[:-1])
    with pytest.raises(ValueError, match="folds"):
        ev.lfw_protocol(emb, same, folds=1)
    with pytest.raises(ValueError, match="issame: must be booleans"):
        ev.lfw_protocol(emb, np.full(40, 0.5))


def test_flip_fuse_adds_or_concatenates_and_normalises():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    add = ev.flip_fuse(a, b)
    np.testing.assert_allclose(add, (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True))
    cat = ev.flip_fuse(a.astype(np.float32), b.astype(np.float32), mode="concat")
    assert cat.shape == (5, 16) and cat.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cat, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        ev.flip_fuse(a, b, mode="mean")
    with pytest.raises(ValueError, match="emb_flipped: shape"):
        ev.flip_fuse(a, b[:4])


# --- IJB: a transcription of the 1:1 scripts' image2template_feature and verification -----


def _ijb_templates(img_feats, templates, medias, scores, use_norm, use_det):
    x = img_feats
    if not use_norm:  # the script: normalise unless the norm is used as a score
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if use_det:
        x = x * scores[:, np.newaxis]
    unique = np.unique(templates)
    feats = np.zeros((len(unique), x.shape[1]))
    for c, uqt in enumerate(unique):
        (ind_t,) = np.where(templates == uqt)
        face = x[ind_t]
        face_medias = medias[ind_t]
        um, counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for u, ct in zip(um, counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_feats += [face[ind_m]]
            else:
                media_feats += [np.mean(face[ind_m], axis=0, keepdims=True)]
        feats[c] = np.sum(np.array(media_feats), axis=0)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, unique


def _ijb_verification(feats, unique, p1, p2):
    template2id = np.zeros((max(unique) + 1, 1), dtype=int)
    for c, uqt in enumerate(unique):
        template2id[uqt] = c
    score = np.zeros((len(p1),))
    for lo in range(0, len(p1), 1000):
        s = np.arange(lo, min(lo + 1000, len(p1)))
        f1, f2 = feats[template2id[p1[s]]], feats[template2id[p2[s]]]
        score[s] = np.sum(f1 * f2, -1).flatten()
    return score


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_templates_and_pair_scores_equal_the_ijb_scripts(normalize, weighted):
    rng = np.random.default_rng(2)
    n, d = 2000, 24
    templates = rng.integers(0, 300, n) * 3 + 7  # sparse ids
    medias = rng.integers(0, 4, n) + 10 * templates
    feats = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))
    scores = rng.uniform(0.3, 1.0, n)
    ids, tf = ev.aggregate_templates(
        feats, templates, medias, weights=scores if weighted else None, normalize=normalize
    )
    want, unique = _ijb_templates(feats, templates, medias, scores, not normalize, weighted)
    np.testing.assert_array_equal(ids, unique)
    np.testing.assert_allclose(tf, want, atol=1e-6)
    p1, p2 = rng.choice(ids, 5000), rng.choice(ids, 5000)
    got = ev.template_pair_scores(tf, ids, p1, p2)
    np.testing.assert_allclose(got, _ijb_verification(want, unique, p1, p2), atol=1e-6)
    with pytest.raises(ValueError, match="t2: template id"):
        ev.template_pair_scores(tf, ids, p1[:3], np.array([ids[0], 1, ids[1]]))


def test_identification_1n_reports_each_gallery_set():
    rng = np.random.default_rng(3)
    g1, g2 = rng.standard_normal((20, 16)), rng.standard_normal((25, 16))
    probes = np.vstack([g1[:10], g2[:10]]) + 0.1 * rng.standard_normal((20, 16))
    ids1, ids2 = np.arange(20), np.arange(100, 125)
    pid = np.concatenate([ids1[:10], ids2[:10]])
    reports = ev.identification_1n(probes, pid, [(g1, ids1), (g2, ids2)], ranks=(1,), fpir=(0.1,))
    want = afr.metrics.identification(probes, pid, g1, ids1, ranks=(1,), fpir=(0.1,))
    assert len(reports) == 2 and reports[0].cmc == want.cmc


# --- all pairs -------------------------------------------------------------------------


def _brute_tar(x, labels, fars):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    iu = np.triu_indices(len(x), 1)
    scores, same = s[iu], labels[iu[0]] == labels[iu[1]]
    neg = np.sort(scores[~same])[::-1]
    pos = scores[same]
    out = {}
    for f in fars:
        # the highest TPR over thresholds whose FPR <= f: accept the scores above the
        # (k+1)-th largest negative, k = the false accepts f allows
        k = int(np.floor(f * len(neg)))
        out[f] = float(np.mean(pos > neg[k])) if k < len(neg) else 1.0
    return out


def test_all_pairs_tar_at_far_equals_brute_force_on_6000():
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 1200, 6000)
    centres = rng.standard_normal((1200, 32))
    x = centres[ids] + 0.8 * rng.standard_normal((6000, 32))
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    got = ev.all_pairs_tar_at_far(x, ids, far=fars)
    assert got == _brute_tar(x, ids, fars)
    got32 = ev.all_pairs_tar_at_far(x.astype(np.float32), ids, far=fars)
    for f in fars:
        assert abs(got32[f] - got[f]) < 1e-3


def test_all_pairs_checks_its_arguments():
    x = np.random.default_rng(5).standard_normal((10, 4))
    with pytest.raises(ValueError, match="labels"):
        ev.all_pairs_tar_at_far(x, np.arange(10))  # no same-label pair
    with pytest.raises(ValueError, match="far"):
        ev.all_pairs_tar_at_far(x, np.arange(10) % 3, far=(0.0,))
    with pytest.raises(ValueError, match="labels"):
        ev.all_pairs_tar_at_far(x, np.arange(9) % 3)


# --- .bin files ------------------------------------------------------------------------


def _png(seed, size=(8, 6)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue(), np.asarray(img)


@pytest.mark.parametrize("as_arrays", [False, True])
def test_load_bin_round_trips_the_insightface_layout(tmp_path, as_arrays):
    encoded = [_png(i) for i in range(6)]
    bins = [np.frombuffer(b, dtype=np.uint8) if as_arrays else b for b, _ in encoded]
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=2)
    images, same = ev.load_bin(path, image_size=(8, 6))
    assert images.shape == (6, 8, 6, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack([a for _, a in encoded]))
    np.testing.assert_array_equal(same, issame)
    resized, _ = ev.load_bin(path, image_size=(16, 12))
    assert resized.shape == (6, 16, 12, 3)


def test_load_bin_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(([Evil()], [True]), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ev.load_bin(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        ev.load_bin(tmp_path / "missing.bin")


def test_the_example_runs_every_protocol():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "evaluation_protocols.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for line in ("LFW-style", "IJB-style 1:1", "IJB-style 1:N G2", "all pairs"):
        assert line in out.stdout


@pytest.mark.parametrize("n", [300, 2000])
def test_all_pairs_tar_at_far_equals_the_verification_report_on_the_same_pairs(n):
    """TAR@FAR is the highest TPR over thresholds with FPR <= far in both (the all-pairs
    scan used to accept k-1 negatives where k are allowed: 0.1030 vs 0.1032 at N=2000)."""
    rng = np.random.default_rng(n)
    ids = rng.integers(0, n // 4, n)
    x = rng.standard_normal((n // 4, 16))[ids] + 0.9 * rng.standard_normal((n, 16))
    iu = np.triu_indices(n, 1)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, same = (u @ u.T)[iu], ids[iu[0]] == ids[iu[1]]
    negatives = int((~same).sum())
    fars = [f for f in (1e-5, 1e-4, 1e-3, 1e-2, 0.1) if f * negatives >= 1]
    report = afr.metrics.verification(scores, same, far=fars)
    got = ev.all_pairs_tar_at_far(x, ids, far=fars)
    for f in fars:
        assert got[f] == pytest.approx(report.tar_at_far[f], abs=1e-12), f
    # ties: negatives scoring exactly at the threshold count as accepted
    tied = np.repeat(np.eye(4), [3, 3, 3, 3], axis=0)  # 4 identities, 3 identical rows each
    tied = np.vstack([tied, np.eye(4)[[0, 1]]])
    labels = np.r_[np.repeat(np.arange(4), 3), 9, 8]  # the last two duplicate other ids' rows
    iu = np.triu_indices(len(tied), 1)
    s = (tied @ tied.T)[iu]
    m = labels[iu[0]] == labels[iu[1]]
    for f in (0.02, 0.05, 0.2, 1.0):
        want = afr.metrics.verification(s, m, far=[f]).tar_at_far[f]
        assert ev.all_pairs_tar_at_far(tied, labels, far=[f])[f] == pytest.approx(want), f


def test_template_ids_must_name_one_row_each_and_weights_be_finite():
    feats = np.eye(3)
    with pytest.raises(ValueError, match="template_ids.*7"):
        ev.template_pair_scores(feats, [7, 8, 7], [7], [8])
    x = np.random.default_rng(0).standard_normal((4, 5))
    t, m = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 0])
    for bad in ([1.0, np.nan, 1.0, 1.0], [1.0, 1.0, np.inf, 1.0]):
        with pytest.raises(ValueError, match="weights"):
            ev.aggregate_templates(x, t, m, weights=bad)


def test_lfw_protocol_names_a_fold_without_both_kinds_of_pair():
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((40, 8))
    same = np.r_[np.ones(10, bool), np.zeros(10, bool)]  # fold 0 and 1 of 10 hold one kind
    with pytest.raises(ValueError, match="issame: fold 0"):
        ev.lfw_protocol(emb, same, folds=10)


def _bin(path, bins, issame):
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=2)


@pytest.mark.parametrize("issame", [["False", True], [2, 1], [None, True], [0.5, 1]])
def test_load_bin_refuses_what_is_not_a_boolean(tmp_path, issame):
    pytest.importorskip("PIL")
    path = tmp_path / "odd.bin"
    _bin(path, [_png(i)[0] for i in range(4)], issame)
    with pytest.raises(ValueError, match=r"issame\[0\]") as info:
        ev.load_bin(path)
    assert str(path) in str(info.value)
    _bin(path, [_png(i)[0] for i in range(4)], [1, 0])  # 0/1 are fine
    assert ev.load_bin(path, image_size=(8, 6))[1].tolist() == [True, False]


def test_load_bin_errors_name_the_file_and_the_image(tmp_path):
    pytest.importorskip("PIL")
    path = tmp_path / "broken.bin"
    _bin(path, [_png(0)[0], b"not an image", _png(1)[0], _png(2)[0]], [True, False])
    with pytest.raises(ValueError, match="image 1") as info:
        ev.load_bin(path)
    assert str(path) in str(info.value)
    _bin(path, None, None)
    with pytest.raises(ValueError) as info:
        ev.load_bin(path)
    assert str(path) in str(info.value)
    path.write_bytes(pickle.dumps(([b"x"], [True]), protocol=2)[:-9] + b"h\x05.")
    with pytest.raises((ValueError, pickle.UnpicklingError)) as info:
        ev.load_bin(path)
    assert str(path) in str(info.value)
