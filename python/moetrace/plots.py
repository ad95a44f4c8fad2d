"""Charts for `moetrace analyze` and `moetrace speculate`, drawn with matplotlib (Agg, no display).

Every function writes one chart of a fixed size (figsize x DPI, no "tight" cropping) so that the
report's layout and the tests can rely on it, and returns the file name the report shows. configure()
sets the resolution (--dpi; 100 by default, 300 for print) and the format (--format): png (default),
svg (vector, shown in the report), or pdf (written beside a PNG that the report shows).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
FORMAT = "png"
FORMATS = ("png", "svg", "pdf")
WIDE = (10.0, 4.5)    # 1000 x 450 px at 100 dpi
SQUARE = (6.0, 5.0)   # 600 x 500 px
LINESTYLES = ("-", "--", ":", "-.")


def configure(dpi: int | None = None, fmt: str | None = None) -> None:
    """Resolution and file format of the charts that follow (see the module docstring)."""
    global DPI, FORMAT
    if dpi is not None:
        if not 10 <= int(dpi) <= 1200:
            raise ValueError(f"--dpi {dpi}: expected 10..1200")
        DPI = int(dpi)
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        FORMAT = fmt


def _save(fig, path: str) -> str:
    """Writes path (its extension replaced by the format's); returns the name the report shows."""
    base = os.path.splitext(path)[0]
    if FORMAT == "svg":
        fig.savefig(base + ".svg", format="svg")
        shown = base + ".svg"
    else:
        fig.savefig(base + ".png", dpi=DPI, format="png")
        shown = base + ".png"
        if FORMAT == "pdf":
            fig.savefig(base + ".pdf", format="pdf")
    plt.close(fig)
    return os.path.basename(shown)


def palette(n: int) -> list[tuple]:
    """n distinguishable (colour, line style) pairs: tab10 up to 10, tab20 up to 20, beyond that
    evenly spaced hues of a perceptual map, each hue reused with a different line style only after
    all hues are taken, so no two series share both colour and style."""
    if n <= 10:
        cols = [plt.get_cmap("tab10")(i) for i in range(n)]
        return [(c, "-") for c in cols]
    if n <= 20:
        return [(plt.get_cmap("tab20")(i), "-") for i in range(n)]
    hues = min(n, 24)
    cmap = plt.get_cmap("turbo")
    base = [cmap(0.05 + 0.9 * i / max(1, hues - 1)) for i in range(hues)]
    # interleave far-apart hues so neighbours in the legend differ clearly
    order = [i for k in range(3) for i in range(k, hues, 3)]
    return [(base[order[i % hues]], LINESTYLES[(i // hues) % len(LINESTYLES)]) for i in range(n)]


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
            figsize=WIDE, vmin=None, vmax=None, cmap: str = "viridis", annotate: bool = False,
            marks=None, mark_label: str = "") -> str:
    """marks: bool matrix; marked cells get a small white dot (e.g. 'within the noise floor')."""
    m = np.asarray(matrix, np.float64)
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    cm = plt.get_cmap(cmap).with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", interpolation="nearest", cmap=cm, vmin=vmin, vmax=vmax)
    if marks is not None and np.any(marks):
        yy, xx = np.nonzero(np.asarray(marks, bool))
        ax.scatter(xx, yy, s=max(2.0, 60.0 / max(1, m.shape[0]) ** 0.5), c="white", edgecolors="black",
                   linewidths=0.3, label=mark_label)
        if mark_label:
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize=7, frameon=False)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    small = 7 if m.shape[0] <= 30 else 5
    if yticklabels is not None:
        ax.set_yticks(np.arange(len(yticklabels)))
        ax.set_yticklabels(yticklabels, fontsize=None if len(yticklabels) <= 12 else small)
    else:
        _expert_ticks(ax, m.shape[0], "y")
    if xticklabels is not None:
        ax.set_xticks(np.arange(len(xticklabels)))
        ax.set_xticklabels(xticklabels, rotation=30 if len(xticklabels) <= 12 else 90, ha="right",
                           fontsize=None if len(xticklabels) <= 12 else small)
    else:
        _expert_ticks(ax, m.shape[1], "x")
    if annotate and m.size <= 144:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                    color="white" if v < (np.nanmax(m) + np.nanmin(m)) / 2 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def lines(path: str, x, series: dict[str, list], title: str, xlabel: str, ylabel: str,
          xticklabels: list[str] | None = None, logx: bool = False, ylim=None, markers: bool = True,
          bands: dict[str, tuple] | None = None, styles: dict[str, dict] | None = None) -> str:
    """Several named series over a shared x axis (None values are gaps). bands: {name: (low, high)}
    shaded around that series (a confidence interval); styles: {name: matplotlib line kwargs}.
    Series may carry their own x as {name: (xs, ys)}."""
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    pal = palette(len(series))
    for (name, ys), (colour, ls) in zip(series.items(), pal):
        xs = x
        if isinstance(ys, tuple):
            xs, ys = ys
        y = np.array([np.nan if v is None else v for v in ys], np.float64)
        kw = {"color": colour, "ls": ls, "marker": "o" if markers else None, "ms": 4}
        kw.update((styles or {}).get(name, {}))
        ax.plot(xs, y, label=name, **kw)
        if bands and name in bands:
            lo = np.array([np.nan if v is None else v for v in bands[name][0]], np.float64)
            hi = np.array([np.nan if v is None else v for v in bands[name][1]], np.float64)
            ax.fill_between(xs, lo, hi, color=kw["color"], alpha=0.15, lw=0)
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
        ax.legend(fontsize=8 if len(series) <= 12 else 6, loc="best",
                  ncol=1 if len(series) <= 6 else 2 if len(series) <= 16 else 3)
    return _save(fig, path)


def panels(path: str, x, groups: list[tuple], title: str, xlabel: str, xticklabels: list[str] | None = None) -> str:
    """Side-by-side panels, one per metric scale: groups = [(panel title, {name: values}), ...], so
    that a z-loss of 28 and an aux loss of 1.5 do not share an axis."""
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=WIDE, layout="constrained", squeeze=False)
    for ax, (sub, series) in zip(axes[0], groups):
        for (name, ys), (colour, ls) in zip(series.items(), palette(len(series))):
            y = np.array([np.nan if v is None else v for v in ys], np.float64)
            ax.plot(x, y, marker="o", ms=4, color=colour, ls=ls, label=name)
        if xticklabels is not None:
            ax.set_xticks(list(x))
            ax.set_xticklabels(xticklabels, rotation=45 if len(xticklabels) > 4 else 0, fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title(sub, fontsize=10)
        ax.set_xlabel(xlabel)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
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
                 cbar_label: str, vmin=0.0, vmax=1.0, cols: int = 3, log: bool = False) -> str:
    """Several heatmaps on one shared colour scale (e.g. one transition matrix per layer pair). NaN
    cells (masked rows) are grey; log=True uses a logarithmic colour scale from max(vmin, 1e-3)."""
    from matplotlib.colors import LogNorm
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
        base = plt.get_cmap("viridis")
        cm = base.with_extremes(bad="#bbbbbb", under=base(0.0))
        if log:
            norm = LogNorm(vmin=max(vmin or 0.0, 1e-3), vmax=vmax, clip=False)
            im = ax.imshow(np.ma.masked_invalid(np.where(np.isnan(m) | (m > 0), m, 1e-9)), aspect="auto", interpolation="nearest",
                           cmap=cm, norm=norm)
        else:
            im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", interpolation="nearest", cmap=cm, vmin=vmin,
                           vmax=vmax)
        _expert_ticks(ax, m.shape[1], "x", most=8)
        _expert_ticks(ax, m.shape[0], "y", most=8)
        ax.set_title(titles[k], fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8).set_label(cbar_label)
    fig.suptitle(title)
    return _save(fig, path)


def data_range(edges, series: dict, lo_q: float = 0.001, hi_q: float = 0.999, bins: int = 50):
    """Re-bins fine fixed-bin histograms onto the range the data occupies (quantiles lo_q..hi_q of
    all series together): returns (new edges, {name: counts}). Fine accumulator bins keep this exact
    to one fine bin."""
    edges = np.asarray(edges, np.float64)
    total = sum(np.asarray(c, np.float64) for c in series.values()) if series else np.zeros(len(edges) - 1)
    if total.sum() <= 0:
        return edges, series
    cdf = np.cumsum(total) / total.sum()
    a = int(np.searchsorted(cdf, lo_q))
    b = int(np.searchsorted(cdf, hi_q)) + 1
    a, b = max(0, a), min(len(total), max(b, a + 1))
    step = max(1, int(np.ceil((b - a) / bins)))
    b = min(len(total), a + step * int(np.ceil((b - a) / step)))
    new_edges = edges[a:b + 1:step]
    if new_edges[-1] != edges[b]:
        new_edges = np.append(new_edges, edges[b])
    out = {}
    for name, c in series.items():
        c = np.asarray(c, np.float64)
        idx = np.minimum((np.arange(a, b) - a) // step, len(new_edges) - 2)
        out[name] = np.bincount(idx, weights=c[a:b], minlength=len(new_edges) - 1)
    return new_edges, out


def histogram_pair(path: str, left: tuple, right: tuple, title: str) -> str:
    """Two panels of histograms; each side is (edges, {name: counts}, xlabel), drawn on the range the
    data occupies (data_range) rather than the accumulator's full range."""
    fig, axes = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    for ax, (edges, series, xlabel) in zip(axes, (left, right)):
        edges, series = data_range(edges, series)
        pal = palette(len(series))
        for (name, counts), (colour, ls) in zip(series.items(), pal):
            c = np.asarray(counts, np.float64)
            if c.sum() > 0:
                ax.stairs(c / c.sum(), edges, label=name, color=colour, ls=ls)
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share of tokens per bin")
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def cache_panels(path: str, runs: list[dict], policies: list[str], tokens: int, title: str) -> str:
    """The expert-cache replay: hit rate (left) beside its cost, experts moved per token (right), over
    the cache size; one colour per policy, solid without and dashed with prefetching (prefetch can
    raise transfers while it lowers or raises the hit rate: both are shown)."""
    fig, axes = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    pal = palette(len(policies))
    for pol, (colour, _) in zip(policies, pal):
        for pf, ls, mk in ((False, "-", "o"), (True, "--", "s")):
            rs = sorted((r for r in runs if r["policy"] == pol and r["prefetch"] == pf),
                        key=lambda r: r["cache_experts_per_layer"])
            if not rs:
                continue
            x = [r["cache_experts_per_layer"] for r in rs]
            label = pol + (" + prefetch" if pf else "")
            axes[0].plot(x, [r["hit_rate"] for r in rs], color=colour, ls=ls, marker=mk, ms=4, label=label)
            axes[1].plot(x, [r["experts_transferred"] / max(1, tokens) for r in rs], color=colour, ls=ls, marker=mk,
                         ms=4, label=label)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("hit rate")
    axes[1].set_ylabel("experts moved per token (demand + prefetch)")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("cache size (experts per layer)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
