"""The report's plots: pure data extraction from result rows, then matplotlib drawing.

Every plot has two halves. ``*_points(rows)`` turns result rows into plain records (what is drawn,
exactly; tests compare these with the rows) and ``draw_*(points)`` turns the records into a
:class:`matplotlib.figure.Figure` on an explicit Agg canvas (no pyplot, no global backend state, so
it works headless and inside other programs).

Conventions
-----------
* Only rows with ``status == "ok"`` are plotted.
* Accuracy is plotted in percent; the accuracy drop is in percentage points:
  ``100 · (accuracy_base − accuracy_finetuned)``, or ``− accuracy_decomposed`` when the cell was not
  fine-tuned (the same number as the summary table's ``acc_drop``); with a control arm
  (``accuracy_base_finetuned``) the reference is the better of base and base+FT.
* A rank is an int or a Tucker-2 pair ``[r_out, r_in]``; a pair is plotted at x = r_out · r_in (its
  product, the size of the Tucker-2 core's channel plane) and labelled ``r_outxr_in``.
* A row's rank for the accuracy plot (which is per cell, not per layer) is the rank shared by all its
  layers, or the mean of the layers' rank numbers when a rank table gives them different ranks.
* A cell is "flagged" when any timing flag is set (:func:`cpbench.measure.intervals.flag_labels`: busy, disagree,
  wide; ``noisy`` in rows of old runs); per-layer points use ``layer_timing_flags[layer]`` (old
  rows: ``layer_noisy[layer]``) when the row has one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..measure.intervals import flag_labels
from ..run.record import CellResult
from .tables import accuracy_drop  # noqa: F401  (one definition for tables, plots and exports)

__all__ = [
    "PAPER_POINT", "ParetoPoint", "EfficiencyPoint", "ErrorRankPoint", "AccuracyRankPoint",
    "rank_x", "rank_label", "accuracy_drop",
    "pareto_points", "pareto_front", "efficiency_points", "error_rank_points", "accuracy_rank_points",
    "draw_pareto", "draw_efficiency", "draw_error_rank", "draw_accuracy_rank", "style_map",
]

#: Lebedev et al. (ICLR 2015), character CNN: 8.5× speedup of the whole network for a 1 point drop.
PAPER_POINT = {"model": "charnet", "speedup": 8.5, "drop": 1.0,
               "label": "Lebedev et al. 2015 (8.5×, 1 pt)"}

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


# -- helpers ----------------------------------------------------------------------------------
def rank_x(rank: Any) -> float | None:
    """The number a rank is plotted at: an int as is, a Tucker-2 pair by its product."""
    if isinstance(rank, bool) or rank is None:
        return None
    if isinstance(rank, (int, float)):
        return float(rank)
    if isinstance(rank, (list, tuple)) and len(rank) == 2 and all(isinstance(v, (int, float)) for v in rank):
        return float(rank[0] * rank[1])
    return None


def rank_label(rank: Any) -> str:
    if isinstance(rank, (list, tuple)):
        return "x".join(str(v) for v in rank)
    if isinstance(rank, dict):
        return " ".join(f"{k}:{rank_label(v)}" for k, v in rank.items())
    return str(rank)


def _ok(rows: list[dict]) -> list[CellResult]:
    return [c for c in (CellResult.from_row(r) for r in rows) if c.ok]


def _model_label(c: CellResult) -> str:
    """The model as the summary table shows it: ``model_label`` if the row has one, else name(params)."""
    if c.model_label:
        return str(c.model_label)
    model = str(c.model)
    if c.model_params:
        model += "(" + ",".join(f"{k}={v}" for k, v in c.model_params.items()) + ")"
    return model


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _row_rank(c: CellResult) -> tuple[float | None, str]:
    ranks = c.rank
    if isinstance(ranks, dict) and ranks:
        xs = [rank_x(v) for v in ranks.values()]
        labels = {rank_label(v) for v in ranks.values()}
        if any(x is None for x in xs):
            return None, rank_label(ranks)
        if len(labels) == 1:
            return xs[0], labels.pop()
        return sum(xs) / len(xs), rank_label(ranks)
    x = rank_x(ranks)
    if x is None:
        return rank_x(c.rank_spec), rank_label(c.rank_spec)
    return x, rank_label(ranks)


# -- data -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParetoPoint:
    model: str
    decomposer: str
    rank: str
    backend: str
    threads: Any
    batch: Any
    finetune_epochs: Any
    drop: float          # accuracy drop, percentage points (x)
    speedup: float       # whole-network measured speedup (y)
    speedup_lo: float
    speedup_hi: float
    flagged: bool        # a timing flag is set (busy, disagree, wide; noisy in rows of old runs)
    cell_key: str | None
    model_name: str = ""  # the model plugin's name (``row["model"]``), e.g. "charnet"


def pareto_points(rows: list[dict]) -> list[ParetoPoint]:
    """One point per ok cell that has a measured speedup and an accuracy drop, in row order."""
    out = []
    for c in _ok(rows):
        sp, drop = _num(c.speedup), c.accuracy_drop()
        if sp is None or drop is None:
            continue
        ci = c.speedup_ci or [None, None]
        lo, hi = _num(ci[0]), _num(ci[1])
        out.append(ParetoPoint(
            model=_model_label(c), decomposer=str(c.decomposer), rank=_row_rank(c)[1],
            backend=str(c.backend), threads=c.threads, batch=c.batch,
            finetune_epochs=c.finetune_epochs, drop=drop, speedup=sp,
            speedup_lo=sp if lo is None else lo, speedup_hi=sp if hi is None else hi,
            flagged=bool(flag_labels(c)), cell_key=c.cell_key, model_name=str(c.model)))
    return out


def pareto_front(points: list) -> list:
    """The points no other point beats on both axes (higher speedup, lower drop), by increasing drop.

    A point is dominated when another has speedup ≥ and drop ≤ with at least one strict; of exact
    duplicates the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i].drop, -points[i].speedup, i))
    front, best = [], -math.inf
    for i in order:
        if points[i].speedup > best:
            front.append(points[i])
            best = points[i].speedup
    return front


