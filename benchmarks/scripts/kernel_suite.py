"""Kernel suite: every CP solver side by side on real trained conv kernels and on low-rank ones.

Usage::

    python benchmarks/scripts/kernel_suite.py [--classes small,mid,large,synthetic] [--compression 4,8] [--solvers a,b]
                                      [--only NAME,...] [--no-pyttb] [--json OUT] [--steps N]

Kernels (:mod:`suite_kernels`): the character network's conv2/conv3, an AlexNet-style and a
VGG-style network trained here on synthchars (cached), at the ranks of 4x and 8x parameter
compression (``R = numel // (c * sum(dims))``); and exactly rank-R kernels with and without 1 %
noise at that R. Size classes: ``small`` <= 1e5 entries, ``mid`` 1e5-1e6, ``large`` > 1e6.

Solvers, all in this one process on one thread (torch, and every BLAS/OpenMP pool through
threadpoolctl), each pair running them in a rotated order so that a burst of load from other jobs
does not always hit the same solver:

* ``als``: the efficient torch ALS (:func:`cpbench.decomposition.solvers.cp_als`) from TensorLy's SVD init,
  1000 sweeps, tol 1e-10 -- the time reference;
* ``als@nls-init``: the same ALS from cp-nls's own initialisation (SVD + its ALS sweeps);
* ``cp-nls``: :func:`cpbench.decomposition.solvers.cp_nls` at its defaults;
* ``cp-epc``: cp-nls's fit, then :func:`cpbench.decomposition.solvers.cp_epc` (time: both);
* ``cp-nls r=N``: cp-nls with ``restarts=N`` (``--restarts``, default 3; 0 leaves it out), the best of
  its start and N random ones, on the small and synthetic classes only (each restart costs a run);
* ``pyttb.cp_als`` and ``pyttb.gcp_opt`` (Gaussian, L-BFGS-B): Sandia's pyttb from its own
  defaults (random init, numpy RNG seeded per pair), if installed
  (``pip install --no-deps pyttb numpy_groupies``; benchmark-only).

Per pair: error ratio = rel_error / min(als, als@nls-init) (errors below 1e-9 count as 1e-9:
round-off); degeneracy; time ratio = seconds /
als's seconds. The end prints, per size class and solver, the median error ratio, the share of
pairs within 1.001, the median degeneracy and the median time ratio, then one PASS/FAIL line per
target of cp-nls on the trained kernels (error ratio <= 1.001 on >= 95 % of pairs; median
degeneracy <= 2; median time <= als's, per class) and on the exactly low-rank ones (< 1e-6).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from suite_kernels import synthetic_kernels, trained_kernels  # noqa: E402

from cpbench.decomposition.solvers import cp_als, cp_epc, cp_nls, degeneracy, rel_error  # noqa: E402
from cpbench.decomposition.solvers._cp_common import svd_init  # noqa: E402
from cpbench.decomposition.solvers._cp_common import tree_split  # noqa: E402
from cpbench.decomposition.solvers.cp_als import _als_sweeps  # noqa: E402

CLASSES = ("small", "mid", "large", "synthetic")
RESTART_CLASSES = ("small", "synthetic")  # where cp-nls with restarts is run too

# Solver time is the CPU time of this thread (every solver runs on it: torch and the BLAS/OpenMP pools
# are limited to one thread), not wall time: it is what the solver costs, and unlike wall time it
# holds when another job shares the machine (measured: see the closing note of issue 21). --wall
# switches to wall-clock time.
_clock = time.thread_time
ALS_ITER, ALS_TOL = 1000, 1e-10
EXACT = 1e-9


def size_class(numel: int) -> str:
    return "small" if numel <= 100_000 else "mid" if numel <= 1_000_000 else "large"


def rank_for(shape, compression: int) -> int:
    return max(1, math.prod(shape) // (compression * sum(shape)))


def _nls_init(w: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """cp-nls's ``init="als"``: TensorLy's SVD init and the default number of ALS sweeps."""
    import inspect

    sweeps = inspect.signature(cp_nls).parameters["als_sweeps"].default
    factors = svd_init(w, rank, torch.Generator().manual_seed(0))
    return _als_sweeps(w, factors, sweeps, 0.0, split=tree_split(tuple(w.shape)))[0]


def _pyttb_solvers():
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # pyttb warns on every C-ordered factor it copies
    try:
        import numpy as np
        import pyttb as ttb
        from pyttb.gcp.fg_setup import Objectives
        from pyttb.gcp.optimizers import LBFGSB
    except Exception:  # noqa: BLE001 - optional peer
        return {}

    def run(fn):
        def solve(w, rank):
            np.random.seed(0)
            x = ttb.tensor(w.numpy().copy())
            start = _clock()
            model = fn(x, rank)
            seconds = _clock() - start
            model = model.normalize(sort=False)
            factors = [torch.from_numpy(np.asarray(f).copy()) for f in model.factor_matrices]
            factors[0] = factors[0] * torch.from_numpy(np.asarray(model.weights).copy())[None, :]
            return factors, seconds
        return solve

    return {
        "pyttb.cp_als": run(lambda x, r: ttb.cp_als(x, r, printitn=0)[0]),
        "pyttb.gcp_opt": run(lambda x, r: ttb.gcp_opt(x, r, Objectives.GAUSSIAN, LBFGSB(), printitn=0)[0]),
    }


def solvers(with_pyttb: bool, restarts: int = 0) -> dict:
    def timed(fn):
        def solve(w, rank):
            start = _clock()
            factors = fn(w, rank)
            return factors, _clock() - start
        return solve

    def epc(w, rank):
        return cp_epc(w, cp_nls(w, rank).factors).factors

    out = {
        "als": timed(lambda w, r: cp_als(w, r, max_iter=ALS_ITER, tol=ALS_TOL).factors),
        "als@nls-init": timed(lambda w, r: cp_als(w, r, init=_nls_init(w, r), max_iter=ALS_ITER, tol=ALS_TOL).factors),
        "cp-nls": timed(lambda w, r: cp_nls(w, r).factors),
        "cp-epc": timed(epc),
    }
    if restarts:
        out[f"cp-nls r={restarts}"] = timed(lambda w, r: cp_nls(w, r, restarts=restarts).factors)
    if with_pyttb:
        out.update(_pyttb_solvers())
    return out


def run_pair(name: str, w: torch.Tensor, rank: int, kind: str, order: list[str], table: dict) -> dict:
    w = w.double().contiguous()
    norm_sq = float((w * w).sum())
    rec = {"kernel": name, "shape": list(w.shape), "rank": rank, "class": kind, "solvers": {}}
    for sname in order:
        factors, seconds = table[sname](w, rank)
        rec["solvers"][sname] = {"rel_error": rel_error(w, factors), "degeneracy": degeneracy(factors, norm_sq),
                                 "seconds": seconds}
    best_als = min(rec["solvers"][s]["rel_error"] for s in ("als", "als@nls-init") if s in rec["solvers"])
    t_als = rec["solvers"]["als"]["seconds"]
    for s in rec["solvers"].values():  # errors below EXACT count as exact (round-off)
        s["error_ratio"] = max(s["rel_error"], EXACT) / max(best_als, EXACT)
        s["time_ratio"] = s["seconds"] / t_als
    return rec


def summarise(recs: list[dict]) -> list[dict]:
    rows = []
    for kind in CLASSES:
        group = [r for r in recs if r["class"] == kind]
        if not group:
            continue
        for sname in dict.fromkeys(s for r in group for s in r["solvers"]):  # every solver any pair ran
            vals = [r["solvers"][sname] for r in group if sname in r["solvers"]]
            rows.append({
                "class": kind, "solver": sname, "pairs": len(vals),
                "median_error_ratio": statistics.median(v["error_ratio"] for v in vals),
                "within_1.001": sum(v["error_ratio"] <= 1.001 for v in vals) / len(vals),
                "worst_error_ratio": max(v["error_ratio"] for v in vals),
                "median_degeneracy": statistics.median(v["degeneracy"] for v in vals),
                "median_time_ratio": statistics.median(v["time_ratio"] for v in vals),
                "median_seconds": statistics.median(v["seconds"] for v in vals),
                "max_rel_error": max(v["rel_error"] for v in vals),
            })
    return rows


def targets(recs: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    nls = list(dict.fromkeys(s for r in recs for s in r["solvers"] if s.startswith("cp-nls")))  # and its restarts
    for kind in ("small", "mid", "large"):
        for sname in nls:
            group = [r["solvers"][sname] | {"als_s": r["solvers"]["als"]["seconds"]} for r in recs
                     if r["class"] == kind and sname in r["solvers"]]
            if not group:
                continue
            ok = sum(g["error_ratio"] <= 1.001 for g in group)
            out.append((f"{kind}: {sname} error <= 1.001 x best ALS on >= 95% of pairs", ok >= 0.95 * len(group),
                        f"{ok}/{len(group)}"))
            md = statistics.median(g["degeneracy"] for g in group)
            out.append((f"{kind}: {sname} median degeneracy <= 2", md <= 2, f"{md:.3g}"))
            tn, ta = statistics.median(g["seconds"] for g in group), statistics.median(g["als_s"] for g in group)
            out.append((f"{kind}: {sname} median seconds <= als's", tn <= ta, f"{tn:.2f} s vs {ta:.2f} s"))
    exact = [r["solvers"]["cp-nls"]["rel_error"] for r in recs if r["kernel"].startswith("lowrank.")]
    if exact:
        out.append(("exactly rank-R: cp-nls rel_error < 1e-6", max(exact) < 1e-6, f"max {max(exact):.2g}"))
    return out


def _print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=title)
    cols = ["class", "solver", "pairs", "err ratio (median)", "<= 1.001", "worst", "degeneracy (median)",
            "time ratio (median)", "seconds (median)"]
    for c in cols:
        tab.add_column(c, justify="right")
    for r in rows:
        tab.add_row(r["class"], r["solver"], str(r["pairs"]), f"{r['median_error_ratio']:.5f}",
                    f"{r['within_1.001']:.0%}", f"{r['worst_error_ratio']:.4f}", f"{r['median_degeneracy']:.3g}",
                    f"{r['median_time_ratio']:.2f}", f"{r['median_seconds']:.2f}")
    Console(width=200).print(tab)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="small,mid,large,synthetic", help="size classes to run")
    ap.add_argument("--compression", default="4,8", help="parameter compression factors (ranks)")
    ap.add_argument("--only", help="comma-separated kernel names")
    ap.add_argument("--solvers", help="comma-separated solvers to run (default all; 'als' is always run: the references "
                                      "are its error and time)")
    ap.add_argument("--no-pyttb", action="store_true", help="leave pyttb out even if installed")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the AlexNet/VGG-style nets")
    ap.add_argument("--nets", default="charnet,alexnet,vgg,resnet20", help="networks whose kernels are used")
    ap.add_argument("--restarts", type=int, default=3, help="restarts of the 'cp-nls r=N' row (small and synthetic classes; 0: none)")
    ap.add_argument("--wall", action="store_true", help="time solvers by wall clock instead of this thread's CPU time")
    ap.add_argument("--json", metavar="OUT", help="write every pair and the summary as JSON")
    ap.add_argument("--jsonl", metavar="OUT", help="append each pair's record to OUT as it finishes; pairs already "
                                                "in OUT are not run again (a stopped run resumes) and are reported")
    ap.add_argument("--summarise", metavar="JSONL", help="print the table of the pairs in JSONL (a --jsonl file); run nothing")
    args = ap.parse_args(argv)
    if args.wall:
        global _clock
        _clock = time.perf_counter
    if args.summarise:
        recs = [json.loads(line) for line in Path(args.summarise).read_text().splitlines() if line.strip()]
        _report(recs, f"kernel suite, 1 thread, {len(recs)} pairs from {args.summarise}")
        return 0
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    pools = threadpool_limits(limits=1)
    classes = set(args.classes.split(","))
    unknown = classes - set(CLASSES)
    if unknown:
        ap.error(f"unknown classes {sorted(unknown)}; allowed: {', '.join(CLASSES)}")
    tables = {kind: solvers(not args.no_pyttb, args.restarts if kind in RESTART_CLASSES else 0) for kind in CLASSES}
    if args.solvers:
        wanted = {"als", *args.solvers.split(",")}
        known = set().union(*tables.values())
        if wanted - known:
            ap.error(f"unknown solvers {sorted(wanted - known)}; allowed: {', '.join(sorted(known))}")
        tables = {kind: {n: f for n, f in t.items() if n in wanted} for kind, t in tables.items()}
    comps = [int(c) for c in args.compression.split(",")]
    pairs = []
    nets = tuple(args.nets.split(","))
    for name, w in trained_kernels(args.steps, log=lambda s: print(s, file=sys.stderr), nets=nets).items():
        if size_class(w.numel()) in classes:
            pairs += [(name, w, rank_for(tuple(w.shape), c), size_class(w.numel())) for c in comps]
    if "synthetic" in classes:
        pairs += [(name, w, r, "synthetic") for name, (w, r) in synthetic_kernels().items()]
    if args.only:
        keep = set(args.only.split(","))
        pairs = [p for p in pairs if p[0] in keep]
    pairs.sort(key=lambda p: p[1].numel() * p[2])
    recs = _done(args.jsonl, {(name, rank) for name, _, rank, _ in pairs})
    if recs:
        print(f"{len(recs)} pairs already in {args.jsonl}: not run again", file=sys.stderr)
        done = {(r["kernel"], r["rank"]) for r in recs}
        pairs = [p for p in pairs if (p[0], p[2]) not in done]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for i, (name, w, rank, kind) in enumerate(pairs, start=len(recs)):
        names = list(tables[kind])
        order = names[i % len(names):] + names[: i % len(names)]
        rec = run_pair(name, w, rank, kind, order, tables[kind])
        recs.append(rec)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        print(f"{name} {tuple(w.shape)} R={rank}: " + "; ".join(
            f"{s} err {v['rel_error']:.5f} (x{v['error_ratio']:.4f}) deg {v['degeneracy']:.3g} "
            f"{v['seconds']:.2f} s (x{v['time_ratio']:.2f})" for s, v in rec["solvers"].items()), flush=True)
    pools.restore_original_limits()
    rows, checks = _report(recs, f"kernel suite, 1 thread, {len(recs)} pairs (started {started})")
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": recs, "summary": rows, "targets": [
            {"target": a, "pass": b, "value": c} for a, b, c in checks]}, indent=1))
    return 0


def _done(jsonl: str | None, wanted: set) -> list[dict]:
    """The records of ``wanted`` (kernel, rank) pairs already in ``jsonl`` (a stopped run's)."""
    if not jsonl or not Path(jsonl).exists():
        return []
    recs = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    return [r for r in recs if (r["kernel"], r["rank"]) in wanted]


def _report(recs: list[dict], title: str):
    rows = summarise(recs)
    _print_table(rows, f"{title}; ratios against the efficient torch ALS (error: the better of its two starts)")
    checks = targets(recs)
    for label, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {value}")
    return rows, checks


if __name__ == "__main__":
    raise SystemExit(main())
