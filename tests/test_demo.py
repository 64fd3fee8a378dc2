"""python -m arcface_rs.demo runs end to end (short settings) and writes its figures."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_writes_figures(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "arcface_rs.demo",
            "--epochs",
            "3",
            "--seeds",
            "1",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "Open-set verification on unseen digits" in out
    for head in ("Plain softmax", "Norm. softmax", "SphereFace", "CosFace", "ArcFace", "Combined"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {head} |"))
        auc = float(row.split("|")[2])
        assert 0.5 < auc <= 1.0, row
    for name in ("target_logits.png", "roc_cmc.png", "features_2d.png", "features_3d.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
