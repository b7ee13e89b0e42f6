"""What the stages before the search leave (:class:`Prepared`: options per layer, the layers' shares of
the network, the latency table's entries, the calibration) and the whole-network speedup they predict for a
plan: ``1 / (rest + Σ share_l / speedup_l)``, each layer's saving scaled by the calibration factor
(:mod:`cpbench.tune.latency`), refitted to each plan the verify loop measures (:func:`recalibrated`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .candidates import KEEP, Candidate
from .latency import Timed, calibrated, predicted_cost, savings_calibration
from .search import Option, fastest
from .sensitivity import cand_key

__all__ = ["Prepared", "normalised_shares", "recalibrated", "nearest_verified", "predicted_speedup", "option_cost", "layer_costs",
           "reach"]


def normalised_shares(rest: float, shares: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The rest and the layers' shares scaled to sum to 1: each is measured against its own timing of
    the baseline, so a drift of the machine between them is a common error, and a plan that keeps every
    layer must be predicted at exactly 1x. Measured on the character network: shares timed minutes apart
    summed to 1.18 on one run (the 8x plan predicted 8.1x, measured 10.9x) and to 1.01 on another."""
    total = rest + sum(shares.values())
    if total <= 0:
        return rest, shares
    return rest / total, {n: v / total for n, v in shares.items()}


@dataclass
class Prepared:
    """What the stages before the search leave: options per layer, shares, and their records."""

    layers: list[str]
    rest: float  # fraction of the baseline network's latency outside the tunable layers
    shares: dict[str, float]
    options: dict[str, list[Option]]
    timed: dict[str, Timed]  # candidate key -> layer speedup
    dropped: dict[str, list[str]] = field(default_factory=dict)  # layer -> candidates slower than the layer
    # layer -> candidates no plan within the loosest budget can hold (their sensitivity never computed)
    out_of_reach: dict[str, list[str]] = field(default_factory=dict)
    # those candidates, timed, held back: a drop round that searches below every target admits the
    # ones its budget can hold (Tuner.admit); ``loosest`` is the budget they were out of reach of
    reserve: dict[str, list[Candidate]] = field(default_factory=dict)
    loosest: float = math.inf
    seconds: dict[str, float] = field(default_factory=dict)
    # the factor on every layer's saving (latency.savings_calibration), from the whole network timed
    # with every layer at its fastest candidate: {"factor", "plan", "predicted_speedup", "speedup", ...}
    calibration: dict[str, Any] = field(default_factory=lambda: {"factor": 1.0})
    # plans the search rules out, with every plan at least as coarse in every layer (search.excluded_by): the
    # fine-tuned plans that lost far more than --max-drop (drops.tune_target adds them); shared, not copied,
    # by recalibrated copies
    excluded: list[dict[str, str]] = field(default_factory=list)
    # layer -> its cost kept whole in a compressed network (a fraction of the baseline's latency, measured
    # against the fastest plan: Tuner.kept_in_place), the keep option's cost in every plan that replaces a
    # layer; absent: its share (the baseline's, where the layer was timed)
    kept: dict[str, float] = field(default_factory=dict)

    @property
    def all_kept_cost(self) -> float:
        """The real cost of the plan that keeps every layer: the baseline's, 1 (``rest + Σ shares``), which the
        keep options' in-place costs need not sum to (the search is told: :func:`~.search.search`)."""
        return self.rest + sum(self.shares.values())


def recalibrated(prepared: Prepared, labels: dict[str, str], measured_speedup: float) -> Prepared:
    """``prepared`` with its options' costs calibrated by the factor that makes the predicted latency of
    the plan ``labels`` its measured one (:func:`~cpbench.tune.latency.savings_calibration` on the
    layers' timings alone); the losses, the shares and the timings unchanged."""
    speedups = _alone_speedups(prepared, labels)
    alone = predicted_cost(prepared.rest, prepared.shares, speedups, 1.0, prepared.kept)
    unscaled = predicted_cost(prepared.rest, prepared.shares, speedups, 0.0, prepared.kept)
    k = savings_calibration(alone, 1.0 / measured_speedup, unscaled)
    costs = layer_costs(prepared.shares, prepared.kept, prepared.timed,
                        {n: [o.candidate for o in opts] for n, opts in prepared.options.items()}, k)
    options = {n: [replace(o, cost=c) for o, c in zip(opts, costs[n])] for n, opts in prepared.options.items()}
    return replace(prepared, options=options,
                   calibration={**prepared.calibration, "factor": k, "refitted_on": {"plan": labels, "speedup": measured_speedup}})


def nearest_verified(verified: Sequence[tuple[dict[str, str], float]], target: float) -> tuple[dict[str, str], float] | None:
    """The verified ``(plan, speedup)`` nearest ``target`` in log-speed (None: none yet); of two equally
    near, the later."""
    if not verified:
        return None
    return min(reversed(verified), key=lambda v: abs(math.log(v[1] / target)))


def option_cost(share: float, timed: Timed, factor: float, kept: float | None = None) -> float:
    """A candidate's predicted cost in the network: its layer's share over its speedup alone, the saving
    calibrated by ``factor``; for the keep option, ``kept`` where given (the layer's cost kept whole in a
    compressed network), else its share."""
    if kept is not None:
        return kept
    return calibrated(share, share / timed.speedup, factor)


def layer_costs(shares: dict[str, float], kept: dict[str, float], timed: dict[str, Timed],
                pool: dict[str, list[Candidate]], factor: float) -> dict[str, list[float]]:
    """:func:`option_cost` of every candidate of ``pool`` (layer -> candidates)."""
    return {n: [option_cost(shares[n], timed[cand_key(c)], factor, kept.get(n) if c.is_keep else None) for c in cs]
            for n, cs in pool.items()}


def _alone_speedups(prepared: Prepared, labels: dict[str, str]) -> dict[str, float]:
    """Each replaced layer's speedup timed alone under a plan given by labels (absent or "keep": kept, not named)."""
    return {n: prepared.timed[f"{n}/{labels[n]}"].speedup for n in prepared.layers if labels.get(n, KEEP) != KEEP}


def predicted_speedup(prepared: Prepared, labels: dict[str, str]) -> float:
    """The predicted speedup of a plan given by labels (``{"conv2": "cp-nls:48"}``, absent: kept)."""
    return 1.0 / predicted_cost(prepared.rest, prepared.shares, _alone_speedups(prepared, labels),
                                prepared.calibration["factor"], prepared.kept)


def reach(calibration: dict[str, Any], options: dict[str, list[Option]], rest: float) -> float:
    """The fastest speedup a tune may aim at: the whole network with every layer at its fastest candidate, at
    the upper end of the interval the calibration measured it in (a target the verify loop would accept
    from a measurement is not refused before one); without that measurement, the fastest plan's predicted
    speedup under ``options``' costs."""
    if "speedup_ci" in calibration:
        return max(calibration["speedup_ci"][1], calibration["speedup"])
    return 1.0 / fastest(options, rest).cost
