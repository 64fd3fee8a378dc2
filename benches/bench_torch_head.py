#!/usr/bin/env python3
"""Cost of the PyTorch wrapper: ArcFaceHead forward + backward vs the bare NumPy call.

usage: python benches/bench_torch_head.py [B D C] [--peer PATH]
Both run in one process on the same memory (the tensors are views of the NumPy arrays),
interleaved (alternating which goes first), best of 9 each; then
benches/peer_head.py (PyTorch eager head) runs in its own process for the lead
over it. 2 threads unless RAYON_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEER = Path(__file__).resolve().parent / "peer_head.py"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[256, 512, 100_000])
    ap.add_argument("--peer", default=str(PEER))
    args = ap.parse_args()
    b, d, c = args.shape
    os.environ.setdefault("RAYON_NUM_THREADS", "2")

    import numpy as np
    import torch

    import arcface_rs as afr
    import arcface_rs.torch as aft

    torch.set_num_threads(int(os.environ["RAYON_NUM_THREADS"]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, d), dtype=np.float32)
    w = rng.standard_normal((c, d), dtype=np.float32)
    w *= 0.01
    y = rng.integers(0, c, size=b)
    head = aft.ArcFaceHead(embedding_size=d, num_classes=c)
    with torch.no_grad():
        head.weight.data = torch.from_numpy(w)  # same memory as the NumPy call uses
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.from_numpy(y)
    margin = afr.ArcFace()

    def numpy_call():
        afr.margin_loss(x, w, y, margin)

    def torch_call():
        xt.grad = None
        head.weight.grad = None
        head(xt, yt).backward()

    numpy_call(), torch_call()
    t_np, t_torch = [], []
    pairs = [(numpy_call, t_np), (torch_call, t_torch)]
    for rep in range(int(os.environ.get("REPS", "9"))):
        for fn, acc in pairs if rep % 2 else pairs[::-1]:  # alternate who goes first
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    ms_np, ms_torch = 1e3 * min(t_np), 1e3 * min(t_torch)
    print(f"B={b} D={d} C={c} float32, threads={os.environ['RAYON_NUM_THREADS']}")
    print(f"bare NumPy margin_loss:        {ms_np:8.1f} ms")
    ratio = ms_torch / ms_np
    print(f"ArcFaceHead forward+backward:  {ms_torch:8.1f} ms  ({ratio:.3f}x the bare call)")
    if Path(args.peer).exists():
        env = dict(os.environ, OMP_NUM_THREADS=os.environ["RAYON_NUM_THREADS"])
        out = subprocess.run(
            [sys.executable, args.peer, str(b), str(d), str(c)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        peer = json.loads(out.strip().splitlines()[-1])
        print(
            f"PyTorch eager head (peer):     {peer['ms']:8.1f} ms  "
            f"(ArcFaceHead is {peer['ms'] / ms_torch:.2f}x faster)"
        )


if __name__ == "__main__":
    main()
