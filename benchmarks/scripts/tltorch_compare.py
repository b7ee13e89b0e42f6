"""cpbench's CP block against TensorLy-Torch's CP convolution at the same rank, timed side by side.

    pip install --no-deps tensorly-torch      # benchmark-only dependency (tensorly is already one of ours)
    python benchmarks/scripts/tltorch_compare.py [--matrix FILE] [--layers a,b] [--specs ...] [--batches 1,32]
                                         [--threads 1,2] [--passes N] [--dense] [--json OUT]

The cells are the user suite's (``benchmarks/matrices/user_suite.toml``, ranks resolved from its
``speedup:X`` specs; see ``user_suite.py``). In each cell both sides compute the same function: one set
of random CP factors is loaded into cpbench's :class:`~cpbench.nn.layers.CPBlock` and into a
``tltorch.FactorizedConv`` (``factorization="cp"``), and their outputs are checked to agree. TensorLy-Torch
offers two CP forwards, ``factorized`` (its CP convolution as a chain of convs) and ``mobilenet`` (1×1,
depthwise per spatial mode, 1×1); cpbench offers its backends' prepared blocks (``mkl`` and
``channels-last``, each choosing its own execution form). A short selection picks the faster of each
side, and ``--passes`` final paired measurements (:func:`cpbench.measure.timing.time_pair`, interleaved, pass 1
of every cell before pass 2 of any) time the two winners against each other, TensorLy-Torch as the
"baseline" arm: the speedup is TensorLy-Torch's time over cpbench's (geometric mean over passes, with a
t-interval). TensorLy-Torch runs as a user runs it: eager PyTorch in NCHW under ``inference_mode`` at the
cell's thread count.

With ``--dense``, each pass also times the dense layer (the fastest of torch-cpu, mkl, channels-last and
onnxruntime, picked by a short selection) against cpbench's block, so each side's efficiency (speedup over the
dense layer / theoretical speedup) is measured in the same process, and with it the efficiency cpbench would
need for a 1.5x lead: above 1 where TensorLy-Torch is already within 1/1.5 of the FLOP ratio.

Target (issue 22): cpbench >= 1.5x faster in every cell. TensorLy-Torch has no grouped convolution, so
grouped layers are skipped (and listed).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _omp_early import early_wait_policy  # noqa: E402

WAIT_POLICY_AT_LOAD = early_wait_policy(sys.argv[1:]) if __name__ == "__main__" else None

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import layer_suite  # noqa: E402
import user_suite  # noqa: E402
from cpbench.errors import BackendError  # noqa: E402
from cpbench.kernels.forms import configure_malloc, rel_error  # noqa: E402
from cpbench.measure.machine import machine_info  # noqa: E402
from cpbench.plugin.manager import Plugins  # noqa: E402
from cpbench.measure.stats import speedup_across_passes  # noqa: E402
from cpbench.measure.threads import thread_limits  # noqa: E402
from cpbench.measure.timing import time_pair  # noqa: E402

TARGET = 1.5
CPBENCH_BACKENDS = ("mkl", "channels-last")
TLTORCH_FORWARDS = ("factorized", "mobilenet")
#: the dense layer's backends with --dense (the user suite's baselines but torch-compile, whose compile per
#: cell costs more than the cell)
DENSE_BACKENDS = ("torch-cpu", "mkl", "channels-last", "onnxruntime")


def tltorch_conv(layer: layer_suite.Layer, block, implementation: str):
    """A ``tltorch.FactorizedConv`` holding ``block``'s CP factors (same rank, same function)."""
    import tltorch

    conv = tltorch.FactorizedConv(layer.in_ch, layer.out_ch, layer.k, order=2, padding=layer.pad, bias=True,
                                  factorization="cp", rank=block.rank, implementation=implementation)
    first, vert, hor, last = block
    r = block.rank
    factors = (last.weight.detach().reshape(layer.out_ch, r), first.weight.detach().reshape(r, layer.in_ch).t(),
               vert.weight.detach().reshape(r, layer.k).t(), hor.weight.detach().reshape(r, layer.k).t())
    with torch.no_grad():
        for p, f in zip(conv.weight.factors, factors):
            p.copy_(f)
        conv.weight.weights.fill_(1.0)
        conv.bias.copy_(last.bias.detach())
    return conv.eval()


