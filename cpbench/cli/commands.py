"""The ``cpbench`` command line. A user's mistake prints one line and exits 2; no traceback."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from .. import __version__
from ..errors import CpbenchError, UsageError
from ..report.columns import COLUMNS, DEFAULT_COLUMNS, parse_columns, print_run_end, table_width
from ..report.verdict import DEFAULT_MAX_DROP
from .console import _console, _wide_console
from .decompose import cmd_decompose
from .system import cmd_build_kernel, cmd_machine, cmd_plugins

__all__ = ["main", "build_parser"]

BUILTIN_MATRICES = ("default", "lebedev2015", "lebedev2015-alexnet", "layer_suite", "smoke", "resnet20")


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
def _executor_cli_options(plugins, args) -> dict:
    """The ``--scheduler``/``--workers`` values given, checked against what the executor declares it takes
    (its ``cli_options``): the CLI knows the flags, the executor plugin says whether they are its own."""
    given = {k: v for k, v in (("scheduler", args.scheduler), ("workers", args.workers)) if v is not None}
    takes = set(getattr(plugins.executors.get(args.executor), "cli_options", ()))
    for flag in given:
        if flag not in takes:
            which = [n for n in plugins.executors.names()
                     if flag in getattr(plugins.executors.get(n), "cli_options", ())]
            raise UsageError(f"--{flag} is not an option of executor {args.executor!r}; executors that take it: "
                             f"{', '.join(which) or 'none registered'}")
    return given


def cmd_run(args) -> int:
    from ..run.matrix import load_matrix
    from ..run.session import run_matrix
    from ..plugin.manager import get_plugins
    from ..run.progress import CellProgress
    from ..run.cell import RunContext

    plugins = get_plugins()
    plugins.warn_failures()
    if args.matrix is False:
        raise UsageError("cpbench run needs --matrix [FILE.toml]")
    path = _matrix_path(args.matrix)
    matrix = load_matrix(path, registries=plugins.registries)
    from ..run.validate import validate_matrix

    ctx = RunContext.from_matrix(matrix, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                 processes=args.processes, require_quiet_s=args.require_quiet)
    warnings = validate_matrix(matrix, plugins=plugins, ctx=ctx)
    extra = parse_columns(args.columns)
    out = Path(args.out) if args.out else Path("cpbench-runs") / path.stem
    ex_opts = {} if args.cell_timeout is None else {"cell_timeout_s": args.cell_timeout}
    ex_opts.update(_executor_cli_options(plugins, args))
    console = _console()
    for w in warnings:
        print(f"cpbench: warning: {w}", file=sys.stderr)
    if getattr(args, "list", False):
        _list_cells(matrix, out, console)
        return 0
    shown = f"{path.stem} (shipped)" if path.parent == Path(str(resources.files("cpbench") / "matrices")) else path
    console.print(f"matrix {shown} → {len(matrix)} cells; results in {out / 'results.jsonl'}")
    start = time.perf_counter()
    progress = CellProgress()
    try:
        summary = run_matrix(matrix, out, resume=args.resume, keep_errors=args.keep_errors,
                             executor=args.executor, executor_options=ex_opts,
                             ctx=ctx, progress=progress, plugins=plugins)
    except KeyboardInterrupt:
        print(f"cpbench: interrupted; finished cells are in {out / 'results.jsonl'}; "
              "finish with the same command plus --resume", file=sys.stderr)
        return 130
    wall = time.perf_counter() - start
    sys.stderr.flush()  # the progress bar ends before the table
    from ..run.results import latest_rows, read_results

    rows, _ = latest_rows(read_results(out))
    report = None
    if args.report:
        from ..report.html import write_report

        report = str(next(p for p in write_report(out, max_drop=args.max_drop) if p.suffix == ".html"))
    title = (f"{path.stem}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} resumed, {wall:.0f} s")
    print_run_end(console, rows, title=title, width=table_width(console), extra=extra, max_drop=args.max_drop,
                  report=report or f"not written (add --report, or run: cpbench report {out})")
    sys.stdout.flush()
    return summary.exit_code


def _list_cells(matrix, out: Path, console: Console) -> None:
    """The cells a run would run (a dry run), with what ``--resume`` would do with each."""
    from rich.table import Table

    from ..run.results import RESULTS_FILE, latest_rows, read_results

    path = out / RESULTS_FILE
    status = {r.get("cell_key"): r.get("status") for r in latest_rows(read_results(path))[0]} if path.is_file() else {}
    cells = matrix.cells()
    t = Table(title=f"{matrix.source}: {len(cells)} cells" + (f" ({path} holds {len(status)})" if status else ""),
              box=None, pad_edge=False)
    for col in ("#", "model", "layers", "decomposer", "rank", "backend", "threads", "batch", "ft", "seed", "on disk"):
        t.add_column(col, overflow="fold")
    for i, c in enumerate(cells, 1):
        dec = c.decomposer["name"] + "".join(f" {k}={v}" for k, v in c.decomposer.items() if k != "name")
        model = c.model["name"] + "".join(f" {k}={v}" for k, v in c.model.items() if k != "name")
        rank = " ".join(f"{k}={v}" for k, v in c.rank.items()) if isinstance(c.rank, dict) else str(c.rank)
        layers = c.layers if c.layers == "auto" else ",".join(c.layers)
        t.add_row(str(i), model, layers, dec, rank, c.backend, str(c.threads), str(c.batch), str(c.finetune_epochs),
                  str(c.seed), {"ok": "done", None: "–"}.get(status.get(c.key), "failed") if status else "–")
    console.print(t)


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
    print_comparison(result, _wide_console())
    return 1 if result.regressions else 0


def cmd_report(args) -> int:
    from ..report.html import write_report

    written = write_report(args.run_dir, formats=args.format, max_drop=args.max_drop)
    for p in written:
        print(p)
    return 0


EXPERIMENTS = {
    "lebedev2015": "the paper's character network: conv2+conv3 by four decomposers, fine-tuned, timed",
    "lebedev2015-alexnet": "the paper's AlexNet conv2 (grouped 5×5, block-diagonal) at ranks 100–300, timed",
    "resnet20": "ResNet-20 on an image folder: 18 convs by four decomposers at 2× and 3×, fine-tuned, timed",
}
# the data set resnet20 is trained on, written on first use (sampledata gratings, train/ and test/)
RESNET20_DATA = {"classes": 10, "per_class": 300, "test_per_class": 60, "size": (32, 32), "seed": 0}


def _resnet20_matrix(out: Path) -> Path:
    """``out/resnet20.toml`` beside ``out/data/gratings``: the shipped matrix, its data written once."""
    from ..testing.sampledata import write_image_folder

    data = out / "data" / "gratings"
    if not (data / "test").is_dir():
        tmp = data.with_name(data.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_image_folder(tmp, splits=True, **RESNET20_DATA)
        tmp.replace(data)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resnet20.toml"
    path.write_text(_matrix_path("resnet20").read_text())
    return path


def cmd_reproduce(args) -> int:
    if args.experiment not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {args.experiment!r}; available: {', '.join(EXPERIMENTS)}")
    args.matrix = args.experiment
    args.out = args.out or f"cpbench-runs/{args.experiment}"
    if args.experiment == "resnet20":
        args.matrix = str(_resnet20_matrix(Path(args.out)))
    code = cmd_run(args)
    from ..run.results import read_results
    from ..report.tables import network_table, paper_table, paper_verdict

    rows = read_results(args.out)
    console = _wide_console()
    table = network_table if args.experiment == "resnet20" else paper_table
    console.print(table(rows, title=f"{args.experiment}: {EXPERIMENTS[args.experiment]}"))
    if args.experiment == "lebedev2015":
        for line in paper_verdict(rows):
            console.print(line)
    return code


# -- parser -----------------------------------------------------------------------------------
RANK_SPECS = """\
rank specs:
  64                an integer rank (Tucker-2 also a pair [r_out, r_in])
  "speedup:4"       the largest rank whose theoretical layer speedup is at least 4
  "params:0.25"     the largest rank keeping at most 25% of the layer's parameters
  "error:0.2"       the smallest rank whose relative reconstruction error is at most 0.2
  "vbmf"            Tucker-2 ranks by variational Bayesian matrix factorization"""

RUN_EPILOG = f"""\
A matrix file is TOML; the run is the cartesian product of the lists in [matrix]:

  [matrix]
  model = ["charnet"]                 # or {{name = "conv", in_channels = 64, out_channels = 192,
                                      #      kernel_size = 5, input_size = 27, padding = 2}}
  layers = [["conv2", "conv3"]]       # optional; "auto" = the model's default layers
  decomposer = ["cp-nls", {{name = "cp-als", impl = "tensorly"}}]
  rank = [64, "speedup:4", {{conv2 = 64, conv3 = 128}}]   # per layer: a table
  backend = ["torch-cpu", "mkl"]      # optional, default torch-cpu
  threads = [1]                       # optional, default 1
  batch = [1, 32]                     # optional, default 1
  finetune_epochs = [0, 1]            # optional, default 0 (models with a data set)
  seed = [0]                          # optional, default 0

  [timing]                            # optional: budget_s, warmup, min_rounds, max_rounds, ...
  budget_s = 4.0

