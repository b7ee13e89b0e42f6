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

A plan whose interval reaches the target but whose point falls short of it (1.98x [1.94, 2.02] for 2x,
measured on ResNet-20) meets the target as the issue defines it, but a user who asked for 2x reads 1.98x:
while rounds are left the loop searches once more, as after a miss, and keeps the new plan only if its
point reaches the target (else the first, which met within its interval).

The other way too, with ``recalibrate``: a plan measured more than :data:`OVERSHOOT` above the target,
its whole interval above it, overshoots it, which costs accuracy the target did not ask for (measured on the
character network at batch 1: plans searched for 8x and 10x measured 9.8x and 12.0x, the model
pessimistic by 18%). The model is refitted to it and the search runs again at the target's budget; a
new plan is measured, within the same ``max_rounds``. Of the measured plans that meet the target the
one of least predicted loss (the search's own objective) is kept, so loosening never returns a plan
that misses when one that meets was measured.

The accuracy side, :func:`hold_drop`: a verified plan is fine-tuned, and when it loses more than the
allowed drop the tuner steps back to slower plans, between the fastest measured plan that held the drop
(the base network, 1x, at first) and the slowest measured plan that did not, by false position on the
drops they lost (:func:`step_back`), for a bounded number of rounds; the plan of the highest measured
speedup that holds the drop is kept, and a target the plans already fine-tuned show far past the drop is
not fine-tuned itself (:func:`hopeless`). The
bracket's ends are the plans' *measured* speedups (in a tune, each plan's timings pooled:
:func:`pooled_speedup`), not the targets they were searched at: a plan searched
at 9.7x that measured 10.1x shows 10.1x holds, and one searched at 10x that measured 11.3x lost at 11.3x
(both measured on the character network), so stepping between the searched targets (9.7 to 10) searched again
where the held plan already was, and never looked between 10.1x and 11.3x. Each step's search starts
from the model refitted to the verified plan nearest its target, so a searched target and the speed its
plan measures agree to the prediction's accuracy.

Pure: the search, the measurement and the refit are passed in, so the loop runs in tests on a fake timer.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .search import Selection, TargetUnreachable

__all__ = ["Measured", "Round", "TuneOutcome", "tighten_loop", "DEFAULT_ROUNDS", "Attempt", "hold_drop",
           "step_back", "DEFAULT_DROP_ROUNDS", "OVERSHOOT", "Skipped", "hopeless",
           "pooled_speedup", "bracket"]

DEFAULT_ROUNDS = 3
#: Fine-tuned plans a target may try after the first one lost more than ``--max-drop`` (each costs a
#: fine-tuning); each step narrows the bracket by at least a quarter in log-speed (:func:`step_back`).
DEFAULT_DROP_ROUNDS = 2
#: Stop stepping when the bracket's ends are within 8% of each other: plans inside it differ from its ends by
#: less than their pooled speeds' own noise (one timing moves by ±10% on a shared host, two pooled by about
#: ±7%), so fine-tuning one buys a drop, not a faster answer. Measured on the character network (a fresh tune,
#: 2026-12-07): with a 9.22x plan that held and a 9.77x one that lost (5.9% apart; the limit was 5%), the 12x
#: target, hopeless, fine-tuned two more plans (about 200 s) to keep one at 9.36x.
_MIN_BRACKET = 1.08
_MAX_FREE_STEPS = 3  # drop-round steps not fine-tuned (Attempt.fine_tuned False) beyond ``rounds``
_MAX_SILENT_TIGHTENINGS = 20  # re-searches per round that found an already measured plan
#: A plan measured more than ``OVERSHOOT x target``, with its whole interval above the target,
#: overshoots it: the model was pessimistic by more than the 10% a prediction is held to (issue #23),
#: so a refitted search is likely to find a slower plan of less loss that still meets it. The point,
#: not the interval's lower end, is held to the 10%: the whole-network intervals here are +-10-15%
#: wide on a contended host, and a lower end 10% above the target would almost never be seen.
OVERSHOOT = 1.10


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


def overshoots(m: Measured, target: float) -> bool:
    """The measured speedup is above the target by more than :data:`OVERSHOOT`, its interval wholly above."""
    return m.speedup > OVERSHOOT * target and m.speedup_ci[0] > target


def _key(selection: Selection) -> tuple:
    return tuple(sorted(selection.labels().items()))


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
    met: list[tuple[Selection, Measured]] = []  # the measured plans that meet the target

    def outcome(stopped: str) -> TuneOutcome:
        if met:  # the least predicted loss among those whose point reaches the target (else among those that
            # reach it within their interval); of equal loss the faster
            sel, mm = min([t for t in met if t[1].speedup >= target] or met, key=lambda t: (t[0].loss, -t[1].speedup))
            return TuneOutcome(sel, mm, rounds, met=True, stopped="met")
        assert best is not None
        return TuneOutcome(*best, rounds, met=False, stopped=stopped)

    def tightened(m: Measured) -> Selection | None:
        """The next plan after one measured short of the target (refitted, else tightened by the miss); None
        when no plan not yet measured can be found."""
        nonlocal budget
        try:
            if recalibrate is not None:
                recalibrate(selection, m)
                budget = 1.0 / target
                nxt = search(budget)
                if _key(nxt) not in tried:
                    return nxt
            for _ in range(_MAX_SILENT_TIGHTENINGS):
                budget *= m.speedup / target
                nxt = search(budget)
                if _key(nxt) not in tried:
                    return nxt
        except TargetUnreachable:
            pass
        return None

    while True:
        m = measure(selection)
        tried[_key(selection)] = m
        rounds.append(Round(budget, selection.labels(), selection.predicted_speedup, m.speedup, m.speedup_ci))
        if best is None or m.speedup > best[1].speedup:
            best = (selection, m)
        if not misses(m, target):
            met.append((selection, m))
            short = not any(mm.speedup >= target for _, mm in met)  # within its interval, below the point
            overshot = recalibrate is not None and overshoots(m, target)
            if len(rounds) >= max_rounds or not (short or overshot):
                return outcome("met")
            if short:  # one more plan, a little faster: kept only if its point reaches the target
                nxt = tightened(m)
                if nxt is None:
                    return outcome("met")
                selection = nxt
                continue
            assert recalibrate is not None, "only a loop that recalibrates overshoots"
            recalibrate(selection, m)  # overshot: the refitted model looks for a slower plan of less loss
            budget = 1.0 / target
            try:
                selection = search(budget)
            except TargetUnreachable:
                return outcome("met")
            if _key(selection) in tried:
                return outcome("met")
            continue
        if len(rounds) >= max_rounds:
            return outcome("max-rounds")
        nxt = tightened(m)
        if nxt is None:
            return outcome("unreachable")
        selection = nxt


@dataclass(frozen=True)
class Attempt:
    """One fine-tuned plan: the target it was searched for, its measured speedup and accuracy drop."""

    target: float
    speedup: float  # measured; in a tune, its verify round's and first fine-tuned timing pooled (pooled_speedup)
    drop: float | None  # None: no accuracy to hold (then the first attempt is kept)
    payload: Any = None  # what the caller keeps (the row, the plan)
    #: False: its drop is predicted, not measured (a plan coarser than one that lost); a drop round that
    #: fine-tunes nothing does not count against ``hold_drop``'s ``rounds``
    fine_tuned: bool = True

    def holds(self, max_drop: float) -> bool:
        return self.drop is not None and self.drop <= max_drop + 1e-9


def pooled_speedup(speedups: Sequence[float]) -> float:
    """One plan's whole-network speedups, each measured against the baseline at another moment (in a tune:
    its verify round before fine-tuning and its first timing after it), pooled: their geometric mean
    (speedups are ratios). The architecture is the same in all of them, so they measure
    one speed; on this kind of host a single measurement moves by 10%: the same fine-tuned character
    network measured 7.68x [7.29, 8.59] and, 4 minutes later, 8.46x [7.42, 9.48]. Pooled, a plan that
    lost the drop is not read as slower than one that held it by the noise of one timing."""
    if not speedups:
        raise ValueError("no speedup to pool")
    return math.exp(sum(math.log(s) for s in speedups) / len(speedups))


_BASE = Attempt(1.0, 1.0, 0.0)  # the base network: 1x, nothing lost
#: The share of the bracket (in log-speed) a step may go from its held end: never onto an end, and at least
#: a quarter of the way, so the bracket shrinks by a quarter or more per step whatever the drops say.
_STEP_SHARE = (0.25, 0.9)


def bracket(attempts: Sequence[Attempt], max_drop: float, base: Attempt = _BASE) -> tuple[Attempt, Attempt | None]:
    """The ends of the answer among ``attempts``: the fastest that held ``max_drop`` (``base`` when none did)
    and the slowest faster one that lost it (None when none did); attempts of unknown drop are neither."""
    known = [a for a in attempts if a.drop is not None]
    lo = max((a for a in known if a.holds(max_drop)), key=lambda a: a.speedup, default=base)
    lost = [a for a in known if not a.holds(max_drop) and a.speedup > lo.speedup]
    return lo, min(lost, key=lambda a: a.speedup, default=None)


def _drop_model(lo: Attempt, hi: Attempt) -> tuple[float, float] | None:
    """``(a, b)`` of the drop ``a + b (ln s)^2`` through ``lo`` and ``hi`` (their speedups and drops); None
    when it is not a rising curve (a drop unknown, or ``hi`` lost no more than ``lo``)."""
    if hi.drop is None or lo.drop is None or hi.drop <= lo.drop or hi.speedup <= lo.speedup:
        return None
    x_lo, x_hi = math.log(lo.speedup) ** 2, math.log(hi.speedup) ** 2
    b = (hi.drop - lo.drop) / (x_hi - x_lo)
    return lo.drop - b * x_lo, b


def step_back(lo: Attempt, hi: Attempt, max_drop: float) -> float:
    """The speed to search next between ``lo`` (the fastest plan that held ``max_drop``; the base network at
    first) and ``hi`` (the slowest faster plan that lost it): where a drop rising with the *square* of the
    log-speed through both ends reaches ``max_drop`` (false position on a convex model), kept within
    :data:`_STEP_SHARE` of the bracket; the log-midpoint when a drop is unknown.

    Why not bisection: a plan that lost 1.3 points when 1 was allowed is near the answer, one that lost 5
    is far from it, and bisection treats them alike. On the character network the 8x target's plan measured
    7.45x and lost more than the point allowed; bisecting from the base network searched next at 2.73x, whose
    plan needed 34 more candidates scored (436 s of high-rank fits) and a fine-tuning, far below a plan of
    another tune that measured 9.85x and lost 0.23 points. Accuracy falls off faster than log-speed as compression grows
    (a convex drop), so a straight line through the two ends would step back too far, as bisection does;
    the square puts the step at the log-midpoint when the plan lost four times the allowance from the base
    network, and near the lost plan when it lost little more than it."""
    model = _drop_model(lo, hi)
    if model is None:
        share = 0.5
    else:
        a, b = model
        x_lo, x_hi = math.log(lo.speedup), math.log(hi.speedup)
        x = math.sqrt(max((max_drop - a) / b, 0.0))
        share = (x - x_lo) / (x_hi - x_lo)
    share = min(max(share, _STEP_SHARE[0]), _STEP_SHARE[1])
    return lo.speedup * (hi.speedup / lo.speedup) ** share


@dataclass(frozen=True)
class Skipped:
    """A target not fine-tuned: the drop model through two plans already fine-tuned predicts it loses
    ``predicted_drop`` points (:func:`hopeless`)."""

    target: float
    predicted_drop: float
    held: Attempt
    lost: Attempt


def hopeless(known: Sequence[Attempt], target: float, max_drop: float) -> Skipped | None:
    """Whether ``target`` need not be fine-tuned at all: the drop rising with the square of the log-speed
    (:func:`step_back`'s model), drawn through the fastest of ``known`` that held ``max_drop`` and the slowest
    faster one that lost it, reaches at least twice the allowance (and at least a point more than it) at
    ``target``. Needs a known plan that held, which is then the answer if no step finds a faster one.

    Measured on the character network (2026-12-07): after the 10x target's rounds (the 8.7x plan lost 0.29
    points, a 9.4x one 2.81), the 12x target's first plan was fine-tuned anyway and lost 12.0 points; this
    model through those two predicts 11.5. A plan so far past the allowance cannot be the answer, and its
    fine-tuning (80-150 s) buys nothing the model did not already say."""
    if not any(a.holds(max_drop) for a in known):
        return None
    lo, hi = bracket(known, max_drop)
    if hi is None or target <= lo.speedup:
        return None
    model = _drop_model(lo, hi)
    if model is None:
        return None
    predicted = model[0] + model[1] * math.log(target) ** 2
    if predicted < max(2 * max_drop, max_drop + 1.0):
        return None
    return Skipped(target, predicted, lo, hi)


def hold_drop(attempt: Callable[[float], Attempt], target: float, max_drop: float, *, rounds: int = DEFAULT_DROP_ROUNDS,
              known: Sequence[Attempt] = (), on_skip: Callable[[Skipped], None] | None = None) -> tuple[Attempt, list[Attempt]]:
    """Try ``target``; while the fine-tuned plan loses more than ``max_drop``, step back (see the module
    docstring) at most ``rounds`` times (a step not fine-tuned, its drop predicted, is not counted; at most
    :data:`_MAX_FREE_STEPS` of them). ``known``: the attempts already fine-tuned in the same tune
    (other targets), which narrow the bracket from the start; when they show the target :func:`hopeless`,
    it is not tried itself (``on_skip`` is told why) and the steps start from their bracket.

    Returns the kept attempt and every attempt of this target in order. The kept one is the fastest
    that holds the drop among this target's attempts *and* ``known``: another target's plan measured
    faster than anything this target held is a better answer to it than a plan that lost the drop
    (measured on the character network: a repeated 9x target kept its own 8.59x plan, 1.41 points lost,
    while the 8x target's plan measured 9.90x and lost 0.43). When none holds, the one of this target's
    that lost least."""
    seen = [a for a in known if a.drop is not None]
    tried: list[Attempt] = []
    skipped = hopeless(seen, target, max_drop)
    if skipped is None:
        first = attempt(target)
        tried.append(first)
        if first.drop is None or first.holds(max_drop):
            return first, tried
    elif on_skip is not None:
        on_skip(skipped)
    paid = free = 0  # steps fine-tuned, and steps whose drop was predicted (each a verify timing only)
    while paid < rounds and free < _MAX_FREE_STEPS:
        lo, hi = bracket(seen + tried, max_drop)
        if hi is None:
            hi = Attempt(target, max(target, lo.speedup), None)
        if hi.speedup / lo.speedup < _MIN_BRACKET:
            break
        a = attempt(step_back(lo, hi, max_drop))
        if a.payload is not None and any(a.payload is b.payload for b in tried):
            break  # the step found a plan this target already has: the bracket would not move
        tried.append(a)
        paid, free = (paid + 1, free) if a.fine_tuned else (paid, free + 1)
    within = [a for a in tried + seen if a.holds(max_drop)]
    kept = max(within, key=lambda a: a.speedup) if within else min(tried, key=lambda a: math.inf if a.drop is None else a.drop)
    return kept, tried
