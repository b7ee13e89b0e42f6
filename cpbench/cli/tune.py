"""The ``cpbench tune`` sub-command: arguments → :class:`TuneRequest` → :func:`run_tune` → tables."""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from ..errors import UsageError

__all__ = ["add_tune_parser", "cmd_tune", "parse_targets", "parse_against"]

DESCRIPTION = """\
Compress a whole network to a measured speedup target: per layer, each decomposer over a rank grid
(plus "leave it"), every candidate timed alone on its real input on the backend (cached per machine,
backend, threads, batch and shape), its accuracy loss with only that layer replaced measured on the
validation split (only for the candidates a search needs), one candidate per layer chosen by an exact
knapsack search on predicted latency,
the plan timed whole against the baseline (on a miss, or a plan more than 10% faster than the
target, the prediction refitted to it and searched again, up to --rounds times), fine-tuned, evaluated on the test split and timed again. Writes results.jsonl,
plan-<target>.toml (cpbench.compress(model, "plan-12.toml") applies it), tune-report.md and pareto.png."""


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--target-speedup {text!r} is not allowed; allowed: numbers > 1, comma-separated (8,12,16)") from None
    if not values:
        raise UsageError("--target-speedup is empty; allowed: numbers > 1, comma-separated (8,12,16)")
    return values


MODEL_FILE_TABLES = ("model", "train")


def model_from_file(path: str) -> tuple[dict, dict, str]:
    """A model spec file: ``[model]`` (an inline model spec as a matrix's ``model`` axis takes it:
    ``name = "python"``, ``target = "mynet.py:MyNet"``, ``dataset = {...}``, ...) and an optional
    ``[train]`` (the base training recipe). Returns (model spec, train table, the file's folder, where
    its relative paths start). One-line :class:`UsageError` on anything else."""
    from ..run.matrix import MatrixError, _parse_train
    from ..run.paths import read_toml

    p = Path(path)
    data = read_toml(p, "model spec")
    bad = sorted(set(data) - set(MODEL_FILE_TABLES))
    if bad:
        raise UsageError(f"{p}: unknown table(s) {bad}; allowed: [model] and [train]")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise UsageError(f'{p}: needs a [model] table with a name (e.g. name = "python", target = "mynet.py:MyNet")')
    try:
        train = _parse_train(data.get("train", {}), str(p))
    except MatrixError as e:
        raise UsageError(str(e)) from None
    return dict(model), train, str(p.resolve().parent)


def progress(err, stack: contextlib.ExitStack, start: float):
    """How the tune's steps are shown: a spinner on a terminal; in a log, one line per step with the
    seconds since ``start`` (a tune takes minutes, and a log without its steps says nothing)."""
    if err.is_terminal:
        return stack.enter_context(err.status("tuning")).update

    def step(s: str) -> None:
        err.print(f"[{time.perf_counter() - start:7.1f} s] {s}", highlight=False, soft_wrap=True)
    return step


