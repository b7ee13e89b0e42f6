"""The user suite: CP-block speed at users' operating points (theoretical speedup 2-6 per layer).

    python benchmarks/scripts/user_suite.py [--matrix FILE] [--layers a,b] [--specs speedup:2,...]
                                    [--batches 1,32] [--threads 1,2] [--passes N] [--json OUT]

The cells come from a cpbench matrix file (default ``benchmarks/matrices/user_suite.toml``): every
``conv`` model × rank spec × batch × threads of its ``[[matrix]]`` blocks, over the backends it lists.
Each ``speedup:X`` spec is resolved as ``cpbench run`` resolves it (:func:`cpbench.decomposition.ranks.resolve_rank`
with the block's cost model: the largest rank whose theoretical speedup is at least X; rank per group
for grouped layers). Each cell is then timed exactly as the layer suite times its cells
(``benchmarks/scripts/layer_suite.py``: random CP factors, a short selection over every backend for both arms,
then ``--passes`` final paired measurements of the fastest baseline(s) against the fastest compressed
execution, pass 1 of every cell before pass 2 of any), with:

    efficiency = fastest baseline over all backends / fastest compressed over all backends / theo

Targets printed at the end (issue 22): median efficiency >= 0.8; the worst quarter's (25th percentile)
>= 0.7; no cell with theo >= 1.5 slower than its baseline. OpenMP settings as in the layer suite
(``--omp-wait-policy``, ``--gomp-spincount``, read before torch loads).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _omp_early import early_wait_policy  # noqa: E402

WAIT_POLICY_AT_LOAD = early_wait_policy(sys.argv[1:]) if __name__ == "__main__" else None

import layer_suite  # noqa: E402  (imports torch: after the OpenMP settings above)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cpbench.kernels.forms import configure_malloc  # noqa: E402
from cpbench.nn.layers import geometry  # noqa: E402
from cpbench.measure.machine import machine_info  # noqa: E402
from cpbench.run.matrix import load_matrix  # noqa: E402
from cpbench.plugin.manager import Plugins  # noqa: E402
from cpbench.decomposition.ranks import resolve_rank  # noqa: E402

MATRIX = Path(__file__).resolve().parents[1] / "matrices" / "user_suite.toml"
# Issue 22's targets.
TARGET_MEDIAN, TARGET_WORST_QUARTER, NO_SLOWDOWN_FROM_THEO = 0.8, 0.7, 1.5


def layer_name(params: dict) -> str:
    """``64-192-k5@27`` (``-g2`` for groups): short, unique within the suite, stable across runs."""
    g = params.get("groups", 1)
    return (f"{params['in_channels']}-{params['out_channels']}-k{params['kernel_size']}@{params['input_size']}"
            + (f"-g{g}" if g != 1 else ""))


def suite_from_matrix(path: Path, plugins: Plugins) -> tuple[list[layer_suite.Layer], dict, dict]:
    """The matrix's layers with their resolved ranks; ``{(layer, rank): spec}``; and the axes
    ``{"batch", "threads", "backend"}`` (the union over its blocks, in file order)."""
    matrix = load_matrix(path, registries={"backend": plugins.backends, "decomposer": plugins.decomposers,
                                           "model": plugins.models})
    layers: dict[str, layer_suite.Layer] = {}
    specs: dict[tuple[str, int], str] = {}
    axes: dict[str, list] = {"batch": [], "threads": [], "backend": []}
    for block in matrix.blocks:
        for axis in axes:
            axes[axis] += [v for v in block[axis] if v not in axes[axis]]
        decomposer = plugins.decomposers.get(block["decomposer"][0]["name"])
        for model in block["model"]:
            params = {k: v for k, v in model.items() if k != "name"}
            if model["name"] != "conv" or not isinstance(params["kernel_size"], int) or \
                    not isinstance(params["input_size"], int) or params.get("stride", 1) != 1:
                raise SystemExit(f"{path}: the user suite takes square stride-1 'conv' models, not {model}")
            conv = nn.Conv2d(params["in_channels"], params["out_channels"], params["kernel_size"],
                             padding=params.get("padding", 0), groups=params.get("groups", 1))
            size = params["input_size"]
            name = layer_name(params)
            ranks = []
            for spec in block["rank"]:
                rank, _ = resolve_rank(spec, decomposer, conv.weight, geometry(conv), (size, size), layer=name)
                ranks.append(int(rank))
                specs[(name, int(rank))] = spec
            old = layers.get(name)
            merged = tuple(dict.fromkeys((old.ranks if old else ()) + tuple(ranks)))
            layers[name] = layer_suite.Layer(name, conv.in_channels, conv.out_channels, params["kernel_size"],
                                             params.get("padding", 0), size, conv.groups, merged)
    return list(layers.values()), specs, axes


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation between order statistics, numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(cells: list[dict]) -> dict:
    ok = [c for c in cells if c["status"] == "ok"]
    effs = [c["efficiency"] for c in ok]
    slow = [layer_suite._key(c) for c in ok if c["theo"] >= NO_SLOWDOWN_FROM_THEO and c["speedup"] < 1.0]
    by_spec: dict[str, list[float]] = {}
    by_layer: dict[str, list[float]] = {}
    for c in ok:
        by_spec.setdefault(c.get("spec", "?"), []).append(c["efficiency"])
        by_layer.setdefault(c["layer"], []).append(c["efficiency"])
    nan = float("nan")
    return {
        "cells": len(cells), "ok_cells": len(ok),
        "median_efficiency": statistics.median(effs) if effs else nan,
        "worst_quarter_efficiency": quantile(effs, 0.25) if effs else nan,
        "min_efficiency": min(effs) if effs else nan,
        "slower_than_baseline": slow,
        "median_by_spec": {k: statistics.median(v) for k, v in by_spec.items()},
        "median_by_layer": {k: statistics.median(v) for k, v in by_layer.items()},
        "backend_wins_baseline": layer_suite._count(c["best_baseline"] for c in ok),
        "backend_wins_compressed": layer_suite._count(c["best_compressed"] for c in ok),
        "compressed_forms": layer_suite._count(",".join(sorted(set(c["compressed_form"] or ["cp4"]))) for c in ok),
    }


def print_summary(s: dict, out=sys.stdout) -> None:
    flag = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"\ncells: {s['ok_cells']}/{s['cells']} ok", file=out)
    print(f"[{flag(s['median_efficiency'] >= TARGET_MEDIAN)}] median efficiency {s['median_efficiency']:.3f} "
          f"(target >= {TARGET_MEDIAN})", file=out)
    print(f"[{flag(s['worst_quarter_efficiency'] >= TARGET_WORST_QUARTER)}] worst quarter (25th percentile) "
          f"{s['worst_quarter_efficiency']:.3f} (target >= {TARGET_WORST_QUARTER}); lowest {s['min_efficiency']:.3f}",
          file=out)
    print(f"[{flag(not s['slower_than_baseline'] and s['ok_cells'] == s['cells'])}] cells with theo >= "
          f"{NO_SLOWDOWN_FROM_THEO} slower than baseline: {len(s['slower_than_baseline'])} {s['slower_than_baseline']}",
          file=out)
    print("median efficiency by spec: " + ", ".join(f"{k} {v:.2f}" for k, v in s["median_by_spec"].items()), file=out)
    print("median efficiency by layer: " + ", ".join(f"{k} {v:.2f}" for k, v in s["median_by_layer"].items()),
          file=out)
    print(f"fastest baseline backend: {s['backend_wins_baseline']}", file=out)
    print(f"fastest compressed backend: {s['backend_wins_compressed']}; forms: {s['compressed_forms']}", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", default=str(MATRIX), help="a matrix file of conv models and speedup specs")
    ap.add_argument("--layers", help="comma-separated layer names (e.g. 64-192-k5@27; default all)")
    ap.add_argument("--specs", help="comma-separated rank specs to keep (default all in the matrix)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default the matrix's)")
    ap.add_argument("--threads", help="comma-separated thread counts (default the matrix's)")
    ap.add_argument("--backends", help="comma-separated backends (default the matrix's)")
    ap.add_argument("--passes", type=int, default=2, help="final passes per cell, spread over the run (default 2)")
    ap.add_argument("--quick", action="store_true", help="shorter final timing budget")
    ap.add_argument("--json", help="write cells, summary and machine info here")
    ap.add_argument("--omp-wait-policy", default="default", help="as for layer_suite.py")
    ap.add_argument("--gomp-spincount", default=layer_suite.GOMP_SPINCOUNT, help="as for layer_suite.py")
    args = ap.parse_args(argv)
    malloc = configure_malloc()  # before anything is timed: same allocator for every arm
    print(layer_suite.build_kernel_step(), flush=True)
    plugins = Plugins()
    suite, specs, axes = suite_from_matrix(Path(args.matrix), plugins)
    if args.specs:
        keep = set(args.specs.split(","))
        suite = [layer_suite.Layer(**{**lay.__dict__, "ranks": tuple(r for r in lay.ranks if specs[(lay.name, r)] in keep)})
                 for lay in suite]
        suite = [lay for lay in suite if lay.ranks]
    names = args.backends.split(",") if args.backends else axes["backend"]
    backends = [plugins.backends.get(n) for n in names]
    print(f"backends: {', '.join(names)}; torch {torch.__version__}; {os.cpu_count()} logical CPUs; "
          f"malloc {malloc}; OMP_WAIT_POLICY at torch load: {WAIT_POLICY_AT_LOAD}; "
          f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'default')}", flush=True)
    print(layer_suite.HEADER + " spec", flush=True)
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    cells = layer_suite.run_suite(
        backends, quick=args.quick, log=log, suite=suite, passes=args.passes,
        threads_list=tuple(int(v) for v in args.threads.split(",")) if args.threads else tuple(axes["threads"]),
        batches=tuple(int(v) for v in args.batches.split(",")) if args.batches else tuple(axes["batch"]),
        layers=set(args.layers.split(",")) if args.layers else None)
    for c in cells:
        c["spec"] = specs.get((c["layer"], c["rank"]), "?")
    summary = summarize(cells)
    summary["wall_seconds"] = time.perf_counter() - t0
    print_summary(summary)
    print(f"wall time: {summary['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"summary": summary, "cells": cells, "machine": machine_info(), "malloc": malloc,
                       "matrix": args.matrix, "omp_wait_policy": WAIT_POLICY_AT_LOAD,
                       "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
                       "layers": [lay.__dict__ for lay in suite]}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
