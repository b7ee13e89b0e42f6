"""Do the speedup intervals hold from one run to the next? Coverage of two runs of the same matrix.

    python benchmarks/scripts/interval_coverage.py RUN_A RUN_B [--json OUT]

RUN_A and RUN_B are two ``cpbench run`` directories (or results.jsonl files) of the same matrix, run
as separate invocations (issue 17 asks for at least 10 minutes apart, caches warm). A cell *agrees*
when each run's speedup lies inside the other run's 95% interval. Printed, for the whole network and
for each replaced layer alone (``layer_speedup``): the cells matched, the share that agree (target
>= 90%), the median interval half-width relative to the speedup (target <= 5%), the same over the cells
flagged busy in neither run, how many cells each flag marked, each run's first and last timestamp, and
the cells that disagree. A correctly calibrated 95% interval gives about 83% agreement on this test
(each point must fall within 1.96 sigma of the other, a difference whose sigma is sqrt(2) larger), so
reaching 90% needs intervals that are somewhat conservative, which the small-sample t factor of
cpbench.measure.intervals provides.

Under load: run the second invocation with another process busy on one core, e.g.
``python -c "while True: pass" & cpbench run ...; kill %1``; its rows should be flagged busy and the
coverage of the rows flagged in neither run should still hold.

Exit code 0 when the un-flagged coverage and half-width targets are met, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

from cpbench.measure.intervals import flag_labels, row_flags
from cpbench.run.results import read_results

TARGET_COVERAGE = 0.90
TARGET_HALF_WIDTH = 0.05


def _rows(path: str) -> list[dict]:
    """Rows of a ``cpbench run`` directory, or the cells of a ``layer_suite.py --json`` file as rows."""
    p = Path(path)
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        started = data.get("started_at")
        return [{"cell_key": f"{c['layer']}/R{c['rank']}/b{c['batch']}/t{c['threads']}", "model": c["layer"],
                 "decomposer": "cp", "rank": c["rank"], "backend": c.get("best_compressed"), "batch": c["batch"],
                 "threads": c["threads"], "speedup": c["speedup"], "speedup_ci": c["ci"], "status": "ok",
                 "timing_flags": c.get("flags") or {}, "started_at": started, "wall_seconds": data.get("seconds")}
                for run in data.get("runs", [data.get("cells", [])]) for c in run if c.get("status") == "ok"]
    return [r for r in read_results(p.parent if p.is_file() else p) if r.get("status") == "ok"]


def _inside(x: float, ci) -> bool:
    return ci is not None and ci[0] <= x <= ci[1]


def _half(sp: float, ci) -> float:
    return (ci[1] - ci[0]) / 2 / sp


def _when(rows: list[dict]) -> tuple[str, str]:
    ts = [r["started_at"] for r in rows if r.get("started_at")]
    end = [r["started_at"] + (r.get("wall_seconds") or 0) for r in rows if r.get("started_at")]
    f = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # noqa: E731
    return (f(min(ts)), f(max(end))) if ts else ("?", "?")


def _label(r: dict) -> str:
    model = r.get("model_label") or r.get("model")
    return f"{model} {r.get('decomposer')} {r.get('rank')} {r.get('backend')} b{r.get('batch')} t{r.get('threads')}"


def pairs_of(rows_a: list[dict], rows_b: list[dict]):
    """(label, speedup_a, ci_a, speedup_b, ci_b, busy_either, flags_a, flags_b) per matched measurement,
    whole network and each layer."""
    by_key = {r["cell_key"]: r for r in rows_b}
    out = {"network": [], "layers": []}
    for a in rows_a:
        b = by_key.get(a["cell_key"])
        if b is None or a.get("speedup") is None or b.get("speedup") is None:
            continue
        busy = bool(row_flags(a).get("busy") or row_flags(b).get("busy"))
        out["network"].append((_label(a), a["speedup"], a.get("speedup_ci"), b["speedup"], b.get("speedup_ci"),
                               busy, flag_labels(a), flag_labels(b)))
        for layer, sa in (a.get("layer_speedup") or {}).items():
            sb = (b.get("layer_speedup") or {}).get(layer)
            if sb is None:
                continue
            fa = (a.get("layer_timing_flags") or {}).get(layer, {})
            fb = (b.get("layer_timing_flags") or {}).get(layer, {})
            out["layers"].append((f"{_label(a)} {layer}", sa, a["layer_speedup_ci"][layer], sb,
                                  b["layer_speedup_ci"][layer], bool(fa.get("busy") or fb.get("busy")),
                                  [k for k, v in fa.items() if v], [k for k, v in fb.items() if v]))
    return out


def coverage(pairs: list[tuple]) -> dict:
    def stats(ps):
        if not ps:
            return {"cells": 0, "agree": 0, "coverage": None, "median_half_width": None}
        agree = [p for p in ps if _inside(p[1], p[4]) and _inside(p[3], p[2])]
        halves = [_half(p[1], p[2]) for p in ps] + [_half(p[3], p[4]) for p in ps]
        return {"cells": len(ps), "agree": len(agree), "coverage": len(agree) / len(ps),
                "median_half_width": statistics.median(halves)}

    flags_a, flags_b = {}, {}
    for p in pairs:
        for f in p[6]:
            flags_a[f] = flags_a.get(f, 0) + 1
        for f in p[7]:
            flags_b[f] = flags_b.get(f, 0) + 1
    return {"all": stats(pairs), "not_busy": stats([p for p in pairs if not p[5]]),
            "flags_a": flags_a, "flags_b": flags_b,
            "disagree": [{"cell": p[0], "a": p[1], "a_ci": p[2], "b": p[3], "b_ci": p[4], "busy": p[5]}
                         for p in pairs if not (_inside(p[1], p[4]) and _inside(p[3], p[2]))]}


def _fmt(s: dict) -> str:
    if not s["cells"]:
        return "no cells"
    return (f"{s['agree']}/{s['cells']} agree ({100 * s['coverage']:.0f}%), median half-width "
            f"{100 * s['median_half_width']:.1f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    rows_a, rows_b = _rows(args.run_a), _rows(args.run_b)
    when_a, when_b = _when(rows_a), _when(rows_b)
    print(f"run A {args.run_a}: {len(rows_a)} ok cells, {when_a[0]} .. {when_a[1]}")
    print(f"run B {args.run_b}: {len(rows_b)} ok cells, {when_b[0]} .. {when_b[1]}")
    result = {"run_a": args.run_a, "run_b": args.run_b, "when_a": when_a, "when_b": when_b}
    ok = True
    for what, ps in pairs_of(rows_a, rows_b).items():
        if not ps:
            continue
        c = coverage(ps)
        result[what] = c
        print(f"{what}: all cells {_fmt(c['all'])}; flagged busy in neither run {_fmt(c['not_busy'])}")
        print(f"  flags in A: {c['flags_a'] or 'none'}; in B: {c['flags_b'] or 'none'}")
        for d in c["disagree"]:
            print(f"  disagree{' (busy)' if d['busy'] else ''}: {d['cell']}: A {d['a']:.2f} "
                  f"[{d['a_ci'][0]:.2f}, {d['a_ci'][1]:.2f}]  B {d['b']:.2f} [{d['b_ci'][0]:.2f}, {d['b_ci'][1]:.2f}]")
        nb = c["not_busy"]
        if what == "network":
            ok = bool(nb["cells"]) and nb["coverage"] >= TARGET_COVERAGE and nb["median_half_width"] <= TARGET_HALF_WIDTH
    print(f"targets (un-flagged cells: coverage >= {TARGET_COVERAGE:.0%}, median half-width <= "
          f"{TARGET_HALF_WIDTH:.0%}): {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
