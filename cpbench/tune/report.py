"""The tune's tables and report: each plan per layer, the targets, and the Pareto front.

``pareto_front`` is pure (rows in, the non-dominated rows out); the report is Markdown plus one PNG
(matplotlib, Agg) of measured whole-network speedup against accuracy after fine-tuning, tuned plans
beside the uniform-rank ones.
"""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

__all__ = ["pareto_front", "targets_table", "layers_table", "write_tune_report", "row_accuracy"]


def row_accuracy(row: dict) -> float | None:
    """Accuracy after fine-tuning (before it when there was none), in [0, 1]; None without labels."""
    for k in ("accuracy_finetuned", "accuracy_decomposed"):
        if row.get(k) is not None:
            return row[k]
    return None


def _drop(row: dict) -> float | None:
    if row.get("accuracy_drop") is not None:
        return row["accuracy_drop"]
    acc, base = row_accuracy(row), row.get("accuracy_base")
    if acc is None or base is None:
        return None
    ref = max(base, row.get("accuracy_base_finetuned") or 0.0)
    return 100.0 * (ref - acc)


def _measured(rows: list[dict]) -> list[tuple[dict, float]]:
    """The rows with a measured speedup and an accuracy drop, each with its drop."""
    out = []
    for r in rows:
        d = _drop(r)
        if r.get("speedup") is not None and d is not None:
            out.append((r, d))
    return out


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats in both measured speedup and accuracy drop (lower drop is better)."""
    pts = _measured(rows)
    front = []
    for r, d in pts:
        s = r["speedup"]
        if not any((o["speedup"] >= s and od <= d) and (o["speedup"] > s or od < d) for o, od in pts):
            front.append(r)
    return sorted(front, key=lambda r: r["speedup"])


def _label(row: dict) -> str:
    if isinstance(row.get("rank_spec"), dict) and "target_speedup" in row["rank_spec"]:
        return f"tuned {row['rank_spec']['target_speedup']:g}x"
    return f"{row.get('decomposer')} {row.get('rank_spec')}"


def _plan_cell(row: dict) -> str:
    methods = row.get("layer_decomposer") or {n: row.get("decomposer") for n in (row.get("rank") or {})}
    ranks = row.get("rank") or {}
    parts = []
    for n, m in methods.items():
        r = ranks.get(n)
        r = "x".join(map(str, r)) if isinstance(r, list) else r
        parts.append(f"{n} keep" if m == "keep" else f"{n} {m}:{r}")
    return ", ".join(parts)


def _ci(row: dict) -> str:
    ci = row.get("speedup_ci") or [None, None]
    return f"{row['speedup']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else f"{row['speedup']:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


TARGET_COLUMNS = ("target", "plan", "predicted", "measured [95% CI]", "vs fastest original", "acc base",
                  "acc decomposed", "acc fine-tuned", "drop (pts)", "rounds", "met")


def _vs_fastest(r: dict) -> str:
    """The speedup against the fastest original network of any backend (``--against``), with its backend."""
    v = r.get("vs_fastest_original")
    if not v or v.get("speedup") is None:
        return "-" if not v else "failed"
    lo, hi = v["speedup_ci"]
    return f"{v['speedup']:.2f} [{lo:.2f}, {hi:.2f}] {v['backend']}"


#: How much faster another backend must run the original network before the tune says so (past run-to-run noise).
FASTER_ORIGINAL = 1.2


def faster_original_notes(rows: list[dict]) -> list[str]:
    """One line per target whose original network runs markedly faster on another backend than on the tune's:
    there the speedup on ``--backend`` overstates what the plan is worth (``vs_fastest_original``)."""
    out = []
    for r in rows:
        v = r.get("vs_fastest_original") or {}
        if v.get("speedup") is None or v.get("backend") == r.get("backend") or not r.get("speedup"):
            continue
        if (r.get("tune") or {}).get("kept_from_target") is not None:
            continue  # an earlier target's plan, already noted there
        if (r.get("tune") or {}).get("target_against"):
            continue  # its target is already against the fastest original
        ratio = r["speedup"] / v["speedup"]
        if ratio >= FASTER_ORIGINAL:
            out.append(f"target {r['rank_spec']['target_speedup']:g}x: {v['backend']} runs the original network "
                       f"{ratio:.2f}x faster than {r['backend']}; against it the plan measured {v['speedup']:.2f}x "
                       f"[{v['speedup_ci'][0]:.2f}, {v['speedup_ci'][1]:.2f}] (tune with --target-against fastest, or "
                       f"--backend {v['backend']}, to aim at speedups against it)")
    return out


def _target(r: dict) -> str:
    """The target as the user asked for it; against the fastest original, what it was on the backend too."""
    tune = r.get("tune") or {}
    source = tune.get("kept_from_target")
    text = f"{r['rank_spec']['target_speedup']:g}x"
    against = tune.get("target_against")
    if against:
        text += f" vs {against['backend']} original ({tune['backend_target']:.2f}x on {r.get('backend')})"
    return text + (f" (the {source:g}x plan)" if source is not None else "")


def _target_cells(r: dict) -> list[str]:
    target = _target(r)
    return [target, _plan_cell(r), _num(r.get("predicted_speedup")), _ci(r), _vs_fastest(r),
            _pct(r.get("accuracy_base")), _pct(r.get("accuracy_decomposed")), _pct(r.get("accuracy_finetuned")),
            _num(r.get("accuracy_drop")), str(r.get("tune_rounds")), "yes" if r.get("tune_met") else "no"]


def targets_table(rows: list[dict], title: str = "cpbench tune") -> Table:
    t = Table(title=title)
    for c in TARGET_COLUMNS:
        t.add_column(c, justify="left" if c == "plan" else "right")
    for r in rows:
        t.add_row(*_target_cells(r))
    return t


LAYER_COLUMNS = ("layer", "method", "rank", "theoretical", "predicted layer speedup", "measured layer speedup",
                 "share of network", "sensitivity")  # in the units of the tune's sensitivity mode (README)


def _layer_cells(plan_layers: dict) -> list[list[str]]:
    out = []
    for n, c in plan_layers.items():
        rec = c.record if hasattr(c, "record") else c
        method = c.method if hasattr(c, "method") else c.get("method")
        rank = c.rank if hasattr(c, "rank") else c.get("rank")
        ci = rec.get("layer_speedup_ci")
        measured = "-" if rec.get("layer_speedup") is None else (
            f"{rec['layer_speedup']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{rec['layer_speedup']:.2f}")
        out.append([n, method, "-" if rank is None else ("x".join(map(str, rank)) if isinstance(rank, list) else str(rank)),
                    _num(rec.get("theoretical_speedup"), ".1f"), _num(rec.get("predicted_layer_speedup")), measured,
                    _num(rec.get("share"), ".3f"), _num(rec.get("sensitivity"))])
    return out


def layers_table(plan, title: str) -> Table:
    t = Table(title=title)
    for c in LAYER_COLUMNS:
        t.add_column(c, justify="left" if c in ("layer", "method") else "right")
    for cells in _layer_cells(plan.layers):
        t.add_row(*cells)
    return t


def _md_table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |" for r in rows]


def _plot(path: Path, tuned: list[dict], uniform: list[dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r, "tuned", d) for r, d in _measured(tuned)] + [(r, "uniform", d) for r, d in _measured(uniform)]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, marker in (("tuned", "o"), ("uniform", "s")):
        xs = [r["speedup"] for r, k, _ in pts if k == kind]
        ys = [d for _, k, d in pts if k == kind]
        if xs:
            ax.scatter(xs, ys, marker=marker, label=kind)
            for r, k, d in pts:
                if k == kind:
                    lo, hi = r.get("speedup_ci") or (r["speedup"], r["speedup"])
                    ax.plot([lo, hi], [d] * 2, color="grey", linewidth=0.8)
    front = _measured(pareto_front([r for r, _, _ in pts]))  # every row of the front has its drop
    ax.plot([r["speedup"] for r, _ in front], [d for _, d in front], "k--", linewidth=0.8, label="Pareto front")
    ax.set_xlabel("measured whole-network speedup (95% CI)")
    ax.set_ylabel("accuracy drop after fine-tuning (points)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tune_report(out_dir: str | Path, tuned: list[dict], uniform: list[dict]) -> list[Path]:
    """``tune-report.md`` and ``pareto.png`` in ``out_dir``; returns the files written."""
    from .plan import read_plan
    from .run import plan_name

    out_dir = Path(out_dir)
    lines = ["# cpbench tune", ""]
    if tuned:
        r0 = tuned[0]
        lines += [f"Model `{r0['model']}`, backend `{r0['backend']}`, {r0['threads']} thread(s), batch {r0['batch']}, "
                  f"fine-tuning {r0['finetune_epochs']} epoch(s). Speedups are measured on the whole network against "
                  "the baseline on the same backend, interleaved, with 95% intervals (\"vs fastest original\": against the "
                  "original network on whichever backend ran it fastest, timed the same way); the drop is measured from the better of the base "
                  "network and the base network fine-tuned by the same recipe.", ""]
        against = (r0.get("tune") or {}).get("target_against")
        if against and against["backend"] == r0["backend"]:
            lines += [f"Targets are speedups against the fastest original network: of the backends compared, "
                      f"`{r0['backend']}` ran it fastest, so they were searched there as they are.", ""]
        elif against:
            lo, hi = against["ratio_ci"]
            lines += [f"Targets are speedups against the original network on `{against['backend']}`, which ran it "
                      f"{1 / against['ratio']:.2f}x faster than `{r0['backend']}` (ratio {against['ratio']:.3f} "
                      f"[{lo:.3f}, {hi:.3f}]): each was searched on `{r0['backend']}` at the target divided by that "
                      "ratio, and is met when the plan's speedup against that original reaches it.", ""]
        lines += _md_table(TARGET_COLUMNS, [_target_cells(r) for r in tuned]) + [""]
        notes = faster_original_notes(tuned)
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        for r in tuned:
            target = r["rank_spec"]["target_speedup"]
            p = out_dir / plan_name(target)
            if p.is_file():
                lines += [f"## Plan for {target:g}x (`{p.name}`)", ""]
                lines += _md_table(LAYER_COLUMNS, _layer_cells(read_plan(p).layers)) + [""]
    rows = tuned + uniform
    front = pareto_front(rows)
    if front:
        lines += ["## Pareto front: measured speedup against accuracy drop", "",
                  "Tuned plans beside uniform-rank plans (one method, `speedup:X` on every tuned layer).", ""]
        table = [[_label(r), _plan_cell(r), _ci(r), _pct(row_accuracy(r)), _num(_drop(r)),
                  "yes" if r in front else ""] for r in sorted(rows, key=lambda r: r.get("speedup") or 0)]
        lines += _md_table(("plan", "layers", "measured speedup [95% CI]", "accuracy", "drop (pts)", "on the front"),
                           table) + [""]
    written = []
    png = _plot(out_dir / "pareto.png", tuned, uniform)
    if png:
        lines += ["![Pareto front](pareto.png)", ""]
        written.append(png)
    md = out_dir / "tune-report.md"
    md.write_text("\n".join(lines))
    return [md] + written
