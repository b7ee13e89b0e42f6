"""Targets against the fastest original network (``cpbench tune --target-against fastest``).

A tune's target is a speedup on its backend: the plan and the original network both run there. When
another backend runs the original faster (ONNX Runtime runs the character network at batch 1 in about
half the time eager ``mkl`` takes), a target met on ``mkl`` overstates what the plan is worth to a user
who would otherwise deploy the original on ONNX Runtime. With ``--target-against fastest``, the tune
first times the original on its backend against the fastest original of ``--against``
(:func:`~cpbench.measure.fastest.fastest_original`: ratio ``r`` of the fastest original's time to the
backend's, with its interval), and searches its backend at ``T / r`` for a target ``T``: the whole
search, verify and drop machinery stays in one backend, where its latency table and its interleaved
timings live. Each kept plan is then timed against that fastest original (``vs_fastest_original``, as
with ``--against`` alone), and that measurement, not the backend's, says whether ``T`` was met.

:func:`against_reference` rewrites a row and its plan to the user's target; it is pure.
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from .plan import Plan

if TYPE_CHECKING:
    from .pipeline import Tuner

__all__ = ["measure_reference", "searched_targets", "against_reference", "prepare_for"]


def measure_reference(tuner: Tuner) -> dict:
    """The original network on the tune's backend against the fastest original of ``request.against``;
    kept in the tune's latency table (machine, backend, threads; the network, the backends, the input
    shape), so that a repeated tune searches the same targets on its backend and walks the same rounds."""
    from ..errors import UsageError
    from ..measure.fastest import fastest_original
    from .latency import LatencyTable

    req = tuner.request
    ctx = replace(tuner.ctx, timing=dataclasses.asdict(req.network_budget))
    table = LatencyTable.for_run(ctx.cache().root if ctx.use_cache else None, backend=req.backend,
                                 threads=req.threads, timer=tuner.timer)
    shape = tuner.input_shape(req.batch)

    def measure() -> dict:
        tuner.step(f"timing the original network on {req.backend} against {', '.join(req.against)} "
                   "(the reference of --target-against fastest)")
        budget, processes, pin = ctx.timing_settings()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(req.seed))
        return fastest_original(tuner.backend, [tuner.plugins.backends.get(b) for b in req.against], tuner.base(), x,
                                budget, threads=req.threads, processes=processes, pin=pin)

    got, cached = table.entry("reference", tuner._net_key(), {"against": sorted(req.against), "shape": list(shape)},
                              measure)
    if got.get("error"):
        raise UsageError(f"--target-against fastest: the original network did not run on {req.backend}: {got['error']}")
    if cached:
        tuner.step(f"the original network on {req.backend} against {', '.join(req.against)}: {got['ratio']:.3f} "
                   f"of its time on {got['backend']} (measured by an earlier tune on this machine)")
    return {**got, "cached": cached}


def searched_targets(targets: tuple[float, ...], reference: dict | None) -> dict[float, float]:
    """Each target as the speedup on the tune's backend it stands for: ``T / ratio`` (``T`` itself
    without a reference)."""
    ratio = reference["ratio"] if reference else 1.0
    return {t: t / ratio for t in targets}


def prepare_for(tuner: Tuner, searched: dict[float, float], reference: dict | None):
    """``tuner.prepare`` for the targets as searched on the backend (:func:`searched_targets`); an unreachable
    target is reported in the user's terms too (what the fastest plan reaches against the reference)."""
    from .search import TargetUnreachable

    targets = tuple(searched)
    try:
        return tuner.prepare(budgets=[1.0 / s for s in searched.values()])
    except TargetUnreachable as e:
        if reference is None:
            raise
        r = reference["ratio"]
        raise TargetUnreachable(f"{e}; against the original network on {reference['backend']} (which runs it "
                                f"{1 / r:.2f}x faster than {tuner.request.backend}) that is {e.best_speedup * r:.2f}x, "
                                f"and the targets asked are {', '.join(f'{t:g}x' for t in targets)}",
                                e.best_speedup * r) from None


def against_reference(row: dict, plan: Plan, target: float, searched: dict[float, float], reference: dict) -> tuple[dict, Plan]:
    """``row`` and ``plan``, tuned on the backend at ``searched[target]``, made the row and plan of
    ``target`` against the fastest original: the target the user asked for in ``rank_spec`` and the
    plan, the backend's in ``tune.backend_target``, the reference in ``tune.target_against``, and
    ``tune_met`` decided by ``vs_fastest_original`` (its interval reaching ``target``)."""
    to_user = {s: t for t, s in searched.items()}
    spec = row.get("rank_spec")
    row = {**row, "rank_spec": {**(spec if isinstance(spec, dict) else {}), "target_speedup": target}}
    tune: dict[str, Any] = dict(row.get("tune") or {})
    tune["backend_target"] = searched[target]
    tune["target_speedup"] = target
    tune["target_against"] = {"reference": "fastest", **reference}
    if tune.get("kept_from_target") is not None:
        tune["kept_from_target"] = to_user.get(tune["kept_from_target"], tune["kept_from_target"])
    row["tune"] = tune
    vs = row.get("vs_fastest_original") or {}
    if vs.get("speedup_ci"):
        row["tune_met"] = bool(vs["speedup_ci"][1] >= target)
    meta = {**plan.meta, "target_speedup": target, "backend_target": searched[target],
            "target_against": reference["backend"]}
    if "kept_from_target" in meta:
        meta["kept_from_target"] = tune.get("kept_from_target")
    return row, Plan(plan.layers, meta)
