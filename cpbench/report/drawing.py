"""Drawing the report's plots: each ``draw_*`` turns the records of :mod:`cpbench.report.plots` into a
:class:`matplotlib.figure.Figure` on an explicit Agg canvas (no pyplot, no global backend state, so it
works headless and inside other programs)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

if TYPE_CHECKING:
    from .plots import AccuracyRankPoint, EfficiencyPoint, ErrorRankPoint, ParetoPoint, ReferencePoint

__all__ = ["draw_pareto", "draw_efficiency", "draw_error_rank", "draw_accuracy_rank", "style_map"]

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


# -- drawing ----------------------------------------------------------------------------------
def style_map(names) -> dict[str, tuple[str, str]]:
    """A stable (colour, marker) per name: sorted names get tab10 colours and distinct markers."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: (cmap(i % 10), _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(sorted(set(names)))}


def _figure(w=9.0, h=4.8) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _flagged_handle():
    return Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="0.3",
                  label="flagged timing (hollow)")


def _legend(ax, handles):
    """One legend outside the axes, on the right, so it never hides a point."""
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _readable_log(ax, axis="x") -> None:
    """Log ticks at 1, 2, 5 × 10^k written as plain numbers (0.2, 1, 50); no minor labels, which
    matplotlib otherwise prints as 3×10⁻¹4×10⁻¹ run together on a short axis."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def _log_if_wide(ax, values, axis="x"):
    vals = [v for v in values if v and v > 0]
    if vals and max(vals) / min(vals) > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        _readable_log(ax, axis)
        return True
    return False


def draw_pareto(points: list[ParetoPoint], *, title: str = "", references: Sequence[ReferencePoint] = ()) -> Figure:
    """Speedup (with CI) against accuracy drop, per decomposer; the Pareto front as a step line."""
    fig = _figure()
    ax = fig.add_subplot()
    styles = style_map(p.decomposer for p in points)
    for name, (colour, marker) in styles.items():
        labelled = False
        for flagged in (False, True):
            pts = [p for p in points if p.decomposer == name and p.flagged == flagged]
            if not pts:
                continue
            ax.errorbar([p.drop for p in pts], [p.speedup for p in pts],
                        yerr=[[p.speedup - p.speedup_lo for p in pts], [p.speedup_hi - p.speedup for p in pts]],
                        fmt=marker, color=colour, markerfacecolor="none" if flagged else colour, markersize=7,
                        capsize=3, linewidth=1, label=None if labelled else name)
            labelled = True
    from .plots import _short_rank, pareto_front  # here: plots.py re-exports this module's functions

    front = pareto_front(points)
    # only the front is labelled, by number beside the point; what each number is goes in a key beside
    # the legend (full labels next to the points pile up where front points sit close together)
    for k, p in enumerate(front, 1):
        ax.annotate(str(k), (p.drop, p.speedup), textcoords="offset points", xytext=(5, 3), fontsize=8,
                    color="0.15", fontweight="bold")
    if front:
        key = "\n".join(f"{k}: {_short_rank(p.rank)} · {p.backend} · b{p.batch}" for k, p in enumerate(front, 1))
        ax.text(1.02, 0.0, "Pareto front\n" + key, transform=ax.transAxes, fontsize=7, va="bottom", ha="left",
                color="0.2")
    if front:
        ax.step([p.drop for p in front], [p.speedup for p in front], where="post", color="0.25",
                linestyle="--", linewidth=1.2, label="Pareto front", zorder=0)
    for ref in references:
        ax.plot([ref.drop], [ref.speedup], marker="*", markersize=16, color="gold", markeredgecolor="black",
                linestyle="none", label=ref.label)
    ax.axhline(1.0, color="0.6", linewidth=0.8)
    _log_if_wide(ax, [p.speedup_lo for p in points] + [p.speedup_hi for p in points], "y")
    ax.set_xlabel("accuracy drop after fine-tuning (percentage points)")
    ax.set_ylabel("measured whole-network speedup (×, 95% CI)")
    ax.set_title(title or "speedup against accuracy drop")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    _legend(ax, handles + ([_flagged_handle()] if any(p.flagged for p in points) else []))
    return fig


def draw_efficiency(points: list[EfficiencyPoint], *, title: str = "") -> Figure:
    """Measured layer speedup (with CI) against the layer's FLOP ratio, one panel per layer (the panel
    says which layer, so no point needs a label), colour = backend, marker = decomposer, with y = x."""
    panels = sorted({(p.model, p.layer) for p in points})
    nr, nc = _grid(len(panels))
    fig = _figure(9.0 if nc == 1 else 4.4 * nc + 1.8, 4.8 if nr == 1 else 3.4 * nr + 0.6)
    colours = {n: c for n, (c, _) in style_map(p.backend for p in points).items()}
    markers = {n: m for n, (_, m) in style_map(p.decomposer for p in points).items()}
    multi_model = len({m for m, _ in panels}) > 1
    values = [p.theoretical for p in points] + [p.measured_hi for p in points] + [p.measured_lo for p in points]
    lo, hi = max(min(values + [1.0]) * 0.8, 1e-3), max(values + [1.0]) * 1.15
    for k, (model, layer) in enumerate(panels):
        ax = fig.add_subplot(nr, nc, k + 1)
        mine = [p for p in points if (p.model, p.layer) == (model, layer)]
        for (backend, dec) in sorted({(p.backend, p.decomposer) for p in mine}):
            for flagged in (False, True):
                pts = [p for p in mine if (p.backend, p.decomposer) == (backend, dec) and p.flagged == flagged]
                if not pts:
                    continue
                ax.errorbar([p.theoretical for p in pts], [p.measured for p in pts],
                            yerr=[[p.measured - p.measured_lo for p in pts], [p.measured_hi - p.measured for p in pts]],
                            fmt=markers[dec], color=colours[backend], markerfacecolor="none" if flagged else colours[backend],
                            markersize=7, capsize=3, linewidth=1)
        ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        if not _log_if_wide(ax, [lo, hi], "x") and hi / lo > 3:
            ax.set_xscale("log")
            _readable_log(ax, "x")
        if ax.get_xscale() == "log":
            ax.set_yscale("log")
            _readable_log(ax, "y")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{model} · {layer}" if multi_model else layer, fontsize=10)
        ax.set_xlabel("theoretical layer speedup (FLOP ratio, ×)", fontsize=8)
        ax.set_ylabel("measured layer speedup (×, 95% CI)", fontsize=8)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker="s", color=c, label=f"backend {n}") for n, c in colours.items()]
    handles += [Line2D([], [], linestyle="none", marker=m, color="0.3", label=n) for n, m in markers.items()]
    handles.append(Line2D([], [], color="0.4", linestyle="--", linewidth=1, label="y = x (ideal)"))
    if any(p.flagged for p in points):
        handles.append(_flagged_handle())
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    fig.suptitle(title or "per-layer efficiency: measured against theoretical speedup")
    return fig


def _grid(n: int):
    cols = 1 if n == 1 else 2 if n <= 4 else 3
    return math.ceil(n / cols), cols


def draw_error_rank(points: list[ErrorRankPoint], *, title: str = "") -> Figure:
    """rel_error against rank, one panel per (model, layer), one line per decomposer."""
    panels = sorted({(p.model, p.layer) for p in points})
    nr, nc = _grid(len(panels))
    fig = _figure(4.2 * nc + 1.0, 3.3 * nr + 0.6)
    styles = style_map(p.decomposer for p in points)
    multi_model = len({m for m, _ in panels}) > 1
    for k, (model, layer) in enumerate(panels):
        ax = fig.add_subplot(nr, nc, k + 1)
        mine = [p for p in points if (p.model, p.layer) == (model, layer)]
        by_size = all(p.params_kept is not None for p in mine)
        x = (lambda p: p.params_kept) if by_size else (lambda p: p.rank_x)
        for name, (colour, marker) in styles.items():
            pts = sorted((p for p in mine if p.decomposer == name), key=lambda p: (x(p), p.rel_error))
            if pts:
                ax.plot([x(p) for p in pts], [p.rel_error for p in pts], marker=marker, color=colour,
                        label=name)
        if not _log_if_wide(ax, [x(p) for p in mine], "x") and not by_size:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{model} · {layer}" if multi_model else layer, fontsize=10)
        ax.set_xlabel("parameters kept (fraction of the layer's)" if by_size else "rank (Tucker-2 pair: r_out·r_in)",
                      fontsize=8)
        ax.set_ylabel("relative error", fontsize=8)
        ax.set_ylim(0, max([p.rel_error for p in mine] + [1e-3]) * 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sized = all(p.params_kept is not None for p in points)
    fig.suptitle(title or f"reconstruction error against {'parameters kept' if sized else 'rank'}")
    return fig


def draw_accuracy_rank(points: list[AccuracyRankPoint], *, title: str = "") -> Figure:
    """Accuracy (%) against rank per decomposer: before fine-tuning (dashed, hollow) and after (solid)."""
    models = sorted({p.model for p in points})
    nr, nc = _grid(len(models))
    fig = _figure(9.0 if nc == 1 else 4.6 * nc + 1, 4.8 if nr == 1 else 3.6 * nr + 0.6)
    styles = style_map(p.decomposer for p in points)
    for k, model in enumerate(models):
        ax = fig.add_subplot(nr, nc, k + 1)
        mine = [p for p in points if p.model == model]
        by_size = all(p.params_kept is not None for p in mine)
        x = (lambda p: p.params_kept) if by_size else (lambda p: p.rank_x)
        for name, (colour, marker) in styles.items():
            pts = [p for p in mine if p.decomposer == name]
            if not pts:
                continue
            before = {}
            for p in sorted(pts, key=x):
                before.setdefault(x(p), p.accuracy_decomposed)
            ax.plot(list(before), list(before.values()), marker=marker, color=colour, linestyle="--",
                    markerfacecolor="none", label=f"{name}, decomposed")
            for ep in sorted({p.finetune_epochs for p in pts if p.accuracy_finetuned is not None}):
                after = sorted((p for p in pts if p.finetune_epochs == ep and p.accuracy_finetuned is not None), key=x)
                ax.plot([x(p) for p in after], [p.accuracy_finetuned for p in after], marker=marker,
                        color=colour, linestyle="-", label=f"{name}, fine-tuned {ep} ep")
        bases = sorted({p.accuracy_base for p in mine})
        for b in bases:
            ax.axhline(b, color="0.3", linewidth=1, linestyle=":")
        if bases:
            ax.plot([], [], color="0.3", linestyle=":", label="base network")
        if not _log_if_wide(ax, [x(p) for p in mine], "x") and not by_size:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("parameters kept (fraction of the network's)" if by_size else
                      "rank (Tucker-2 pair: r_out·r_in; rank table: mean)", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        if len(models) > 1:
            ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(y=0.08)
        if len(models) == 1:
            _legend(ax, ax.get_legend_handles_labels()[0])
        else:
            ax.legend(fontsize=7)
    sized = all(p.params_kept is not None for p in points)
    fig.suptitle(title or f"accuracy against {'parameters kept' if sized else 'rank'}: before and after fine-tuning")
    return fig
