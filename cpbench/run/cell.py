"""Running one matrix cell: base → compress → evaluate → fine-tune → measure → record.

:func:`run_cell` is a plain function of a :class:`~cpbench.run.matrix.Cell` and a picklable
:class:`RunContext`, so any executor (in-process, Dask workers) can call it. It never raises for a
cell's own failure: it returns a row with ``status: "error"``. The stages are in
:mod:`cpbench.run.stages`; the row is spelled by :class:`cpbench.run.record.CellResult`. Expensive
values shared between cells (the trained base network, decompositions, evaluations, fine-tuned
networks) are memoised in the process and cached on disk, content-addressed
(:mod:`cpbench.run.memo`).
"""
from __future__ import annotations

import dataclasses

import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CpbenchError
from ..measure.cell_timing import layer_row_fields, split_timing, timing_row_fields
from ..measure.timing import TimingBudget
from . import memo, stages
from .cache import Cache
from .matrix import Cell
from .record import CellResult
from .stages import Base, Compressed, Evaluation, FineTuned, Flops, Measurement, OutputFidelity, StepFn, split_named

if TYPE_CHECKING:
    from ..plugin.manager import Plugins

__all__ = ["RunContext", "run_cell", "base_model", "clear_memo", "record", "axes_result", "versions"]


@dataclass(frozen=True)
class RunContext:
    """Everything a cell needs besides its axes; picklable, shipped to workers."""

    cache_dir: str | None = None
    use_cache: bool = True
    timing: dict = field(default_factory=dict)    # TimingBudget fields
    dataset_size: dict = field(default_factory=dict)  # {"train": n, "test": n} overrides
    per_layer_timing: bool = True
    finetune_samples: int | None = None  # training samples used by fine-tuning (None: the recipe's)
    # also fine-tune the uncompressed network with the same recipe: the accuracy drop is then measured
    # from the better of the two, so extra training is not credited to the compression
    finetune_control: bool = False
    train_threads: int | None = None  # threads for training/fine-tuning (None: leave as is)
    train: dict = field(default_factory=dict)  # the matrix's [train] table: Recipe fields for base training
    spec_dir: str | None = None  # where the matrix file is: relative paths in its specs start there
    processes: int | None = None  # fresh timing processes per cell (None: [timing] processes, or the default)
    require_quiet_s: float | None = None  # wait up to this long for a quiet machine before timing a cell
    fold_bn: bool = True  # fold each BatchNorm2d that directly follows a conv, in both arms (cpbench.nn.bnfold)

    @classmethod
    def from_matrix(cls, matrix, **overrides) -> "RunContext":
        """The context a matrix file asks for ([timing] and [run] tables), plus overrides."""
        run = matrix.run
        return cls(**{"timing": dict(matrix.timing), "dataset_size": dict(run.get("dataset_size", {})),
                      "per_layer_timing": run.get("per_layer_timing", True),
                      "finetune_samples": run.get("finetune_samples"),
                      "finetune_control": run.get("finetune_control", False), "train": dict(matrix.train),
                      "spec_dir": _spec_dir(matrix),
                      "fold_bn": run.get("fold_bn", True), **overrides})

    def budget(self) -> TimingBudget:
        return self.timing_settings()[0]

    def timing_settings(self) -> tuple[TimingBudget, int, bool]:
        """(per-pair budget, processes, pin) from [timing], with ``processes`` overridden if set."""
        budget, processes, pin = split_timing(self.timing)
        return budget, processes if self.processes is None else self.processes, pin

    def timing_passes(self) -> list[int]:
        """Processes per timing pass (:func:`cpbench.measure.cell_timing.pass_sizes`); one pass when
        timing in the harness process."""
        from ..measure.cell_timing import DEFAULT_PASSES, pass_sizes

        return pass_sizes(self.timing_settings()[1], int(self.timing.get("passes", DEFAULT_PASSES)))

    def cache(self) -> Cache:
        return Cache(self.cache_dir, enabled=self.use_cache)


def _spec_dir(matrix) -> str | None:
    from pathlib import Path

    src = Path(matrix.source)
    return str(src.resolve().parent) if src.is_file() else None


def clear_memo() -> None:
    """Forget the networks, decompositions and accuracies memoised in this process (not the disk cache)."""
    memo.clear_all()


