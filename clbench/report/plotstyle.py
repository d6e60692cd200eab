"""One figure style for every clbench figure: sizes for paper columns, a colour-blind-safe palette,
a fixed colour per method, and a save helper that writes the PDF (paper) and PNG (report page).

Figures are built as bare `matplotlib.figure.Figure` objects on the Agg canvas, never through
pyplot: no global backend switch, no figure registry to leak, safe to call from any process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib
import matplotlib.cm
import matplotlib.colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SINGLE_COLUMN_IN = 3.4  # one column of a two-column paper (ACL, NeurIPS-ish)
DOUBLE_COLUMN_IN = 7.0

# Okabe & Ito (2008), distinguishable under the common colour-vision deficiencies. Yellow last:
# it is the hardest to see on white, so it is only used from the 8th method on.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]
HEATMAP_CMAP = "viridis"  # perceptually uniform and colour-blind-safe

RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,  # embed TrueType: text stays text (searchable, editable) in the PDF
    "ps.fonttype": 42,
    "image.cmap": HEATMAP_CMAP,
}


@contextlib.contextmanager
def styled():
    """The clbench rcParams for the duration of the block (the caller's settings are restored)."""
    with matplotlib.rc_context(RC):
        yield


class MethodStyle:
    """Colour/marker/linestyle per method, assigned from the sorted list of all method names in a
    report, so a method looks the same in every figure however many groups it appears in."""

    def __init__(self, methods):
        self.order = sorted(set(methods))
        self._index = {m: i for i, m in enumerate(self.order)}

    def color(self, method: str) -> str:
        return OKABE_ITO[self._index[method] % len(OKABE_ITO)]

    def marker(self, method: str) -> str:
        return MARKERS[self._index[method] % len(MARKERS)]

    def linestyle(self, method: str) -> str:
        # past 8 methods colours repeat; the line style tells the repeats apart
        return LINESTYLES[(self._index[method] // len(OKABE_ITO)) % len(LINESTYLES)]

    def order_of(self, methods) -> list[str]:
        """The methods of one figure, in the report-wide (sorted) order."""
        return [m for m in self.order if m in methods]


def new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write stem.pdf and stem.png; returns both paths. Metadata without dates keeps reruns
    byte-stable, so a re-generated report does not show up as changed in version control."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = stem.with_suffix(".pdf"), stem.with_suffix(".png")
    fig.savefig(pdf, metadata={"CreationDate": None, "ModDate": None})
    fig.savefig(png, metadata={"Software": None})
    return [pdf, png]


def text_color_for(rgba) -> str:
    """Black or white, whichever reads better on a cell of this colour (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


# How a matrix.csv `metric` is named on an axis or in a title: in full, and short (beside others)
METRIC_NAMES = {"per_byte_likelihood": ("per_byte_likelihood = 2^-bpb", "2^-bpb")}


def metric_name(metric: str, brief: bool = False) -> str:
    names = METRIC_NAMES.get(metric)
    return metric if names is None else names[brief]


def short(name: str, width: int = 16) -> str:
    """Long task names would squeeze the panels; the full names are in report.md."""
    return name if len(name) <= width else name[: width - 1] + "…"


# --- the figure types of `clbench report`, drawn from plain numbers (no clbench data classes) -------


def heatmaps(title: str, tasks: list[str], panels: list[tuple[str, "np.ndarray", list[str], int]],
             vrange: tuple[float, float], value_label: str) -> Figure:
    """One accuracy-matrix panel per method, one shared colour scale. Each panel is
    (title, matrix rows x tasks, row labels, number of stream rows); rows past the stream rows
    (e.g. merged models) are drawn below a white rule. Values are printed in every cell."""
    import numpy as np

    T, M = len(tasks), len(panels)
    ncols = min(M, 4)
    nrows = -(-M // ncols)
    n_rows = max(p[1].shape[0] for p in panels)
    same_rows = all(p[2] == panels[0][2] for p in panels)
    fig = new_figure(ncols * (0.36 * T + 0.1) + 1.5 + (0 if same_rows else 0.9 * (ncols - 1)),
                     nrows * (0.24 * n_rows + 0.7) + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = matplotlib.colormaps[HEATMAP_CMAP].with_extremes(bad="white")
    norm = matplotlib.colors.Normalize(*vrange)
    unit = vrange == (0.0, 1.0)
    for k, ax in enumerate(axes.flat):
        if k >= M:
            ax.remove()
            continue
        label, mat, row_labels, n_stream = panels[k]
        padded = np.full((n_rows, T), np.nan)  # equal heights so the cells line up across panels
        padded[: mat.shape[0]] = mat
        # pcolormesh, not imshow: cells stay vector shapes in the PDF instead of an embedded bitmap
        ax.pcolormesh(np.arange(T + 1) - 0.5, np.arange(n_rows + 1) - 0.5, np.ma.masked_invalid(padded), cmap=cmap,
                      norm=norm)
        ax.set_ylim(n_rows - 0.5, -0.5)  # row 0 (the base model) on top
        for (i, j), v in np.ndenumerate(padded):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}" if unit else f"{v:.3g}", ha="center", va="center", fontsize=5.5,
                        color=text_color_for(cmap(norm(v))))
        ax.axhline(0.5, color="white", lw=0.8)  # the base row stands apart
        if mat.shape[0] > n_stream:
            ax.axhline(n_stream - 0.5, color="white", lw=2.5)
        ax.set_xticks(range(T), [short(t) for t in tasks], rotation=40, ha="right", rotation_mode="anchor")
        show_rows = k % ncols == 0 or not same_rows
        ax.set_yticks(range(len(row_labels)), [short(r, 22) for r in row_labels] if show_rows else [])
        ax.tick_params(length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_title(label)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes.flat[:M]), shrink=0.9,
                 aspect=25, label=value_label, pad=0.02)
    fig.suptitle(title)
    return fig


def curves(title: str, tasks: list[str], series: dict, styles: MethodStyle, ylabel: str,
           ylim: tuple[float, float] | None = None) -> Figure:
    """One panel per task (same y scale), one line per method: series[method] = (mean (T+1) x T,
    95% CI half-widths or None, n). The grey band marks the stage that trains the panel's task."""
    import numpy as np

    T = len(tasks)
    ncols = 1 if T == 1 else 2 if T <= 4 else 3
    nrows = -(-T // ncols)
    fig = new_figure(SINGLE_COLUMN_IN if ncols <= 2 else DOUBLE_COLUMN_IN, nrows * 1.3 + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    x = np.arange(T + 1)
    for i, ax in enumerate(axes.flat):
        if i >= T:
            ax.remove()
            axes.flat[i - ncols].xaxis.set_tick_params(labelbottom=True)  # the panel above is now last
            continue
        ax.axvspan(i + 0.6, i + 1.4, color="0.9", lw=0, zorder=0)
        for method, (mean, half, n) in series.items():
            c = styles.color(method)
            ax.plot(x, mean[:, i], color=c, marker=styles.marker(method), ls=styles.linestyle(method), ms=3,
                    label=f"{method} (n={n})")
            if half is not None:
                ax.fill_between(x, mean[:, i] - half[:, i], mean[:, i] + half[:, i], color=c, alpha=0.12, lw=0)
        ax.set_title(short(tasks[i], 24))
        ax.set_xticks(x)
        ax.set_xlim(-0.4, T + 0.4)
        if ylim:  # a CI band must not stretch a [0, 1] score axis past its range
            ax.set_ylim(*ylim)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if i + ncols >= T:
            ax.set_xlabel("stage")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3))
    fig.suptitle(title)
    return fig


def bar_panels(title: str, panels: list[dict], styles: MethodStyle, n: dict, ncols: int, height: float,
               note: str = "") -> Figure:
    """Bars of per-method means with 95% CI error bars (omitted when a CI is NaN, i.e. n = 1) and
    faint dots for the single samples. panels: {label, values: {method: (mean, ci, samples)}, log, zero,
    dots (default True)}."""
    import numpy as np
    from matplotlib.patches import Patch

    methods = styles.order_of(n)
    nrows = -(-len(panels) // ncols)
    fig = new_figure(SINGLE_COLUMN_IN, height)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, p in zip(axes.flat, panels):
        drawn = False
        for k, m in enumerate(methods):
            mean, ci, samples = p["values"].get(m, (np.nan, np.nan, []))
            if not np.isfinite(mean):
                continue
            drawn = True
            ax.bar(k, mean, width=0.7, color=styles.color(m), alpha=0.9, lw=0)
            if np.isfinite(ci):
                ax.errorbar(k, mean, yerr=ci, color="black", capsize=2, lw=0.8, capthick=0.8)
            pts = [s for s in samples if np.isfinite(s)]
            if len(pts) > 1 and p.get("dots", True):
                ax.scatter(k + np.linspace(-0.18, 0.18, len(pts)), pts, s=5, color="black", alpha=0.35, lw=0,
                           zorder=3)
        if not drawn:  # an empty panel without an axis, so the note cannot collide with tick labels
            ax.text(0.5, 0.5, "undefined\n(one-task\nstream)" if p.get("zero") else "n/a", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
            ax.set_yticks([])
            ax.spines["left"].set_visible(False)
        elif p.get("log"):
            ax.set_yscale("log")
        if p.get("zero") and drawn:
            ax.axhline(0, color="0.3", lw=0.6)
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(p["label"])
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    fig.legend([Patch(color=styles.color(m)) for m in methods], [f"{m} (n={n[m]})" for m in methods],
               loc="outside lower center", ncols=min(len(methods), 3))
    fig.suptitle(f"{title}\n{note}" if note else title)
    return fig


def stability(title: str, points: dict, styles: MethodStyle, note: str = "") -> Figure:
    """Learning accuracy (x) against forgetting (y); points[method] = dict(x, y, xci, yci, xs, ys, n):
    a large marker at the mean (with CI bars when n > 1) and faint markers for the samples."""
    import numpy as np

    fig = new_figure(SINGLE_COLUMN_IN, 2.7)
    ax = fig.subplots()
    any_y = False
    for m in styles.order_of(points):
        p = points[m]
        c, mk = styles.color(m), styles.marker(m)
        ax.scatter(p["xs"], p["ys"], color=c, marker=mk, s=12, alpha=0.3, lw=0)
        if np.isfinite(p["x"]) and np.isfinite(p["y"]):
            any_y = True
            ax.errorbar(p["x"], p["y"], xerr=p["xci"] if np.isfinite(p["xci"]) else None,
                        yerr=p["yci"] if np.isfinite(p["yci"]) else None, fmt=mk, color=c, ms=6, mec="white",
                        mew=0.6, capsize=2, lw=0.8, label=f"{m} (n={p['n']})")
    if not any_y:
        ax.text(0.5, 0.5, "forgetting undefined (one-task stream)", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_xlabel("learning accuracy (LA) → more plastic")
    ax.set_ylabel("forgetting → less stable")
    ax.text(0.99, 0.02, "better ↘", transform=ax.transAxes, ha="right", va="bottom", color="0.4")
    ax.margins(0.15)
    if any_y:
        fig.legend(loc="outside lower center", ncols=min(len(points), 3))
    fig.suptitle(f"{title}\n{note}" if note else title)
    return fig


def lines(title: str, x, series: dict, styles: MethodStyle, xlabel: str, ylabel: str) -> Figure:
    """One line per method: series[method] = (y values, n)."""
    fig = new_figure(SINGLE_COLUMN_IN, 2.2)
    ax = fig.subplots()
    ax.axhline(0, color="0.3", lw=0.6)
    for m in styles.order_of(series):
        y, n = series[m]
        ax.plot(x, y, color=styles.color(m), marker=styles.marker(m), ls=styles.linestyle(m), ms=3,
                label=f"{m} (n={n})")
    ax.set_xticks(list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.legend(loc="outside lower center", ncols=min(len(series), 3))
    fig.suptitle(title)
    return fig
