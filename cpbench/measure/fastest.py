"""The compressed network against the *fastest* original network of any backend, side by side.

A cell's speedup is measured against the original network on the cell's own backend. That answers "how
much faster does this backend run the compressed network", not "how much faster than the fastest way to run
the original on this CPU": when another backend runs the original faster, a same-backend speedup flatters the
compressed network by that factor. Measured 2026-12-07 (2-core AMD EPYC VM, one thread, batch 1, both pairs
timed by ``cpbench tune``): the character network's original took 2.05 ms on ``mkl`` and 1.07 ms on
``onnxruntime`` (9×9 convs at batch 1), and the tuned 8× plan measured 7.95× [6.39, 9.07] against ``mkl``'s
original but 4.08× [3.47, 4.55] against ONNX Runtime's.

:func:`against_fastest` prepares the compressed network once on its backend and the original on each of
``backends``; a short in-process selection times every original against the compressed network
(interleaved, :func:`~cpbench.measure.timing.time_pair`) and picks the one it ran slowest against — the
fastest original; that pair alone is then timed again in fresh processes like a cell's network
(:func:`~cpbench.measure.workers.time_in_processes`), so the reported interval is not the selection's
winner's curse. A backend that cannot prepare the network is recorded with its error and skipped.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .intervals import two_level_interval
from .threads import thread_limits
from .timing import TimingBudget, time_pair
from .workers import PairSpec, pair_samples, time_in_processes

__all__ = ["against_fastest", "fastest_original", "SELECT_BUDGET", "LABEL"]

#: The selection's budget per backend: enough to tell backends 10% apart, not to report.
SELECT_BUDGET = TimingBudget(warmup=2, min_rounds=6, max_rounds=60, budget_s=0.6)
LABEL = "<fastest original>"


def _select(backend: Any, backends: Sequence[Any], original, compressed, x, threads: int,
            budget: TimingBudget) -> tuple[dict[str, dict], dict[str, dict]]:
    """``({name: {"speedup": s}} or {"error": ...}, {name: the backend's prepare info})``: each backend's
    original timed against the compressed network prepared once on ``backend``."""
    selection: dict[str, dict] = {}
    infos: dict[str, dict] = {}
    with thread_limits(threads):
        comp = backend.prepare(compressed, x, threads=threads)
        try:
            infos["<compressed>"] = comp.info
            xc = comp.convert_input(x)
            for b in backends:
                try:
                    orig = b.prepare(original, x, threads=threads)
                except Exception as exc:  # noqa: BLE001 - a backend that cannot run this network is skipped
                    selection[b.name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
                    continue
                try:
                    xo = orig.convert_input(x)
                    pt = time_pair(lambda: orig(xo), lambda: comp(xc), budget)
                    selection[b.name] = {"speedup": pt.speedup, "baseline_ms": pt.baseline.median_ms,
                                         "compressed_ms": pt.compressed.median_ms}
                    infos[b.name] = orig.info
                finally:
                    orig.close()
        finally:
            comp.close()
    return selection, infos


def against_fastest(backend: Any, backends: Sequence[Any], original, compressed, x, budget: TimingBudget, *,
                    threads: int, processes: int, pin: bool = False,
                    select_budget: TimingBudget = SELECT_BUDGET) -> dict:
    """The compressed network (on ``backend``) against the fastest original of ``backends``.

    Returns ``{"backend", "speedup", "speedup_ci", "baseline_ms", "compressed_ms", "selection"}``: the
    backend whose original ran fastest, the final paired speedup with its 95% interval and both arms'
    median milliseconds, and what the selection measured per backend (``{"speedup", ...}`` or ``{"error"}``).
    ``{"selection": ..., "error": ...}`` when no backend could run the original.
    """
    original, compressed = original.eval(), compressed.eval()
    selection, infos = _select(backend, backends, original, compressed, x, threads, select_budget)
    ran = {n: s for n, s in selection.items() if "speedup" in s}
    if not ran:
        return {"selection": selection, "error": "no backend could run the original network"}
    best_name = min(ran, key=lambda n: ran[n]["speedup"])
    best = next(b for b in backends if b.name == best_name)
    return {"backend": best_name, **_timed_pair(backend, best, original, compressed, x, budget, infos, threads, processes,
                                                pin), "selection": selection}


def _timed_pair(backend, best, original, compressed, x, budget, infos, threads, processes, pin) -> dict:
    """The original on ``best`` against ``compressed`` on ``backend``, timed in fresh processes as a cell's network
    is: ``{"speedup", "speedup_ci", "baseline_ms", "compressed_ms", "processes"}``."""
    spec = PairSpec(LABEL, original, compressed, x, budget,
                    {"baseline": infos[best.name], "compressed": infos["<compressed>"]},
                    baseline_backend=best, compressed_backend=backend)
    runs = time_in_processes(backend, [spec], threads=threads, processes=processes, pin=pin)
    iv = two_level_interval(pair_samples(runs, LABEL))
    return {"speedup": iv.speedup, "speedup_ci": [float(v) for v in iv.ci],
            "baseline_ms": float(np.median([p.baseline_ms for p in iv.processes])),
            "compressed_ms": float(np.median([p.compressed_ms for p in iv.processes])), "processes": len(runs)}


def fastest_original(backend: Any, backends: Sequence[Any], original, x, budget: TimingBudget, *, threads: int,
                     processes: int, pin: bool = False, select_budget: TimingBudget = SELECT_BUDGET) -> dict:
    """How fast the original network runs on ``backend`` against the fastest of ``backends`` and ``backend``.

    Returns ``{"backend", "ratio", "ratio_ci", "selection", ...}``: ``ratio`` is the fastest original's time
    over ``backend``'s (< 1 when another backend is faster), with its 95% interval. The selection is
    :func:`against_fastest`'s with the original on ``backend`` in the compressed arm; when ``backend``
    itself runs it fastest the ratio is 1 and nothing more is timed, else that pair is timed again in
    fresh processes. A target ``T`` against the fastest original is a target of ``T / ratio`` on
    ``backend`` (``cpbench tune --target-against fastest``)."""
    import copy

    original = original.eval()
    others = [b for b in backends if b.name != backend.name]
    selection, infos = _select(backend, [backend, *others], original, copy.deepcopy(original), x, threads,
                               select_budget)
    ran = {n: s for n, s in selection.items() if "speedup" in s}
    if backend.name not in ran:
        return {"selection": selection, "error": selection.get(backend.name, {}).get("error", "did not run")}
    best_name = min(ran, key=lambda n: ran[n]["speedup"])
    if best_name == backend.name:
        return {"backend": backend.name, "ratio": 1.0, "ratio_ci": [1.0, 1.0], "selection": selection}
    best = next(b for b in others if b.name == best_name)
    t = _timed_pair(backend, best, original, copy.deepcopy(original), x, budget, infos, threads, processes, pin)
    return {"backend": best_name, "ratio": t["speedup"], "ratio_ci": t["speedup_ci"], "fastest_ms": t["baseline_ms"],
            "backend_ms": t["compressed_ms"], "processes": t["processes"], "selection": selection}
