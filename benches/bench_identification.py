#!/usr/bin/env python3
"""identification() of P probes against a gallery plus N distractors vs the search it needs.

usage: python benches/bench_identification.py [P N]   (default 1000 probes, 1,000,000
distractors, D=512, float32, 2 threads). The reference is cosine_topk of the probes over the
gallery and distractors stacked in one array (k=10); identification searches them apart and
adds the ranking. Best of 2 each, interleaved. Then the same with the distractors (and the
gallery) as float32 Gallery objects, against one Gallery search of both.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import arcface_rs as afr  # noqa: E402
from arcface_rs.metrics import identification  # noqa: E402


def main() -> None:
    p = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    d, ids = 512, 1000
    rng = np.random.default_rng(0)
    # 1000 enrolled identities; a tenth of the probes come from 100 identities not enrolled
    centres = rng.standard_normal((ids + 100, d), dtype=np.float32)
    gallery = centres[:ids] + 1.2 * rng.standard_normal((ids, d), dtype=np.float32)
    labels = np.arange(ids)
    probe_labels = np.where(
        rng.random(p) < 0.9, rng.integers(0, ids, p), rng.integers(ids, ids + 100, p)
    )
    probes = centres[probe_labels] + 1.2 * rng.standard_normal((p, d), dtype=np.float32)
    distractors = rng.standard_normal((n, d), dtype=np.float32)
    stacked = np.concatenate([gallery, distractors])
    t_search, t_ident = [], []
    for _ in range(2):
        t = time.perf_counter()
        afr.cosine_topk(probes, stacked, k=10)
        t_search.append(time.perf_counter() - t)
        t = time.perf_counter()
        rep = identification(probes, probe_labels, gallery, labels, distractors)
        t_ident.append(time.perf_counter() - t)
    search, ident = min(t_search), min(t_ident)
    print(f"{p} probes, {ids} enrolled + {n:,} distractors, D={d}, 2 threads")
    print(f"cosine_topk over gallery + distractors: {1e3 * search:8.0f} ms")
    print(f"identification (CMC, TPIR):             {1e3 * ident:8.0f} ms  ({ident / search:.3f}x)")
    print(f"rank-1 {rep.rank1:.4f}, CMC {rep.cmc}, TPIR@FPIR {rep.tpir_at_fpir}")

    del stacked
    g_gallery, g_distractors, g_both = afr.Gallery(d), afr.Gallery(d), afr.Gallery(d)
    g_gallery.add(gallery)
    g_both.add(gallery)
    for lo in range(0, n, 100_000):
        g_distractors.add(distractors[lo : lo + 100_000])
        g_both.add(distractors[lo : lo + 100_000])
    del distractors
    t_search, t_ident = [], []
    for _ in range(2):
        t = time.perf_counter()
        g_both.search(probes, k=10)
        t_search.append(time.perf_counter() - t)
        t = time.perf_counter()
        rep_g = identification(probes, probe_labels, g_gallery, labels, g_distractors)
        t_ident.append(time.perf_counter() - t)
    search, ident = min(t_search), min(t_ident)
    print(f"Gallery.search over gallery + distractors: {1e3 * search:8.0f} ms")
    print(
        f"identification with Gallery objects:      {1e3 * ident:8.0f} ms  ({ident / search:.3f}x)"
    )
    print(f"same report as with arrays: {rep_g.cmc == rep.cmc}")


if __name__ == "__main__":
    main()
