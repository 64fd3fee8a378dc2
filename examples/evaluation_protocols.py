#!/usr/bin/env python3
"""The evaluation protocols of arcface_rs.evaluation end to end on synthetic embeddings
(nothing downloaded): an LFW-style 10-fold verification with the flip test, IJB-style 1:1
over templates (images and video frames aggregated per template), IJB-style 1:N with two
gallery sets, and TAR@FAR over all pairs of a set (MFR style).

usage: python examples/evaluation_protocols.py
"""

from __future__ import annotations

import numpy as np

from arcface_rs import evaluation as ev
from arcface_rs.metrics import verification

rng = np.random.default_rng(0)
D = 128


def faces(identities: np.ndarray, noise: float) -> np.ndarray:
    """One embedding per entry of ``identities``: its centre plus noise."""
    centres = np.random.default_rng(1).standard_normal((identities.max() + 1, D))
    return centres[identities] + noise * rng.standard_normal((len(identities), D))


# LFW style: 3000 pairs, half of one identity; embeddings of the image and of its mirror
pairs = 3000
first = rng.integers(0, 5000, pairs)
same = rng.random(pairs) < 0.5
second = np.where(same, first, rng.integers(0, 5000, pairs))
ids = np.stack([first, second], 1).reshape(-1)
emb = faces(ids, 1.2)
emb_flipped = emb + 0.3 * rng.standard_normal(emb.shape)
fused = ev.flip_fuse(emb, emb_flipped)
report = ev.lfw_protocol(fused, same)
print(
    f"LFW-style: accuracy {report.accuracy_mean:.4f} ± {report.accuracy_std:.4f}, "
    f"VAL {report.val:.4f} ± {report.val_std:.4f} @ FAR {report.far:.2e}"
)

# IJB style 1:1: 400 subjects, 2 templates each of a few images and video frames
subjects = np.repeat(np.arange(400), 2)
template_of_image, media_of_image, subject_of_image = [], [], []
for t, s in enumerate(subjects):
    for m in range(rng.integers(1, 4)):  # medias: a still image or a video
        frames = 1 if rng.random() < 0.5 else rng.integers(2, 6)
        template_of_image += [t] * frames
        media_of_image += [1000 * t + m] * frames
        subject_of_image += [s] * frames
image_feats = faces(np.array(subject_of_image), 2.0)
scores = rng.uniform(0.5, 1.0, len(image_feats))  # detector scores
tids, tfeats = ev.aggregate_templates(
    image_feats, np.array(template_of_image), np.array(media_of_image), weights=scores
)
t1, t2 = rng.integers(0, len(tids), (2, 20_000))
issame = subjects[t1] == subjects[t2]
pair_scores = ev.template_pair_scores(tfeats, tids, tids[t1], tids[t2])
v = verification(pair_scores, issame, far=(1e-3, 1e-2))
print(
    f"IJB-style 1:1 ({len(tids)} templates, {len(t1)} pairs): "
    + ", ".join(f"TAR@FAR={f:g} {t:.4f}" for f, t in v.tar_at_far.items())
)

# IJB style 1:N: probe templates against gallery sets G1 and G2 (half the subjects each)
g1, g2 = np.arange(0, 800, 2) < 400, np.arange(0, 800, 2) >= 400
gallery_t = np.arange(0, 800, 2)  # first template of each subject enrols it
probe_t = gallery_t + 1
reports = ev.identification_1n(
    tfeats[probe_t],
    subjects[probe_t],
    [
        (tfeats[gallery_t[g1]], subjects[gallery_t[g1]]),
        (tfeats[gallery_t[g2]], subjects[gallery_t[g2]]),
    ],
    ranks=(1, 5),
    fpir=(0.1,),
)
for name, r in zip(("G1", "G2"), reports):
    print(f"IJB-style 1:N {name}: rank-1 {r.cmc[1]:.4f}, TPIR@FPIR=0.1 {r.tpir_at_fpir[0.1]:.4f}")

# MFR style: TAR@FAR over all pairs of 20k embeddings of 4k identities
labels = rng.integers(0, 4000, 20_000)
feats = faces(labels, 2.5).astype(np.float32)
tar = ev.all_pairs_tar_at_far(feats, labels, far=(1e-6, 1e-5, 1e-4))
print("all pairs (2.0e8):", ", ".join(f"TAR@FAR={f:g} {t:.4f}" for f, t in tar.items()))
