"""The results table (rich), shared by ``cpbench run``, ``reproduce`` and ``report``."""
from __future__ import annotations

from rich.table import Table

__all__ = ["results_table", "summary_columns", "row_summary"]


def _fmt(v, spec="{:.3g}"):
    if v is None:
        return "–"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def _per_layer(d, spec="{:.3g}"):
    if not isinstance(d, dict):
        return _fmt(d, spec)
    return " ".join(f"{k}:{_fmt(v, spec) if not isinstance(v, (list, tuple)) else 'x'.join(map(str, v))}" for k, v in d.items())


def _acc(v):
    return "–" if v is None else f"{100 * v:.1f}"


def row_summary(r: dict) -> dict:
    """The flat summary of one result row (the table's columns; also the CSV export)."""
    ci = r.get("speedup_ci") or [None, None]
    drop = None
    if r.get("accuracy_base") is not None:
        after = r.get("accuracy_finetuned") if r.get("accuracy_finetuned") is not None else r.get("accuracy_decomposed")
        if after is not None:
            drop = 100 * (r["accuracy_base"] - after)
    model = r.get("model")
    if r.get("model_params"):
        model = f"{model}({','.join(f'{k}={v}' for k, v in r['model_params'].items())})"
    return {
        "status": r.get("status"), "model": model, "decomposer": r.get("decomposer"),
        "rank": _per_layer(r.get("rank") if r.get("rank") is not None else r.get("rank_spec")),
        "backend": r.get("backend"), "threads": r.get("threads"), "batch": r.get("batch"),
        "finetune_epochs": r.get("finetune_epochs"), "rel_error": _per_layer(r.get("rel_error")),
        "acc_base": _acc(r.get("accuracy_base")), "acc_decomposed": _acc(r.get("accuracy_decomposed")),
        "acc_finetuned": _acc(r.get("accuracy_finetuned")), "acc_drop": None if drop is None else round(drop, 2),
        "theoretical_speedup": r.get("theoretical_speedup"), "speedup": r.get("speedup"),
        "speedup_lo": ci[0], "speedup_hi": ci[1], "noisy": bool(r.get("noisy")),
        "baseline_ms": r.get("baseline_ms"), "compressed_ms": r.get("compressed_ms"),
        "error": r.get("error"),
    }


def summary_columns() -> list[str]:
    return list(row_summary({}).keys())


def results_table(rows: list[dict], *, title: str = "cpbench results") -> Table:
    t = Table(title=title, show_lines=False)
    for col, just in [("model", "left"), ("decomposer", "left"), ("rank", "left"), ("backend", "left"),
                      ("thr", "right"), ("batch", "right"), ("ft", "right"), ("rel_error", "left"),
                      ("acc base→dec→ft %", "right"), ("theo ×", "right"), ("speedup × [95% CI]", "right"),
                      ("base ms", "right"), ("comp ms", "right")]:
        t.add_column(col, justify=just)
    for r in rows:
        s = row_summary(r)
        if s["status"] != "ok":
            t.add_row(str(s["model"]), str(s["decomposer"]), s["rank"], str(s["backend"]), _fmt(s["threads"]),
                      _fmt(s["batch"]), _fmt(s["finetune_epochs"]), f"[red]error: {s['error']}[/red]", "", "", "", "", "")
            continue
        acc = f"{s['acc_base']}→{s['acc_decomposed']}→{s['acc_finetuned']}" if s["acc_base"] != "–" else "–"
        sp = f"{s['speedup']:.2f} [{s['speedup_lo']:.2f}, {s['speedup_hi']:.2f}]"
        if s["noisy"]:
            sp += " [yellow]noisy[/yellow]"
        t.add_row(str(s["model"]), s["decomposer"], s["rank"], s["backend"], _fmt(s["threads"]), _fmt(s["batch"]),
                  _fmt(s["finetune_epochs"]), s["rel_error"], acc, _fmt(s["theoretical_speedup"], "{:.2f}"), sp,
                  _fmt(s["baseline_ms"], "{:.3f}"), _fmt(s["compressed_ms"], "{:.3f}"))
    return t
