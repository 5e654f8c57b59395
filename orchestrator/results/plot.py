"""``pareto.png``: accuracy (a language model: perplexity) against size and against latency,
the two trade-offs a person weighs when picking a compressed model.

Drawn on a bare ``matplotlib.figure.Figure`` (rendered by Agg), never through ``pyplot``: the
report is rebuilt from a Ray callback inside the search driver, where a global pyplot state or
an interactive backend would leak figures or need a display.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Any

import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from orchestrator.results.quality import ACCURACY_DROP, Quality, quality_of_columns
from orchestrator.results.table import MB

SIZE = "compress/size_bytes"
GREY = "#b0b0b0"
RING = "#d62728"
# Above this many finished trials, error bars are drawn for the Pareto trials only and the
# legend goes to a fixed corner: thousands of bars hide the points, and matplotlib's search
# for the emptiest corner (and a path per bar) took most of a rebuild's second at 5,000 trials.
MANY_POINTS = 200
# The columns the plot reads (a row dict of every column costs more than the drawing).
COLUMNS = ("trial", "status", "recipe", "feasible", "pareto", SIZE)


def _done(table: pa.Table, q: Quality) -> list[dict[str, Any]]:
    wanted = (*COLUMNS, q.metric, q.latency, *(q.column + s for s in ("", "_lo", "_hi")))
    table = table.select([c for c in wanted if c in table.column_names])
    return [r for r in table.to_pylist() if r["status"] == "done"]


def _panel(
    ax: Any,
    rows: list[dict[str, Any]],
    x_of: Any,
    baseline: dict[str, float] | None,
    colour_range: tuple[float, float] | None,
    q: Quality,
    log_x: bool = False,
) -> Any:
    """One panel: infeasible grey, feasible coloured by latency, Pareto ringed and labelled,
    the dense baseline a star. Returns the colour-mapped scatter (for the colourbar) or None."""
    points = [(x_of(r), r.get(q.metric), r) for r in rows]
    points = [(x, y, r) for x, y, r in points if x is not None and x > 0 and y is not None]
    many = len(points) > MANY_POINTS
    _error_bars(ax, [p for p in points if p[2].get("pareto")] if many else points, q)
    grey = [(x, y) for x, y, r in points if not r.get("feasible")]
    fine = [(x, y, r.get(q.latency)) for x, y, r in points if r.get("feasible")]
    if grey:
        ax.scatter(*zip(*grey, strict=True), c=GREY, s=28, label="infeasible", zorder=2)
    mapped = None
    timed = [p for p in fine if p[2] is not None]
    untimed = [p[:2] for p in fine if p[2] is None]
    if timed and colour_range is not None:
        xs, ys, cs = zip(*timed, strict=True)
        mapped = ax.scatter(
            xs,
            ys,
            c=cs,
            cmap="viridis",
            vmin=colour_range[0],
            vmax=colour_range[1],
            s=36,
            label="feasible",
            zorder=3,
        )
    if untimed:
        ax.scatter(*zip(*untimed, strict=True), c="tab:blue", s=36, zorder=3)
    front = [(x, y, r) for x, y, r in points if r.get("pareto")]
    if front:
        xs, ys, _ = zip(*front, strict=True)
        ax.scatter(
            xs,
            ys,
            s=140,
            facecolors="none",
            edgecolors=RING,
            linewidths=1.5,
            label="Pareto front",
            zorder=4,
        )
        all_x = [p[0] for p in points] + ([] if baseline is None else [x_of(baseline) or xs[0]])
        for x, y, r in front:
            _label(ax, x, y, r.get("recipe") or r["trial"], all_x, log_x)
    if baseline is not None:
        bx, by = x_of(baseline), baseline.get(q.metric)
        if bx is not None and bx > 0 and by is not None:
            ax.scatter([bx], [by], marker="*", s=220, c="black", label="dense", zorder=5)
            ax.annotate("dense", (bx, by), xytext=(6, -10), textcoords="offset points")
    if not points and (baseline is None or baseline.get(q.metric) is None):
        ax.text(
            0.5,
            0.5,
            "no finished trials yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#666666",
        )
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right" if many else "best")
    return mapped


def _error_bars(ax: Any, points: list[tuple[float, float, dict[str, Any]]], q: Quality) -> None:
    """Each trial's score with the interval of its paired loss against the dense model (the
    Pareto trials' alone above ``MANY_POINTS`` trials): accuracy = dense accuracy - drop, so
    the drop's [lo, hi] is [y - (hi - drop), y + (drop - lo)]; perplexity = dense perplexity x
    (1 + increase), so the increase's [lo, hi] is y x [(1 + lo), (1 + hi)] / (1 + increase)."""
    bars = []
    for x, y, r in points:
        loss, lo, hi = (r.get(q.column + s) for s in ("", "_lo", "_hi"))
        if None in (loss, lo, hi):
            continue
        if q is ACCURACY_DROP:
            bars.append((x, y, hi - loss, loss - lo))
        else:
            bars.append((x, y, y * (loss - lo) / (1 + loss), y * (hi - loss) / (1 + loss)))
    if bars:
        xs, ys, below, above = zip(*bars, strict=True)
        ax.errorbar(
            xs,
            ys,
            yerr=[below, above],
            fmt="none",
            ecolor="#888888",
            elinewidth=1,
            capsize=2,
            zorder=1,
        )


