"""The report's figures, drawn with matplotlib and returned as self-contained `data:` URIs (SVG).

No pyplot and no GUI backend: each figure is a bare `matplotlib.figure.Figure` rendered straight to
SVG (text as paths, a fixed hash salt and no date, so the same report gives the same bytes). Labels
are plain text: `$` is escaped so an attribute name never turns into mathtext.
"""

from __future__ import annotations

import base64
import io
import math
import warnings

from ..errors import printable

SIGNIFICANT = "#c2410c"   # orange-red: flip rate significantly above the null
PLAIN = "#475569"         # slate: not significant
NULL = "#2563eb"          # blue: the null control
BAND = "#94a3b8"

_RC = {
    "svg.fonttype": "path",
    "svg.hashsalt": "zoom-report",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.edgecolor": "#94a3b8",
    "axes.labelcolor": "#334155",
    "xtick.color": "#475569",
    "ytick.color": "#334155",
    "axes.titlesize": 9.5,
    "axes.titleweight": "bold",
}


def label(text, width: int = 34) -> str:
    """A plot-safe label: at most `width` characters, `$` escaped (no mathtext), no newlines, and control
    characters (NUL, ESC, ...: illegal in the SVG's XML) shown as escapes."""
    text = printable(" ".join(str(text).split()))
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _figure(width: float, height: float):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        return Figure(figsize=(width, height), layout="constrained")


def _data_uri(fig) -> str:
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(_RC), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in exotic names: drawn as boxes, not an error
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                                     "Type": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _style(ax):
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="x", color="#e2e8f0", linewidth=0.8)
    ax.set_axisbelow(True)


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def forest_plot(rows: list[dict], null: dict | None, *, x_label="flip rate (dot) and its 95% Wilson interval",
                reference_label="null control", title: str | None = None) -> str:
    """One row per attribute: flip rate and its interval; the null's rate as a dashed line over its band.
    The caller keeps `rows` to a readable number (report.html: the top PLOT_TOP) and says so in `title`."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        n = max(len(rows), 1)
        fig = _figure(7.2, 0.34 * n + 1.15 + 0.25 * bool(title))
        ax = fig.add_subplot()
        _style(ax)
        if title:
            ax.set_title(label(title, 110), loc="left")
        if null is not None and _ok(null.get("flip_rate")):
            ax.axvspan(null["ci_low"], null["ci_high"], color=NULL, alpha=0.09, lw=0)
            ax.axvline(null["flip_rate"], color=NULL, ls="--", lw=1.3,
                       label=f"{reference_label} {null['flip_rate']:.2f} (band: its 95% interval)")
        def style(row):
            if row.get("significant"):
                return SIGNIFICANT, "above the null (q < 0.05)"
            return PLAIN, "not significant"

        _interval_rows(ax, rows, ("flip_rate", "ci_low", "ci_high"), style)
        ax.set_xlim(-0.01, 1.01)
        ax.set_xlabel(label(x_label, 80))
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper center", ncol=3, frameon=False, fontsize=8, handlelength=1.6)
        return _data_uri(fig)


def _interval_rows(ax, rows: list[dict], keys: tuple[str, str, str], style) -> None:
    """One row per entry, top to bottom: a dot at keys[0] on a bar from keys[1] to keys[2];
    style(row) -> (color, legend label), each label shown once."""
    value, low, high = keys
    n = max(len(rows), 1)
    seen = set()
    for i, row in enumerate(rows):
        if not _ok(row.get(value)):
            continue
        y = n - 1 - i
        color, kind = style(row)
        ax.hlines(y, row[low], row[high], color=color, lw=2.4, alpha=0.85)
        ax.plot([row[value]], [y], "o", color=color, ms=6.5, mec="white", mew=0.8,
                label=None if kind in seen else kind)
        seen.add(kind)
    ax.set_yticks(range(n), [label(r["name"]) for r in reversed(rows)] or [""])
    ax.set_ylim(-0.6, n - 0.4)


def difference_plot(rows: list[dict], title: str | None = None) -> str:
    """compare: per attribute the difference of flip rates (B - A) and its Newcombe interval."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        n = max(len(rows), 1)
        fig = _figure(7.2, 0.34 * n + 1.15 + 0.25 * bool(title))
        ax = fig.add_subplot()
        _style(ax)
        if title:
            ax.set_title(label(title, 110), loc="left")
        ax.axvline(0, color="#0f172a", lw=1)
        def style(row):
            if row.get("significant"):
                return (NULL if row.get("reference") else SIGNIFICANT), "different (q < 0.05)"
            if row.get("reference"):
                return NULL, "reference"
            return PLAIN, "not significant"

        _interval_rows(ax, rows, ("difference", "diff_ci_low", "diff_ci_high"), style)
        ax.set_xlim(-1.02, 1.02)
        ax.set_xlabel("difference of flip rates, B − A (dot), and its 95% Newcombe interval")
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper center", ncol=3, frameon=False, fontsize=8, handlelength=1.6)
        return _data_uri(fig)


