"""Drive a tune over several targets: results rows, plan files, uniform-rank plans beside, the report.

Everything lands in ``out_dir``: ``results.jsonl`` (one row per target, like a matrix cell's, plus the
uniform plans' rows when asked for), ``plan-<target>.toml`` per target, ``tune-report.md`` (the plan
tables and the Pareto front of measured speedup against accuracy) and ``pareto.png``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..run.results import RESULTS_FILE, ResultSink, jsonable, read_results
from .pipeline import StepFn, Tuner
from .reference import against_reference, measure_reference, prepare_for, searched_targets
from .request import TuneRequest
from .plan import write_plan

__all__ = ["TuneRun", "run_tune", "plan_name", "uniform_matrix"]


def plan_name(target: float) -> str:
    return f"plan-{target:g}.toml"


@dataclass
class TuneRun:
    rows: list[dict]
    uniform_rows: list[dict] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    latency_timed: int = 0


def _is_this_tune(row: dict, request: TuneRequest, targets: set[float]) -> bool:
    spec = row.get("rank_spec")
    return (isinstance(spec, dict) and spec.get("target_speedup") in targets and row.get("model") == request.model["name"]
            and row.get("backend") == request.backend and row.get("threads") == request.threads
            and row.get("batch") == request.batch)


def uniform_matrix(request: TuneRequest, layers: list[str], method: str, speedups: list[float], source: str):
    """The uniform-rank plans to compare with: ``method`` at ``"speedup:X"`` on every tuned layer."""
    from ..run.matrix import Matrix

    block: dict[str, list] = {"model": [dict(request.model)], "layers": [list(layers)], "decomposer": [{"name": method}],
                              "rank": [f"speedup:{x:g}" for x in speedups], "backend": [request.backend],
                              "threads": [request.threads], "batch": [request.batch],
                              "finetune_epochs": [request.finetune_epochs], "seed": [request.seed]}
    run: dict[str, Any] = {"finetune_control": request.finetune_control, "per_layer_timing": False}
    if request.finetune_samples:
        run["finetune_samples"] = request.finetune_samples
    return Matrix([block], {"budget_s": request.network_budget.budget_s}, run, source)


def run_tune(request: TuneRequest, out_dir: str | Path, *, ctx=None, step: StepFn | None = None,
             uniform: str | None = None, uniform_speedups: list[float] | None = None, timer=None,
             plugins=None) -> TuneRun:
    """Tune ``request.model`` at every target; see the module docstring for what is written."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    step = step or (lambda s: None)
    tuner = Tuner(request, ctx=ctx, plugins=plugins, step=step, timer=timer)
    if uniform is not None:
        tuner.plugins.decomposers.get(uniform)
    reference = measure_reference(tuner) if request.target_against == "fastest" else None
    searched = searched_targets(request.targets, reference)
    # every target is checked for reach right after the latency table: before any sensitivity is
    # computed, and before anything is verified, fine-tuned or written
    prepared = prepare_for(tuner, searched, reference)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    targets = set(request.targets)
    kept = [r for r in read_results(path) if not _is_this_tune(r, request, targets)] if path.exists() else []
    path.write_text("".join(json.dumps(jsonable(r)) + "\n" for r in kept))
    run = TuneRun([])
    with ResultSink(path) as sink:
        for target in request.targets:
            started = time.time()
            step(f"target {target:g}x: search and verify" + (
                f" ({searched[target]:.2f}x on {request.backend})" if reference is not None else ""))
            label = None if reference is None else f"{target:g}x ({searched[target]:.2f}x on {request.backend})"
            row, plan, tried = tuner.tune_target(prepared, searched[target], started=started, label=label)
            if reference is not None:
                row, plan = against_reference(row, plan, target, searched, reference)
            row = jsonable(row)
            sink.write(row)
            run.rows.append(row)
            run.written.append(write_plan(out_dir / plan_name(target), plan))
    assert tuner.latency_table is not None, "prepare() makes the latency table"
    run.latency_timed = tuner.latency_table.timed
    if uniform is not None:
        from ..run.session import run_matrix

        speeds = uniform_speedups or sorted({t * f for t in request.targets for f in (1.0, 2.0)})
        matrix = uniform_matrix(request, prepared.layers, uniform, speeds, str(out_dir / "uniform.toml"))
        step(f"uniform plans: {uniform} at {', '.join(f'speedup:{x:g}' for x in speeds)}")
        run_matrix(matrix, out_dir / "uniform", resume=True, ctx=tuner.ctx, plugins=tuner.plugins)
        run.uniform_rows = [r for r in read_results(out_dir / "uniform" / RESULTS_FILE) if r.get("status") == "ok"]
    from .report import write_tune_report

    run.written += write_tune_report(out_dir, run.rows, run.uniform_rows)
    run.seconds = time.perf_counter() - start
    return run
