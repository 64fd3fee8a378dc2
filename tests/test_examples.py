"""The README's demo runs and its margin heads train."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def test_train_digits_example_runs_and_learns():
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "8"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith(("Softmax(", "ArcFace("))]
    assert len(rows) == 2, out
    for row in rows:
        accuracy = float(row.split()[-3])
        assert accuracy > 0.8, row


def test_gallery_example_recognises_and_rejects():
    example = EXAMPLE.parent / "gallery_search.py"
    for dtype in ("float32", "int8"):
        out = subprocess.run(
            [sys.executable, str(example), "--dtype", dtype],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        assert float(lines["known people recognised"]) > 0.9, out
        assert float(lines["strangers rejected"]) > 0.9, out
        assert "saved and reloaded 500 vectors" in out


def test_ddp_example_trains_exactly_like_one_process():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = EXAMPLE.parent / "train_ddp.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={port}", str(example), "--steps", "30", "--check"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("check passed") == 2, out.stdout
    first, last = (float(v) for v in out.stdout.split("loss ")[-1].split(" over")[0].split(" -> "))
    assert last < first, out.stdout
