"""The report in Markdown (``report.md``): the same content as the HTML, referencing the PNGs."""
from __future__ import annotations

from pathlib import Path

from .figures import Plot
from .html import MATRIX_FILE, _cell, _counts, _failures, _flatten, _groups  # shared with the HTML
from .tables import row_summary, summary_columns

__all__ = ["render_markdown"]


# -- Markdown ---------------------------------------------------------------------------------
def _md(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[dict], plots: list[Plot], *, run_dir: Path, matrix: str | None) -> str:
    cols = summary_columns()
    lines = [f"# cpbench report — {run_dir.name}", "", f"{_counts(rows)}. Run directory `{run_dir}`.", "",
             "## Summary", "", "Accuracies in %, acc_drop in percentage points; speedup_lo/hi are the 95% CI.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        s = row_summary(r)
        lines.append("| " + " | ".join(_md(_cell(s[c])) for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for p in plots:
        lines += [f"### {p.title}", ""]
        lines += [f"*{p.note}*", ""] if p.png is None else [f"![{p.title}]({p.filename})", "", p.caption, ""]
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
