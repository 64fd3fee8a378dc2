#!/usr/bin/env python3
"""Enrol faces in a Gallery, identify probes (open set), save and reload it.

NumPy only: synthetic "faces" (identities with noisy samples) stand in for a network's
embeddings. usage: python examples/gallery_search.py [--dtype float16] [--path FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

import arcface_rs as afr


def main() -> None:
    ap = argparse.ArgumentParser()
    dtypes = ["float32", "float16", "bfloat16", "int8"]
    ap.add_argument("--dtype", default="float16", choices=dtypes)
    ap.add_argument("--path", default=None, help="where to save (default: a temporary file)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    dim, people = 128, 500
    centres = rng.standard_normal((people, dim))
    enrol = centres + 0.6 * rng.standard_normal((people, dim))  # one photo per person
    gallery = afr.Gallery(dim, args.dtype)
    gallery.add(enrol, ids=np.arange(1000, 1000 + people))  # e.g. employee numbers
    print(gallery)

    known = centres[:200] + 0.6 * rng.standard_normal((200, dim))  # new photos of enrolled
    strangers = rng.standard_normal((200, dim))  # people never enrolled
    probes = np.vstack([known, strangers])
    who, score = gallery.identify(probes, threshold=0.35)
    print(f"known people recognised: {np.mean(who[:200] == np.arange(1000, 1200)):.3f}")
    print(f"strangers rejected:      {np.mean(who[200:] == -1):.3f}")

    scores, ids = gallery.search(known[:1], k=3)
    print(f"top 3 for probe 0: ids {ids[0].tolist()} scores {[f'{s:.3f}' for s in scores[0]]}")

    path = args.path or os.path.join(tempfile.mkdtemp(), "gallery.safetensors")
    gallery.save(path)
    again = afr.Gallery.load(path)
    assert np.array_equal(again.search(probes, 5)[1], gallery.search(probes, 5)[1])
    print(f"saved and reloaded {len(again)} vectors from {path}")


if __name__ == "__main__":
    main()