def _label(ax: Any, x: float, y: float, text: str, all_x: list[float], log_x: bool) -> None:
    """A recipe label beside a Pareto point, wrapped to two short lines and put on the side
    with more room, so labels stay inside the panel instead of widening the figure."""
    scale = math.log if log_x else (lambda v: v)
    lo, hi = scale(min(all_x)), scale(max(all_x))
    right_half = hi > lo and (scale(x) - lo) / (hi - lo) > 0.5
    ann = ax.annotate(
        textwrap.fill(text, width=max(24, len(text) // 2 + 1)),
        (x, y),
        xytext=(-8 if right_half else 8, 4),
        textcoords="offset points",
        ha="right" if right_half else "left",
        fontsize=7,
        color=RING,
    )
    ann.set_in_layout(False)  # the layout engine must not shrink the panel to fit labels


def _plain_ticks(ax: Any) -> None:
    """Log-axis ticks as plain numbers (0.5, 1, 2) rather than 5x10^-1: sizes rarely span
    more than a decade, so the minor ticks carry the information and must be readable."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="x", which="minor", labelsize=7)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _size_mb(r: dict[str, Any]) -> float | None:
    v = r.get(SIZE)
    return None if v is None else v / MB


def render_pareto_png(
    table: pa.Table, baseline: dict[str, float] | None, title: str = "", dpi: int = 110
) -> bytes:
    """The figure as PNG bytes. Works with no finished trial and without a baseline (the
    panels then say so), so a report can be drawn from the first minute of a search."""
    q = quality_of_columns(table.column_names)
    rows = _done(table, q)
    lat = [r[q.latency] for r in rows if r.get("feasible") and r.get(q.latency) is not None]
    colour_range = None
    if lat:
        # One latency for all: widen the range so the colourbar shows a readable scale.
        lo, hi = min(lat), max(lat)
        pad = 0.0 if hi > lo else max(abs(lo) * 0.05, 0.01)
        colour_range = (lo - pad, hi + pad)
    fig = Figure(figsize=(12, 5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no GUI backend, safe in any process
    left, right = fig.subplots(1, 2)
    has_sizes = any((_size_mb(r) or 0) > 0 for r in rows) or (
        baseline is not None and (baseline.get(SIZE) or 0) > 0
    )
    if has_sizes:
        left.set_xscale("log")
    mapped = _panel(left, rows, _size_mb, baseline, colour_range, q, log_x=has_sizes)
    if has_sizes:
        _plain_ticks(left)
    left.set_xlabel("artifact size (MB, log scale)")
    bars = f"paired {q.words} interval" + (", Pareto trials" if len(rows) > MANY_POINTS else "")
    score = q.metric.split("/", 1)[1]
    latency = f"latency, {q.latency_words} (ms)"
    left.set_ylabel(f"{q.metric} (bars: {bars})")
    left.set_title(f"{score} vs size")
    if mapped is not None:
        fig.colorbar(mapped, ax=left, label=latency)
    _panel(right, rows, lambda r: r.get(q.latency), baseline, colour_range, q)
    right.set_xlabel(latency)
    right.set_ylabel(f"{q.metric} (bars: {bars})")
    right.set_title(f"{score} vs latency")
    if title:
        fig.suptitle(title)
    return _png(fig)


# How a setting's candidates are labelled on the heatmap's columns.
SETTING_LABELS = {
    "bits": lambda v: f"{v:g} bits",
    "sparsity": lambda v: f"{v:.0%} sparse",
    "rank_ratio": lambda v: "dense" if v >= 1 else f"rank {v:g}",
}
SETTING_NAMES = {"bits": "bits", "sparsity": "sparsity", "rank_ratio": "weights kept"}


def render_sensitivity_png(
    allocations: list[dict[str, Any]], title: str = "", dpi: int = 110
) -> bytes:
    """The sensitivity profiles of per-layer allocations (mixed precision, sparsity, rank), one
    layers x candidates heatmap each, side by side (log10 of the KL divergence of the outputs
    with only that layer changed), the setting each layer got outlined. ``allocations``: as
    ``compress_report.json`` records them (``setting``, ``choice``, ``mean``, ``profile``)."""
    import numpy as np

    height = max(len(a["profile"]["layers"]) for a in allocations)
    widths = [len(a["profile"]["values"]) for a in allocations]
    fig = Figure(figsize=(2.2 * len(allocations) + 1.1 * sum(widths), 1.4 + 0.22 * height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(allocations), squeeze=False, width_ratios=widths)[0]
    for ax, allocation in zip(axes, allocations, strict=True):
        profile, chosen = allocation["profile"], allocation["choice"]
        setting, layers, values = allocation["setting"], profile["layers"], profile["values"]
        kl = np.asarray(profile["kl"], dtype=float)
        # An unchanged layer (0 bits lost, a dense layer) drawn a decade below the least change.
        kl = np.maximum(kl, kl[kl > 0].min() / 10 if (kl > 0).any() else 1e-9)
        image = ax.imshow(np.log10(kl), aspect="auto", cmap="viridis_r")
        label = SETTING_LABELS.get(setting, lambda v: f"{v:g}")
        ax.set_xticks(range(len(values)), [label(v) for v in values], rotation=30, fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        for i, name in enumerate(layers):
            j = values.index(chosen[name])
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=RING, linewidth=1.8)
            )
        fig.colorbar(image, ax=ax, label="log10 KL of the outputs (nats)")
        mean = allocation.get("param_ratio", allocation["mean"])
        ax.set_title(
            f"{SETTING_NAMES.get(setting, setting)}: mean {mean:.3g} (budget "
            f"{allocation['budget']:.3g})",
            fontsize=9,
        )
    fig.suptitle(title or "sensitivity per layer; outlined: the allocation", fontsize=10)
    return _png(fig)
