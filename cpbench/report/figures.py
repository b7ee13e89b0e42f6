"""The report's figures: which plots a report has, their captions, and each drawn to PNG bytes.

The data of each plot come from :mod:`cpbench.report.plots` (``*_points``), the drawing from
:mod:`cpbench.report.drawing`; a new plot gets a builder here and a place in :func:`build_plots`.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

from ..run.record import CellResult

__all__ = ["Plot", "build_plots", "pareto_plots", "efficiency_plot", "error_rank_plot", "accuracy_rank_plot"]


@dataclass
class Plot:
    """One figure of the report: its PNG bytes, or a note saying why it was skipped."""

    name: str            # file stem, e.g. "pareto"
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}.png"


# -- plots ------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


_NO_OK = "skipped: no cell finished successfully (see Failures)."


def pareto_plots(rows: list[dict]) -> list[Plot]:
    """Speedup against accuracy drop: one plot per model with accuracy (``pareto.png`` when one model)."""
    from . import plots as P

    cap = ("Measured whole-network speedup (95% CI as error bars) against the accuracy drop after fine-tuning "
           "(base − fine-tuned, or − decomposed without fine-tuning), one marker and colour per decomposer; "
           "the dashed step is the Pareto front (max speedup, min drop). Hollow markers: flagged timings (busy, disagree or wide).")
    title = "Speedup against accuracy drop"
    pts = P.pareto_points(rows)
    if not _any_ok(rows):
        return [Plot("pareto", title, cap, note=_NO_OK)]
    if not pts:
        return [Plot("pareto", title, cap,
                     note="skipped: no cell has an accuracy (the model has no data set) and a measured speedup.")]
    models = sorted({p.model for p in pts})
    out = []
    for m in models:
        mine = [p for p in pts if p.model == m]
        refs = P.reference_points(mine[0].model_name)  # what the model plugin lists as published results
        name = "pareto" if len(models) == 1 else f"pareto-{_slug(m)}"
        c = cap + "".join(f" The gold star is a published result: {r.label}." for r in refs)
        fig = P.draw_pareto(mine, title=f"{m}: speedup against accuracy drop", references=refs)
        out.append(Plot(name, title + ("" if len(models) == 1 else f" — {m}"), c, png=_png(fig)))
    return out


def efficiency_plot(rows: list[dict]) -> Plot:
    from . import plots as P

    cap = ("One panel per replaced layer: measured layer speedup (95% CI) against its theoretical speedup (FLOP "
           "ratio); colour = backend, marker = decomposer; the dashed line is y = x. Hollow markers: flagged timings (busy, disagree or wide).")
    pts = P.efficiency_points(rows)
    if pts:
        return Plot("efficiency", "Efficiency per layer", cap, png=_png(P.draw_efficiency(pts)))
    return Plot("efficiency", "Efficiency per layer", cap, note=_NO_OK if not _any_ok(rows) else
                "skipped: no per-layer timings in this run ([run] per_layer_timing = false?).")


def error_rank_plot(rows: list[dict]) -> Plot:
    from . import plots as P

    cap = ("Relative reconstruction error of each layer's kernel against the fraction of the layer's parameters "
           "the decomposition keeps, one line per decomposer: the size axis on which a CP rank, a Tucker-2 pair "
           "[r_out, r_in] and a spatial-SVD rank compare (rows from before cpbench recorded it: against the rank, a "
           "pair at r_out·r_in).")
    pts = P.error_rank_points(rows)
    if pts:
        return Plot("error_rank", "Error against rank", cap, png=_png(P.draw_error_rank(pts)))
    return Plot("error_rank", "Error against rank", cap,
                note=_NO_OK if not _any_ok(rows) else "skipped: no cell recorded a relative error.")


def accuracy_rank_plot(rows: list[dict]) -> Plot:
    from . import plots as P

    cap = ("Test accuracy against the fraction of the network's parameters kept, per decomposer: right after "
           "decomposition (dashed, hollow) and after fine-tuning (solid); the dotted line is the base network.")
    pts = P.accuracy_rank_points(rows)
    if pts:
        return Plot("accuracy_rank", "Accuracy against rank", cap, png=_png(P.draw_accuracy_rank(pts)))
    return Plot("accuracy_rank", "Accuracy against rank", cap, note=_NO_OK if not _any_ok(rows) else
                "skipped: no cell has an accuracy (the model has no data set).")


def _any_ok(rows) -> bool:
    return any(CellResult.from_row(r).ok for r in rows)


def build_plots(rows: list[dict]) -> list[Plot]:
    """Every plot of the report, in order; skipped ones carry a note instead of a PNG."""
    return [*pareto_plots(rows), efficiency_plot(rows), error_rank_plot(rows), accuracy_rank_plot(rows)]
