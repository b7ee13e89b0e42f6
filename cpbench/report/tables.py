"""Row summaries (the report's table and CSV) and the paper's table of ``cpbench reproduce``. The
end-of-run table of ``cpbench run`` is :mod:`cpbench.report.columns`."""
from __future__ import annotations

from rich.table import Table

from ..measure.intervals import flag_labels
from ..run.record import CellResult

__all__ = ["summary_columns", "row_summary"]


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


def reference_accuracy(r: dict) -> float | None:
    """The accuracy a drop is measured from: the base network's, or, when the run fine-tuned the base
    with the same recipe as a control (``[run] finetune_control``), the better of the two."""
    return CellResult.from_row(r).reference_accuracy()


def accuracy_drop(r: dict) -> float | None:
    """Points lost: reference accuracy minus the fine-tuned (else decomposed) accuracy."""
    return CellResult.from_row(r).accuracy_drop()


def row_summary(r: dict) -> dict:
    """The flat summary of one result row (the table's columns; also the CSV export)."""
    c = CellResult.from_row(r)
    ci = c.speedup_ci or [None, None]
    drop = c.accuracy_drop()
    model = c.model
    if c.model_label:
        model = c.model_label
    elif c.model_params:
        model = f"{model}({','.join(f'{k}={v}' for k, v in c.model_params.items())})"
    return {
        "status": c.status, "model": model, "decomposer": c.decomposer,
        "rank": _per_layer(c.rank if c.rank is not None else c.rank_spec),
        "backend": c.backend, "threads": c.threads, "batch": c.batch,
        "finetune_epochs": c.finetune_epochs, "rel_error": _per_layer(c.rel_error),
        "acc_base": _acc(c.accuracy_base), "acc_base_finetuned": _acc(c.accuracy_base_finetuned),
        "acc_decomposed": _acc(c.accuracy_decomposed),
        "acc_finetuned": _acc(c.accuracy_finetuned), "acc_drop": None if drop is None else round(drop, 2),
        "theoretical_speedup": c.theoretical_speedup, "speedup": c.speedup,
        "speedup_lo": ci[0], "speedup_hi": ci[1], "flags": " ".join(flag_labels(c)),
        "machine_noise": (c.noise or {}).get("verdict"),
        "baseline_ms": c.baseline_ms, "compressed_ms": c.compressed_ms,
        "error": c.error,
    }


def summary_columns() -> list[str]:
    return list(row_summary({}).keys())


def _group_key(c: CellResult) -> tuple:
    import json

    return (c.model, json.dumps(c.model_params, sort_keys=True), c.decomposer,
            json.dumps(c.decomposer_options, sort_keys=True), json.dumps(c.rank_spec, sort_keys=True),
            c.finetune_epochs, c.seed, c.backend, c.threads)


def paper_rows(rows: list[dict]) -> list[dict]:
    """One row per decomposition (batch sizes side by side), as the paper's table reads."""
    groups: dict[tuple, dict] = {}
    for c in (CellResult.from_row(r) for r in rows):
        if not c.ok:
            continue
        g = groups.setdefault(_group_key(c), {"cell": c, "by_batch": {}})
        g["by_batch"][c.batch] = c
    out = []
    for g in groups.values():
        c, by_batch = g["cell"], sorted(g["by_batch"].items())
        out.append({
            "decomposer": c.decomposer, "rank": c.rank, "rel_error": c.rel_error,
            "backend": c.backend, "threads": c.threads, "finetune_epochs": c.finetune_epochs,
            "accuracy_base": c.accuracy_base, "accuracy_base_finetuned": c.accuracy_base_finetuned,
            "accuracy_decomposed": c.accuracy_decomposed, "accuracy_finetuned": c.accuracy_finetuned,
            "accuracy_drop": c.accuracy_drop(), "theoretical_speedup": c.theoretical_speedup,
            "speedup": {b: (x.speedup, x.speedup_ci, " ".join(flag_labels(x))) for b, x in by_batch},
            "compressed_ms": {b: x.compressed_ms for b, x in by_batch},
            "layer_speedup": {b: x.layer_speedup for b, x in by_batch},
            "layer_theoretical_speedup": c.layer_theoretical_speedup,
            "rank_spec": c.rank_spec, "fidelity": c.fidelity,
        })
    return sorted(out, key=lambda x: (x["decomposer"], -(x["theoretical_speedup"] or 0)))


def fastest_baselines(rows: list[dict]) -> dict[tuple, tuple[float, str]]:
    """``(threads, batch) -> (baseline_ms, backend)``: the fastest original network over the run's backends."""
    best: dict[tuple, tuple[float, str]] = {}
    for c in (CellResult.from_row(r) for r in rows):
        ms = c.baseline_ms
        if not c.ok or ms is None:
            continue
        key = (c.threads, c.batch)
        if key not in best or ms < best[key][0]:
            best[key] = (ms, c.backend)
    return best


def vs_fastest_baseline(p: dict, batch, best: dict) -> float | None:
    """A paper row's compressed latency against the fastest baseline of any backend (a ratio of two
    medians from different cells: no paired CI; it answers "faster than the best the original can do?")."""
    ms = p.get("compressed_ms", {}).get(batch)
    ref = best.get((p.get("threads"), batch))
    return None if ms is None or ref is None or ms <= 0 else ref[0] / ms


