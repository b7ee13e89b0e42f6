"""``cpbench compare RUN_A RUN_B``: cell-by-cell comparison of two results files, for CI gating.

Cells are matched on ``cell_key``; rows whose key has no partner (e.g. after a change to how keys are
made) are matched on their axes (model, model_params, layers, decomposer, decomposer_options,
rank_spec, backend, threads, batch, finetune_epochs, seed). For each matched pair (A = before,
B = after):

speedup
    a regression when B is slower by more than ``threshold`` (relative) AND the two 95 % intervals
    separate; rows timed in fresh processes carry between-process intervals, so a rerun alone does not
    separate them. A row without an interval is not judged; a row timed on a busy machine is named.
accuracy
    fine-tuned accuracy, else the decomposed one; a regression when it drops by more than
    ``accuracy_threshold`` percentage points.
rel_error
    per layer; a regression when it grows by more than ``threshold`` (relative) and by more than
    :data:`REL_ERROR_ABS_FLOOR` in absolute terms (so round-off on exact decompositions is ignored).
status
    a cell that was "ok" in A and failed in B is a regression.

Cells present in only one run are listed, never counted as regressions.

Shared shifts: cells of one batch size and thread count often move *together* between two runs on a
shared machine (measured: three cached runs of the default matrix within 35 minutes, every batch-32 cell
of one run 6-7% below the other two, every batch-1 cell of another 5% below; within a run the cells
agreed to 3-4%). No cell's interval covers that, and a cell-by-cell verdict cannot tell it from a change
that slowed every cell alike. :attr:`Comparison.shifts` gives, per (batch, threads) group of at least
:data:`SHIFT_MIN_CELLS` cells, the median change of their speedups and how many moved each way; the
printout names every group whose median moved by more than :data:`SHIFT_NOTE` so the verdicts can be
read against it. It never changes a verdict.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..measure.intervals import row_flags
from ..run.record import AXIS_KEYS, CellResult
from ..run.results import RESULTS_FILE, latest_rows, read_results

__all__ = [
    "AXES",
    "REL_ERROR_ABS_FLOOR",
    "MetricChange",
    "CellComparison",
    "Comparison",
    "compare_rows",
    "compare_runs",
    "print_comparison",
    "comparison_table",
    "Shift",
    "shared_shifts",
    "SHIFT_MIN_CELLS",
    "SHIFT_NOTE",
]

AXES = AXIS_KEYS
REL_ERROR_ABS_FLOOR = 1e-6
#: Fewest cells of a (batch, threads) group whose shared shift is reported.
SHIFT_MIN_CELLS = 4
#: A group's median change of speedup printed as a shared shift above this (relative).
SHIFT_NOTE = 0.03


@dataclass
class MetricChange:
    """One metric of one cell in both runs."""

    metric: str                      # "speedup", "accuracy", "rel_error[conv2]", "status"
    a: Any
    b: Any
    change: float | None = None      # relative change (speedup, rel_error) or points (accuracy)
    a_ci: tuple[float, float] | None = None
    b_ci: tuple[float, float] | None = None
    regression: bool = False
    improvement: bool = False
    reason: str = ""


@dataclass
class CellComparison:
    axes: dict
    a: dict
    b: dict
    matched_on: str                  # "cell_key" or "axes"
    metrics: list[MetricChange] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricChange]:
        return [m for m in self.metrics if m.regression]

    @property
    def improvements(self) -> list[MetricChange]:
        return [m for m in self.metrics if m.improvement]

    def metric(self, name: str) -> MetricChange | None:
        return next((m for m in self.metrics if m.metric == name), None)


@dataclass
class Comparison:
    run_a: str
    run_b: str
    threshold: float
    accuracy_threshold: float
    cells: list[CellComparison]
    only_a: list[dict]
    only_b: list[dict]
    duplicates: list[str] = field(default_factory=list)  # one line per run whose file holds duplicated ok rows
    shifts: list["Shift"] = field(default_factory=list)  # per (batch, threads) group: see the module docstring

    @property
    def regressions(self) -> list[tuple[CellComparison, MetricChange]]:
        return [(c, m) for c in self.cells for m in c.regressions]

    @property
    def improvements(self) -> list[tuple[CellComparison, MetricChange]]:
        return [(c, m) for c in self.cells for m in c.improvements]


@dataclass(frozen=True)
class Shift:
    """The speedups of one (batch, threads) group of cells, B against A: their median relative change, and
    how many cells were slower and faster in B."""

    batch: Any
    threads: Any
    cells: int
    median_change: float
    slower: int
    faster: int

    def describe(self) -> str:
        way = "slower" if self.median_change < 0 else "faster"
        return (f"batch {self.batch}, {self.threads} thread(s): the {self.cells} cells moved together, median "
                f"{100 * self.median_change:+.1f} % ({self.slower} slower, {self.faster} faster in B): B ran {way} "
                f"as a whole, a change of the machine's state or one shared by every cell; the verdicts above "
                f"judge each cell with it included")


def shared_shifts(cells: list[CellComparison], min_cells: int = SHIFT_MIN_CELLS) -> list[Shift]:
    """Per (batch, threads) group of at least ``min_cells`` cells with a speedup in both runs, the median
    relative change of their speedups (as the change of the median log ratio). Pure."""
    groups: dict[tuple, tuple[Any, Any, list[float]]] = {}
    for c in cells:
        m = c.metric("speedup")
        if m is None or not m.a or not m.b or m.a <= 0 or m.b <= 0:
            continue
        batch, threads = c.axes.get("batch"), c.axes.get("threads")
        groups.setdefault((_canon(batch), _canon(threads)), (batch, threads, []))[2].append(math.log(m.b / m.a))
    out = []
    for _, (batch, threads, logs) in sorted(groups.items()):
        if len(logs) < min_cells:
            continue
        out.append(Shift(batch, threads, len(logs), math.exp(statistics.median(logs)) - 1,
                         sum(x < 0 for x in logs), sum(x > 0 for x in logs)))
    return out


# -- loading and matching -------------------------------------------------------------------
def _load(path: str | Path, which: str) -> tuple[str, list[dict]]:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"run {which} not found: {p} (give a run directory or a {RESULTS_FILE} file)")
    rows = read_results(p)  # UsageError when a directory holds no results file
    rows = [r for r in rows if isinstance(r, dict) and CellResult.from_row(r).status is not None]
    if not rows:
        shown = p / RESULTS_FILE if p.is_dir() else p
        raise UsageError(f"run {which} has no result rows: {shown}")
    return str(p), rows


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def axes_key(row: dict) -> str:
    return _canon(CellResult.from_row(row).axis_values())


def _cell_key(row: dict) -> str | None:
    return CellResult.from_row(row).cell_key


def _dedupe(rows: list[dict], keyf) -> dict[str, dict]:
    """One row per key: the last "ok" row, else the last row (a resumed or repeated run may hold several)."""
    out: dict[str, dict] = {}
    for r in rows:
        k = keyf(r)
        if k is None:
            continue
        prev = out.get(k)
        if prev is None or CellResult.from_row(r).ok or not CellResult.from_row(prev).ok:
            out[k] = r
    return out


def _match(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[tuple[dict, dict, str]], list[dict], list[dict]]:
    by_key_a = _dedupe(rows_a, _cell_key)
    by_key_b = _dedupe(rows_b, _cell_key)
    pairs = [(by_key_a[k], by_key_b[k], "cell_key") for k in by_key_a if k in by_key_b]
    matched_a = {id(a) for a, _, _ in pairs}
    matched_b = {id(b) for _, b, _ in pairs}
    rest_a = [r for r in _dedupe(rows_a, lambda r: _cell_key(r) or axes_key(r)).values() if id(r) not in matched_a]
    rest_b = [r for r in _dedupe(rows_b, lambda r: _cell_key(r) or axes_key(r)).values() if id(r) not in matched_b]
    ax_a = _dedupe(rest_a, axes_key)
    ax_b = _dedupe(rest_b, axes_key)
    pairs += [(ax_a[k], ax_b[k], "axes") for k in ax_a if k in ax_b]
    only_a = [r for k, r in ax_a.items() if k not in ax_b]
    only_b = [r for k, r in ax_b.items() if k not in ax_a]
    return pairs, only_a, only_b


# -- metrics ----------------------------------------------------------------------------------
def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _ci(v) -> tuple[float, float] | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v):
        return float(v[0]), float(v[1])
    return None


def _speedup(a: CellResult, b: CellResult, threshold: float) -> MetricChange | None:
    """A speedup regression needs both: a change beyond ``threshold`` and intervals that separate.

    The intervals of rows timed in several fresh processes cover the variation between processes (and
    so between runs); a change whose intervals still overlap is within what a rerun alone gives, and a
    row without an interval cannot be judged."""
    sa, sb = _num(a.speedup), _num(b.speedup)
    if sa is None or sb is None or sa <= 0:
        return None
    ca, cb = _ci(a.speedup_ci), _ci(b.speedup_ci)
    change = sb / sa - 1
    m = MetricChange("speedup", sa, sb, change, ca, cb)
    overlap = None if ca is None or cb is None else not (cb[1] < ca[0] or cb[0] > ca[1])
    big = abs(change) > threshold
    busy = [run for run, r in (("A", a), ("B", b)) if row_flags(r).get("busy")]
    note = f"; run {' and '.join(busy)} timed on a busy machine" if busy else ""
    if big and overlap is False:
        if change < 0:
            m.regression = True
            m.reason = f"speedup {sa:.3g} → {sb:.3g} ({100 * change:+.1f} %), intervals separate" + note
        else:
            m.improvement = True
            m.reason = note.lstrip("; ")
    elif big:
        m.reason = ("change within noise (intervals overlap)" if overlap else "no interval to judge the change by") + note
    return m


def _accuracy(a: CellResult, b: CellResult, points: float) -> MetricChange | None:
    xa, xb = _num(a.accuracy_after()), _num(b.accuracy_after())
    if xa is None or xb is None:
        return None
    change = 100 * (xb - xa)  # percentage points
    m = MetricChange("accuracy", xa, xb, change)
    if change < -points:
        m.regression = True
        m.reason = f"accuracy {100 * xa:.2f} % → {100 * xb:.2f} % ({change:+.2f} points)"
    elif change > points:
        m.improvement = True
    return m


def _rel_errors(a: CellResult, b: CellResult, threshold: float) -> list[MetricChange]:
    ea, eb = a.rel_error, b.rel_error
    if not isinstance(ea, dict):
        ea = {"": ea}
    if not isinstance(eb, dict):
        eb = {"": eb}
    out = []
    for layer in ea:
        xa, xb = _num(ea.get(layer)), _num(eb.get(layer))
        if xa is None or xb is None:
            continue
        name = f"rel_error[{layer}]" if layer else "rel_error"
        diff = xb - xa
        change = diff / xa if xa > 0 else (0.0 if diff == 0 else math.inf)
        m = MetricChange(name, xa, xb, change)
        if abs(diff) > REL_ERROR_ABS_FLOOR and abs(change) > threshold:
            if diff > 0:
                m.regression = True
                m.reason = f"{name} {xa:.4g} → {xb:.4g} ({100 * change:+.1f} %)"
            else:
                m.improvement = True
        out.append(m)
    return out


def compare_rows(a: dict, b: dict, *, threshold: float = 0.05, accuracy_threshold: float = 0.5,
                 matched_on: str = "cell_key") -> CellComparison:
    """Compare one cell's row before (``a``) and after (``b``)."""
    cell = CellComparison({k: b.get(k, a.get(k)) for k in AXES}, a, b, matched_on)
    ra, rb = CellResult.from_row(a), CellResult.from_row(b)
    sa, sb = ra.status, rb.status
    if sa != "ok" or sb != "ok":
        m = MetricChange("status", sa, sb)
        if sa == "ok":
            m.regression = True
            m.reason = f"cell failed: {rb.error or sb}"
        elif sb == "ok":
            m.improvement = True
        cell.metrics.append(m)
        return cell
    for m in (_speedup(ra, rb, threshold), _accuracy(ra, rb, accuracy_threshold)):
        if m is not None:
            cell.metrics.append(m)
    cell.metrics += _rel_errors(ra, rb, threshold)
    return cell


