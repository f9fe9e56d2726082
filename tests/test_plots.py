"""evalhost.plots: a zero rate is visible (issue 17: a bar of height 0 cannot be seen)."""
from __future__ import annotations

from pathlib import Path

import pytest

from evalhost import plots
from evalhost.stats import proportion


@pytest.fixture
def figures(monkeypatch):
    """Keep each figure instead of writing it, so that the test can look at what was drawn."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    yield kept
    plots._plt().close("all")


def _markers_at(ax, x=None, y=None):
    out = []
    for line in ax.get_lines():
        if line.get_marker() in (None, "", "None", " ", "_", "|") or not line.get_visible():
            continue
        for xv, yv in zip(line.get_xdata(), line.get_ydata()):
            if (x is None or abs(float(xv) - x) < 1e-9) and (y is None or abs(float(yv) - y) < 1e-9):
                out.append(line)
    return out


def test_paired_bars_mark_a_zero_rate(figures, tmp_path):
    cmp = {"a": "vllm", "b": "vllm-invariant", "rows": 55, "label": {"p": 4.77e-7},
           "modes": [{"mode": "vllm", "label_flips": proportion(22, 55), "text_changes": proportion(25, 55)},
                     {"mode": "vllm-invariant", "label_flips": proportion(0, 55), "text_changes": proportion(0, 55)}]}
    plots.paired_bars(cmp, tmp_path / "d.png")
    ax = figures[0].axes[0]
    zero_marks = [ln for ln in _markers_at(ax, y=0.0) if not ln.get_clip_on()]
    assert len(zero_marks) == 2  # the invariant mode's label-flip and text-change bars, drawn over the axis
    texts = [t.get_text() for t in ax.texts]
    assert sum(t.startswith("0.0%") for t in texts) == 2 and "40.0%\n22/55" in texts


def test_rates_with_ci_keep_a_zero_rate_inside_the_axes(figures, tmp_path):
    rows = [{"value": "vllm", "pairs": 48, "label_flips": proportion(3, 48), "text_changes": proportion(5, 48)},
            {"value": "vllm-invariant", "pairs": 48, "label_flips": proportion(0, 48),
             "text_changes": proportion(0, 48)}]
    plots.rates_with_ci(rows, "by backend", tmp_path / "r.png")
    ax = figures[0].axes[0]
    assert ax.get_xlim()[0] < 0  # a marker at 0 is drawn whole, not cut in half by the axis
    assert _markers_at(ax, x=0.0)
    assert [t.get_text() for t in ax.texts].count("0") == 2
