"""``cpbench report RUN_DIR``: a run's results as pictures and tables.

:func:`write_report` reads ``RUN_DIR/results.jsonl`` and writes into ``RUN_DIR/report/``:

* ``report.html`` — one self-contained file (plots embedded as base64 PNG data URIs, inline CSS and a
  few lines of inline JS that sort the summary table when a header is clicked; no network needed);
* ``*.png`` — the plots (``pareto.png``, ``efficiency.png``, ``error_rank.png``, ``accuracy_rank.png``);
* ``report.md`` — the same content in Markdown, referencing the PNGs (so ``md`` writes the PNGs too);
* ``results.csv`` — (``--format csv``) the flat summary table, one row per cell, columns
  :func:`cpbench.report.tables.summary_columns`.

The plots' data come from the pure functions in :mod:`cpbench.report.plots`. A run whose cells all failed
still gets a report: the failures section, with every plot replaced by a note saying why it was
skipped. A missing run directory, a missing results file, a results file without rows or an
unknown format is a :class:`~cpbench.errors.UsageError` (one line).
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import UsageError
from ..measure.intervals import flag_labels
from ..run.record import CellResult
from ..run.results import RESULTS_FILE, latest_rows, read_results
from .figures import Plot, build_plots
from .tables import accuracy_drop, row_summary, summary_columns
from .verdict import DEFAULT_MAX_DROP, make_verdict, verdict_lines

__all__ = ["write_report", "FORMATS", "DEFAULT_FORMATS", "load_rows", "render_html", "write_csv", "report_columns"]

FORMATS = ("html", "md", "csv", "png")
DEFAULT_FORMATS = ("html", "md", "png")
REPORT_DIR = "report"
MATRIX_FILE = "matrix.toml"


# -- input ------------------------------------------------------------------------------------
def load_rows(run_dir: str | Path, *, warn=None) -> list[dict]:
    """The run's rows, one per cell (:func:`~cpbench.run.results.latest_rows`: a retried error is superseded);
    duplicated ok rows are reported through ``warn`` (default: a line on stderr)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UsageError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise UsageError(f"not a run directory: {run_dir} (give the directory that holds {RESULTS_FILE})")
    rows = read_results(run_dir)
    if not rows:
        raise UsageError(f"{run_dir / RESULTS_FILE} has no rows: nothing to report (did the run finish a cell?)")
    latest, dup = latest_rows(rows)
    if dup:
        (warn or _warn)(dup.message(run_dir / RESULTS_FILE))
    return latest


def _warn(message: str) -> None:
    import sys

    print(f"cpbench: warning: {message}", file=sys.stderr)


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
    """A :class:`CellResult` field (ignoring keys in ``drop``) once per host: values that changed between
    the host's cells (e.g. its load average) are shown as their range, not as another copy of the machine."""
    per_host: dict[str, list[dict]] = {}
    for c in (CellResult.from_row(r) for r in rows):
        v = getattr(c, field)
        if not isinstance(v, dict):
            continue
        per_host.setdefault(str(c.host or v.get("hostname") or "?"), []).append(
            {k: x for k, x in v.items() if k not in drop})
    seen: dict[str, tuple[list[str], dict]] = {}
    for host, values in per_host.items():
        merged = _merge(values)
        key = json.dumps(merged, sort_keys=True, default=str)
        seen.setdefault(key, ([], merged))[0].append(host)
    return list(seen.values())


def _merge(values: list[dict]) -> dict:
    """One dict from several: a key whose value differs becomes "varies: …" (numbers as min–max)."""
    out: dict = {}
    for k in dict.fromkeys(k for v in values for k in v):
        vs = [v.get(k) for v in values]
        if all(json.dumps(x, sort_keys=True, default=str) == json.dumps(vs[0], sort_keys=True, default=str) for x in vs):
            out[k] = vs[0]
        elif all(isinstance(x, dict) for x in vs):
            out[k] = _merge(vs)
        elif all(isinstance(x, (list, tuple)) and len(x) == len(vs[0]) and
                 all(isinstance(y, (int, float)) for y in x) for x in vs):
            out[k] = "varies over the cells: " + ", ".join(
                f"{min(col):.3g}–{max(col):.3g}" for col in zip(*vs))
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vs):
            out[k] = f"varies over the cells: {min(vs):.3g}–{max(vs):.3g}"
        else:
            distinct = list(dict.fromkeys(json.dumps(x, default=str) for x in vs))
            out[k] = "varies over the cells: " + " | ".join(distinct[:4]) + (" | …" if len(distinct) > 4 else "")
    return out


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
#verdict{background:#f4f8ff;border:1px solid #cfe0ff;padding:.3em 1em .5em;margin-top:1em}
#verdict h2{margin-top:.3em;border:none}#verdict table{font-size:.95em;background:#fff}#verdict tr.over td{color:#8a5a00}
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


# what a reader needs first, left, so that the speedup is on the first screen; then the rest
_FIRST = ("model", "decomposer", "rank", "backend", "batch", "acc_drop", "speedup", "speedup_lo", "speedup_hi")


def report_columns(rows: list[dict]) -> list[str]:
    """The summary table's columns: :data:`_FIRST`, then the other summary columns, without those that
    are empty in every row (e.g. the accuracy columns of a model without a data set)."""
    summaries = [row_summary(r) for r in rows]
    rest = [c for c in summary_columns() if c not in _FIRST and c not in ("status", "error")]

    def empty(c):
        return all(s[c] in (None, "", "–", False) for s in summaries)

    return [c for c in (*_FIRST, *rest, "status", "error") if not empty(c)]


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _html_table(rows: list[dict]) -> str:
    cols = report_columns(rows)
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