def paper_table(rows: list[dict], *, title: str) -> Table:
    prow = paper_rows(rows)
    batches = sorted({b for p in prow for b in p["speedup"]})
    backends = {p["backend"] for p in prow}
    best = fastest_baselines(rows)
    # a control arm (the base fine-tuned like the compressed nets): its accuracy is a column, and the
    # drop is measured from the better of base and base+FT
    control = any(p.get("accuracy_base_finetuned") is not None for p in prow)
    t = Table(title=title)
    cols = ["decomposer", "ranks"] + (["backend"] if len(backends) > 1 else []) + [
        "rel_error", "acc base %"] + (["base+FT %"] if control else []) + [
        "before FT %", "after FT %", "drop pt", "theo ×"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("decomposer", "ranks", "backend", "rel_error") else "right")
    for b in batches:
        t.add_column(f"measured × batch {b} [95% CI]", justify="right")
    if len(backends) > 1:
        for b in batches:
            t.add_column(f"× vs fastest base b{b}", justify="right")
    per_layer = any(p["layer_speedup"].get(b) for p in prow for b in batches)
    if per_layer:
        t.add_column("layers theo ×", justify="left")
        for b in batches:
            t.add_column(f"layers measured × b{b}", justify="left")
    for p in prow:
        cells = []
        for b in batches:
            sp, ci, flags = p["speedup"].get(b, (None, None, None))
            cells.append("–" if sp is None else f"{sp:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" + (f" {flags}" if flags else ""))
        if len(backends) > 1:
            cells += [_fmt(vs_fastest_baseline(p, b, best), "{:.2f}") for b in batches]
        t.add_row(p["decomposer"], _per_layer(p["rank"]), *([p["backend"]] if len(backends) > 1 else []),
                  _per_layer(p["rel_error"], "{:.3f}"), _acc(p["accuracy_base"]),
                  *([_acc(p.get("accuracy_base_finetuned"))] if control else []),
                  _acc(p["accuracy_decomposed"]), _acc(p["accuracy_finetuned"]),
                  "–" if p["accuracy_drop"] is None else f"{p['accuracy_drop']:.2f}",
                  _fmt(p["theoretical_speedup"], "{:.2f}"), *cells,
                  *([_per_layer(p["layer_theoretical_speedup"], "{:.2f}")]
                    + [_per_layer(p["layer_speedup"].get(b), "{:.2f}") for b in batches] if per_layer else []))
    return t


def network_table(rows: list[dict], *, title: str) -> Table:
    """One row per decomposition of a whole network (batch sizes side by side): many layers, so the
    per-layer ranks and errors are summarised (layer count, mean kernel rel_error) and the fidelity of
    the network's outputs is shown instead."""
    prow = paper_rows(rows)
    batches = sorted({b for p in prow for b in p["speedup"]})
    t = Table(title=title)
    cols = ["decomposer", "rank spec", "backend", "layers", "kernel err", "acc base %", "before FT %",
            "after FT %", "out err → FT", "top-1 agree % → FT", "theo ×"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("decomposer", "rank spec", "backend") else "right")
    for b in batches:
        t.add_column(f"measured × b{b} [95% CI]", justify="right")
    for p in prow:
        errs = list((p["rel_error"] or {}).values()) if isinstance(p["rel_error"], dict) else []
        fid = p.get("fidelity") or {}
        agree = (f"{_acc(fid.get('top1_agreement'))} → {_acc(fid.get('top1_agreement_finetuned'))}"
                 if fid.get("top1_agreement") is not None else "–")
        out_err = (f"{fid['rel_error']:.3f} → {_fmt(fid.get('rel_error_finetuned'), '{:.3f}')}"
                   if fid.get("rel_error") is not None else "–")
        cells = []
        for b in batches:
            sp, ci, flags = p["speedup"].get(b, (None, None, None))
            cells.append("–" if sp is None else f"{sp:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" + (f" {flags}" if flags else ""))
        t.add_row(p["decomposer"], str(p.get("rank_spec")), p["backend"], str(len(errs)),
                  f"{sum(errs) / len(errs):.3f}" if errs else "–", _acc(p["accuracy_base"]),
                  _acc(p["accuracy_decomposed"]), _acc(p["accuracy_finetuned"]), out_err, agree,
                  _fmt(p["theoretical_speedup"], "{:.2f}"), *cells)
    return t


def paper_verdict(rows: list[dict], *, target_speedup: float = 8.5, max_drop: float = 1.0) -> list[str]:
    """Lines that compare the run with the paper's headline (best row within the accuracy budget)."""
    lines = []
    prow = paper_rows(rows)
    fastest = fastest_baselines(rows)
    for dec in sorted({p["decomposer"] for p in prow}):
        best = None
        for p in prow:
            if p["decomposer"] != dec or p["accuracy_drop"] is None or p["accuracy_drop"] > max_drop:
                continue
            for b, (sp, ci, flags) in p["speedup"].items():
                if sp is not None and (best is None or sp > best[0]):
                    best = (sp, ci, b, p, flags)
        if best is None:
            lines.append(f"{dec}: no row within a {max_drop:g}-point accuracy drop")
            continue
        sp, ci, b, p, flags = best
        # the interval decides: "meets" only when even its lower end does
        lo, hi = (ci or (sp, sp))[0], (ci or (sp, sp))[1]
        mark = "meets" if lo >= target_speedup else "below" if hi < target_speedup else "cannot tell (interval spans)"
        line = (f"{dec}: best within {max_drop:g} pt drop: {sp:.2f}× [{ci[0]:.2f}, {ci[1]:.2f}] at batch {b} on "
                f"{p['backend']}, ranks {_per_layer(p['rank'])}, drop {p['accuracy_drop']:.2f} pt — {mark} the "
                f"paper's {target_speedup}×")
        ref = fastest.get((p.get("threads"), b))
        vs = vs_fastest_baseline(p, b, fastest)
        if vs is not None and ref is not None and ref[1] != p["backend"]:
            line += f"; {vs:.2f}× against the fastest original network in the run ({ref[1]}, {ref[0]:.3g} ms)"
        if flags:
            line += f" [timing flagged: {flags}]"
        lines.append(line)
    return lines