@dataclass(frozen=True)
class EfficiencyPoint:
    model: str
    layer: str
    backend: str
    decomposer: str
    rank: str
    theoretical: float   # x: FLOP ratio of the layer
    measured: float      # y: measured layer speedup
    measured_lo: float
    measured_hi: float
    flagged: bool        # a timing flag is set (busy, disagree, wide; noisy in rows of old runs)
    cell_key: str | None


def efficiency_points(rows: list[dict]) -> list[EfficiencyPoint]:
    """One point per (ok cell, layer) with both a measured and a theoretical layer speedup."""
    out = []
    for c in _ok(rows):
        meas, theo = c.layer_speedup or {}, c.layer_theoretical_speedup or {}
        cis, ranks = c.layer_speedup_ci or {}, c.rank if isinstance(c.rank, dict) else {}
        layer_flags = c.layer_timing_flags if isinstance(c.layer_timing_flags, dict) else {}
        layer_noisy = c.layer_noisy if isinstance(c.layer_noisy, dict) else {}  # rows of old runs
        for layer, m in meas.items():
            m, t = _num(m), _num(theo.get(layer))
            if m is None or t is None:
                continue
            ci = cis.get(layer) or [None, None]
            lo, hi = _num(ci[0]), _num(ci[1])
            out.append(EfficiencyPoint(
                model=_model_label(c), layer=str(layer), backend=str(c.backend),
                decomposer=str(c.decomposer), rank=rank_label(ranks.get(layer, c.rank_spec)),
                theoretical=t, measured=m, measured_lo=m if lo is None else lo, measured_hi=m if hi is None else hi,
                flagged=(any(layer_flags[layer].values()) if layer in layer_flags
                         else bool(layer_noisy.get(layer, c.noisy))), cell_key=c.cell_key))
    return out


@dataclass(frozen=True)
class ErrorRankPoint:
    model: str
    layer: str
    decomposer: str
    rank: str
    rank_x: float
    rel_error: float


