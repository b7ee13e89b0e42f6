"""The report in Markdown (``report.md``): the same content as the HTML, referencing the PNGs."""
from __future__ import annotations

from pathlib import Path

from .figures import Plot
from .html import (MATRIX_FILE, _cell, _counts, _failures, _flatten, _groups,  # shared with the HTML
                   _headline, report_columns)
from .tables import row_summary
from .verdict import DEFAULT_MAX_DROP, make_verdict, verdict_lines

__all__ = ["render_markdown"]


# -- Markdown ---------------------------------------------------------------------------------
def _md(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_plot(p: Plot) -> list[str]:
    return [f"### {p.title}", ""] + ([f"*{p.note}*", ""] if p.png is None else
                                     [f"![{p.title}]({p.filename})", "", p.caption, ""])


def render_markdown(rows: list[dict], plots: list[Plot], *, run_dir: Path, matrix: str | None,
                    max_drop: float = DEFAULT_MAX_DROP, notes: list[str] | None = None) -> str:
    cols = report_columns(rows)
    verdict = verdict_lines(make_verdict(rows, max_drop=max_drop))
    headline = _headline(plots)
    lines = [f"# cpbench report — {run_dir.name}", "", f"{_counts(rows)}. Run directory `{run_dir}`.", "",
             "## Verdict", "", verdict[0], "", *[f"- {v.strip()}" for v in verdict[1:-1]], "", verdict[-1], "",
             *[f"> {n}" for n in notes or []], *([""] if notes else []),
             *(_md_plot(headline) if headline is not None else []),
             "## Summary", "", "Accuracies in %, acc_drop in percentage points; speedup_lo/hi are the 95% CI; "
             "columns empty in every row are left out.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        s = row_summary(r)
        lines.append("| " + " | ".join(_md(_cell(s[c])) for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for p in plots:
        if p is not headline:
            lines += _md_plot(p)
    fails = _failures(rows)
    lines += [f"## Failures ({len(fails)})", ""]
    if not fails:
        lines += ["No cell failed.", ""]
    else:
        lines += ["| model | decomposer | rank | backend | threads | batch | error |", "|---|---|---|---|---|---|---|"]
        for r in fails:
            s = row_summary(r)
            lines.append("| " + " | ".join(_md(_cell(s[c])) for c in
                                             ("model", "decomposer", "rank", "backend", "threads", "batch", "error")) + " |")
        lines.append("")
    lines += ["## Machine and versions", ""]
    for field, drop in (("machine", ("threads",)), ("versions", ())):
        for hosts, values in _groups(rows, field, drop):
            lines += [f"### {field} on {', '.join(hosts)}", "", "| key | value |", "|---|---|"]
            lines += [f"| {_md(k)} | {_md(v)} |" for k, v in _flatten(values)] + [""]
    lines += ["## Matrix", ""]
    lines += (["```toml", matrix.rstrip("\n"), "```", ""] if matrix is not None else
              [f"No {MATRIX_FILE} in the run directory.", ""])
    return "\n".join(lines)