def _panel_grid(k: int, ylabel: str, xlabel: str, cols: int = 4, cell=(2.55, 2.05)):
    """A figure of k small panels sharing axes, styled and labelled on the outer edges; returns
    (figure, the k visible axes)."""
    cols = max(1, min(cols, k))
    rows = math.ceil(k / cols)
    fig = _figure(cell[0] * cols + 0.4, cell[1] * rows + 0.5)
    axes = list(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).flat)
    for idx, ax in enumerate(axes):
        if idx >= k:
            ax.set_visible(False)
            continue
        _style(ax)
        ax.grid(axis="y", color="#e2e8f0", linewidth=0.8)
        if idx % cols == 0:
            ax.set_ylabel(ylabel)
        if idx // cols == rows - 1 or idx + cols >= k:
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes[:k]


def dose_response_plot(panels: list[tuple[str, dict, bool]], null: dict | None) -> str:
    """Sweep runs: P(base class) against alpha, median over seeds and the interquartile band."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig, axes = _panel_grid(len(panels), "P(base class)", "alpha (edit strength, signed)")
        for ax, (name, dr, significant) in zip(axes, panels):
            color = SIGNIFICANT if significant else PLAIN
            x = dr["alpha"]
            keep = [j for j, m in enumerate(dr["median"]) if m is not None]
            xs = [x[j] for j in keep]
            ax.axvline(0, color="#cbd5e1", lw=0.8)
            if null is not None:
                nk = [j for j, m in enumerate(null["median"]) if m is not None]
                ax.plot([null["alpha"][j] for j in nk], [null["median"][j] for j in nk], color=NULL, ls="--",
                        lw=1.1, label="null control (median)")
            ax.fill_between(xs, [dr["q25"][j] for j in keep], [dr["q75"][j] for j in keep], color=color,
                            alpha=0.18, lw=0, label="interquartile band over seeds")
            ax.plot(xs, [dr["median"][j] for j in keep], color=color, lw=1.8, label="median over seeds")
            ax.set_title(label(name, 30), loc="left")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper center", ncol=3, frameon=False, fontsize=8)
        # (orange panels: attributes significantly above the null; slate: not significant)
        return _data_uri(fig)


def strength_histograms(panels: list[tuple[str, list[float], int, bool]], null: list[float] | None, top: float) -> str:
    """Per attribute the |alpha| (or |delta|/|noise|) at which flipped seeds flipped; null overlaid."""
    import matplotlib
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context(_RC):
        top = top if top and top > 0 else max([max(v) for _, v, _ in panels if v] + [1.0])
        bins = np.linspace(0, top * 1.0001, 13)
        fig, axes = _panel_grid(len(panels), "seeds", "strength to flip")
        for ax, (name, values, n, significant) in zip(axes, panels):
            ax.hist(values, bins=bins, color=SIGNIFICANT if significant else PLAIN, alpha=0.75, label="flipped seeds")
            if null:
                ax.hist(null, bins=bins, histtype="step", color=NULL, lw=1.3, ls="--", label="null control")
            ax.set_title(label(f"{name}  ({len(values)}/{n} flipped)", 34), loc="left")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = [], []
        for ax in axes:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        if handles:
            fig.legend(handles, labels, loc="outside upper center", ncol=2, frameon=False, fontsize=8)
        return _data_uri(fig)
