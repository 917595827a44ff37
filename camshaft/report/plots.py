"""The report's plots, drawn with matplotlib's object API (no pyplot: no global figure state).

Each function draws one PNG from already aggregated numbers and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from camshaft.writers.atomic import atomic_path

INK, ACCENT, WARN, MUTED = "#1f2937", "#2563eb", "#dc2626", "#9ca3af"
_RC = {"font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5}


def _figure(width: float, height: float, *, left: float = 0.55, bottom: float = 0.5, top: float = 0.3, right: float = 0.15) -> Figure:
    """A figure with fixed margins in inches (a layout engine costs more than the drawing)."""
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height, wspace=0.35, hspace=0.75
    )
    return fig


def _style(ax, title: str) -> None:
    ax.set_title(title, loc="left", color=INK, fontsize=_RC["axes.titlesize"])
    ax.tick_params(labelsize=_RC["font.size"] - 1, colors=INK)
    ax.grid(True, axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def histograms(path: Path, panels: Sequence[tuple[str, np.ndarray, float | None, tuple[float, float]]], *, columns: int = 3) -> Path:
    """Histograms side by side: (title, values, threshold line or None, value range) per panel."""
    rows = max(1, -(-len(panels) // columns))
    fig = _figure(2.35 * min(columns, len(panels)), 1.9 * rows)
    axes = fig.subplots(rows, min(columns, len(panels)), squeeze=False).ravel()
    for ax, (title, values, threshold, span) in zip(axes, panels, strict=False):
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        counts, edges = np.histogram(v, bins=20, range=span if span is not None or len(v) else (0.0, 1.0))
        ax.stairs(counts, edges, fill=True, color=ACCENT, alpha=0.85)  # one artist, not 20 patches
        if threshold is not None:
            ax.axvline(threshold, color=WARN, linestyle="--", linewidth=1.2)
        if len(v):
            ax.axvline(float(v.mean()), color=INK, linewidth=1.0)
        _style(ax, title)
        ax.set_xlabel(f"mean {v.mean():.3f} · n = {len(v):,}" if len(v) else "no data", fontsize=7.5, color="#4b5563")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, path)


def mean_curves(path: Path, curves: Mapping[str, np.ndarray], aucs: Mapping[str, float]) -> Path:
    """Mean deletion / insertion curves over the fraction of pixels moved."""
    fig = _figure(4.4, 2.5)
    ax = fig.subplots()
    colours = {"deletion": WARN, "insertion": ACCENT}
    for kind, curve in curves.items():
        x = np.linspace(0, 1, len(curve))
        ax.plot(x, curve, color=colours.get(kind, INK), linewidth=1.8, label=f"{kind} (AUC {aucs.get(kind, float('nan')):.3f})")
        ax.fill_between(x, curve, color=colours.get(kind, INK), alpha=0.08)
    ax.set_xlabel("fraction of pixels removed / inserted, in map order")
    ax.set_ylabel("target score")
    ax.set_xlim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    _style(ax, "Faithfulness: mean curves")
    return _save(fig, path)


def class_bars(
    path: Path, names: Sequence[str], values: np.ndarray, *, title: str, threshold: float | None = None, span=(0.0, 1.0)
) -> Path:
    """One horizontal bar per class (at most a few dozen: pass the worst ones)."""
    n = len(names)
    labels = [str(s)[:28].replace("$", r"\$") for s in names]  # a class name is text, never mathtext
    left = 0.25 + 0.065 * max((len(t) for t in labels), default=4)  # room for the class names
    fig = _figure(4.0 + left, 0.8 + 0.18 * max(n, 3), left=left)
    ax = fig.subplots()
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    colours = [WARN if threshold is not None and x >= threshold else ACCENT for x in v]
    ax.barh(np.arange(n), v, color=colours, height=0.7)
    ax.set_yticks(np.arange(n), labels)
    ax.invert_yaxis()
    ax.set_xlim(*span)
    if threshold is not None:
        ax.axvline(threshold, color=WARN, linestyle="--", linewidth=1.0)
    _style(ax, title)
    ax.grid(True, axis="x", color="#e5e7eb", linewidth=0.8)
    ax.grid(False, axis="y")
    return _save(fig, path)


def scatter(path: Path, x: np.ndarray, y: np.ndarray, *, title: str, xlabel: str, ylabel: str, highlight: np.ndarray | None = None) -> Path:
    """A scatter of two per-image statistics; ``highlight`` (bool) points drawn in red."""
    fig = _figure(3.3, 2.4)
    ax = fig.subplots()
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    hi = np.zeros(len(x), bool) if highlight is None else np.asarray(highlight, bool)
    ax.scatter(x[~hi], y[~hi], s=8, color=ACCENT, alpha=0.6, linewidths=0)
    ax.scatter(x[hi], y[hi], s=10, color=WARN, alpha=0.8, linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _style(ax, title)
    return _save(fig, path)
