"""The measure stage of a cell: prepare once here, time in fresh processes, intervals, flags, noise.

The parent prepares each pair on the backend once — that is where an optimising backend makes its
timed choices, recorded in ``backend_info`` — then :func:`cpbench.measure.workers.time_in_processes` times
the whole network and each replaced layer in ``processes`` fresh workers that rebuild the same
choices, and :func:`cpbench.measure.intervals.two_level_interval` turns their rounds into the speedup and its
interval. The fields this returns are the timing part of a result row.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .intervals import Interval, two_level_interval
from .noise import busy_reasons, snapshot, static_noise_facts, verdict, wait_for_quiet
from .timing import TimingBudget
from .workers import PairSpec, ProcessRun, pair_samples, time_in_processes

__all__ = ["MODEL", "DEFAULT_PROCESSES", "DEFAULT_PIN", "DEFAULT_PASSES", "measure_pairs", "timing_row_fields",
           "layer_row_fields", "split_timing", "pass_sizes", "merged_intervals", "aggregate_noise"]

MODEL = "<model>"  # the label of the whole-network pair
#: Fresh processes per cell by default, and whether to pin them (chosen by measurement: see README
#: "How timing works" and benchmarks/scripts/interval_coverage.py).
DEFAULT_PROCESSES = 5
DEFAULT_PIN = False
#: A run times each cell's processes in this many passes over the matrix: the first when the cell runs
#: (its row is written then), the others after every cell has had its first, each appending the cell's
#: row again with the processes so far. The machine drifts over minutes (on this VM, both arms of every
#: cell 10-20% slower for five minutes of one run, with no load, steal or clock change to show for it),
#: and only processes minutes apart put that drift inside the interval (README "How timing works").
#: One process per pass by default: measured 2026-12-06 on a contended 2-core VM, two cached default
#: matrices ten minutes apart agreed on 28/32 cells in 5 passes against 27/32 in 2, the 12-cell layer
#: matrix on 10/12 against 2/12, for 234-238 s against 217 s (the budget is the cell's, shared by all
#: its processes: :func:`cpbench.measure.workers.time_in_processes`).
DEFAULT_PASSES = 5


def _parent_info(backend, base, compressed, x, threads) -> dict:
    """Prepare both arms here once (the backend's choices are made and recorded), then release them."""
    info = {}
    for arm, model in (("baseline", base), ("compressed", compressed)):
        p = backend.prepare(model, x, threads=threads)
        try:
            info[arm] = p.info
        finally:
            p.close()
    return info


def measure_pairs(backend, pairs: Sequence[tuple[str, Any, Any, Any, TimingBudget]], *, threads: int,
                  processes: int, pin: bool = False, require_quiet_s: float | None = None,
                  sampler=None, contended_retries: int | None = None,
                  share_of: int | None = None) -> tuple[dict[str, Interval], list[ProcessRun], dict]:
    """Time ``(label, baseline, compressed, x, budget)`` pairs; return intervals by label, the runs,
    and the noise fields (``noise``, ``quiet_wait``) for the row. ``share_of``: the processes of all the
    cell's passes, of which these are some (each gets ``budget / share_of``)."""
    extra: dict[str, Any] = {}
    if require_quiet_s is not None:
        from .canary import contention_now

        extra["quiet_wait"] = wait_for_quiet(require_quiet_s, own_threads=0,
                                             canary=lambda: contention_now(threads)["canary_ratio"])
    before = {**static_noise_facts(), **snapshot(names=True)}
    specs = [PairSpec(label, a, b, x, budget, _parent_info(backend, a, b, x, threads))
             for label, a, b, x, budget in pairs]
    kwargs: dict[str, Any] = {} if sampler is None else {"sampler": sampler}
    if contended_retries is not None:
        kwargs["contended_retries"] = contended_retries
    if share_of is not None:
        kwargs["share_of"] = share_of
    runs = time_in_processes(backend, specs, threads=threads, processes=processes, pin=pin, **kwargs)
    intervals = {s.label: two_level_interval(pair_samples(runs, s.label)) for s in specs}
    agg = aggregate_noise([r.noise for r in runs])
    before.pop("cpu_jiffies", None)
    extra["noise"] = {"before": before, "during": agg, "verdict": verdict(agg)}
    extra["backend_info"] = specs[0].info if specs else {}
    return intervals, runs, extra


def pass_sizes(processes: int, passes: int) -> list[int]:
    """Processes per pass, as even as possible, the first passes taking the remainder (5 in 2: [3, 2]);
    a single pass when there are fewer than two processes."""
    k = max(1, min(passes, processes)) if processes >= 2 else 1
    return [processes // k + (1 if i < processes % k else 0) for i in range(k)]


def merged_intervals(runs: Sequence[ProcessRun], labels: Sequence[str]) -> dict[str, Interval]:
    """The interval of each pair over all ``runs`` (the processes of every pass so far)."""
    return {label: two_level_interval(pair_samples(runs, label)) for label in labels}


def aggregate_noise(per: list[dict]) -> dict:
    """Over all processes: the worst of each measure, busy if any process was busy."""
    def worst(key, f=max):
        vals = [n[key] for n in per if n.get(key) is not None]
        return f(vals) if vals else None

    out = {"other_runnable_mean": worst("other_runnable_mean"), "other_runnable_max": worst("other_runnable_max"),
           "steal": worst("steal"), "freq_ratio_min": worst("freq_ratio_min", min),
           "freq_mhz": worst("freq_mhz", min), "governor": next((n.get("governor") for n in per), None),
           "load_average": per[-1].get("load_average") if per else None,
           "seconds": sum(n.get("seconds") or 0.0 for n in per),
           "canary_ratio_max": worst("canary_ratio"),
           "contended_set_aside": sum(len(n.get("contended_set_aside", [])) for n in per),
           "contention_standing": any(n.get("contention_standing") for n in per)}
    busy = [i for i, n in enumerate(per) if n.get("busy")]
    # the reasons of the worst process's numbers; busy if any process was measured on a busy machine
    contention = [r for n in per for r in n.get("reasons", []) if r.startswith("host contention")][:1]
    out.update(busy=bool(busy), reasons=(busy_reasons(out) + contention)
               or sorted({r for n in per for r in n.get("reasons", [])}), busy_processes=busy)
    return out


def _flags(iv: Interval, runs: Sequence[ProcessRun]) -> dict[str, bool]:
    return {"wide": iv.wide, "busy": any(r.noise.get("busy") for r in runs), "disagree": iv.disagree}


def timing_row_fields(iv: Interval, runs: Sequence[ProcessRun], label: str = MODEL) -> dict:
    """The row's whole-network timing fields (``speedup``, ``speedup_ci``, ``timing_flags``, ...)."""
    a = np.concatenate([np.asarray(r.pairs[label]["baseline_ms"]) for r in runs])
    b = np.concatenate([np.asarray(r.pairs[label]["compressed_ms"]) for r in runs])
    q = np.percentile
    per = [{"pid": r.pid, **p.as_dict(), "cores": r.cores, "seconds": r.seconds, "mode": r.mode,
            "calls_per_round": r.pairs[label]["calls_per_round"], "busy": bool(r.noise.get("busy")),
            "other_runnable_mean": r.noise.get("other_runnable_mean"), "steal": r.noise.get("steal"),
            "canary_ratio": r.noise.get("canary_ratio")}
           for r, p in zip(runs, iv.processes)]
    return {
        "baseline_ms": float(np.median([p.baseline_ms for p in iv.processes])),
        "compressed_ms": float(np.median([p.compressed_ms for p in iv.processes])),
        "baseline_p90_ms": float(q(a, 90)), "compressed_p90_ms": float(q(b, 90)),
        "baseline_iqr_ms": float(q(a, 75) - q(a, 25)), "compressed_iqr_ms": float(q(b, 75) - q(b, 25)),
        "speedup": iv.speedup, "speedup_ci": list(iv.ci), "speedup_half_width": iv.half_width_rel,
        "timing_flags": _flags(iv, runs), "timing_processes": per,
        "timing_rounds": int(a.size), "timing_mode": runs[0].mode if runs else None,
        "timing_pinned": runs[0].cores if runs and runs[0].cores else None,
        "calls_per_round": runs[0].pairs[label]["calls_per_round"] if runs else None,
    }


def layer_row_fields(intervals: dict[str, Interval], runs: Sequence[ProcessRun], layers: Sequence[str]) -> dict:
    """Per replaced layer: speedup, interval, flags and the processes' speedups."""
    return {
        "layer_speedup": {n: intervals[n].speedup for n in layers},
        "layer_speedup_ci": {n: list(intervals[n].ci) for n in layers},
        "layer_timing_flags": {n: _flags(intervals[n], runs) for n in layers},
        "layer_process_speedups": {n: [p.speedup for p in intervals[n].processes] for n in layers},
    }


def split_timing(timing: dict) -> tuple[TimingBudget, int, bool]:
    """Split a [timing] table into the per-pair budget and the process settings."""
    t = dict(timing)
    processes = t.pop("processes", DEFAULT_PROCESSES)
    pin = t.pop("pin", DEFAULT_PIN)
    t.pop("passes", None)
    t.pop("contended_retries", None)  # read by the timing stage itself
    return TimingBudget(**t), processes, pin