def base_model(model_spec: dict, ctx: RunContext, *, plugins: "Plugins | None" = None,
               step: StepFn | None = None) -> nn.Module:
    """The model a cell starts from: given weights, or trained (cached by recipe) when the model has a
    data set."""
    from ..plugin.manager import get_plugins

    return stages.base_model(model_spec, ctx, plugins=plugins or get_plugins(), step=step or (lambda s: None))


# -- the cell ---------------------------------------------------------------------------------
def run_cell(cell: Cell, ctx: RunContext = RunContext(), *, step: StepFn | None = None,
             plugins: "Plugins | None" = None) -> dict:
    """Run one cell; always returns a result row (``status`` "ok" or "error")."""
    from ..plugin.manager import get_plugins

    started = time.time()
    if ctx.timing_settings()[1] > 0:
        from ..measure.workers import start_fork_server

        start_fork_server()  # imports torch in the background while the cell builds, decomposes, fine-tunes
    plugins = plugins or get_plugins()
    step = step or (lambda s: None)
    done: dict = {}
    sizes = [1]
    result = axes_result(cell)
    result.status, result.host, result.started_at = "ok", socket.gethostname(), started
    try:
        from ..tune.cell import is_target_spec, run_tuned_cell

        if is_target_spec(cell.rank):  # {target_speedup = X}: the tune chooses method and rank per layer
            return run_tuned_cell(cell, ctx, plugins, step, started)
        decomposer = plugins.decomposers.get(cell.decomposer["name"])
        backend = plugins.backends.get(cell.backend)
        done["base"] = base = stages.build_base(cell, ctx, plugins, step)
        done["compressed"] = compressed = stages.compress(base, decomposer, cell, ctx, step)
        done["evaluation"] = stages.evaluate(base, compressed, ctx, plugins, step)
        done["tuned"] = tuned = stages.fine_tune(base, compressed, cell, ctx, plugins, step)
        done["fidelity"] = stages.measure_fidelity(base, compressed, tuned, cell, ctx, plugins, step)
        done["flops"] = stages.count_flops_of(base, compressed, tuned.model)
        sizes = ctx.timing_passes()
        done["measurement"] = stages.measure(base, compressed, tuned.model, cell, backend, ctx, step,
                                             processes=sizes[0])
    except Exception as exc:  # recorded, the run goes on
        result.status = "error"
        result.error = str(exc) if isinstance(exc, CpbenchError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CpbenchError):
            result.traceback = traceback.format_exc(limit=8)
    record(result, **done)
    result.wall_seconds = time.time() - started
    result.versions = versions(plugins)
    result.machine = _machine()
    m = done.get("measurement")
    later = result.status == "ok" and m is not None and len(sizes) > 1
    if later:
        result.timing_pass, result.timing_passes = 1, len(sizes)
    row = result.to_row()
    if later and m is not None:
        # the processes so far, for the later passes to add to (never written: results.ResultSink drops
        # keys that start with "_")
        row["_timing_runs"] = [dataclasses.asdict(r) for r in m.runs]
    return row


def retime_cell(cell: Cell, row: dict, ctx: RunContext, *, plugins: "Plugins | None" = None,
                step: StepFn | None = None) -> dict:
    """The next timing pass of a cell whose ``row`` a pass before wrote: the networks rebuilt from the
    cache (decomposition and fine-tuning are not repeated), timed in that pass's share of the processes,
    and the row returned with the intervals over every process so far and ``timing_pass`` + 1."""
    from ..measure.cell_timing import MODEL, aggregate_noise, merged_intervals
    from ..measure.noise import verdict
    from ..measure.workers import ProcessRun
    from ..plugin.manager import get_plugins

    plugins = plugins or get_plugins()
    step = step or (lambda s: None)
    k = int(row["timing_pass"])  # the passes done; this one is k + 1
    sizes = ctx.timing_passes()
    before = [ProcessRun(**d) for d in row["_timing_runs"]]
    base = stages.build_base(cell, ctx, plugins, step)
    compressed = stages.compress(base, plugins.decomposers.get(cell.decomposer["name"]), cell, ctx, step)
    tuned = stages.fine_tune(base, compressed, cell, ctx, plugins, step)
    m = stages.measure(base, compressed, tuned.model, cell, plugins.backends.get(cell.backend), ctx, step,
                       processes=sizes[k] if k < len(sizes) else sizes[-1])
    runs = before + list(m.runs)
    intervals = merged_intervals(runs, list(m.intervals))
    fields = timing_row_fields(intervals[MODEL], runs)
    if m.layers:
        fields.update(layer_row_fields(intervals, runs, m.layers))
    during = aggregate_noise([r.noise for r in runs])
    noise = {**(row.get("noise") or {}), "during": during, "verdict": verdict(during),
             "passes": [*(row.get("noise") or {}).get("passes", [(row.get("noise") or {}).get("during")]),
                        m.noise["during"]]}
    # wall_seconds stays the cell's own (started_at + wall_seconds is when its first pass ended)
    return {**row, **fields, "noise": noise, "timing_pass": k + 1,
            "_timing_runs": [dataclasses.asdict(r) for r in runs]}