def _runner(module):
    def run(x):
        with torch.inference_mode():
            return module(x)
    return run


def run_cell(layer, rank, batch, threads, backends, dense=()) -> dict:
    conv, block = layer_suite.build(layer, rank)
    x = layer_suite._input(layer, batch)
    cell = {"layer": layer.name, "rank": rank, "batch": batch, "threads": threads, "status": "ok", "errors": {},
            "theo": layer_suite.flops(conv, x) / layer_suite.flops(block, x)}
    with thread_limits(threads):
        with torch.inference_mode():
            ref = block(x)
        peers = {}
        for impl in TLTORCH_FORWARDS:
            m = tltorch_conv(layer, block, impl)
            run = _runner(m)
            err = rel_error(run(x), ref)
            if err > 1e-4:
                cell["errors"][f"tltorch-{impl}"] = f"output differs from cpbench's block by {err:.2e}"
                continue
            peers[f"tltorch-{impl}"] = (run, x)
        ours = {}
        preps = []
        for b in backends:
            p = b.prepare(block, x, threads=threads)
            preps.append(p)
            xi = p.convert_input(x)
            err = rel_error(p(xi), ref)
            if err > 1e-4:
                cell["errors"][b.name] = f"output differs from the built block by {err:.2e}"
                continue
            ours[b.name] = (p, xi, [c["form"] for c in p.info.get("cp_forms", [])])
        if not peers or not ours:
            cell["status"] = "error"
            return cell
        # Selection: each candidate against a fixed reference arm (cpbench's first), short budget.
        ref_name = next(iter(ours))
        pr, xr, _ = ours[ref_name]
        sel = {}
        for name, (run, xi) in list(peers.items()):
            sel[name] = time_pair(lambda: run(xi), lambda: pr(xr), layer_suite.SELECT_BUDGET).baseline.median_ms
        best_peer = min(sel, key=sel.get)
        sel_ours = {}
        for name, (p, xi, _) in ours.items():
            sel_ours[name] = time_pair(lambda: pr(xr), lambda: p(xi), layer_suite.SELECT_BUDGET).compressed.median_ms
        best_ours = min(sel_ours, key=sel_ours.get)
        cell.update(tltorch=best_peer, cpbench=best_ours, cpbench_form=ours[best_ours][2],
                    selection_ms={**sel, **sel_ours}, passes=[])
        dense_arm = None
        if dense:  # the dense layer on each backend, the fastest against cpbench's winner
            with torch.inference_mode():
                dense_ref = conv(x)
            sel_dense = {}
            for b in dense:
                try:
                    q = b.prepare(conv, x, threads=threads)
                except BackendError as e:
                    cell["errors"][f"dense/{b.name}"] = str(e)
                    continue
                preps.append(q)
                xq = q.convert_input(x)
                y = q(xq)
                err = rel_error(y.contiguous() if not y.is_mkldnn else y, dense_ref)
                if err > 1e-4:
                    cell["errors"][f"dense/{b.name}"] = f"output differs from the dense layer by {err:.2e}"
                    continue
                sel_dense[b.name] = (time_pair(lambda: q(xq), lambda: pr(xr), layer_suite.SELECT_BUDGET).baseline.median_ms,
                                     (q, xq))
            best_dense = min(sel_dense, key=lambda k: sel_dense[k][0])
            cell["dense"] = best_dense
            dense_arm = sel_dense[best_dense][1]
        final_pass(cell, peers[best_peer], ours[best_ours][:2], dense_arm)
        for p in preps:
            p.close()
    return cell