def error_rank_points(rows: list[dict]) -> list[ErrorRankPoint]:
    """One point per distinct (model, layer, decomposer, rank, rel_error), sorted.

    Cells that differ only in backend/threads/batch/fine-tuning share one decomposition (same
    rel_error), so they collapse into one point; different seeds giving different errors stay apart.
    """
    seen = set()
    for c in _ok(rows):
        errs = c.rel_error or {}
        ranks = c.rank if isinstance(c.rank, dict) else {}
        if not isinstance(errs, dict):
            continue
        for layer, e in errs.items():
            e = _num(e)
            rk = ranks.get(layer, c.rank_spec)
            x = rank_x(rk)
            if e is None or x is None:
                continue
            seen.add(ErrorRankPoint(_model_label(c), str(layer), str(c.decomposer), rank_label(rk), x, e))
    return sorted(seen, key=lambda p: (p.model, p.layer, p.decomposer, p.rank_x, p.rel_error))


@dataclass(frozen=True)
class AccuracyRankPoint:
    model: str
    decomposer: str
    rank: str
    rank_x: float
    finetune_epochs: int
    accuracy_base: float         # percent
    accuracy_decomposed: float   # percent, before fine-tuning
    accuracy_finetuned: float | None  # percent; None when not fine-tuned


def accuracy_rank_points(rows: list[dict]) -> list[AccuracyRankPoint]:
    """One point per distinct (model, decomposer, rank, epochs, accuracies), sorted; percent."""
    seen = set()
    for c in _ok(rows):
        base, dec = _num(c.accuracy_base), _num(c.accuracy_decomposed)
        x, label = _row_rank(c)
        if base is None or dec is None or x is None:
            continue
        ft = _num(c.accuracy_finetuned)
        seen.add(AccuracyRankPoint(_model_label(c), str(c.decomposer), label, x,
                                   int(c.finetune_epochs or 0), 100 * base, 100 * dec,
                                   None if ft is None else 100 * ft))
    return sorted(seen, key=lambda p: (p.model, p.decomposer, p.finetune_epochs, p.rank_x, p.rank))


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


def _log_if_wide(ax, values, axis="x"):
    vals = [v for v in values if v and v > 0]
    if vals and max(vals) / min(vals) > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        return True
    return False


