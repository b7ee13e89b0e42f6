"""``cpbench report RUN_DIR``: a run's results as pictures and tables.

:func:`write_report` reads ``RUN_DIR/results.jsonl`` and writes into ``RUN_DIR/report/``:

* ``report.html`` — one self-contained file (plots embedded as base64 PNG data URIs, inline CSS and a
  few lines of inline JS that sort the summary table when a header is clicked; no network needed);
* ``*.png`` — the plots (``pareto.png``, ``efficiency.png``, ``error_rank.png``, ``accuracy_rank.png``);
* ``report.md`` — the same content in Markdown, referencing the PNGs (so ``md`` writes the PNGs too);
* ``results.csv`` — (``--format csv``) the flat summary table, one row per cell, columns
  :func:`cpbench.table.summary_columns`.

The plots' data come from the pure functions in :mod:`cpbench.plots`. A run whose cells all failed
still gets a report: the failures section, with every plot replaced by a note saying why it was
skipped. A missing run directory, a missing results file, a results file without rows or an
unknown format is a :class:`~cpbench.errors.UsageError` (one line).
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..measure.intervals import flag_labels
from ..run.record import CellResult
from ..run.results import RESULTS_FILE, read_results
from .tables import row_summary, summary_columns

__all__ = ["write_report", "FORMATS", "DEFAULT_FORMATS", "Plot", "build_plots", "load_rows", "pareto_plots",
           "efficiency_plot", "error_rank_plot", "accuracy_rank_plot",
           "render_html", "render_markdown", "write_csv"]

FORMATS = ("html", "md", "csv", "png")
DEFAULT_FORMATS = ("html", "md", "png")
REPORT_DIR = "report"
MATRIX_FILE = "matrix.toml"


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


# -- input ------------------------------------------------------------------------------------
def load_rows(run_dir: str | Path) -> list[dict]:
    """The run's rows; a later row for the same ``cell_key`` replaces an earlier one."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UsageError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise UsageError(f"not a run directory: {run_dir} (give the directory that holds {RESULTS_FILE})")
    rows = read_results(run_dir)
    if not rows:
        raise UsageError(f"{run_dir / RESULTS_FILE} has no rows: nothing to report (did the run finish a cell?)")
    by_key: dict = {}
    for i, r in enumerate(rows):
        by_key[CellResult.from_row(r).cell_key or f"#{i}"] = r
    return list(by_key.values())


def _formats(formats) -> list[str]:
    if formats is None:
        return list(DEFAULT_FORMATS)
    if isinstance(formats, str):
        formats = [formats]
    out = []
    for f in formats:
        f = str(f).lower().strip()
        if f not in FORMATS:
            raise UsageError(f"unknown report format {f!r}; allowed: {', '.join(FORMATS)}")
        if f not in out:
            out.append(f)
    return out or list(DEFAULT_FORMATS)


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
        paper = any(p.model_name == P.PAPER_POINT["model"] for p in mine)
        name = "pareto" if len(models) == 1 else f"pareto-{_slug(m)}"
        c = cap + (" The gold star is the paper's result (Lebedev et al. 2015: 8.5×, 1 point)." if paper else "")
        fig = P.draw_pareto(mine, title=f"{m}: speedup against accuracy drop", paper=paper)
        out.append(Plot(name, title + ("" if len(models) == 1 else f" — {m}"), c, png=_png(fig)))
    return out


def efficiency_plot(rows: list[dict]) -> Plot:
    from . import plots as P

    cap = ("Per replaced layer: measured layer speedup (95% CI) against its theoretical speedup (FLOP ratio); "
           "colour = backend, marker = decomposer; the dashed line is y = x. Hollow markers: flagged timings (busy, disagree or wide).")
    pts = P.efficiency_points(rows)
    if pts:
        return Plot("efficiency", "Efficiency per layer", cap, png=_png(P.draw_efficiency(pts)))
    return Plot("efficiency", "Efficiency per layer", cap, note=_NO_OK if not _any_ok(rows) else
                "skipped: no per-layer timings in this run ([run] per_layer_timing = false?).")


def error_rank_plot(rows: list[dict]) -> Plot:
    from . import plots as P

    cap = ("Relative reconstruction error of each layer's kernel against rank, one line per decomposer "
           "(a Tucker-2 pair [r_out, r_in] is plotted at r_out·r_in).")
    pts = P.error_rank_points(rows)
    if pts:
        return Plot("error_rank", "Error against rank", cap, png=_png(P.draw_error_rank(pts)))
    return Plot("error_rank", "Error against rank", cap,
                note=_NO_OK if not _any_ok(rows) else "skipped: no cell recorded a relative error.")