def final_pass(cell: dict, peer, ours, dense=None) -> None:
    """One paired measurement of TensorLy-Torch's winner against cpbench's; with ``dense`` (a prepared dense
    layer and its input), also the dense layer against cpbench's, in the same pass: each side's efficiency is
    then its speedup over the dense layer over the theoretical one (TensorLy-Torch's through the ratio)."""
    (run, xp), (p, xo) = peer, ours
    t = time_pair(lambda: run(xp), lambda: p(xo), layer_suite.FINAL_BUDGET)
    record = {"speedup": t.speedup, "tltorch_ms": t.baseline.median_ms, "cpbench_ms": t.compressed.median_ms,
              "noisy": t.noisy}
    if dense is not None:
        q, xq = dense
        d = time_pair(lambda: q(xq), lambda: p(xo), layer_suite.FINAL_BUDGET)
        record.update(dense_speedup=d.speedup, dense_ms=d.baseline.median_ms)
    cell["passes"].append(record)
    ratios = [q["speedup"] for q in cell["passes"]]
    if len(ratios) == 1:
        cell["speedup"], cell["ci"] = t.speedup, list(t.speedup_ci)
    else:
        cell["speedup"], ci = speedup_across_passes(ratios)
        cell["ci"] = list(ci)
    cell["tltorch_ms"] = statistics.median(q["tltorch_ms"] for q in cell["passes"])
    cell["cpbench_ms"] = statistics.median(q["cpbench_ms"] for q in cell["passes"])
    dense = [q["dense_speedup"] for q in cell["passes"] if "dense_speedup" in q]
    if dense:
        over_dense = statistics.geometric_mean(dense)
        cell["efficiency_cpbench"] = over_dense / cell["theo"]
        cell["efficiency_tltorch"] = cell["efficiency_cpbench"] / cell["speedup"]
        # what cpbench's efficiency would have to be for TARGET x over TensorLy-Torch in this cell
        cell["efficiency_needed"] = TARGET * cell["efficiency_tltorch"]


def repass(cell: dict, layer, by_name: dict) -> None:
    conv, block = layer_suite.build(layer, cell["rank"])
    x = layer_suite._input(layer, cell["batch"])
    with thread_limits(cell["threads"]):
        run = _runner(tltorch_conv(layer, block, cell["tltorch"].removeprefix("tltorch-")))
        p = by_name[cell["cpbench"]].prepare(block, x, threads=cell["threads"])
        q = by_name[cell["dense"]].prepare(conv, x, threads=cell["threads"]) if "dense" in cell else None
        try:
            final_pass(cell, (run, x), (p, p.convert_input(x)), (q, q.convert_input(x)) if q is not None else None)
        finally:
            p.close()
            if q is not None:
                q.close()
            gc.collect()


