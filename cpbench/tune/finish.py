"""Stage 5 of a tune: the verified plan fine-tuned, evaluated on the test split and timed whole again (a fresh
measurement, not the one the verify loop stopped on), through the same stages a matrix cell runs
(:mod:`cpbench.run.stages`), and written as a results row (a cell's, plus the tune's keys) and a plan
(:class:`~.plan.Plan`: per layer the method, rank, predicted and measured layer speed, sensitivity).
"""
from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from .loop import TuneOutcome
from .plan import LayerChoice, Plan
from .prepared import Prepared
from .sensitivity import cand_key

if TYPE_CHECKING:
    from .pipeline import Tuner

__all__ = ["finish"]


def finish(tuner: Tuner, prepared: Prepared, target: float, outcome: TuneOutcome, batch: int | None = None,
           *, started: float | None = None, cell=None) -> tuple[dict, Plan]:
    """The verified plan through a cell's stages — evaluate, fine-tune, FLOPs, measure — and its
    row (a cell's, plus the tune's keys) and plan. ``cell``: the matrix cell this tune runs for."""
    from ..nn.surgery import layer_input_shapes, replace_layers
    from ..run import stages
    from ..run.cell import _machine, axes_result, record, versions

    req = tuner.request
    batch = batch or req.batch
    started = started or time.time()
    sel = outcome.selection
    replaced = [n for n, o in sel.choice.items() if not o.candidate.is_keep]
    cell = cell or tuner.target_cell(target, batch)
    base_net = tuner.base()
    x1 = torch.randn(1, *tuner.input_shape(1)[1:], generator=torch.Generator().manual_seed(req.seed))
    base = stages.Base(spec=dict(req.model), model=base_net, plugin=tuner.model_plugin, layers=replaced,
                       convs={n: tuner.conv(n) for n in replaced}, input_shape=tuner.input_shape(1)[1:], example=x1,
                       layer_shapes=layer_input_shapes(base_net, x1, replaced),
                       label=tuner.model_plugin.label(**tuner.params) if hasattr(tuner.model_plugin, "label") else None,
                       dataset=tuner.dataset)
    parts = {n: tuner.decomposed(sel.choice[n].candidate) for n in replaced}
    facts = {n: p.factorizations[n] for n, p in parts.items()}
    repl = {n: p.replacements[n] for n, p in parts.items()}
    compressed = stages.Compressed(replace_layers(base_net, repl).eval(), repl, facts,
                                   {n: p.ranks[n] for n, p in parts.items()},
                                   {n: p.decompose_seconds[n] for n, p in parts.items()},
                                   {n: p.cached[n] for n, p in parts.items()})
    ctx = replace(tuner.ctx, finetune_samples=req.finetune_samples or tuner.ctx.finetune_samples,
                  finetune_control=req.finetune_control, per_layer_timing=True,
                  timing=dataclasses.asdict(req.network_budget))
    evaluation = stages.evaluate(base, compressed, ctx, tuner.plugins, tuner.step)
    fine = stages.fine_tune(base, compressed, cell, ctx, tuner.plugins, tuner.step)
    flops = stages.count_flops_of(base, compressed, fine.model)
    # the whole network and each replaced layer timed afresh, as a cell times them
    tuner.step("timing the fine-tuned network against the baseline")
    measurement = stages.measure(base, compressed, fine.model, cell, tuner.backend, ctx, tuner.step)
    vs_fastest = _against_fastest(tuner, base, fine.model, cell, ctx) if req.against else None

    result = axes_result(cell)
    result.status, result.host, result.started_at = "ok", socket.gethostname(), started
    record(result, base=base, compressed=compressed, evaluation=evaluation, tuned=fine, flops=flops,
           measurement=measurement)
    result.layers = replaced
    result.layer_decomposer = {n: o.candidate.method for n, o in sel.choice.items()}
    result.tune_layers = list(tuner.layers)
    result.predicted_speedup, result.predicted_loss = sel.predicted_speedup, sel.loss
    result.tune_rounds, result.tune_met, result.tune_stopped = len(outcome.rounds), outcome.met, outcome.stopped
    result.tune = {"plan": sel.labels(), "rounds": [r.as_dict() for r in outcome.rounds],
                   "shares": prepared.shares, "rest": prepared.rest, "kept_in_place": prepared.kept,
                   "sensitivity": tuner.sensitivity_mode, "max_drop": req.max_drop, "target_speedup": target,
                   "decomposers": list(req.decomposers), "candidates": {n: len(o) for n, o in prepared.options.items()},
                   "dropped_slower_than_layer": prepared.dropped,
                   "dropped_out_of_reach": prepared.out_of_reach,
                   "stage_seconds": {**prepared.seconds,
                                     "sensitivity": prepared.seconds.get("sensitivity", 0.0) + tuner.sensitivity.seconds},
                   "sensitivities": tuner.sensitivity.record(prepared.options),
                   "calibration": {**prepared.calibration, "rounds": list(tuner.calibration_log)},
                   "joint": list(tuner.joint_log)}
    drop = result.accuracy_drop()
    if not tuner.dataset:
        result.fidelity_loss = drop = tuner._scorer("fidelity")(fine.model)
    result.extra["accuracy_drop"] = drop  # a row key; CellResult.accuracy_drop() computes it for cells
    if vs_fastest is not None:
        result.extra["vs_fastest_original"] = vs_fastest
    result.meets_max_drop = drop is not None and drop <= req.max_drop
    result.wall_seconds = time.time() - started
    result.versions, result.machine = versions(tuner.plugins), _machine()
    row = result.to_row()

    layers = {}
    for n in tuner.layers:
        o = sel.choice[n]
        tm = prepared.timed[cand_key(o.candidate)]
        rec: dict[str, Any] = {"sensitivity": o.loss, "predicted_share": o.cost, "share": prepared.shares[n]}
        if not o.candidate.is_keep:
            rec.update(theoretical_speedup=o.candidate.theoretical_speedup, predicted_layer_speedup=tm.speedup,
                       predicted_layer_speedup_ci=list(tm.speedup_ci),
                       layer_speedup=(row.get("layer_speedup") or {}).get(n),
                       layer_speedup_ci=(row.get("layer_speedup_ci") or {}).get(n),
                       rel_error=facts[n].rel_error)
        layers[n] = LayerChoice(o.candidate.method, o.candidate.rank, {}, rec)
    meta = {k: row.get(k) for k in ("model", "model_params", "backend", "threads", "batch", "finetune_epochs",
                                    "seed", "predicted_speedup", "speedup", "speedup_ci", "accuracy_base",
                                    "accuracy_base_finetuned", "accuracy_decomposed", "accuracy_finetuned",
                                    "accuracy_drop", "tune_rounds")}
    if vs_fastest is not None and vs_fastest.get("speedup") is not None:
        meta["speedup_vs_fastest_original"] = vs_fastest["speedup"]
        meta["fastest_original_backend"] = vs_fastest["backend"]
    meta["target_speedup"] = target
    meta["model_params"] = meta["model_params"] or None
    return row, Plan(layers, meta)


def _against_fastest(tuner: Tuner, base, model, cell, ctx) -> dict:
    """The fine-tuned plan on the tune's backend against the original network on whichever of the
    request's ``against`` backends runs it fastest (:func:`cpbench.measure.fastest.against_fastest`)."""
    from ..measure.fastest import against_fastest

    names = tuner.request.against
    tuner.step(f"timing the fine-tuned network against the fastest original network of {', '.join(names)}")
    budget, processes, pin = ctx.timing_settings()
    x = torch.randn(cell.batch, *base.input_shape, generator=torch.Generator().manual_seed(cell.seed))
    return against_fastest(tuner.backend, [tuner.plugins.backends.get(b) for b in names], base.model, model, x,
                           budget, threads=cell.threads, processes=processes, pin=pin)