def accuracy_rank_plot(rows: list[dict]) -> Plot:
    from . import plots as P

    cap = ("Test accuracy against rank per decomposer: right after decomposition (dashed, hollow) and after "
           "fine-tuning (solid); the dotted line is the base network. A cell whose layers have different "
           "ranks is plotted at the mean rank.")
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


# -- shared pieces ----------------------------------------------------------------------------
def _cell(v) -> str:
    """A summary value as displayed (floats to 4 significant digits)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not CellResult.from_row(r).ok]


def _flatten(d, prefix="") -> list[tuple[str, str]]:
    out = []
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, "" if v is None else json.dumps(v) if isinstance(v, list) else str(v)))
    return out


def _groups(rows: list[dict], field: str, drop=()) -> list[tuple[list[str], dict]]:
    """Distinct values of a :class:`CellResult` field (ignoring keys in ``drop``) with the hosts that
    reported them."""
    seen: dict[str, tuple[list[str], dict]] = {}
    for c in (CellResult.from_row(r) for r in rows):
        v = getattr(c, field)
        if not isinstance(v, dict):
            continue
        v = {k: x for k, x in v.items() if k not in drop}
        key = json.dumps(v, sort_keys=True, default=str)
        hosts, _ = seen.setdefault(key, ([], v))
        h = str(c.host or v.get("hostname") or "?")
        if h not in hosts:
            hosts.append(h)
    return list(seen.values())


def _counts(rows) -> str:
    cells = [CellResult.from_row(r) for r in rows]
    ok = sum(c.ok for c in cells)
    flagged: dict[str, int] = {}
    for c in cells:
        if c.ok:
            for f in flag_labels(c):
                flagged[f] = flagged.get(f, 0) + 1
    what = ", ".join(f"{n} {f}" for f, n in flagged.items()) or "none"
    return f"{len(rows)} cells: {ok} ok, {len(rows) - ok} failed; timing flags: {what}"


def _matrix_text(run_dir: Path) -> str | None:
    p = run_dir / MATRIX_FILE
    try:
        return p.read_text(encoding="utf-8") if p.is_file() else None
    except OSError:
        return None


# -- HTML -------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1700px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666}table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.error td{background:#fdecea}tr.flagged td.sp{background:#fff6d6}
.scroll{overflow-x:auto}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em;max-width:60em}.note{color:#8a5a00;background:#fff6d6;padding:.4em .7em;
display:inline-block}pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:.85em}
.kv td:first-child{color:#555}#summary td{white-space:nowrap}#summary td.wrap{white-space:normal;min-width:7em}
#summary td.err{white-space:normal;min-width:18em;max-width:40em}
"""

_JS = """
(function(){
  function val(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim():v;}
  function cmp(a,b){
    if(a===''&&b==='')return 0; if(a==='')return 1; if(b==='')return -1;
    var x=parseFloat(a),y=parseFloat(b);
    if(!isNaN(x)&&!isNaN(y)&&isFinite(a)&&isFinite(b))return x-y;
    return a.localeCompare(b,undefined,{numeric:true});
  }
  function sortBy(table,col){
    var th=table.tHead.rows[0].cells[col],asc=th.getAttribute('aria-sort')!=='ascending';
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(r1,r2){var a=val(r1.cells[col]),b=val(r2.cells[col]);
      if(a===''||b==='')return cmp(a,b); var c=cmp(a,b);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  }
  window.cpbenchSort=sortBy;
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(t){
    Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){
      th.title='click to sort';th.addEventListener('click',function(){sortBy(t,i);});});
  });
})();
"""

_NUMERIC = {"threads", "batch", "finetune_epochs", "acc_base", "acc_base_finetuned", "acc_decomposed",
            "acc_finetuned", "acc_drop", "theoretical_speedup", "speedup", "speedup_lo", "speedup_hi", "baseline_ms", "compressed_ms"}


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _html_table(rows: list[dict]) -> str:
    cols = summary_columns()
    head = "".join(f'<th data-col="{_e(c)}">{_e(c).replace("_", "_<wbr>")}</th>' for c in cols)
    body = []
    for r in rows:
        s = row_summary(r)
        cls = "error" if s["status"] != "ok" else "flagged" if s["flags"] else ""
        tds = []
        for c in cols:
            v = s[c]
            raw = "" if v is None else ("1" if v is True else "0" if v is False else str(v))
            if c in ("acc_base", "acc_decomposed", "acc_finetuned") and v == "–":
                raw, v = "", None
            klass = (' class="num' + (' sp' if c == "speedup" else '') + '"' if c in _NUMERIC else
                     ' class="wrap"' if c in ("rank", "rel_error") else ' class="err"' if c == "error" else "")
            tds.append(f'<td{klass} data-v="{_e(raw)}">{_e(_cell(v))}</td>')
        body.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>")
    return (f'<div class="scroll"><table class="sortable" id="summary"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _html_kv_groups(groups, what) -> str:
    if not groups:
        return f"<p>No {what} recorded.</p>"
    parts = []
    for hosts, values in groups:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in _flatten(values))
        parts.append(f"<h3>{_e(what)} on {_e(', '.join(hosts))}</h3><table class=\"kv\">{rows}</table>")
    return "".join(parts)


