"""The latency table of a tune: every candidate timed alone on its layer's real input, cached.

Two kinds of entries, both ratios of paired, interleaved timings (:func:`cpbench.timing.time_pair`
through the backend, as a cell times its networks) so that the machine's load, which changes between
entries, cancels within each:

* a candidate's **layer speedup**: the original layer against the candidate, each prepared by the
  backend (its fastest exact form), on the layer's input shape;
* the baseline network against **variants** of itself: with one layer stubbed out (a module that returns
  a tensor of the layer's output shape at no cost), whose ratio gives the layer's share of the network
  in place (``share = 1 − variant / network``), and with every tunable layer stubbed out: the rest, the
  part never replaced, timed once. Two whole networks timed against each other, not a network against
  one small layer: on a loaded machine the second kind of pair was off by tens of percent.

A plan's predicted cost, as a fraction of the baseline network's latency, is
``rest + Σ share_l / speedup_l`` (:func:`predicted_cost`). Layers timed alone are not layers in place
(a replaced layer's output lands in another layout, the next layer finds other data in cache), so the
saving ``share_l − share_l / speedup_l`` is scaled by one measured factor (:func:`savings_calibration`):
the baseline against the whole network with every layer at its fastest candidate, timed once (a third
kind of entry), so that the fastest plan's prediction is its measurement and the baseline's stays 1.
The verify loop refits the factor to each plan it measures (:mod:`cpbench.tune.loop`).

A layer left whole is not free of its neighbours either: its share is timed in the dense baseline, and
beside compressed layers it can cost a fraction of that (the character network's conv1 on mkl: 0.038 of
the baseline's latency against a share of 0.09-0.12). So each layer is also timed kept whole inside the
fastest plan (a fourth kind of entry, :meth:`cpbench.tune.pipeline.Tuner.kept_in_place`), and that cost,
not its share, is the keep option's in every plan that replaces a layer (``predicted_cost(..., kept=)``);
the plan that keeps every layer stays the baseline, exactly 1.

How far layers alone are from layers in place, measured on the character network at batch 1 (mkl, one
thread; each layer stubbed out of the network against the network, beside the layer alone): the
original conv1 costs 2.2-2.9x in place what it costs alone, conv3 1.3x, conv2 0.9-1.1x; in the 10x plan
the compressed layers cost 1.2-1.45x in place what they cost alone, in the fastest plan 0.45-1.1x (there
the ~10 us a call costs alone through a backend, timed against a stub, is most of their time). No one
factor per layer or per plan fits all of these, and the whole network timed twice back to back, four
processes each, measured 8.68x and 9.72x for one plan: the prediction is refitted near where plans are
chosen rather than modelled further (a model with the candidates' in-place costs measured inside the
fastest plan mispredicted by +8 to +15%, no better).

Entries are keyed by the machine (CPU, cores, torch), the backend, threads, the input shape (batch
included), the layer's geometry and the candidate (method, rank, options) — not by weights, which do
not change a dense kernel's speed — so a second tune on the same machine times nothing, and layers of
the same shape share entries. The timer is injected: tests count its calls.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..run.cache import key_of
from ..nn.layers import geometry
from .candidates import Candidate
from .store import JsonStore

__all__ = ["Timed", "PairTimer", "LatencyTable", "machine_key", "plan_variant", "predicted_cost", "calibrated", "savings_calibration",
           "backend_timer"]


@dataclass(frozen=True)
class Timed:
    """One paired timing: ``speedup = reference_ms / candidate_ms`` (ratio of medians) and its CI."""

    speedup: float
    speedup_ci: tuple[float, float]
    reference_ms: float
    candidate_ms: float

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "speedup_ci": list(self.speedup_ci)}

    @classmethod
    def from_dict(cls, d: dict) -> "Timed":
        return cls(float(d["speedup"]), tuple(d["speedup_ci"]), float(d["reference_ms"]), float(d["candidate_ms"]))


# (reference module, candidate module, reference input, candidate input) -> Timed; the inputs are
# one tensor of one shape in the default timer, two arguments so a fake can tell the arms apart
PairTimer = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor], Timed]


def machine_key() -> dict:
    """What identifies a machine for cached latencies: CPU, cores, torch build, and the build of the fused
    CP kernel the optimising backends may run (a new build — another source, compiler or torch — is timed
    anew, not read from latencies of the old one)."""
    from ..kernels import fused
    from ..measure.machine import static_machine_info

    m = static_machine_info()
    key = {k: m.get(k) for k in ("hostname", "cpu_model", "logical_cores", "torch", "cpu_capability")}
    key["fused_kernel"] = fused.loaded_build_key()
    return key


def backend_timer(backend: Any, threads: int, budget: Any, *, processes: int = 0) -> PairTimer:
    """The default timer: both modules prepared by ``backend`` and timed as a cell times its networks
    (:func:`cpbench.measure.cell_timing.measure_pairs`), in ``processes`` fresh workers (0: here)."""
    from ..measure.cell_timing import MODEL, measure_pairs

    def timer(ref: nn.Module, cand: nn.Module, x_ref: torch.Tensor, x_cand: torch.Tensor) -> Timed:
        intervals, runs, _ = measure_pairs(backend, [(MODEL, ref.eval(), cand.eval(), x_ref, budget)],
                                           threads=threads, processes=processes)
        iv = intervals[MODEL]
        base_ms = float(np.median([p.baseline_ms for p in iv.processes])) if iv.processes else float("nan")
        comp_ms = float(np.median([p.compressed_ms for p in iv.processes])) if iv.processes else float("nan")
        lo, hi = iv.ci
        return Timed(iv.speedup, (lo, hi), base_ms, comp_ms)

    return timer


def _geometry_key(conv: nn.Conv2d) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(geometry(conv)).items()}


class LatencyTable:
    """Cached layer speedups and network shares; ``timed`` counts what this table measured itself."""

    def __init__(self, context: dict, timer: PairTimer, path: str | Path | None = None):
        self.context = dict(context)  # machine, backend, threads (the batch is in every input shape)
        self.timer = timer
        self.store = JsonStore(path)
        self.timed = 0

    @classmethod
    def for_run(cls, cache_root: str | Path | None, *, backend: str, threads: int, timer: PairTimer,
                machine: dict | None = None) -> "LatencyTable":
        from ..kernels.forms import FORMS_VERSION

        # the forms a backend may choose are part of what was timed: a new one times everything anew
        context = {"machine": machine or machine_key(), "backend": backend, "threads": threads, "forms": FORMS_VERSION}
        path = None if cache_root is None else Path(cache_root) / "latency" / f"{key_of(context)}.json"
        return cls(context, timer, path)

    def _get(self, key: str, measure: Callable[[], Timed]) -> Timed:
        hit = self.store.get(key)
        if hit is not None:
            return Timed.from_dict(hit)
        t = measure()
        self.timed += 1
        self.store.put(key, t.as_dict())
        return t

    def layer_speedup(self, cand: Candidate, conv: nn.Conv2d, input_shape: tuple[int, ...],
                      build: Callable[[], nn.Module], options: dict | None = None, *,
                      structure: str | None = None) -> Timed:
        """The original ``conv`` against the candidate module ``build()`` on a random input of
        ``input_shape``. "Leave it as it is" is 1 by definition, never timed. ``structure`` names the
        block the candidate builds when several methods build the same one (every CP decomposer builds
        a CP block): they then share one entry."""
        if cand.is_keep:
            return Timed(1.0, (1.0, 1.0), float("nan"), float("nan"))
        key = key_of("layer", self.context, _geometry_key(conv), list(input_shape), structure or cand.method,
                     cand.rank, options or {})

        def measure() -> Timed:
            x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
            return self.timer(conv, build(), x, x)

        return self._get(key, measure)

    def network_ratio(self, network_key: Any, variant: str, network: nn.Module, build: Callable[[], nn.Module],
                      input_shape: tuple[int, ...], timer: PairTimer | None = None) -> Timed:
        """The baseline ``network`` against a variant of it, ``build()`` (e.g. with layers stubbed out), on
        a random input of ``input_shape``; ``timer`` overrides the table's (a longer budget: every plan's
        prediction rests on these)."""
        key = key_of("network", self.context, network_key, variant, list(input_shape))

        def measure() -> Timed:
            x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
            return (timer or self.timer)(network, build(), x, x)

        return self._get(key, measure)

    def entry(self, what: str, network_key: Any, parts: Any, measure: Callable[[], dict]) -> tuple[dict, bool]:
        """``(value, cached)``: a measured record of the network that is not a pair timing (``what``, e.g.
        the reference of ``--target-against fastest``), read from the table or ``measure()``-d and stored;
        a record holding an ``error`` is not stored."""
        key = key_of(what, self.context, network_key, parts)
        hit = self.store.get(key)
        if hit is not None:
            return hit, True
        value = measure()
        if not value.get("error"):
            self.store.put(key, value)
        return value, False

    def recorded(self, network_key: Any, variant: str, input_shape: tuple[int, ...], measured: Timed) -> Timed:
        """The first timing recorded under ``variant`` (``measured``, when none was yet): for a timing the
        table does not take itself (a fine-tuned plan's, taken as a cell takes it), so that a repeated tune
        decides on the numbers its first run decided on and walks the same rounds."""
        key = key_of("network", self.context, network_key, variant, list(input_shape))
        hit = self.store.get(key)
        if hit is not None:
            return Timed.from_dict(hit)
        self.store.put(key, measured.as_dict())
        return measured


def plan_variant(labels: dict[str, str], stage: str = "plan") -> str:
    """The latency table's name of a whole network with the plan ``labels`` (``stage``: "plan" for its
    verify round, "fine-tuned plan" for its timing after fine-tuning)."""
    return stage + " " + ",".join(f"{n}={label}" for n, label in sorted(labels.items()))


def predicted_cost(rest: float, shares: dict[str, float], speedups: dict[str, float],
                   calibration: float = 1.0, kept: dict[str, float] | None = None) -> float:
    """Predicted latency of a plan as a fraction of the baseline network's: the part never replaced
    plus each replaced layer's share over its speedup (``speedups`` names the replaced layers), each
    layer's saving scaled by ``calibration`` (:func:`calibrated`; 0 gives the plan's cost before any
    saving), plus each kept layer's cost: its share, or, when the plan replaces a layer, its cost kept
    in a compressed network where ``kept`` gives it (:meth:`cpbench.tune.pipeline.Tuner.kept_in_place`).
    A plan that replaces nothing is the baseline: exactly ``rest + Σ shares``."""
    in_place = kept if speedups else None
    return rest + sum(calibrated(s, s / speedups[n], calibration) if n in speedups else (in_place or {}).get(n, s)
                      for n, s in shares.items())


def calibrated(share: float, cost: float, calibration: float) -> float:
    """A layer's predicted cost in place: its share less ``calibration`` times the saving its timing
    alone predicts (``share − cost``); never below 0."""
    return max(0.0, share - calibration * (share - cost))


# the factor is kept within these bounds: outside them one whole-network timing is more likely to be a
# bad timing than a network whose layers save 5x more (or less) in place than alone
CALIBRATION_BOUNDS = (0.2, 5.0)


def savings_calibration(predicted: float, measured: float, unscaled: float = 1.0) -> float:
    """The factor on every layer's saving that makes a plan predicted at ``predicted`` (a fraction of the
    baseline's latency) cost its ``measured`` one: ``(unscaled − measured) / (unscaled − predicted)``,
    ``unscaled`` the plan's predicted cost before any saving (1 where it keeps no layer at another cost
    than its share: ``predicted_cost(..., calibration=0)``). 1 where the plan saves nothing predicted
    (nothing to scale); clipped to :data:`CALIBRATION_BOUNDS`."""
    if not predicted < unscaled:
        return 1.0
    k = (unscaled - measured) / (unscaled - predicted)
    return min(max(k, CALIBRATION_BOUNDS[0]), CALIBRATION_BOUNDS[1])