{RANK_SPECS}

Every cell is checked before any work (exit 2 and one line on a mistake); failed cells are recorded
and the run goes on (exit 1). The run ends with a table and a verdict: per decomposer the fastest
cell within --max-drop points of accuracy.
Shipped matrices (a name instead of a file): {", ".join(BUILTIN_MATRICES)}.

examples:
  cpbench run --matrix                        the default matrix (the paper's character network)
  cpbench run --matrix my.toml --list         check a matrix and list its cells, run nothing
  cpbench run --matrix my.toml --out runs/a --report
  cpbench run --matrix my.toml --out runs/a --resume     finish it, running failed cells again

More: cpbench's README.md, sections "Matrix files" and "Result fields"; docs/scale-out.md for
--executor, --resume and what survives a crash."""

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _run_options(p) -> None:
    p.add_argument("--out", help="result directory (default cpbench-runs/<matrix name>)")
    p.add_argument("--resume", action="store_true",
                   help="finish the run in --out: skip its finished cells, run again the ones that failed")
    p.add_argument("--keep-errors", action="store_true",
                   help="with --resume: count failed cells as finished (do not run them again)")
    p.add_argument("--executor", default="local", help="executor plugin (local, dask)")
    p.add_argument("--workers", type=int, help="executors that take it (dask): start a local cluster of N workers")
    p.add_argument("--scheduler", help="executors that take it (dask): address of an existing scheduler, e.g. tcp://host:8786")
    p.add_argument("--cell-timeout", type=float, help="seconds before a cell is recorded as an error (local, dask)")
    p.add_argument("--cache-dir", help="cache directory (default $CPBENCH_CACHE_DIR or ~/.cache/cpbench)")
    p.add_argument("--no-cache", action="store_true", help="compute everything afresh")
    p.add_argument("--report", action="store_true", help="write the HTML/Markdown report at the end")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, metavar="POINTS",
                   help=f"accuracy budget of the verdict, in percentage points (default {DEFAULT_MAX_DROP:g})")
    p.add_argument("--columns", metavar="A,B,..",
                   help=f"more table columns: {', '.join(n for n in COLUMNS if n not in DEFAULT_COLUMNS)}, "
                        "or all (the table always has " + ", ".join(DEFAULT_COLUMNS) + "; every field: "
                        "cpbench report DIR --format csv)")
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


def _decompose_epilog() -> str:
    from ..plugin.manager import get_plugins
    from ..plugin.registry import description_of

    try:
        reg = get_plugins().decomposers
        methods = "\n".join(f"  {n:<14}{description_of(reg.get(n))}" for n in reg.names())
    except Exception as exc:  # a broken plugin set must not break --help
        methods = f"  (plugins could not be listed: {exc})"
    return (f"methods:\n{methods}\n\n{RANK_SPECS}\n  (decompose takes integer ranks and pairs; the others are "
            "resolved per layer by cpbench run)\n\nexamples:\n  cpbench decompose conv2.npy --method cp-nls --rank 64\n"
            "  cpbench decompose model.pt --tensor conv2.weight --method tucker2 --rank '[32,16]' --json\n"
            "  cpbench decompose k.npy --method cp-als -o impl=tensorly -o n_iter_max=200 --rank 8 --save f.safetensors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpbench", description="Benchmark low-rank decompositions of CNN conv layers.")
    parser.add_argument("--version", action="version", version=f"cpbench {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("plugins", help="list registered plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("run", help="run a benchmark matrix", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Decompose, fine-tune and time every cell of a matrix; end with a verdict.")
    p.add_argument("--matrix", nargs="?", const=None, default=False, metavar="FILE",
                   help=f"a matrix .toml, or a shipped one ({', '.join(BUILTIN_MATRICES)}); none: the default")
    p.add_argument("--list", action="store_true", help="check the matrix and list its cells; run nothing")
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

    p = sub.add_parser("decompose", help="decompose one kernel file", epilog=_decompose_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Decompose one conv kernel (out_channels, in_channels/groups, kh, kw) from a "
                                   ".npy, .pt or .safetensors file and print its relative error.")
    p.add_argument("kernel", metavar="KERNEL_FILE")
    p.add_argument("--method", default="cp-nls", help="a decomposer (listed below); default cp-nls")
    p.add_argument("--rank", required=True, help="an integer, or for tucker2 a pair [r_out,r_in]")
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

    p = sub.add_parser("build-kernel", help="build the fused CP-block kernel for this machine (form cp4-fused)")
    p.add_argument("--march", default="native",
                   help="the -march target (default native: this CPU; e.g. x86-64-v3 for an AVX2 build)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=cmd_build_kernel)

    p = sub.add_parser("report", help="write a report (HTML, Markdown, PNGs; or CSV) for a run")
    p.add_argument("run_dir")
    p.add_argument("--format", action="append", choices=["html", "md", "csv", "png"],
                   help="repeatable; default html+md+png")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, metavar="POINTS",
                   help=f"accuracy budget of the verdict, in percentage points (default {DEFAULT_MAX_DROP:g})")
    p.set_defaults(func=cmd_report)

    from .tune import add_tune_parser

    add_tune_parser(sub)

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
        return exc.exit_code  # per class: cpbench/errors.py
    except KeyboardInterrupt:
        print("cpbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`cpbench ... | head`): stop quietly, exit 1 as rich's tables do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1


if __name__ == "__main__":
    sys.exit(main())