def draw_pareto(points: list[ParetoPoint], *, title: str = "", paper: bool = False) -> Figure:
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
    if len(points) <= 30:
        for p in points:
            ax.annotate(p.rank, (p.drop, p.speedup), textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color="0.35")
    front = pareto_front(points)
    if front:
        ax.step([p.drop for p in front], [p.speedup for p in front], where="post", color="0.25",
                linestyle="--", linewidth=1.2, label="Pareto front", zorder=0)
    if paper:
        ax.plot([PAPER_POINT["drop"]], [PAPER_POINT["speedup"]], marker="*", markersize=16, color="gold",
                markeredgecolor="black", linestyle="none", label=PAPER_POINT["label"])
    ax.axhline(1.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("accuracy drop after fine-tuning (percentage points)")
    ax.set_ylabel("measured whole-network speedup (×, 95% CI)")
    ax.set_title(title or "speedup against accuracy drop")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    _legend(ax, handles + ([_flagged_handle()] if any(p.flagged for p in points) else []))
    return fig


def draw_efficiency(points: list[EfficiencyPoint], *, title: str = "") -> Figure:
    """Measured layer speedup (with CI) against the layer's FLOP ratio, per backend, with y = x."""
    fig = _figure()
    ax = fig.add_subplot()
    colours = {n: c for n, (c, _) in style_map(p.backend for p in points).items()}
    markers = {n: m for n, (_, m) in style_map(p.decomposer for p in points).items()}
    for (backend, dec) in sorted({(p.backend, p.decomposer) for p in points}):
        colour, marker = colours[backend], markers[dec]
        for flagged in (False, True):
            pts = [p for p in points if (p.backend, p.decomposer) == (backend, dec) and p.flagged == flagged]
            if not pts:
                continue
            ax.errorbar([p.theoretical for p in pts], [p.measured for p in pts],
                        yerr=[[p.measured - p.measured_lo for p in pts], [p.measured_hi - p.measured for p in pts]],
                        fmt=marker, color=colour, markerfacecolor="none" if flagged else colour, markersize=7,
                        capsize=3, linewidth=1)
    if len(points) <= 30:
        for p in points:
            ax.annotate(f"{p.layer} r{p.rank}", (p.theoretical, p.measured), textcoords="offset points",
                        xytext=(7, -3), va="top", fontsize=7, color="0.35")
    handles = [Line2D([], [], linestyle="none", marker="s", color=c, label=f"backend {n}") for n, c in colours.items()]
    handles += [Line2D([], [], linestyle="none", marker=m, color="0.3", label=n) for n, m in markers.items()]
    values = [p.theoretical for p in points] + [p.measured_hi for p in points] + [p.measured_lo for p in points]
    lo, hi = min(values + [1.0]), max(values + [1.0])
    lo, hi = max(lo * 0.8, 1e-3), hi * 1.15
    handles += ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=1, label="y = x (ideal)")
    _log_if_wide(ax, [lo, hi], "x")
    _log_if_wide(ax, [lo, hi], "y")
    if any(p.flagged for p in points):
        handles.append(_flagged_handle())
    ax.set_xlabel("theoretical layer speedup (FLOP ratio, ×)")
    ax.set_ylabel("measured layer speedup (×, 95% CI)")
    ax.set_title(title or "per-layer efficiency: measured against theoretical speedup")
    ax.grid(alpha=0.3)
    _legend(ax, handles)
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
        for name, (colour, marker) in styles.items():
            pts = sorted((p for p in mine if p.decomposer == name), key=lambda p: (p.rank_x, p.rel_error))
            if pts:
                ax.plot([p.rank_x for p in pts], [p.rel_error for p in pts], marker=marker, color=colour,
                        label=name)
        if not _log_if_wide(ax, [p.rank_x for p in mine], "x"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{model} · {layer}" if multi_model else layer, fontsize=10)
        ax.set_xlabel("rank (Tucker-2 pair: r_out·r_in)", fontsize=8)
        ax.set_ylabel("relative error", fontsize=8)
        ax.set_ylim(0, max([p.rel_error for p in mine] + [1e-3]) * 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "reconstruction error against rank")
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
        for name, (colour, marker) in styles.items():
            pts = [p for p in mine if p.decomposer == name]
            if not pts:
                continue
            before = {}
            for p in sorted(pts, key=lambda p: p.rank_x):
                before.setdefault(p.rank_x, p.accuracy_decomposed)
            ax.plot(list(before), list(before.values()), marker=marker, color=colour, linestyle="--",
                    markerfacecolor="none", label=f"{name}, decomposed")
            for ep in sorted({p.finetune_epochs for p in pts if p.accuracy_finetuned is not None}):
                after = sorted((p for p in pts if p.finetune_epochs == ep and p.accuracy_finetuned is not None),
                               key=lambda p: p.rank_x)
                ax.plot([p.rank_x for p in after], [p.accuracy_finetuned for p in after], marker=marker,
                        color=colour, linestyle="-", label=f"{name}, fine-tuned {ep} ep")
        bases = sorted({p.accuracy_base for p in mine})
        for b in bases:
            ax.axhline(b, color="0.3", linewidth=1, linestyle=":")
        if bases:
            ax.plot([], [], color="0.3", linestyle=":", label="base network")
        if not _log_if_wide(ax, [p.rank_x for p in mine], "x"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rank (Tucker-2 pair: r_out·r_in; rank table: mean)", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        if len(models) > 1:
            ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(y=0.08)
        if len(models) == 1:
            _legend(ax, ax.get_legend_handles_labels()[0])
        else:
            ax.legend(fontsize=7)
    fig.suptitle(title or "accuracy against rank: before and after fine-tuning")
    return fig
