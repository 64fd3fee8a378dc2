#!/usr/bin/env python3
"""arcface_rs.metrics.verification vs scikit-learn's roc_curve + roc_auc_score, one run.

usage: python benches/bench_metrics.py [N]   (default 10,000,000 pairs, 2 threads)
arcface_rs computes more (TAR@FAR at six FARs, best threshold, 10-fold LFW accuracy) than
the two scikit-learn calls it is timed against. Best of 3 each, interleaved.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from arcface_rs.metrics import verification  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
    rng = np.random.default_rng(0)
    same = rng.random(n) < 0.1
    scores = (rng.normal(size=n) * 0.1 + 0.4 * same).astype(np.float32)
    t_ours, t_sk = [], []
    for _ in range(3):
        t = time.perf_counter()
        rep = verification(scores, same)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        roc_curve(same, scores)
        auc = roc_auc_score(same, scores)
        t_sk.append(time.perf_counter() - t)
    assert abs(auc - rep.auc) < 1e-9
    ours, sk = min(t_ours), min(t_sk)
    print(f"{n:,} pairs, threads={os.environ['RAYON_NUM_THREADS']}")
    print(f"scikit-learn roc_curve + roc_auc_score: {1e3 * sk:8.0f} ms")
    print(
        f"arcface_rs verification (+10 folds):     {1e3 * ours:8.0f} ms  ({sk / ours:.1f}x faster)"
    )


if __name__ == "__main__":
    main()
