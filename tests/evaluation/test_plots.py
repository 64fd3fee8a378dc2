"""arcface_rs.plots draws what the reports hold."""

from __future__ import annotations

import matplotlib
import numpy as np

matplotlib.use("Agg")

from arcface_rs import plots  # noqa: E402
from arcface_rs.metrics import identification, verification  # noqa: E402


def test_roc_and_cmc_curves_carry_the_report_values(tmp_path):
    rng = np.random.default_rng(0)
    same = rng.random(2000) < 0.5
    rep = verification(rng.normal(size=2000) + same, same, far=(0.1,))
    ax = plots.roc({"a": rep, "b": rep})
    assert len(ax.get_lines()) == 2 and ax.get_xscale() == "log"
    x, y = ax.get_lines()[0].get_data()
    np.testing.assert_array_equal(y, rep.tpr[rep.fpr > 0])
    g = rng.standard_normal((20, 8))
    ident = identification(g + 0.1, np.arange(20), g, np.arange(20), ranks=(1, 3))
    ax = plots.cmc(ident)
    assert list(ax.get_lines()[0].get_ydata()) == [ident.cmc[1], ident.cmc[3]]
    ax.figure.savefig(tmp_path / "cmc.png")
    assert (tmp_path / "cmc.png").stat().st_size > 1000
