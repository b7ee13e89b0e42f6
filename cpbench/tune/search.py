"""Choose one candidate per layer: a multiple-choice knapsack over measured latency.

Every layer offers options, each with a ``cost`` (the fraction of the baseline network's latency the
layer takes with that option, from the latency table) and a ``loss`` (the accuracy lost, in points,
with only that layer replaced). A network's predicted latency is ``rest + Σ cost`` (``rest``: the part
of the network that is never replaced, timed once) and its predicted loss ``Σ loss`` — losses are taken
as additive, the usual first-order assumption of per-layer sensitivity searches (AIMET, NetAdapt).
:func:`search` minimises the loss subject to ``rest + Σ cost ≤ budget`` by dynamic programming over
the costs discretised into ``bins`` steps of the available budget, each cost rounded *up*: the plan it
returns always meets the budget with its real costs, and it is optimal among the plans whose real
cost is at least ``layers × step`` inside the budget (exact when the costs are multiples of the step).
:func:`brute_force` enumerates every plan, for tests and tiny cases. Pure functions.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .candidates import KEEP, Candidate, at_least_as_compressed

__all__ = ["Option", "Selection", "TargetUnreachable", "search", "check_reach", "shaped_plans", "lazy_plans", "brute_force",
           "fastest", "infeasible", "excluded_by"]

DEFAULT_BINS = 4000


class TargetUnreachable(UsageError):
    """No choice of candidates meets the latency budget; ``best_speedup`` is what the fastest plan reaches."""

    def __init__(self, message: str, best_speedup: float):
        super().__init__(message)
        self.best_speedup = best_speedup


@dataclass(frozen=True)
class Option:
    candidate: Candidate
    cost: float  # fraction of the baseline network's latency this layer takes with this candidate
    loss: float  # accuracy points lost with only this layer replaced (fidelity loss without labels)
    known: bool = True  # False: ``loss`` is only a lower bound of it, not computed yet (lazy_plans)


@dataclass(frozen=True)
class Selection:
    """One option per layer, with the predicted whole-network cost (``rest`` included) and loss."""

    choice: dict[str, Option]
    cost: float
    loss: float

    @property
    def predicted_speedup(self) -> float:
        return 1.0 / self.cost if self.cost > 0 else math.inf

    def labels(self) -> dict[str, str]:
        return {n: o.candidate.label for n, o in self.choice.items()}


def _check(options: dict[str, list[Option]], rest: float, budget: float) -> None:
    if not options or any(not opts for opts in options.values()):
        raise UsageError("the search needs at least one option for every layer")
    if rest < 0 or budget <= 0:
        raise UsageError(f"rest {rest} must be ≥ 0 and budget {budget} > 0")


def fastest(options: dict[str, list[Option]], rest: float) -> Selection:
    """The lowest-cost plan (ties: the lower loss)."""
    choice = {n: min(opts, key=lambda o: (o.cost, o.loss)) for n, opts in options.items()}
    return Selection(choice, rest + sum(o.cost for o in choice.values()), sum(o.loss for o in choice.values()))


def infeasible(costs: dict[str, list[float]], rest: float, budget: float) -> dict[str, list[int]]:
    """Per layer, the indices of the costs that no plan within ``budget`` can contain: even with every
    other layer at its cheapest option, ``rest + cost + Σ cheapest > budget``. Exact: dropping them
    changes no optimal plan of this budget or of any tighter one, whatever the losses turn out to be,
    so a tune skips their sensitivities (each a decomposition, the costliest part of a fresh tune).
    Nothing is dropped when no plan fits at all: the search then says what the fastest plan reaches."""
    cheapest = {n: min(cs) for n, cs in costs.items() if cs}
    floor = rest + sum(cheapest.values())
    if floor > budget:
        return {}
    return {n: [i for i, c in enumerate(cs) if floor - cheapest[n] + c > budget * (1 + 1e-12)]
            for n, cs in costs.items() if cs}


def _unreachable(options, rest, budget) -> TargetUnreachable:
    best = fastest(options, rest)
    return TargetUnreachable(
        f"no plan reaches a predicted speedup of {1 / budget:g}x; the fastest plan of these candidates "
        f"reaches {best.predicted_speedup:.2f}x ({', '.join(f'{n} {l}' for n, l in best.labels().items())})",
        best.predicted_speedup)


def check_reach(options: dict[str, list[Option]], rest: float, budget: float) -> None:
    """Raise :class:`TargetUnreachable` (naming what the fastest plan reaches) when no plan fits ``budget``."""
    _check(options, rest, budget)
    if budget < rest or fastest(options, rest).cost > budget:
        raise _unreachable(options, rest, budget)


def excluded_by(labels: dict[str, str], exclude: Sequence[dict[str, str]]) -> dict[str, str] | None:
    """The first plan of ``exclude`` that the plan ``labels`` is, or compresses at least as coarsely in every
    layer (:func:`~cpbench.tune.candidates.at_least_as_compressed`; a layer a plan does not name is kept);
    None when there is none."""
    for ex in exclude:
        if all(at_least_as_compressed(labels.get(n, KEEP), ex.get(n, KEEP)) for n in set(labels) | set(ex)):
            return ex
    return None


def search(options: dict[str, list[Option]], rest: float, budget: float, *, bins: int = DEFAULT_BINS,
           exclude: Sequence[dict[str, str]] = (), all_kept: float | None = None) -> Selection:
    """The plan of least total loss with ``rest + Σ cost ≤ budget`` (ties: the lower cost).

    ``exclude``: plans (layer -> label) ruled out together with every plan at least as coarse in every layer
    (:func:`excluded_by`; in a tune, fine-tuned plans that lost far more than the drop allowed). A plan
    escapes one of them by being finer (or of another method) in at least one layer, so the search branches
    on that layer: one search per layer with its options restricted to those, the best of all branches
    (their union is exactly the plans not excluded; they overlap, which does not change the optimum).
    ``k`` exclusions cost at most ``layers ** k`` searches; branches that cannot meet the budget end at once.

    ``all_kept``: the real cost of the plan that keeps every layer, where the keep options' costs are not
    the layers' shares but their costs kept in a compressed network (a tune's ``Prepared.kept``), so that
    they need not add up to the baseline. When that plan is chosen and its real cost is over the budget, the
    search branches on the layer it replaces (one search per layer without its keep option; the best).

    Raises :class:`TargetUnreachable` (naming what the fastest plan reaches) when no plan fits.
    """
    if exclude:
        return _search_outside(options, rest, budget, list(exclude), bins, all_kept)
    check_reach(options, rest, budget)
    sel = _knapsack(options, rest, budget, bins)
    if all_kept is None:
        return sel
    if all(o.candidate.is_keep for o in sel.choice.values()):
        if all_kept > budget:
            return _best_branch(options, rest, budget, bins, None,
                                lambda n, opts: [o for o in opts if not o.candidate.is_keep], "replacing a layer")
        return Selection(sel.choice, all_kept, sel.loss)
    keep = {n: [o for o in opts if o.candidate.is_keep] for n, opts in options.items()}
    if all_kept <= budget and all(keep.values()):
        choice = {n: min(os, key=lambda o: o.loss) for n, os in keep.items()}
        every = Selection(choice, all_kept, sum(o.loss for o in choice.values()))
        if (every.loss, every.cost) < (sel.loss, sel.cost):
            return every
    return sel


def _knapsack(options: dict[str, list[Option]], rest: float, budget: float, bins: int) -> Selection:
    """The dynamic programme of :func:`search`, without exclusions."""
    avail = budget - rest
    step = avail / bins if avail > 0 else 1.0
    # best_*[b]: (loss, real cost) of the best partial plan whose rounded cost is exactly b bins. One
    # numpy pass per option over every b (a Python loop over b took ~1 s per search of ResNet-20's 18
    # layers, and a tune runs hundreds); ties go as in a loop over b then option: the lower (loss, cost),
    # then the smaller b, then the earlier option.
    loss = np.full(bins + 1, math.inf)
    cost = np.full(bins + 1, math.inf)
    loss[0] = cost[0] = 0.0
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for opts in options.values():
        units = [math.ceil(o.cost / step - 1e-9) if avail > 0 else (0 if o.cost <= 0 else bins + 1) for o in opts]
        new_loss, new_cost = np.full(bins + 1, math.inf), np.full(bins + 1, math.inf)
        new_b, new_i = np.full(bins + 1, bins + 1), np.full(bins + 1, -1)
        for i, (o, u) in enumerate(zip(opts, units)):
            if u > bins:
                continue
            n = bins + 1 - u
            cand_loss, cand_cost, src = loss[:n] + o.loss, cost[:n] + o.cost, np.arange(n)
            cur_loss, cur_cost, cur_b = new_loss[u:], new_cost[u:], new_b[u:]
            better = (cand_loss < cur_loss) | ((cand_loss == cur_loss) & (
                (cand_cost < cur_cost) | ((cand_cost == cur_cost) & (src < cur_b))))
            better &= loss[:n] < math.inf
            at = np.nonzero(better)[0]
            new_loss[u + at], new_cost[u + at], new_b[u + at], new_i[u + at] = cand_loss[at], cand_cost[at], at, i
        loss, cost = new_loss, new_cost
        back.append((new_b, new_i))
    reached = np.nonzero(loss < math.inf)[0]
    if not len(reached):
        # each option's cost is rounded up to whole bins, so a budget within a few roundings of the fastest
        # plan's cost can leave no plan inside the bins though that plan fits (check_reach): it is the answer
        # (a tune's verify loop searches at exactly the fastest plan's cost when a target is within its reach)
        return fastest(options, rest)
    b = int(reached[np.lexsort((reached, cost[reached], loss[reached]))[0]])
    names = list(options)
    choice: dict[str, Option] = {}
    for li in range(len(names) - 1, -1, -1):
        prev, i = back[li][0][b], back[li][1][b]
        choice[names[li]] = options[names[li]][int(i)]
        b = int(prev)
    choice = {n: choice[n] for n in names}
    return Selection(choice, rest + sum(o.cost for o in choice.values()), sum(o.loss for o in choice.values()))


def _search_outside(options: dict[str, list[Option]], rest: float, budget: float, exclude: list[dict[str, str]],
                    bins: int, all_kept: float | None) -> Selection:
    """:func:`search` over the plans that :func:`excluded_by` does not rule out (see there)."""
    check_reach(options, rest, budget)
    first, more = exclude[0], exclude[1:]
    return _best_branch(options, rest, budget, bins, all_kept,
                        lambda n, opts: [o for o in opts if not at_least_as_compressed(o.candidate.label, first.get(n, KEEP))],
                        f"without compressing every layer at least as much as an excluded plan ({len(exclude)} excluded)",
                        more)


def _best_branch(options: dict[str, list[Option]], rest: float, budget: float, bins: int, all_kept: float | None,
                 restrict: Callable[[str, list[Option]], list[Option]], what: str,
                 exclude: Sequence[dict[str, str]] = ()) -> Selection:
    """The best of one :func:`search` per layer with that layer's options ``restrict``-ed (a branch whose
    layer keeps none, or that meets no plan within the budget, is skipped)."""
    best: Selection | None = None
    for n, opts in options.items():
        kept = restrict(n, opts)
        if not kept:
            continue
        try:
            sel = search({**options, n: kept}, rest, budget, bins=bins, exclude=exclude, all_kept=all_kept)
        except TargetUnreachable:
            continue
        if best is None or (sel.loss, sel.cost) < (best.loss, best.cost):
            best = sel
    if best is None:
        raise TargetUnreachable(f"no plan reaches a predicted speedup of {1 / budget:g}x {what}",
                                fastest(options, rest).predicted_speedup)
    return best


def shaped_plans(options: dict[str, list[Option]], rest: float, budget: float, exponents=(1.0,), *,
                 bins: int = DEFAULT_BINS, exclude: Sequence[dict[str, str]] = (),
                 all_kept: float | None = None) -> list[tuple[float, Selection]]:
    """:func:`search` with each loss ``l`` taken as ``sign(l) |l|^p``, for each ``p`` of ``exponents``:
    the distinct plans, in the order of ``exponents``, as ``(p, plan)`` with the plan's real losses.

    Summed per-layer losses are a first-order model: how losses compound over many replaced layers is
    not in them. ``p > 1`` makes the search avoid the largest single losses, ``p < 1`` spreads the
    compression over more layers; which is right for a network is a measurement, not a guess (the
    tuner scores every plan with all its layers replaced at once)."""
    out: list[tuple[float, Selection]] = []
    seen: set[tuple] = set()
    for p in exponents:
        shaped = {n: [Option(o.candidate, o.cost, math.copysign(abs(o.loss) ** p, o.loss)) for o in opts]
                  for n, opts in options.items()}
        sel = search(shaped, rest, budget, bins=bins, exclude=exclude, all_kept=all_kept)
        key = tuple(sorted(sel.labels().items()))
        if key in seen:
            continue
        seen.add(key)
        by_label = {n: {o.candidate.label: o for o in opts} for n, opts in options.items()}
        choice = {n: by_label[n][o.candidate.label] for n, o in sel.choice.items()}
        out.append((p, Selection(choice, sel.cost, sum(o.loss for o in choice.values()))))
    return out


def lazy_plans(options: dict[str, list[Option]], rest: float, budget: float,
               resolve: Callable[[dict[str, list[Option]]], dict[str, list[Option]]], exponents=(1.0,), *,
               bins: int = DEFAULT_BINS, exclude: Sequence[dict[str, str]] = (),
               all_kept: float | None = None) -> list[tuple[float, Selection]]:
    """:func:`shaped_plans` over options whose losses are computed only when a search needs them.

    An option with ``known = False`` holds a lower bound of its loss. When a search's plan holds such
    options, ``resolve(pending)`` computes them (the same options, per layer, with their exact losses
    and ``known = True``); they are written into ``options`` in place and the search runs again. A plan
    whose options are all known is optimal for the exact losses as well: every other plan's exact loss
    is at least its loss under the bounds, which is at least this plan's. So the result is
    :func:`shaped_plans`'s with every loss computed, without computing the losses no optimal plan needs
    (in a tune, each is a decomposition: cp-nls fits of the slowest candidates took 172 of the 526 s of
    the character network's sensitivities, and no tuned plan used them). Each round resolves at least
    one option, so the loop ends."""
    while True:
        plans = shaped_plans(options, rest, budget, exponents, bins=bins, exclude=exclude, all_kept=all_kept)
        pending: dict[str, list[Option]] = {}
        for _, sel in plans:
            for n, o in sel.choice.items():
                if not o.known and o not in pending.get(n, []):
                    pending.setdefault(n, []).append(o)
        if not pending:
            return plans
        exact = resolve(pending)
        for n, olds in pending.items():
            for old, new in zip(olds, exact[n], strict=True):
                if not new.known or new.candidate != old.candidate:
                    raise ValueError(f"resolve returned {new!r} for {old!r}: the same candidate, its loss known")
                options[n][options[n].index(old)] = new


def brute_force(options: dict[str, list[Option]], rest: float, budget: float,
                exclude: Sequence[dict[str, str]] = (), all_kept: float | None = None) -> Selection:
    """Every plan enumerated: the least loss within the budget (ties: the lower cost), none that
    :func:`excluded_by` rules out; the plan that keeps every layer costs ``all_kept`` where given."""
    _check(options, rest, budget)
    names = list(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        cost = rest + sum(o.cost for o in combo)
        if all_kept is not None and all(o.candidate.is_keep for o in combo):
            cost = all_kept
        if cost > budget:
            continue
        if excluded_by({n: o.candidate.label for n, o in zip(names, combo)}, exclude) is not None:
            continue
        key = (sum(o.loss for o in combo), cost)
        if best is None or key < best[0]:
            best = (key, combo)
    if best is None:
        raise _unreachable(options, rest, budget)
    (loss, cost), combo = best
    return Selection(dict(zip(names, combo)), cost, loss)
