"""Report plots (PNG, matplotlib's Agg backend, imported lazily). Each function takes parts of the summary dict,
writes one PNG and returns its path, or returns None when there is nothing to draw."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

LABEL_COLOR = "#c0392b"
TEXT_COLOR = "#2c7fb8"
DPI = 120


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _err(prop: Mapping[str, Any]) -> tuple[float, float, float]:
    """(rate, lower error, upper error) in percent for errorbar()."""
    r, lo, hi = (_finite(prop.get(k)) * 100 for k in ("rate", "lo", "hi"))
    if math.isnan(r):
        return (float("nan"), 0.0, 0.0)
    return (r, max(r - lo, 0.0), max(hi - r, 0.0))


def pct_text(v: float) -> str:
    return f"{v:.1f}%"


def _short(text: Any, n: int = 32) -> str:
    s = str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def rates_with_ci(rows: Sequence[Mapping[str, Any]], title: str, path: Path) -> Path | None:
    """Label-flip and text-change rate (Wilson 95% CI) per breakdown value (rows of analysis.breakdown)."""
    rows = [r for r in rows if r.get("pairs")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * len(rows)))
    ys = list(range(len(rows)))
    for offset, key, color, name in ((-0.15, "label_flips", LABEL_COLOR, "label flips"),
                                     (0.15, "text_changes", TEXT_COLOR, "text changes")):
        vals = [_err(r[key]) for r in rows]
        ax.errorbar([v[0] for v in vals], [y + offset for y in ys], xerr=[[v[1] for v in vals], [v[2] for v in vals]],
                    fmt="o", color=color, capsize=3, label=name)
        for v, y in zip(vals, ys):  # a zero rate sits on the axis: say "0" next to it so it cannot be missed
            if v[0] == 0:
                ax.annotate("0", (0, y + offset), textcoords="offset points", xytext=(-9, 0), ha="right",
                            va="center", fontsize=8, color=color, annotation_clip=False)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{_short(r['value'])} (n={r['pairs']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("rate vs solo, % (Wilson 95% CI)")
    top = max([v for r in rows for k in ("label_flips", "text_changes") for v in [sum(_err(r[k])[::2])]
               if not math.isnan(v)] + [1.0])
    ax.set_xlim(left=-0.06 * top - 1.0)  # room left of 0, so a marker at 0 is drawn whole
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def paired_bars(comparison: Mapping[str, Any], path: Path) -> Path | None:
    """Study D: label-flip and text-change rates of the two modes side by side, with CIs."""
    modes = comparison.get("modes") or []
    if len(modes) != 2 or not comparison.get("rows"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.38
    for i, (key, name) in enumerate((("label_flips", "label flips"), ("text_changes", "text changes"))):
        for j, (mode, color) in enumerate(zip(modes, ("#e67e22", "#27ae60"))):
            r, lo, hi = _err(mode[key])
            x = i + (j - 0.5) * width
            h = 0 if math.isnan(r) else r
            ax.bar(x, h, width, color=color, label=_short(mode["mode"], 40) if i == 0 else None)
            ax.errorbar(x, h, yerr=[[lo], [hi]], color="black", capsize=4)
            if h == 0:  # a bar of height 0 is invisible: mark it
                ax.plot([x], [0], marker="D", markersize=7, color=color, markeredgecolor="black", clip_on=False,
                        zorder=5)
            ax.text(x, h + hi + 1.5, f"{pct_text(h)}\n{mode[key]['k']}/{mode[key]['n']}", ha="center", fontsize=9)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["score flips" if comparison.get("flip_on") == "score" else "label flips", "text changes"])
    ax.set_ylabel("% of paired rows (Wilson 95% CI)")
    top = max(_err(m[k])[0] + _err(m[k])[2] for m in modes for k in ("label_flips", "text_changes"))
    ax.set_ylim(0, max(10.0, (0 if math.isnan(top) else top) + 12))
    lab = comparison.get("label", {})
    ax.set_title(f"{_short(comparison['a'], 28)} vs {_short(comparison['b'], 28)}: "
                 f"McNemar p = {lab.get('p', float('nan')):.3g}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def label_pair_heatmap(label_pairs: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Matrix of solo label (rows) x batch label (columns) counts."""
    if not label_pairs:
        return None
    import numpy as np

    plt = _plt()
    labels = sorted({str(p["solo"]) for p in label_pairs} | {str(p["batch"]) for p in label_pairs})
    idx = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=int)
    for p in label_pairs:
        m[idx[str(p["solo"])], idx[str(p["batch"])]] += int(p["count"])
    size = 2.5 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    # log-ish colour so that a few off-diagonal flips stay visible next to a large diagonal
    im = ax.imshow(np.log1p(m), cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if np.log1p(m[i, j]) > np.log1p(m.max()) * 0.6 else "black",
                    fontweight="bold" if i != j and m[i, j] else "normal")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([_short(lab, 18) for lab in labels], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([_short(lab, 18) for lab in labels])
    ax.set_xlabel("batch label")
    ax.set_ylabel("solo label")
    ax.set_title(title or "solo -> batch labels (off-diagonal = flips)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="log(1 + count)")
    return _save(fig, path)


def divergence_histogram(positions: Sequence[int], path: Path) -> Path | None:
    """Histogram of the first divergent output-token index over text-changed pairs."""
    if not positions:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    top = max(positions)
    bins = min(50, top + 1) if top > 0 else 1
    ax.hist(positions, bins=bins, range=(0, top + 1), color=TEXT_COLOR, edgecolor="white")
    ax.set_xlabel("first divergent output token (index)")
    ax.set_ylabel("pairs")
    import statistics

    med = statistics.median(positions)
    ax.axvline(med, color=LABEL_COLOR, linestyle="--", label=f"median {med:g}")
    ax.legend(fontsize=8)
    ax.set_title(f"Where solo and batch outputs diverge (n={len(positions)})", fontsize=10)
    return _save(fig, path)


def study_b_scatter(models: Sequence[Mapping[str, Any]], pearson: Mapping[str, Any], path: Path,
                    title: str = "") -> Path | None:
    """Per-model text-change rate (x) vs label-flip rate (y) with a least-squares line."""
    import numpy as np

    pts = [(m["text_changes"]["rate"] * 100, m["label_flips"]["rate"] * 100, m["model"], m.get("alignment_type"))
           for m in models if m["text_changes"]["n"]]
    if len(pts) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    kinds = sorted({str(p[3]) for p in pts})
    cmap = plt.get_cmap("tab10")
    for k_i, kind in enumerate(kinds):
        sel = [p for p in pts if str(p[3]) == kind]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], color=cmap(k_i % 10), label=kind, zorder=3)
    for x, y, name, _ in pts:
        ax.annotate(_short(name, 20), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    if np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(grid, slope * grid + intercept, color="gray", linestyle="--", label="least-squares fit")
    r = pearson.get("r")
    lo, hi = pearson.get("ci_lo"), pearson.get("ci_hi")
    title = "Output instability vs label flips per model" + (f", {title}" if title else "")
    if r is not None and r == r:
        title += f"\nr = {r:.3f}"
        if lo is not None and lo == lo and hi is not None:
            title += f", {pearson.get('method') or 'bootstrap'} 95% CI [{lo:.2f}, {hi:.2f}]"
        else:
            title += ", no CI"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("text-change rate vs solo, %")
    ax.set_ylabel("label-flip rate vs solo, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="alignment type", title_fontsize=8)
    return _save(fig, path)


def invariance_heatmap(grid: Mapping[str, Any], path: Path) -> Path | None:
    """Text-change rate per backend configuration (rows) and dispatcher/batch size (columns)."""
    rows, cols, cells = grid.get("rows") or [], grid.get("cols") or [], grid.get("cells") or []
    if not cells:
        return None
    import numpy as np

    plt = _plt()
    m = np.full((len(rows), len(cols)), np.nan)
    ann = {}
    for c in cells:
        i, j = rows.index(c["backend"]), cols.index(c["column"])
        m[i, j] = _finite(c["text_changes"]["rate"]) * 100
        ann[(i, j)] = f"{m[i, j]:.1f}%\n{c['text_changes']['k']}/{c['text_changes']['n']}"
    fig, ax = plt.subplots(figsize=(4.0 + 1.4 * len(cols), 2.2 + 0.8 * len(rows)))
    vmax = max(5.0, float(np.nanmax(m)) if np.isfinite(m).any() else 5.0)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="OrRd", vmin=0, vmax=vmax, aspect="auto")
    for (i, j), text in ann.items():
        ax.text(j, i, text, ha="center", va="center", fontsize=9,
                color="white" if m[i, j] > 0.6 * vmax else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r, 36) for r in rows])
    ax.set_title("Text-change rate vs solo (0% = batch invariant)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="%")
    return _save(fig, path)