def axes_result(cell: Cell) -> CellResult:
    """A result holding only the cell's axes (what every row has, also one whose cell never ran)."""
    model_name, model_params = split_named(cell.model)
    dec_name, dec_options = split_named(cell.decomposer)
    return CellResult(
        cell_key=cell.key, model=model_name, model_params=model_params, layers=cell.layers, decomposer=dec_name,
        decomposer_options=dec_options, rank_spec=cell.rank, backend=cell.backend, threads=cell.threads,
        batch=cell.batch, finetune_epochs=cell.finetune_epochs, seed=cell.seed, axes=cell.axes())


def record(result: CellResult, *, base: Base | None = None, compressed: Compressed | None = None,
           evaluation: Evaluation | None = None, tuned: FineTuned | None = None, flops: Flops | None = None,
           measurement: Measurement | None = None, fidelity: OutputFidelity | None = None) -> CellResult:
    """Stage 6: write what the stages that finished found into ``result`` (the others stay unset)."""
    if base is not None:
        result.layers, result.model_label, result.weights_from = base.layers, base.label, base.weights_from
        result.layer_info, result.layers_skipped, result.bn_folded = base.layer_info, base.layers_skipped, base.bn_folded
    if fidelity is not None:
        result.fidelity = fidelity.fields()
    if compressed is not None:
        facts = compressed.factorizations
        result.rank = compressed.ranks
        result.rel_error = {n: f.rel_error for n, f in facts.items()}
        result.decompose_seconds = sum(compressed.decompose_seconds.values())
        result.layer_decompose_seconds = compressed.decompose_seconds
        result.decomposition_cached = compressed.cached
        result.degeneracy = {n: f.info.get("degeneracy") for n, f in facts.items()}
        result.decomposer_info = {n: _small_info(f.info) for n, f in facts.items()}
        # a cell that got this far has its accuracy keys (None without a data set)
        result.finetune_seconds = 0.0
    if evaluation is not None:
        result.accuracy_base, result.accuracy_decomposed = evaluation.accuracy_base, evaluation.accuracy_decomposed
    if tuned is not None:
        result.accuracy_finetuned, result.finetune_seconds = tuned.accuracy_finetuned, tuned.finetune_seconds
        result.accuracy_base_finetuned, result.finetune_cached = tuned.accuracy_base_finetuned, tuned.cached
    if flops is not None:
        result.baseline_flops, result.compressed_flops = flops.baseline, flops.compressed
        result.theoretical_speedup = flops.theoretical_speedup
        result.layer_theoretical_speedup = flops.layer_theoretical_speedup
        result.params_kept, result.layer_params_kept = flops.params_kept, flops.layer_params_kept
    if measurement is not None:
        m = measurement
        result.allocator, result.backend_info, result.thread_state = m.allocator, m.backend_info, m.thread_state
        result.noise, result.quiet_wait = m.noise, m.quiet_wait
        fields = timing_row_fields(m.intervals[stages.MODEL], m.runs)
        if m.layers:
            fields.update(layer_row_fields(m.intervals, m.runs, m.layers))
        for k, v in fields.items():
            setattr(result, k, v)
    return result


def _small_info(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "per_group" and isinstance(v, (int, float, str, bool, type(None)))}


def versions(plugins: "Plugins") -> dict:
    """What produced a row: cpbench, torch, oneDNN, every loaded plugin's distribution and version, and the
    libraries the plugins report (their ``versions()``)."""
    import cpbench

    mkldnn = getattr(torch.backends.mkldnn, "version", None)
    return {"cpbench": cpbench.__version__, "torch": torch.__version__, "mkldnn": mkldnn() if mkldnn else None,
            "plugins": plugins.versions(), **plugins.library_versions()}


def _machine() -> dict:
    try:
        from ..measure.machine import machine_info

        return machine_info()
    except Exception as exc:  # machine probing must never lose a result
        return {"error": f"{type(exc).__name__}: {exc}", "host": socket.gethostname()}
