"""The verdict of a run: what a person reads in five seconds at the end of ``cpbench run`` and at the
head of the HTML and Markdown reports.

Per decomposer (per model and decomposer when the run has several models): the cell with the
highest measured whole-network speedup among those whose accuracy drop is within the budget
(``max_drop`` points, default 1), with its interval; where the model has no accuracy (no data set),
the highest measured speedup, said so. Then the counts: cells ok, failed, flagged (any flag a row
carries, see :func:`row_flags`). Pure: rows in, records and lines out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tables import accuracy_drop

__all__ = ["DEFAULT_MAX_DROP", "Best", "Verdict", "row_flags", "make_verdict", "verdict_heading", "verdict_entries",
           "verdict_counts", "verdict_lines"]

DEFAULT_MAX_DROP = 1.0


def row_flags(row: dict) -> list[str]:
    """Every flag on a result row, by name: the whole network's timing flags
    (:func:`cpbench.measure.intervals.flag_labels`: busy, disagree, wide; ``noisy`` in rows of old runs),
    then ``"<flag> layer timing"`` for a flag set on any replaced layer's own timing."""
    from ..measure.intervals import flag_labels

    flags = flag_labels(row)
    layers = row.get("layer_timing_flags")
    if isinstance(layers, dict):
        for per_layer in layers.values():
            for name in flag_labels({"timing_flags": per_layer}) if isinstance(per_layer, dict) else ():
                if f"{name} layer timing" not in flags:
                    flags.append(f"{name} layer timing")
    elif isinstance(row.get("layer_noisy"), dict) and any(row["layer_noisy"].values()) and "noisy" not in flags:
        flags.append("noisy layer timing")
    return flags


@dataclass(frozen=True)
class Best:
    """The verdict for one decomposer (of one model)."""

    model: str
    decomposer: str
    row: dict | None           # the chosen cell; None when no cell qualifies
    has_accuracy: bool         # the cells have an accuracy drop (the model has a data set)
    closest: dict | None = None  # with accuracy but none within budget: the cell with the smallest drop

    @property
    def speedup(self) -> float | None:
        return None if self.row is None else self.row.get("speedup")


@dataclass(frozen=True)
class Verdict:
    max_drop: float
    best: list[Best]
    total: int
    ok: int
    failed: int
    flagged: int
    flag_names: list[str] = field(default_factory=list)
    multi_model: bool = False
    varying: tuple[str, ...] = ()  # of backend, batch, threads: the axes whose value differs between cells


def _model(row: dict) -> str:
    from .tables import row_summary

    return str(row_summary(row)["model"])


def make_verdict(rows: list[dict], *, max_drop: float = DEFAULT_MAX_DROP) -> Verdict:
    """The verdict of ``rows`` (one row per cell, e.g. :func:`cpbench.run.results.latest_rows`)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in ok:
        groups.setdefault((_model(r), str(r.get("decomposer"))), []).append(r)
    for r in rows:  # a decomposer whose every cell failed still gets a line
        if r.get("status") != "ok":
            groups.setdefault((_model(r), str(r.get("decomposer"))), [])
    best = []
    for (model, dec), mine in groups.items():
        timed = [r for r in mine if isinstance(r.get("speedup"), (int, float))]
        with_acc = [r for r in timed if accuracy_drop(r) is not None]
        if with_acc:
            within = [r for r in with_acc if accuracy_drop(r) <= max_drop + 1e-9]
            pick = max(within, key=lambda r: r["speedup"]) if within else None
            closest = None if within else min(with_acc, key=lambda r: (accuracy_drop(r), -r["speedup"]))
            best.append(Best(model, dec, pick, True, closest))
        else:
            best.append(Best(model, dec, max(timed, key=lambda r: r["speedup"]) if timed else None, False))
    flags = [row_flags(r) for r in ok]
    names = sorted({f for fl in flags for f in fl})
    varying = tuple(a for a in ("backend", "batch", "threads") if len({str(r.get(a)) for r in rows}) > 1)
    return Verdict(max_drop, best, len(rows), len(ok), len(rows) - len(ok), sum(bool(f) for f in flags), names,
                   multi_model=len({m for m, _ in groups}) > 1, varying=varying)


def _rank(row: dict) -> str:
    from .columns import rank_text

    return rank_text(row)


def _speedup(row: dict) -> str:
    ci = row.get("speedup_ci") or [None, None]
    text = f"{row['speedup']:.2f}×"
    if all(isinstance(v, (int, float)) for v in ci):
        text += f" [{ci[0]:.2f}–{ci[1]:.2f}]"
    return text


def _where(row: dict, varying: tuple[str, ...]) -> str:
    parts = [f"rank {_rank(row)}"] + [f"{row.get('backend')}"] * ("backend" in varying)
    parts += [f"batch {row.get('batch')}"] * ("batch" in varying)
    parts += [f"{row.get('threads')} thread(s)"] * ("threads" in varying)
    return ", ".join(parts)


def verdict_heading(v: Verdict) -> str:
    return f"Verdict — the fastest cell per decomposer within a {v.max_drop:g}-point accuracy drop:"


def verdict_entries(v: Verdict) -> list[tuple[str, str]]:
    """(decomposer, what it reached) for each decomposer, then ("", note) where a note is due."""
    out, no_accuracy = [], False
    for b in v.best:
        name = f"{b.model}: {b.decomposer}" if v.multi_model else b.decomposer
        if b.row is not None and b.has_accuracy:
            out.append((name, f"{_speedup(b.row)}  drop {accuracy_drop(b.row):.2f} pt  ({_where(b.row, v.varying)})"))
        elif b.row is not None:
            no_accuracy = True
            out.append((name, f"{_speedup(b.row)}  no accuracy  ({_where(b.row, v.varying)})"))
        elif b.closest is not None:
            c = b.closest
            out.append((name, f"none within {v.max_drop:g} pt; closest: drop {accuracy_drop(c):.2f} pt at "
                              f"{_speedup(c)} ({_where(c, v.varying)})"))
        else:
            out.append((name, "no cell finished"))
    if no_accuracy:
        out.append(("", "(no accuracy: the model has no data set; the fastest measured cell is shown)"))
    return out


def verdict_counts(v: Verdict) -> str:
    flagged = f"{v.flagged} flagged" + (f" ({', '.join(v.flag_names)})" if v.flag_names else "")
    return f"{v.total} cells: {v.ok} ok, {v.failed} failed, {flagged}"


def verdict_lines(v: Verdict, *, report: str | None = None) -> list[str]:
    """The verdict as plain lines (the Markdown report, the HTML report's head; the terminal prints the
    same entries as a grid, so that a long entry wraps under itself)."""
    entries = verdict_entries(v)
    width = max([len(n) for n, _ in entries] + [4])
    lines = [verdict_heading(v)] + [f"  {n.ljust(width)}  {t}" for n, t in entries] + [verdict_counts(v)]
    if report:
        lines.append(f"report: {report}")
    return lines