def render_html(rows: list[dict], plots: list[Plot], *, run_dir: Path, matrix: str | None) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>cpbench report — {_e(run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>cpbench report — {_e(run_dir.name)}</h1>",
        f"<p class=\"meta\">{_e(_counts(rows))}. Run directory <code>{_e(run_dir)}</code>; generated {now}.</p>",
        "<h2 id=\"summary-table\">Summary</h2><p class=\"meta\">Click a column header to sort. Accuracies in %, "
        "acc_drop in percentage points; speedup_lo/hi are the 95% interval over the cell's fresh timing processes; red rows failed, yellow speedups "
        "are flagged (busy: the machine was busy while timing; disagree: a process measured outside the interval; "
        "wide: half-width above 5%); machine_noise is the probe's verdict.</p>",
        _html_table(rows), "<h2 id=\"plots\">Plots</h2>",
    ]
    for p in plots:
        parts.append(f"<h3>{_e(p.title)}</h3>")
        if p.png is None:
            parts.append(f"<p class=\"note\">{_e(p.note)}</p>")
        else:
            data = base64.b64encode(p.png).decode("ascii")
            parts.append(f"<figure><img alt=\"{_e(p.title)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{_e(p.caption)}</figcaption></figure>")
    fails = _failures(rows)
    parts.append(f"<h2 id=\"failures\">Failures ({len(fails)})</h2>")
    if not fails:
        parts.append("<p>No cell failed.</p>")
    else:
        trs = []
        for r in fails:
            s = row_summary(r)
            tb = CellResult.from_row(r).traceback
            err = _e(s["error"]) + (f"<details><summary>traceback</summary><pre>{_e(tb)}</pre></details>" if tb else "")
            trs.append(f"<tr><td>{_e(s['model'])}</td><td>{_e(s['decomposer'])}</td><td>{_e(s['rank'])}</td>"
                       f"<td>{_e(s['backend'])}</td><td>{_e(_cell(s['threads']))}</td><td>{_e(_cell(s['batch']))}</td>"
                       f"<td>{err}</td></tr>")
        parts.append("<div class=\"scroll\"><table id=\"failures-table\"><thead><tr><th>model</th><th>decomposer</th>"
                     "<th>rank</th><th>backend</th><th>threads</th><th>batch</th><th>error</th></tr></thead><tbody>"
                     + "".join(trs) + "</tbody></table></div>")
    parts.append("<h2 id=\"machine\">Machine and versions</h2>")
    parts.append(_html_kv_groups(_groups(rows, "machine", drop=("threads",)), "machine"))
    parts.append(_html_kv_groups(_groups(rows, "versions"), "versions"))
    parts.append("<h2 id=\"matrix\">Matrix</h2>")
    parts.append(f"<pre id=\"matrix-toml\">{_e(matrix)}</pre>" if matrix is not None else
                 f"<p>No {MATRIX_FILE} in the run directory.</p>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


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


# -- CSV --------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> Path:
    """The flat summary, one row per cell, columns :func:`summary_columns` (None → empty field)."""
    cols = summary_columns()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            s = row_summary(r)
            w.writerow({c: "" if s[c] is None else s[c] for c in cols})
    return path


# -- entry point ------------------------------------------------------------------------------
def write_report(run_dir: str | Path, formats: Iterable[str] | str | None = None) -> list[Path]:
    """Write the report of a run into ``RUN_DIR/report/``; return the files written.

    ``formats``: any of ``html`` (self-contained report.html), ``md`` (report.md plus the PNGs it
    references), ``png`` (the plots), ``csv`` (results.csv); default html, md and png.
    """
    fmts = _formats(formats)
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    out_dir = run_dir / REPORT_DIR
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    written: list[Path] = []
    if "csv" in fmts:
        written.append(write_csv(rows, out_dir / "results.csv"))
    if not {"html", "md", "png"} & set(fmts):
        return written
    plots = build_plots(rows)
    matrix = _matrix_text(run_dir)
    if "png" in fmts or "md" in fmts:
        for p in plots:
            if p.png is not None:
                (out_dir / p.filename).write_bytes(p.png)
                written.append(out_dir / p.filename)
    if "md" in fmts:
        path = out_dir / "report.md"
        path.write_text(render_markdown(rows, plots, run_dir=run_dir, matrix=matrix), encoding="utf-8")
        written.append(path)
    if "html" in fmts:
        path = out_dir / "report.html"
        path.write_text(render_html(rows, plots, run_dir=run_dir, matrix=matrix), encoding="utf-8")
        written.append(path)
    return written
