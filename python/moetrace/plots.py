"""Charts for `moetrace analyze` and `moetrace speculate`, drawn with matplotlib (Agg, no display).

Every function writes one PNG of a fixed pixel size (figsize x DPI, no "tight" cropping) so that the
report's layout and the tests can rely on it, and returns the file name it wrote.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
WIDE = (10.0, 4.5)    # 1000 x 450 px
SQUARE = (6.0, 5.0)   # 600 x 500 px


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return os.path.basename(path)


def _expert_ticks(ax, n: int, axis: str = "x", most: int = 16) -> None:
    """Integer expert ticks, every expert up to `most`, else a readable subset."""
    from matplotlib.ticker import FixedLocator, MaxNLocator
    loc = FixedLocator(np.arange(n)) if n <= most else MaxNLocator(nbins=most, integer=True)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(loc)


def _bars(ax, values) -> None:
    """Bars per expert; beyond 32 experts one filled step artist (one patch per bar is slow)."""
    n = len(values)
    if n <= 32:
        ax.bar(np.arange(n), values, color="#4C72B0", width=0.8)
    else:
        ax.stairs(values, np.arange(n + 1) - 0.5, fill=True, color="#4C72B0")
        ax.set_xlim(-0.5, n - 0.5)


def usage_bars(path: str, counts, title: str) -> str:
    """Bar chart of one layer's top-1 expert counts, with the uniform level as a dashed line."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    share = counts / total * 100 if total else counts
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    _bars(ax, share)
    if len(counts):
        ax.axhline(100.0 / len(counts), color="#C44E52", ls="--", lw=1, label="uniform")
        ax.legend(loc="upper right")
    _expert_ticks(ax, len(counts))
    ax.set_xlabel("expert")
    ax.set_ylabel("share of tokens (%)")
    ax.set_title(title)
    return _save(fig, path)


def usage_grid(path: str, names: list[str], counts: list, title: str) -> str:
    """One small bar chart per layer (shares in %), side by side for comparison."""
    n = max(1, len(names))
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(10.0, 2.6 * rows + 0.6), squeeze=False,
                             layout="constrained", sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        c = np.asarray(counts[k], np.float64)
        share = c / c.sum() * 100 if c.sum() else c
        _bars(ax, share)
        ax.axhline(100.0 / len(c), color="#C44E52", ls="--", lw=1)
        _expert_ticks(ax, len(c), most=8)
        ax.set_title(names[k], fontsize=10)
        ax.set_xlabel("expert")
        if k % cols == 0:
            ax.set_ylabel("share (%)")
    fig.suptitle(title)
    return _save(fig, path)


def heatmap(path: str, matrix, title: str, xlabel: str, ylabel: str, cbar_label: str,
            yticklabels: list[str] | None = None, xticklabels: list[str] | None = None,
            figsize=WIDE, vmin=None, vmax=None, cmap: str = "viridis", annotate: bool = False) -> str:
    m = np.asarray(matrix, np.float64)
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    if yticklabels is not None:
        ax.set_yticks(np.arange(len(yticklabels)))
        ax.set_yticklabels(yticklabels)
    else:
        _expert_ticks(ax, m.shape[0], "y")
    if xticklabels is not None:
        ax.set_xticks(np.arange(len(xticklabels)))
        ax.set_xticklabels(xticklabels, rotation=30, ha="right")
    else:
        _expert_ticks(ax, m.shape[1], "x")
    if annotate and m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                    color="white" if v < (np.nanmax(m) + np.nanmin(m)) / 2 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def lines(path: str, x, series: dict[str, list], title: str, xlabel: str, ylabel: str,
          xticklabels: list[str] | None = None, logx: bool = False, ylim=None, markers: bool = True) -> str:
    """Several named series over a shared x axis (None values are gaps)."""
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    for name, ys in series.items():
        y = np.array([np.nan if v is None else v for v in ys], np.float64)
        ax.plot(x, y, marker="o" if markers else None, ms=4, label=name)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x))
        ax.set_xticklabels([str(v) for v in x])
    if xticklabels is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels(xticklabels, rotation=30 if len(xticklabels) > 8 else 0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=8, loc="best", ncol=2 if len(series) > 6 else 1)
    return _save(fig, path)


def histograms(path: str, edges, series: dict[str, list], title: str, xlabel: str) -> str:
    """Fixed-bin histograms (counts per bin) drawn as normalised step lines, one per series."""
    edges = np.asarray(edges, np.float64)
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    for name, counts in series.items():
        c = np.asarray(counts, np.float64)
        if c.sum() > 0:
            ax.stairs(c / c.sum(), edges, label=name)
    ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of tokens per bin")
    ax.set_title(title)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def heatmap_grid(path: str, mats: list, titles: list[str], title: str, xlabel: str, ylabel: str,
                 cbar_label: str, vmin=0.0, vmax=1.0, cols: int = 3) -> str:
    """Several heatmaps on one shared colour scale (e.g. one transition matrix per layer pair)."""
    n = max(1, len(mats))
    cols = min(cols, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 3.4 * rows + 0.6), squeeze=False,
                             layout="constrained")
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(mats):
            ax.axis("off")
            continue
        m = np.asarray(mats[k], np.float64)
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)
        _expert_ticks(ax, m.shape[1], "x", most=8)
        _expert_ticks(ax, m.shape[0], "y", most=8)
        ax.set_title(titles[k], fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8).set_label(cbar_label)
    fig.suptitle(title)
    return _save(fig, path)


def histogram_pair(path: str, left: tuple, right: tuple, title: str) -> str:
    """Two panels of fixed-bin histograms; each side is (edges, {name: counts}, xlabel)."""
    fig, axes = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    for ax, (edges, series, xlabel) in zip(axes, (left, right)):
        edges = np.asarray(edges, np.float64)
        for name, counts in series.items():
            c = np.asarray(counts, np.float64)
            if c.sum() > 0:
                ax.stairs(c / c.sum(), edges, label=name)
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share of tokens per bin")
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