def format_row(c: dict) -> str:
    head = f"{c['layer']:<18} {c['rank']:>5} {c['batch']:>3} {c['threads']:>2}"
    if c["status"] != "ok":
        return f"{head} {c['status'].upper()} {c['errors']}"
    eff = (f"  efficiency cpbench {c['efficiency_cpbench']:.2f}, TensorLy-Torch {c['efficiency_tltorch']:.2f} "
           f"({TARGET:g}x over it needs {c['efficiency_needed']:.2f}; theo {c['theo']:.2f})" if "efficiency_cpbench" in c else "")
    return (f"{head} {c['tltorch_ms']:>9.3f} {c['cpbench_ms']:>9.3f} {c['speedup']:>6.2f} "
            f"[{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]  {c['tltorch']:<20} {c['cpbench']} "
            f"({','.join(sorted(set(c['cpbench_form']))) or 'cp4'}){eff}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", default=str(user_suite.MATRIX))
    ap.add_argument("--layers", help="comma-separated layer names (default all ungrouped)")
    ap.add_argument("--specs", help="comma-separated rank specs (default all)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default the matrix's)")
    ap.add_argument("--threads", help="comma-separated thread counts (default the matrix's)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--dense", action="store_true",
                    help="also time the dense layer (fastest of cpbench's backends) against cpbench's block in each pass: "
                         "each side's efficiency, and the efficiency a 1.5x lead would need")
    ap.add_argument("--json")
    ap.add_argument("--omp-wait-policy", default="default", help="as for layer_suite.py")
    ap.add_argument("--gomp-spincount", default=layer_suite.GOMP_SPINCOUNT, help="as for layer_suite.py")
    args = ap.parse_args(argv)
    try:
        import tltorch
    except ImportError:
        print("tensorly-torch is not installed: pip install --no-deps tensorly-torch", file=sys.stderr)
        return 2
    malloc = configure_malloc()
    print(layer_suite.build_kernel_step(), flush=True)
    plugins = Plugins()
    suite, specs, axes = user_suite.suite_from_matrix(Path(args.matrix), plugins)
    keep_specs = set(args.specs.split(",")) if args.specs else None
    keep_layers = set(args.layers.split(",")) if args.layers else None
    skipped = [lay.name for lay in suite if lay.groups != 1]
    backends = [plugins.backends.get(n) for n in CPBENCH_BACKENDS]
    dense = [plugins.backends.get(n) for n in DENSE_BACKENDS if n in plugins.backends.names()] if args.dense else []
    by_name = {b.name: b for b in [*backends, *dense]}
    print(f"tensorly-torch {tltorch.__version__}; torch {torch.__version__}; {os.cpu_count()} logical CPUs; "
          f"OMP_WAIT_POLICY at torch load: {WAIT_POLICY_AT_LOAD}; skipped (grouped): {skipped}", flush=True)
    print(f"{'layer':<18} {'R':>5} {'B':>3} {'T':>2} {'tltorch ms':>9} {'cpbench ms':>9} {'x':>6} 95% CI  "
          "tltorch forward      cpbench backend (form)", flush=True)
    t0 = time.perf_counter()
    cells, placed = [], []
    threads = tuple(int(v) for v in args.threads.split(",")) if args.threads else tuple(axes["threads"])
    batches = tuple(int(v) for v in args.batches.split(",")) if args.batches else tuple(axes["batch"])
    for layer in suite:
        if layer.groups != 1 or (keep_layers and layer.name not in keep_layers):
            continue
        for rank in layer.ranks:
            if keep_specs and specs[(layer.name, rank)] not in keep_specs:
                continue
            for batch in batches:
                for t in threads:
                    cell = run_cell(layer, rank, batch, t, backends, dense=dense)
                    cell["spec"] = specs[(layer.name, rank)]
                    cells.append(cell)
                    placed.append((cell, layer))
                    print(format_row(cell), flush=True)
    for k in range(2, args.passes + 1):
        print(f"-- pass {k}/{args.passes}", flush=True)
        for cell, layer in placed:
            if cell["status"] == "ok":
                repass(cell, layer, by_name)
    if args.passes > 1:
        print("-- after all passes", flush=True)
        for cell in cells:
            print(format_row(cell), flush=True)
    ok = [c for c in cells if c["status"] == "ok"]
    ratios = [c["speedup"] for c in ok]
    below = [(c["layer"], c["rank"], c["batch"], c["threads"], round(c["speedup"], 2)) for c in ok if c["speedup"] < TARGET]
    beyond = [(c["layer"], c["rank"], c["batch"], c["threads"], round(c["efficiency_needed"], 2))
              for c in ok if c.get("efficiency_needed", 0) > 1.0]
    summary = {"cells": len(cells), "ok_cells": len(ok), "skipped_grouped_layers": skipped,
               "target_needs_efficiency_above_1": beyond,
               "median_speedup": statistics.median(ratios) if ratios else float("nan"),
               "min_speedup": min(ratios) if ratios else float("nan"), "below_target": below,
               "wall_seconds": time.perf_counter() - t0}
    flag = "PASS" if ok and not below and len(ok) == len(cells) else "FAIL"
    print(f"\ncells: {len(ok)}/{len(cells)} ok; cpbench over TensorLy-Torch: median {summary['median_speedup']:.2f}x, "
          f"lowest {summary['min_speedup']:.2f}x")
    print(f"[{flag}] every cell >= {TARGET}x: {len(below)} below {below}")
    if args.dense:
        print(f"cells where {TARGET:g}x over TensorLy-Torch needs cpbench faster than the FLOP ratio allows "
              f"(efficiency > 1 against the fastest dense layer): {len(beyond)} {beyond}")
    print(f"wall time: {summary['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"summary": summary, "cells": cells, "machine": machine_info(), "malloc": malloc,
                       "tltorch": tltorch.__version__}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
