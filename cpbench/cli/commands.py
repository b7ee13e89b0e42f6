"""The ``cpbench`` command line. A user's mistake prints one line and exits 2; no traceback."""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path

from rich.console import Console

from .. import __version__
from ..errors import CpbenchError, UsageError

__all__ = ["main", "build_parser"]

BUILTIN_MATRICES = ("default", "lebedev2015", "lebedev2015-alexnet", "layer_suite", "smoke")


def _matrix_path(name_or_file: str | None) -> Path:
    """A matrix FILE, or the name of a matrix shipped with cpbench."""
    if name_or_file is None:
        name_or_file = "default"
    p = Path(name_or_file)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise UsageError(f"matrix file not found: {p}")
        return p
    shipped = resources.files("cpbench") / "matrices" / f"{name_or_file}.toml"
    if not shipped.is_file():
        names = sorted(f.name[:-5] for f in (resources.files("cpbench") / "matrices").iterdir() if f.name.endswith(".toml"))
        raise UsageError(f"no matrix file {name_or_file!r}; give a .toml path or a shipped matrix: {', '.join(names)}")
    return Path(str(shipped))


# -- commands ---------------------------------------------------------------------------------
def cmd_plugins(args) -> int:
    from ..plugin.manager import get_plugins

    plugins = get_plugins()
    data = {
        "plugins": [
            {"name": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin,
             "provides": i.provides, "error": i.error}
            for i in plugins.info.values()
        ],
        "registered": {kind: {n: reg.plugin_of(n) for n in reg.names()} for kind, reg in plugins.registries.items()},
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.table import Table

    t = Table(title="cpbench plugins")
    for c in ("kind", "name", "plugin", "distribution"):
        t.add_column(c)
    for kind, names in data["registered"].items():
        for n, plugin in names.items():
            info = plugins.info.get(plugin)
            dist = f"{info.distribution} {info.version}" if info and info.distribution else "-"
            t.add_row(kind, n, plugin, dist)
    Console().print(t)
    for f in plugins.failures():
        Console(stderr=True).print(f"[red]not loaded[/red] {f.name}: {f.error}")
    return 0


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _options(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise UsageError(f"option {p!r} must be KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def load_kernel(path: str, tensor: str | None = None):
    """A 4-D kernel from .npy, .pt (weights_only) or .safetensors; one-line errors."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"kernel file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            w = torch.from_numpy(np.load(p, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(p, weights_only=True, map_location="cpu")
            w = _pick(obj, tensor, p)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            w = _pick(load_file(str(p)), tensor, p)
        else:
            raise UsageError(f"kernel file {p} has suffix {suffix!r}; allowed: .npy, .pt, .safetensors")
    except CpbenchError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read kernel file {p}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return w


def _pick(obj, name, path):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if name is not None:
            if name not in tensors:
                raise UsageError(f"{path} has no tensor {name!r}; tensors: {', '.join(tensors)}")
            return tensors[name]
        four = {k: v for k, v in tensors.items() if v.dim() == 4}
        if len(four) == 1:
            return next(iter(four.values()))
        raise UsageError(f"{path} holds {len(four)} 4-D tensors; choose one with --tensor: {', '.join(four)}")
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a tensor")


def cmd_decompose(args) -> int:
    import cpbench
    from ..decomposition.ranks import parse_rank

    w = load_kernel(args.kernel, args.tensor)
    dec = cpbench.get_decomposer(args.method)
    rank = _parse_value(args.rank) if isinstance(args.rank, str) else args.rank
    spec = parse_rank(rank)
    if spec.kind != "fixed":
        raise UsageError(f"decompose takes an integer rank (or a Tucker-2 pair), got {args.rank!r}")
    opts = _options(args.option)
    if args.groups > 1:
        opts["groups"] = args.groups
    start = time.perf_counter()
    fact = dec.decompose(w, spec.value, seed=args.seed, **opts)
    seconds = time.perf_counter() - start
    from ..run.results import jsonable

    out = {"method": dec.name, "rank": spec.value, "shape": list(w.shape), "rel_error": fact.rel_error,
           "seconds": seconds, "info": jsonable({k: v for k, v in fact.info.items() if k != "per_group"})}
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in fact.factors.items()}, args.save,
                  metadata={"rel_error": str(fact.rel_error), "method": dec.name})
        out["saved"] = args.save
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{dec.name} rank {spec.value} on {tuple(w.shape)}: rel_error {fact.rel_error:.6g} in {seconds:.3f} s")
        for k, v in out["info"].items():
            print(f"  {k}: {v}")
    return 0


def cmd_run(args) -> int:
    from ..run.matrix import load_matrix
    from ..run.session import run_matrix
    from ..plugin.manager import get_plugins
    from ..run.progress import CellProgress
    from ..run.cell import RunContext
    from ..report.tables import results_table

    plugins = get_plugins()
    plugins.warn_failures()
    if args.matrix is False:
        raise UsageError("cpbench run needs --matrix [FILE.toml]")
    path = _matrix_path(args.matrix)
    matrix = load_matrix(path, registries=plugins.registries)
    out = Path(args.out) if args.out else Path("cpbench-runs") / path.stem
    ctx = RunContext.from_matrix(matrix, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                 processes=args.processes, require_quiet_s=args.require_quiet)
    ex_opts = {} if args.cell_timeout is None else {"cell_timeout_s": args.cell_timeout}
    if args.executor == "dask":
        ex_opts.update({k: v for k, v in (("scheduler", args.scheduler), ("workers", args.workers)) if v is not None})
    elif args.scheduler or args.workers:
        raise UsageError("--scheduler/--workers go with --executor dask")
    console = _console()
    console.print(f"matrix {path} → {len(matrix)} cells; results in {out / 'results.jsonl'}")
    start = time.perf_counter()
    progress = CellProgress()
    try:
        summary = run_matrix(matrix, out, resume=args.resume, executor=args.executor, executor_options=ex_opts,
                             ctx=ctx, progress=progress, plugins=plugins)
    except KeyboardInterrupt:
        print(f"cpbench: interrupted; finished cells are in {out / 'results.jsonl'}; "
              "finish with the same command plus --resume", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    from ..run.results import read_results

    rows = read_results(out)
    console.print(results_table(rows, title=f"{path.stem}: {summary.ok} ok, {summary.failed} failed, "
                                            f"{summary.skipped} resumed, {wall:.0f} s"))
    if args.report:
        from ..report.html import write_report

        written = write_report(out)
        console.print("report: " + ", ".join(map(str, written)))
    return summary.exit_code


def cmd_train(args) -> int:
    from ..nn.training import evaluate
    from ..plugin.manager import get_plugins
    from ..run.cell import RunContext
    from ..run.stages import network

    plugins = get_plugins()
    model_plugin = plugins.models.get(args.model)
    if not getattr(model_plugin, "dataset", None):
        raise UsageError(f"model {args.model!r} has no data set to train on; a model spec with "
                         "dataset = {...} in a matrix file is trained by cpbench run")
    ctx = RunContext(cache_dir=args.cache_dir)
    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status(f"training {args.model} (cached by recipe; reused by cpbench run)"):
        net = network({"name": args.model}, ctx, plugins=plugins)
        acc = evaluate(net.module, net.data.load("test", seed=0))
    print(f"{args.model}: test accuracy {100 * acc:.2f}% ({time.perf_counter() - start:.0f} s, weights cached in "
          f"{ctx.cache().root / 'models'})")
    return 0


def cmd_compare(args) -> int:
    from ..report.compare import compare_runs, print_comparison

    result = compare_runs(args.run_a, args.run_b, threshold=args.threshold,
                          accuracy_threshold=args.accuracy_threshold)
    print_comparison(result, _console())
    return 1 if result.regressions else 0


def cmd_report(args) -> int:
    from ..report.html import write_report

    written = write_report(args.run_dir, formats=args.format)
    for p in written:
        print(p)
    return 0


EXPERIMENTS = {
    "lebedev2015": "the paper's character network: conv2+conv3 by four decomposers, fine-tuned, timed",
    "lebedev2015-alexnet": "the paper's AlexNet conv2 (grouped 5×5, block-diagonal) at ranks 100–300, timed",
}


def cmd_reproduce(args) -> int:
    if args.experiment not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {args.experiment!r}; available: {', '.join(EXPERIMENTS)}")
    args.matrix = args.experiment
    args.out = args.out or f"cpbench-runs/{args.experiment}"
    code = cmd_run(args)
    from ..run.results import read_results
    from ..report.tables import paper_table, paper_verdict

    rows = read_results(args.out)
    console = _console()
    console.print(paper_table(rows, title=f"{args.experiment}: {EXPERIMENTS[args.experiment]}"))
    if args.experiment == "lebedev2015":
        for line in paper_verdict(rows):
            console.print(line)
    return code


def _console() -> Console:
    """The terminal's console, or a wide one when stdout is a file or pipe (rich would squeeze the
    results tables into 80 columns there, which makes them unreadable in logs)."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 240))


# -- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _run_options(p) -> None:
    p.add_argument("--out", help="result directory (default cpbench-runs/<matrix name>)")
    p.add_argument("--resume", action="store_true", help="skip cells already in the results file")
    p.add_argument("--executor", default="local", help="executor plugin (local, dask)")
    p.add_argument("--workers", type=int, help="dask: start a LocalCluster with N workers")
    p.add_argument("--scheduler", help="dask: address of an existing scheduler, e.g. tcp://host:8786")
    p.add_argument("--cell-timeout", type=float, help="seconds before a cell is recorded as an error (local, dask)")
    p.add_argument("--cache-dir", help="cache directory (default $CPBENCH_CACHE_DIR or ~/.cache/cpbench)")
    p.add_argument("--no-cache", action="store_true", help="compute everything afresh")
    p.add_argument("--report", action="store_true", help="write the HTML/Markdown report at the end")
    p.add_argument("--processes", type=_count, metavar="N",
                   help="fresh timing processes per cell (default: [timing] processes, else 5; 0: in this process)")
    p.add_argument("--require-quiet", type=_seconds, nargs="?", const=60.0, metavar="SECONDS",
                   help="before timing each cell wait up to SECONDS (default 60) for a quiet machine; "
                        "a cell still timed on a busy one is flagged busy")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number >= 0 is needed, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"seconds >= 0 are needed, not {text!r}")
    return v


def cmd_machine(args) -> int:
    from ..measure.noise import format_machine_report, machine_report

    report = machine_report(window_s=args.seconds)
    print(json.dumps(report, indent=2) if args.json else format_machine_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpbench", description="Benchmark low-rank decompositions of CNN conv layers.")
    parser.add_argument("--version", action="version", version=f"cpbench {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("plugins", help="list registered plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("run", help="run a benchmark matrix")
    p.add_argument("--matrix", nargs="?", const=None, default=False, metavar="FILE",
                   help=f"a matrix .toml, or a shipped one ({', '.join(BUILTIN_MATRICES)}); none: the default")
    _run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reproduce", help="reproduce a paper's experiment (lebedev2015)")
    p.add_argument("experiment")
    _run_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("machine", help="how busy this machine is now: noise probe, verdict, advice")
    p.add_argument("--seconds", type=_seconds, default=3.0, help="how long to watch (default 3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_machine)

    p = sub.add_parser("decompose", help="decompose one kernel file")
    p.add_argument("kernel", metavar="KERNEL_FILE")
    p.add_argument("--method", default="cp-nls")
    p.add_argument("--rank", required=True)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor", help="which tensor of a multi-tensor file")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="decomposer option (repeatable)")
    p.add_argument("--save", metavar="OUT.safetensors", help="write the factors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("train", help="train (and cache) a model's base network")
    p.add_argument("model")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="compare two runs cell by cell; exit 1 on regressions")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--threshold", type=float, default=0.05, help="relative change that counts (default 0.05)")
    p.add_argument("--accuracy-threshold", type=float, default=0.5,
                   help="accuracy drop in percentage points that counts (default 0.5)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write a report (HTML, Markdown, PNGs; or CSV) for a run")
    p.add_argument("run_dir")
    p.add_argument("--format", action="append", choices=["html", "md", "csv", "png"],
                   help="repeatable; default html+md+png")
    p.set_defaults(func=cmd_report)

    from ..plugin.manager import get_plugins

    try:
        get_plugins().hook.cpbench_add_commands(subparsers=sub)
    except Exception as exc:
        print(f"cpbench: a plugin's cpbench_add_commands failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except CpbenchError as exc:
        print(f"cpbench: error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, UsageError) or exc.exit_code == 2 else 2
    except KeyboardInterrupt:
        print("cpbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