def _is_model_file(model: str) -> bool:
    return model.endswith(".toml")


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_tune_parser(sub) -> argparse.ArgumentParser:
    from ..tune.candidates import GRID_POINTS, MAX_SPEEDUP, MIN_SPEEDUP
    from ..tune.loop import DEFAULT_DROP_ROUNDS, DEFAULT_ROUNDS
    from ..tune.request import DEFAULT_DECOMPOSERS, TARGET_AGAINST
    from ..tune.sensitivity import SENSITIVITY_MODES

    p = sub.add_parser("tune", help="compress a whole network to a measured speedup target",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="a model plugin name (cpbench plugins lists them), or a model spec file (.toml) with a "
                        "[model] table as a matrix's model entry (your network, its data set) and an optional [train]")
    p.add_argument("--model-param", "-p", action="append", metavar="KEY=VALUE", help="model parameter (repeatable)")
    p.add_argument("--target-speedup", default="8", metavar="X[,Y...]",
                   help="whole-network speedup target(s), > 1 (default 8)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy points a plan may lose after fine-tuning (default 1.0); a plan that loses more is "
                        "replaced by a slower one, see --drop-rounds")
    p.add_argument("--drop-rounds", type=int, default=DEFAULT_DROP_ROUNDS, metavar="N",
                   help="slower plans fine-tuned per target when a plan loses more than --max-drop, each step back "
                        "sized by how much the last plan lost; the fastest that holds the drop is kept, and the target "
                        f"counts as met only if its interval reaches the target (default {DEFAULT_DROP_ROUNDS}; 0: only report)")
    p.add_argument("--backend", default="mkl",
                   help="execution backend of both the original network and the plans; a target is a speedup on it "
                        "(default mkl; choose the backend that runs your original network fastest, see --against)")
    p.add_argument("--against", default="all", metavar="all|none|A,B",
                   help="also time each kept plan against the original network on these backends and report the speedup "
                        "against the fastest of them (default all registered backends; none: skip)")
    p.add_argument("--target-against", choices=TARGET_AGAINST, default="backend",
                   help="what a target is a speedup against: the original network on --backend (default), or on "
                        "whichever of --backend and --against runs it fastest (fastest: the plans still run on --backend, "
                        "searched at the target scaled by how much slower --backend runs the original)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decomposers", default=",".join(DEFAULT_DECOMPOSERS), metavar="A,B",
                   help=f"decomposers to choose from (default {','.join(DEFAULT_DECOMPOSERS)})")
    p.add_argument("--layers", default="auto", metavar="auto|NAME,PATTERN",
                   help="layers that may be replaced: auto (every conv larger than 1x1) or names/fnmatch patterns")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs of each plan (default 1)")
    p.add_argument("--finetune-samples", type=int, help="training samples fine-tuning uses (default the recipe's)")
    p.add_argument("--no-control", action="store_true",
                   help="do not fine-tune the base network as a control (drops then count from the base network)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"verify rounds per target (default {DEFAULT_ROUNDS})")
    p.add_argument("--sensitivity", choices=SENSITIVITY_MODES, default="auto",
                   help="auto: kl (KL divergence from the original on the validation split) with a data set, else fidelity; "
                        "accuracy: validation accuracy lost; error: reconstruction error")
    p.add_argument("--val-samples", type=int, help="validation images for the sensitivities (default all)")
    p.add_argument("--min-layer-speedup", type=float, default=MIN_SPEEDUP,
                   help=f"lowest theoretical layer speedup of the rank grid (default {MIN_SPEEDUP})")
    p.add_argument("--max-layer-speedup", type=float, default=MAX_SPEEDUP,
                   help=f"highest theoretical layer speedup of the rank grid (default {MAX_SPEEDUP:g})")
    p.add_argument("--grid-points", type=int, default=GRID_POINTS, help=f"ranks per decomposer and layer (default {GRID_POINTS})")
    p.add_argument("--budget-s", type=float, default=3.0, help="seconds to time each whole-network pair (default 3)")
    p.add_argument("--uniform", metavar="METHOD", help="also run uniform-rank plans of METHOD for the Pareto front")
    p.add_argument("--uniform-speedups", metavar="X,Y", help="their per-layer speedup:X specs (default each target and twice it)")
    p.add_argument("--out", help="output directory (default cpbench-runs/tune-MODEL)")
    p.add_argument("--cache-dir", help="cache directory (default $CPBENCH_CACHE_DIR or ~/.cache/cpbench)")
    p.add_argument("--no-cache", action="store_true", help="measure and decompose everything afresh")
    p.add_argument("--no-calibrate", action="store_true",
                   help="predict from the layers timed alone, without the whole-network timing of the fastest plan")
    p.set_defaults(func=cmd_tune)
    return p


def parse_against(text: str) -> tuple[str, ...]:
    """``--against``: all registered backends, none, or names (checked with the request)."""
    from ..plugin.manager import get_plugins

    if text.strip() == "all":
        return tuple(get_plugins().backends.names())
    if text.strip() == "none":
        return ()
    names = _names(text)
    if not names:
        raise UsageError("--against is empty; allowed: all, none or backend names (cpbench plugins lists them)")
    return tuple(names)


def request_from_args(args):
    from dataclasses import replace

    from .decompose import _options
    from ..measure.timing import TimingBudget
    from ..tune.request import TuneRequest

    layers = "auto" if args.layers == "auto" else list(_names(args.layers))
    if layers != "auto" and not layers:
        raise UsageError("--layers is empty; allowed: auto or layer names / patterns")
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s {args.budget_s} is not allowed; allowed: seconds > 0")
    model = model_from_file(args.model)[0] if _is_model_file(args.model) else {"name": args.model}
    req = TuneRequest(model={**model, **_options(args.model_param)}, targets=parse_targets(args.target_speedup),
                      max_drop=args.max_drop, backend=args.backend, threads=args.threads, batch=args.batch,
                      decomposers=_names(args.decomposers), layers=layers, finetune_epochs=args.finetune_epochs,
                      finetune_samples=args.finetune_samples, finetune_control=not args.no_control,
                      max_rounds=args.rounds, drop_rounds=args.drop_rounds, sensitivity=args.sensitivity, val_samples=args.val_samples,
                      min_speedup=args.min_layer_speedup, max_speedup=args.max_layer_speedup,
                      grid_points=args.grid_points, calibrate=not args.no_calibrate,
                      against=parse_against(args.against), target_against=args.target_against)
    return replace(req, network_budget=TimingBudget(budget_s=args.budget_s))


def cmd_tune(args) -> int:
    from rich.console import Console

    from .console import _console
    from ..plugin.manager import get_plugins
    from ..run.cell import RunContext
    from ..tune.plan import read_plan
    from ..tune.report import faster_original_notes, layers_table, targets_table
    from ..tune.run import plan_name, run_tune

    plugins = get_plugins()
    plugins.warn_failures()
    request = request_from_args(args)
    request.check(plugins)
    uniform_speedups = list(parse_targets(args.uniform_speedups)) if args.uniform_speedups else None
    if args.uniform:
        plugins.decomposers.get(args.uniform)
    out = Path(args.out) if args.out else Path("cpbench-runs") / f"tune-{Path(args.model).stem}"
    train, spec_dir = model_from_file(args.model)[1:] if _is_model_file(args.model) else ({}, None)
    ctx = RunContext(cache_dir=args.cache_dir, use_cache=not args.no_cache, train=train, spec_dir=spec_dir)
    console = _console()
    err = Console(stderr=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        step = progress(err, stack, start)
        run = run_tune(request, out, ctx=ctx, step=step, plugins=plugins,
                       uniform=args.uniform, uniform_speedups=uniform_speedups)
    for r in run.rows:
        target = r["rank_spec"]["target_speedup"]
        console.print(layers_table(read_plan(out / plan_name(target)), f"plan for {target:g}x ({plan_name(target)})"))
    console.print(targets_table(run.rows, title=f"cpbench tune {args.model}: {time.perf_counter() - start:.0f} s, "
                                                f"{run.latency_timed} candidate timings measured (the rest cached)"))
    console.print(f"results in {out / 'results.jsonl'}; report {out / 'tune-report.md'}")
    for line in faster_original_notes(run.rows):
        console.print(f"note: {line}")
    missed = [r for r in run.rows if not r.get("tune_met") or not r.get("meets_max_drop")]
    for r in missed:
        vs = r.get("vs_fastest_original") or {}
        if (r.get("tune") or {}).get("target_against") and vs.get("speedup") is not None:
            measured = f"measured {vs['speedup']:.2f}x against the original on {vs['backend']} " \
                       f"(interval up to {vs['speedup_ci'][1]:.2f}x)"
        else:
            measured = f"measured {r['speedup']:.2f}x (interval up to {r['speedup_ci'][1]:.2f}x)"
        why = [] if r.get("tune_met") else [measured]
        if not r.get("meets_max_drop"):
            why.append(f"drop {r['accuracy_drop']:.2f} > --max-drop {request.max_drop:g}")
        for sk in (r.get("tune") or {}).get("skipped", []):
            why.append(f"not fine-tuned at {sk['target']:g}x: the plans fine-tuned for the other targets predict a drop "
                       f"of {sk['predicted_drop']:.1f} points there")
        if r.get("tune_drop_rounds"):
            why.append(f"{r['tune_drop_rounds']} slower plan(s) tried to hold --max-drop; kept the one searched at "
                       f"{r['tune']['searched_target']:.2f}x on {r['backend']}")
        console.print(f"target {r['rank_spec']['target_speedup']:g}x not met: {'; '.join(why)}")
    return 1 if missed else 0
