"""The end-of-run results table, fitted to the terminal.

The columns a user needs first — model, decomposer, rank, backend, batch, accuracy drop, speedup with
its interval — always; the rest on request (``--columns``, names in :data:`COLUMNS`). Per-layer
values are summarised (a rank table as ``12/40`` in layer order, the worst layer's error), never
spelled out per layer. The width is the terminal's, or ``$COLUMNS`` when output is piped
(:func:`table_width`). When the table is too wide, first the columns whose value is the same in
every row move to the title, then the remaining optional columns are dropped (and said so); cell
text is never cut.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .tables import accuracy_drop, row_summary

__all__ = ["Column", "COLUMNS", "DEFAULT_COLUMNS", "table_width", "rank_text", "parse_columns", "fitted_table",
           "print_run_end"]


def _num(v, spec: str = "{:.3g}") -> str:
    return "–" if not isinstance(v, (int, float)) or isinstance(v, bool) else spec.format(v)


def _one(v) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


def rank_text(row: dict) -> str:
    """The chosen rank of a cell: one value when every layer has it, else the layers' values in
    layer order joined by "/" (a Tucker-2 pair as r_outxr_in); the spec when nothing was chosen."""
    ranks = row.get("rank")
    if ranks is None:
        spec = row.get("rank_spec")
        return " ".join(f"{k}={_one(v)}" for k, v in spec.items()) if isinstance(spec, dict) else _one(spec)
    if isinstance(ranks, dict):
        values = [_one(v) for v in ranks.values()]
        return values[0] if len(set(values)) == 1 else "/".join(values)
    return _one(ranks)


def _layer_max(d) -> float | None:
    vals = [v for v in (d or {}).values() if isinstance(v, (int, float))] if isinstance(d, dict) else []
    return max(vals) if vals else None


def _layer_range(d) -> str:
    vals = [v for v in (d or {}).values() if isinstance(v, (int, float))] if isinstance(d, dict) else []
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}" if abs(hi - lo) < 5e-3 else f"{lo:.2f}–{hi:.2f}"


def _speedup(row: dict) -> str:
    if row.get("status") != "ok":
        return "failed"
    sp, ci = row.get("speedup"), row.get("speedup_ci") or [None, None]
    if not isinstance(sp, (int, float)):
        return "–"
    text = f"{sp:.2f}"
    if all(isinstance(v, (int, float)) for v in ci):
        text += f" [{ci[0]:.2f}–{ci[1]:.2f}]"
    from .verdict import row_flags

    return text + (" *" if row_flags(row) else "")


def _acc(row: dict) -> str:
    s = row_summary(row)
    return "–" if s["acc_base"] == "–" else f"{s['acc_base']}→{s['acc_decomposed']}→{s['acc_finetuned']}"


@dataclass(frozen=True)
class Column:
    name: str                      # what --columns takes
    header: str
    value: Callable[[dict], str]
    right: bool = False
    help: str = ""


COLUMNS: dict[str, Column] = {c.name: c for c in [
    Column("model", "model", lambda r: str(row_summary(r)["model"])),
    Column("decomposer", "decomposer", lambda r: str(r.get("decomposer"))),
    Column("rank", "rank", rank_text, help="chosen rank; per layer as a/b in layer order"),
    Column("backend", "backend", lambda r: str(r.get("backend"))),
    Column("batch", "batch", lambda r: _num(r.get("batch"), "{}"), right=True),
    Column("drop", "drop pt", lambda r: _num(accuracy_drop(r), "{:.2f}"), right=True,
           help="accuracy points lost"),
    Column("speedup", "speedup [95% CI]", _speedup, right=True, help="whole network, measured"),
    Column("threads", "thr", lambda r: _num(r.get("threads"), "{}"), right=True),
    Column("ft", "ft", lambda r: _num(r.get("finetune_epochs"), "{}"), right=True, help="fine-tuning epochs"),
    Column("seed", "seed", lambda r: _num(r.get("seed"), "{}"), right=True),
    Column("acc", "acc % base→dec→ft", _acc, right=True),
    Column("rel_error", "rel err", lambda r: _num(_layer_max(r.get("rel_error")), "{:.3f}"), right=True,
           help="largest relative error over the layers"),
    Column("theo", "theo ×", lambda r: _num(r.get("theoretical_speedup"), "{:.2f}"), right=True,
           help="FLOP ratio of the whole network"),
    Column("layer_speedup", "layer ×", lambda r: _layer_range(r.get("layer_speedup")), right=True,
           help="measured per-layer speedups, min–max"),
    Column("ms", "base→comp ms", lambda r: (f"{_num(r.get('baseline_ms'), '{:.3f}')}→"
                                            f"{_num(r.get('compressed_ms'), '{:.3f}')}"), right=True),
    Column("status", "status", lambda r: str(r.get("status"))),
]}

DEFAULT_COLUMNS = ("model", "decomposer", "rank", "backend", "batch", "drop", "speedup")


def parse_columns(text: str | None) -> list[str]:
    """``--columns``: extra column names, comma-separated, or ``all``; one-line error otherwise."""
    from ..errors import UsageError

    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return [n for n in COLUMNS if n not in DEFAULT_COLUMNS]
    bad = [n for n in names if n not in COLUMNS]
    if bad:
        raise UsageError(f"unknown column(s) {', '.join(bad)}; allowed: {', '.join(COLUMNS)}, or all")
    return [n for n in names if n not in DEFAULT_COLUMNS]


def table_width(console: Console | None = None) -> int:
    """The terminal's width; when output is piped, ``$COLUMNS`` if set, else 120."""
    console = console or Console()
    if console.is_terminal:
        return console.width
    env = os.environ.get("COLUMNS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 120


def _build(rows: list[dict], cols: Sequence[Column], title: str, caption: str | None) -> Table:
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
              title_justify="left", caption_justify="left", collapse_padding=True)
    for c in cols:
        t.add_column(c.header, justify="right" if c.right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*[c.value(r) for c in cols], style=None if r.get("status") == "ok" else "red")
    return t