def _headline(plots: list[Plot]) -> Plot | None:
    """The plot shown right under the verdict: the first one drawn (speedup against accuracy drop, or
    the per-layer efficiency when the model has no accuracy)."""
    return next((p for p in plots if p.png is not None), None)


def _html_plot(p: Plot) -> str:
    if p.png is None:
        return f"<h3>{_e(p.title)}</h3><p class=\"note\">{_e(p.note)}</p>"
    data = base64.b64encode(p.png).decode("ascii")
    return (f"<h3>{_e(p.title)}</h3><figure><img alt=\"{_e(p.title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_e(p.caption)}</figcaption></figure>")


def _html_verdict(rows: list[dict], max_drop: float, notes: list[str]) -> str:
    """The verdict as a small table (one row per decomposer), its counts line and any notes."""
    from .columns import rank_text

    v = make_verdict(rows, max_drop=max_drop)
    lines = verdict_lines(v)
    trs = []
    for b in v.best:
        name = f"{b.model}: {b.decomposer}" if v.multi_model else b.decomposer
        r = b.row or b.closest
        if r is None:
            trs.append(f"<tr><td>{_e(name)}</td><td colspan=\"6\">no cell finished</td></tr>")
            continue
        ci = r.get("speedup_ci") or [None, None]
        sp = f"{r['speedup']:.2f}×" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if None not in ci else "")
        drop = accuracy_drop(r)
        what = ("" if b.row is not None else f"none within {max_drop:g} pt; closest: ")
        drop_text = "no accuracy (no data set)" if drop is None else f"{drop:.2f}"
        trs.append(f"<tr class=\"{'' if b.row is not None else 'over'}\"><td>{_e(name)}</td>"
                   f"<td class=\"num sp\">{_e(what + sp)}</td><td class=\"num\">{_e(drop_text)}</td>"
                   f"<td>{_e(rank_text(r))}</td><td>{_e(r.get('backend'))}</td><td class=\"num\">{_e(r.get('batch'))}</td>"
                   f"<td class=\"num\">{_e(r.get('threads'))}</td></tr>")
    extra = "".join(f"<p class=\"note\">{_e(n)}</p>" for n in notes)
    return (f"<section id=\"verdict\"><h2>Verdict</h2><p>{_e(lines[0])}</p><table id=\"verdict-table\"><thead><tr>"
            "<th>decomposer</th><th>speedup [95% CI]</th><th>drop pt</th><th>rank</th><th>backend</th><th>batch</th>"
            f"<th>threads</th></tr></thead><tbody>{''.join(trs)}</tbody></table>"
            f"<p class=\"meta\">{_e(lines[-1])}</p>{extra}</section>")


def render_html(rows: list[dict], plots: list[Plot], *, run_dir: Path, matrix: str | None,
                max_drop: float = DEFAULT_MAX_DROP, notes: list[str] | None = None) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    headline = _headline(plots)
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>cpbench report — {_e(run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>cpbench report — {_e(run_dir.name)}</h1>",
        f"<p class=\"meta\">{_e(_counts(rows))}. Run directory <code>{_e(run_dir)}</code>; generated {now}.</p>",
        _html_verdict(rows, max_drop, notes or []),
        *([_html_plot(headline)] if headline is not None else []),
        "<h2 id=\"summary-table\">Summary</h2><p class=\"meta\">Click a column header to sort. Accuracies in %, "
        "acc_drop in percentage points; speedup_lo/hi are the 95% interval over the cell's fresh timing processes; red rows failed, yellow speedups "
        "are flagged (busy: the machine was busy while timing; disagree: a process measured outside the interval; "
        "wide: half-width above 5%); machine_noise is the probe's verdict; "
        "columns empty in every row are left out (every field: <code>cpbench report DIR --format csv</code>).</p>",
        _html_table(rows), "<h2 id=\"plots\">Plots</h2>",
    ]
    parts += [_html_plot(p) for p in plots if p is not headline]
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
def write_report(run_dir: str | Path, formats: Iterable[str] | str | None = None, *,
                 max_drop: float = DEFAULT_MAX_DROP) -> list[Path]:
    """Write the report of a run into ``RUN_DIR/report/``; return the files written.

    ``formats``: any of ``html`` (self-contained report.html), ``md`` (report.md plus the PNGs it
    references), ``png`` (the plots), ``csv`` (results.csv); default html, md and png. ``max_drop``:
    the accuracy budget of the verdict, in points.
    """
    fmts = _formats(formats)
    run_dir = Path(run_dir)
    notes: list[str] = []
    rows = load_rows(run_dir, warn=lambda m: (_warn(m), notes.append(m)))
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
        from .markdown import render_markdown  # here: it shares this module's helpers

        path = out_dir / "report.md"
        path.write_text(render_markdown(rows, plots, run_dir=run_dir, matrix=matrix, max_drop=max_drop, notes=notes),
                        encoding="utf-8")
        written.append(path)
    if "html" in fmts:
        path = out_dir / "report.html"
        path.write_text(render_html(rows, plots, run_dir=run_dir, matrix=matrix, max_drop=max_drop, notes=notes),
                        encoding="utf-8")
        written.append(path)
    return written
