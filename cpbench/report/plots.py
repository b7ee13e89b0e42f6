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
* A rank is an int or a Tucker-2 pair ``[r_out, r_in]``, labelled ``r_outxr_in``. The error and
  accuracy plots put ranks on the axis every decomposer shares, the fraction of parameters kept
  (``layer_params_kept``, ``params_kept``: a CP rank and a Tucker-2 pair mean different sizes). Rows
  written before cpbench recorded it are plotted at the rank (a pair at r_out · r_in).
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


from ..measure.intervals import flag_labels
from ..run.record import CellResult
from .tables import accuracy_drop  # noqa: F401  (one definition for tables, plots and exports)

__all__ = [
    "ReferencePoint", "reference_points", "ParetoPoint", "EfficiencyPoint", "ErrorRankPoint", "AccuracyRankPoint",
    "rank_x", "rank_label", "accuracy_drop",
    "pareto_points", "pareto_front", "efficiency_points", "error_rank_points", "accuracy_rank_points",
    "draw_pareto", "draw_efficiency", "draw_error_rank", "draw_accuracy_rank", "style_map",
]



@dataclass(frozen=True)
class ReferencePoint:
    """A published result drawn on the Pareto plot of its model (a model plugin's ``reference_points``)."""

    speedup: float
    drop: float  # accuracy drop, percentage points
    label: str


def reference_points(model: str, plugins: Any = None) -> list[ReferencePoint]:
    """What the registered model plugin ``model`` lists as ``reference_points`` (none for a model that is
    not registered here: a report may be made where the run's plugins are not installed)."""
    if plugins is None:
        from ..plugin.manager import get_plugins

        plugins = get_plugins()
    if model not in plugins.models:
        return []
    return [ReferencePoint(float(r["speedup"]), float(r["drop"]), str(r["label"]))
            for r in getattr(plugins.models.get(model), "reference_points", None) or ()]



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


def _short_rank(label: str) -> str:
    """``conv2:47 conv3:56`` as ``47/56`` (the layers' order is the caption's)."""
    parts = label.split(" ")
    if len(parts) > 1 and all(":" in q for q in parts):
        return "/".join(q.split(":", 1)[1] for q in parts)
    return label


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
    params_kept: float | None = None  # the layer's parameters kept (fraction)


def error_rank_points(rows: list[dict]) -> list[ErrorRankPoint]:
    """One point per distinct (model, layer, decomposer, rank, rel_error), sorted.

    Cells that differ only in backend/threads/batch/fine-tuning share one decomposition (same
    rel_error), so they collapse into one point; different seeds giving different errors stay apart.
    """
    seen = set()
    for c in _ok(rows):
        errs = c.rel_error or {}
        ranks = c.rank if isinstance(c.rank, dict) else {}
        kept = c.layer_params_kept if isinstance(c.layer_params_kept, dict) else {}
        if not isinstance(errs, dict):
            continue
        for layer, e in errs.items():
            e = _num(e)
            rk = ranks.get(layer, c.rank_spec)
            x = rank_x(rk)
            if e is None or x is None:
                continue
            seen.add(ErrorRankPoint(_model_label(c), str(layer), str(c.decomposer), rank_label(rk), x, e,
                                    _num(kept.get(layer))))
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
    params_kept: float | None = None  # the whole network's parameters kept (fraction)


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
                                   None if ft is None else 100 * ft, _num(c.params_kept)))
    return sorted(seen, key=lambda p: (p.model, p.decomposer, p.finetune_epochs, p.rank_x, p.rank))


# the drawing half, importable from here as before
from .drawing import draw_accuracy_rank, draw_efficiency, draw_error_rank, draw_pareto, style_map  # noqa: E402