def _width(table: Table, width: int) -> int:
    console = Console(width=10_000, file=open(os.devnull, "w"))
    return Measurement.get(console, console.options, table).maximum


def fitted_table(rows: list[dict], *, width: int, title: str, extra: Sequence[str] = (),
                 layer_names: Sequence[str] | None = None) -> Table:
    """A table of ``rows`` no wider than ``width`` where possible (see the module docstring)."""
    wanted = [COLUMNS[n] for n in (*DEFAULT_COLUMNS, *extra)]
    values = {c.name: {c.value(r) for r in rows} for c in wanted}
    notes = []
    if layer_names and any(isinstance(r.get("rank"), dict) and len({_one(v) for v in r["rank"].values()}) > 1
                           for r in rows):
        notes.append(f"rank per layer: {'/'.join(layer_names)}")
    if any(_speedup(r).endswith("*") for r in rows):
        notes.append("* flagged timing (see the report)")
    cols, moved, dropped = list(wanted), [], []
    if rows and values["drop"] == {"–"}:  # no cell has an accuracy: the column would say nothing
        cols.remove(COLUMNS["drop"])
        notes.append("no drop column: no accuracy (no data set)")

    def table() -> Table:
        head = title + "".join(f" · {c.header} {next(iter(values[c.name]))}" for c in moved)
        caption = "; ".join(notes + ([f"left out for width: {', '.join(c.name for c in dropped)}"] if dropped else []))
        return _build(rows, cols, head, caption or None)

    t = table()
    # first what is the same in every row goes to the title; then optional columns go, last first
    for c in [c for c in cols if len(values[c.name]) == 1 and len(rows) > 1 and c.name != "speedup"]:
        if _width(t, width) <= width:
            break
        cols.remove(c)
        moved.append(c)
        t = table()
    for c in reversed([c for c in cols if c.name not in DEFAULT_COLUMNS]):
        if _width(t, width) <= width:
            break
        cols.remove(c)
        dropped.append(c)
        t = table()
    return t


def _layer_order(rows: list[dict]) -> list[str] | None:
    for r in rows:
        if isinstance(r.get("rank"), dict) and len(r["rank"]) > 1:
            return list(r["rank"])
    return None


def print_run_end(console: Console, rows: list[dict], *, title: str, width: int, extra: Sequence[str] = (),
                  max_drop: float | None = None, report: str | None = None) -> None:
    """What every run ends with: the table, one line per failed cell, then the verdict."""
    from .verdict import DEFAULT_MAX_DROP, make_verdict, verdict_counts, verdict_entries, verdict_heading

    console.print(fitted_table(rows, width=width, title=title, extra=extra, layer_names=_layer_order(rows)),
                  width=width)
    for r in rows:
        if r.get("status") != "ok":
            line = (f"failed: {r.get('decomposer')} rank {rank_text(r)} on {r.get('backend')}, batch "
                    f"{r.get('batch')}: {r.get('error')}")
            console.print(line if len(line) <= width else line[: width - 1] + "…", style="red", markup=False,
                          highlight=False, width=width, overflow="ignore", crop=False)
    console.print()
    v = make_verdict(rows, max_drop=DEFAULT_MAX_DROP if max_drop is None else max_drop)
    console.print(verdict_heading(v), style="bold", markup=False, highlight=False, width=width)
    grid = Table.grid(padding=(0, 2), pad_edge=False)
    grid.add_column(no_wrap=True)
    grid.add_column()  # a long entry wraps under itself, not under the names
    for name, text in verdict_entries(v):
        grid.add_row(Text("  " + name), Text(text))
    console.print(grid, width=width)
    console.print(verdict_counts(v), markup=False, highlight=False, width=width)
    if report:
        console.print(f"report: {report}", markup=False, highlight=False, width=width)
