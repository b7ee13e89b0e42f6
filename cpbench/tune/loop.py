"""Verify a searched plan by timing the whole network; on a miss, correct the model (or tighten the
budget) by the miss and search again.

The search predicts a network's latency from layers timed alone; the whole network, timed against the
baseline interleaved, is the truth. When its speedup misses the target beyond its interval (the upper
end of the interval below the target), the loop searches again, for at most ``max_rounds`` measured
rounds:

* with ``recalibrate`` (the tune's): the prediction model is refitted to the plan just measured (its
  predicted latency made its measured one) and the search runs again at the target's own budget, so
  the next plan's predicted speedup is a prediction made by a model that has seen the last miss;
* without it, or when that search returns a plan already measured: the budget is multiplied by
  ``measured / target`` (a plan already measured is tightened again without timing it twice).

Pure: the search, the measurement and the refit are passed in, so the loop runs in tests on a fake timer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .search import Selection, TargetUnreachable

__all__ = ["Measured", "Round", "TuneOutcome", "tighten_loop", "DEFAULT_ROUNDS"]

DEFAULT_ROUNDS = 3
_MAX_SILENT_TIGHTENINGS = 20  # re-searches per round that found an already measured plan


@dataclass(frozen=True)
class Measured:
    speedup: float
    speedup_ci: tuple[float, float]
    extra: Any = None  # whatever the measurement wants to keep (the timing, the built network)


@dataclass(frozen=True)
class Round:
    budget: float
    plan: dict[str, str]
    predicted_speedup: float
    speedup: float
    speedup_ci: tuple[float, float]

    def as_dict(self) -> dict:
        return {"budget": self.budget, "plan": self.plan, "predicted_speedup": self.predicted_speedup,
                "speedup": self.speedup, "speedup_ci": list(self.speedup_ci)}


@dataclass
class TuneOutcome:
    selection: Selection
    measured: Measured
    rounds: list[Round] = field(default_factory=list)
    met: bool = False  # the measured interval reaches the target
    stopped: str = ""  # why the loop ended: "met", "max-rounds", "unreachable"


def misses(m: Measured, target: float) -> bool:
    """The measured speedup misses the target beyond its interval."""
    return m.speedup_ci[1] < target


def tighten_loop(search: Callable[[float], Selection], measure: Callable[[Selection], Measured],
                 target: float, *, max_rounds: int = DEFAULT_ROUNDS,
                 recalibrate: Callable[[Selection, Measured], None] | None = None) -> TuneOutcome:
    """Search at budget ``1 / target``, measure, and search again on a miss (see the module docstring).

    The first search's :class:`TargetUnreachable` propagates (the target is out of reach of the
    candidates); a later one ends the loop with the last measured plan, ``stopped = "unreachable"``.
    """
    budget = 1.0 / target
    selection = search(budget)
    tried: dict[tuple, Measured] = {}
    rounds: list[Round] = []
    best: tuple[Selection, Measured] | None = None
    while True:
        m = measure(selection)
        tried[tuple(sorted(selection.labels().items()))] = m
        rounds.append(Round(budget, selection.labels(), selection.predicted_speedup, m.speedup, m.speedup_ci))
        if best is None or m.speedup > best[1].speedup:
            best = (selection, m)
        if not misses(m, target):
            return TuneOutcome(selection, m, rounds, met=True, stopped="met")
        if len(rounds) >= max_rounds:
            return TuneOutcome(*best, rounds, met=False, stopped="max-rounds")
        try:
            if recalibrate is not None:
                recalibrate(selection, m)
                budget = 1.0 / target
                selection = search(budget)
                if tuple(sorted(selection.labels().items())) not in tried:
                    continue
            for _ in range(_MAX_SILENT_TIGHTENINGS):
                budget *= m.speedup / target
                selection = search(budget)
                if tuple(sorted(selection.labels().items())) not in tried:
                    break
            else:
                return TuneOutcome(*best, rounds, met=False, stopped="unreachable")
        except TargetUnreachable:
            return TuneOutcome(*best, rounds, met=False, stopped="unreachable")