def compare_runs(run_a: str | Path, run_b: str | Path, threshold: float = 0.05,
                 accuracy_threshold: float = 0.5) -> Comparison:
    """Compare two runs (a run directory or a results.jsonl file each); B is judged against A."""
    for name, v in (("threshold", threshold), ("accuracy_threshold", accuracy_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"{name} must be a number >= 0, got {v!r}")
    pa, rows_a = _load(run_a, "A")
    pb, rows_b = _load(run_b, "B")
    pairs, only_a, only_b = _match(rows_a, rows_b)
    cells = [compare_rows(a, b, threshold=threshold, accuracy_threshold=accuracy_threshold, matched_on=how)
             for a, b, how in pairs]
    dups = [f"run {which}: " + d.message(p) for which, p, rows in (("A", pa, rows_a), ("B", pb, rows_b))
            if (d := latest_rows(rows)[1])]
    return Comparison(pa, pb, float(threshold), float(accuracy_threshold), cells, only_a, only_b, dups,
                      shared_shifts(cells))


# -- display ----------------------------------------------------------------------------------
def _short(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        return ",".join(f"{k}={_short(x)}" for k, x in v.items()) or "–"
    if isinstance(v, (list, tuple)):
        return "+".join(_short(x) for x in v)
    return str(v)


def _varying_axes(rows: list[dict]) -> list[str]:
    shown = [k for k in AXES if len({_canon(CellResult.from_row(r).axis_values()[k]) for r in rows}) > 1]
    for k in ("decomposer", "model"):
        if k not in shown:
            shown.insert(0, k)
    return [k for k in AXES if k in shown]


def _fmt_speedup(v, ci) -> str:
    if v is None:
        return "–"
    s = f"{v:.2f}"
    if ci:
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def comparison_table(result: Comparison):
    from rich.table import Table

    rows = [c.a for c in result.cells] + [c.b for c in result.cells] + result.only_a + result.only_b
    axes = _varying_axes(rows)
    t = Table(title=f"cpbench compare: A = {result.run_a}  →  B = {result.run_b}")
    for k in axes:
        t.add_column(k.replace("_", " "))
    for col in ("speedup A [95% CI]", "speedup B [95% CI]", "Δ speedup", "acc A→B %", "rel_error A→B", "verdict"):
        t.add_column(col, justify="right" if col != "verdict" else "left")
    for c in result.cells:
        cols = [_short(c.axes.get(k)) for k in axes]
        st = c.metric("status")
        if st is not None:
            verdict = ("[red]REGRESSION[/red] " + st.reason) if st.regression else f"status {st.a} → {st.b}"
            t.add_row(*cols, "", "", "", "", "", verdict)
            continue
        sp = c.metric("speedup")
        acc = c.metric("accuracy")
        errs = [m for m in c.metrics if m.metric.startswith("rel_error")]
        dsp = "–" if sp is None else f"{100 * sp.change:+.1f} %"
        if sp is not None and sp.regression:
            dsp = f"[red]{dsp}[/red]"
        elif sp is not None and sp.improvement:
            dsp = f"[green]{dsp}[/green]"
        acc_s = "–" if acc is None else f"{100 * acc.a:.1f}→{100 * acc.b:.1f} ({acc.change:+.2f})"
        err_s = " ".join(f"{m.a:.3g}→{m.b:.3g}" for m in errs) or "–"
        if c.regressions:
            verdict = "[red]REGRESSION[/red] " + "; ".join(m.reason for m in c.regressions)
        elif c.improvements:
            verdict = "[green]improved[/green] " + ", ".join(m.metric for m in c.improvements)
        else:
            notes = [m.reason for m in c.metrics if m.reason]
            verdict = "ok" + (f" ({'; '.join(notes)})" if notes else "")
        t.add_row(*cols, _fmt_speedup(sp and sp.a, sp and sp.a_ci), _fmt_speedup(sp and sp.b, sp and sp.b_ci),
                  dsp, acc_s, err_s, verdict)
    return t


def print_comparison(result: Comparison, console=None) -> None:
    """Print the table, the cells found in only one run, and a one-line verdict."""
    if console is None:
        from rich.console import Console

        console = Console()
    for line in result.duplicates:
        console.print(f"[yellow]warning[/yellow]: {line}", highlight=False)
    console.print(comparison_table(result))
    rows = result.only_a + result.only_b
    axes = _varying_axes(rows + [c.a for c in result.cells]) if rows else []
    for label, only in (("only in A", result.only_a), ("only in B", result.only_b)):
        for r in only:
            desc = " ".join(f"{k}={_short(r.get(k))}" for k in axes)
            console.print(f"{label}: {desc} (status {r.get('status')})", highlight=False)
    n_reg = len(result.regressions)
    summary = (f"{len(result.cells)} cells compared, {len(result.only_a)} only in A, {len(result.only_b)} only in B; "
               f"threshold {100 * result.threshold:.0f} % relative, accuracy {result.accuracy_threshold:g} points")
    console.print(summary, highlight=False)
    for shift in result.shifts:
        if abs(shift.median_change) > SHIFT_NOTE:
            console.print(f"[yellow]shared shift[/yellow]: {shift.describe()}", highlight=False)
    if n_reg:
        console.print(f"[red]{n_reg} regression(s)[/red] in {len({id(c) for c, _ in result.regressions})} cell(s)")
    else:
        console.print("[green]no regressions[/green]")
