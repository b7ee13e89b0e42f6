"""Candidates of a tune: per layer, each decomposer over a grid of ranks, plus "leave it as it is".

The grid comes from the decomposers' cost models (``macs``): theoretical layer speedups spaced
geometrically from ``min_speedup`` up to ``max_speedup``, each turned into the largest rank that still
reaches it (exactly what the ``"speedup:X"`` rank spec resolves to). Pure: no decomposition, no timing.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..nn.flops import conv_macs
from ..nn.layers import ConvGeometry
from ..decomposition.ranks import _candidates, _largest

__all__ = ["KEEP", "Candidate", "keep", "speedup_grid", "rank_grid", "layer_candidates", "between", "at_least_as_compressed",
           "dominates"]

KEEP = "keep"  # the method name of "leave the layer as it is"

# Theoretical layer speedups a grid spans by default. Below 1.5 a replacement saves too little to pay
# for its extra layers once measured; above 128 the ranks left (a few per group) lose too much.
MIN_SPEEDUP = 1.5
MAX_SPEEDUP = 128.0
GRID_POINTS = 7
# The layer speedups users compress at (2-6x keeps accuracy without heroic fine-tuning) are in every
# grid that spans them, so a tune can always choose what a uniform "speedup:X" plan does: on ResNet-20
# the 7-point geometric grid alone steps 1.5 -> 3.2 -> 6.7, and at 2x the tuner had nothing between.
OPERATING_POINTS = (2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Candidate:
    """One way to execute one layer: ``method`` at ``rank``, or :data:`KEEP` (``rank`` None)."""

    layer: str
    method: str
    rank: Any
    theoretical_speedup: float = 1.0

    @property
    def is_keep(self) -> bool:
        return self.method == KEEP

    @property
    def label(self) -> str:
        """``"cp-nls:48"``, ``"tucker2:32x16"`` or ``"keep"``."""
        if self.is_keep:
            return KEEP
        r = "x".join(map(str, self.rank)) if isinstance(self.rank, (list, tuple)) else str(self.rank)
        return f"{self.method}:{r}"


def keep(layer: str) -> Candidate:
    return Candidate(layer, KEEP, None, 1.0)


def speedup_grid(min_speedup: float = MIN_SPEEDUP, max_speedup: float = MAX_SPEEDUP,
                 points: int = GRID_POINTS) -> list[float]:
    """``points`` theoretical speedups, geometric from ``min_speedup`` to ``max_speedup`` inclusive, and
    the :data:`OPERATING_POINTS` between them (sorted)."""
    if not (1 < min_speedup <= max_speedup) or points < 1:
        raise UsageError(f"speedup grid {min_speedup}..{max_speedup} with {points} points is not allowed; "
                         "allowed: 1 < min ≤ max, points ≥ 1")
    if points == 1:
        geometric = [float(min_speedup)]
    else:
        step = (max_speedup / min_speedup) ** (1 / (points - 1))
        geometric = [min_speedup * step ** i for i in range(points)]
    extra = [p for p in OPERATING_POINTS if min_speedup < p < max_speedup
             and all(abs(math.log(p / g)) > 0.05 for g in geometric)]  # not a near-duplicate of a grid point
    return sorted(geometric + extra)


def _hashable(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, list) else rank


def rank_grid(decomposer: Any, weight_shape: tuple[int, ...], geo: ConvGeometry, in_hw: tuple[int, int],
              speedups: list[float], options: dict | None = None) -> list[tuple[Any, float]]:
    """``[(rank, theoretical layer speedup)]``: for each speedup of ``speedups`` the largest rank whose
    theoretical speedup reaches it; duplicates dropped, highest rank first. Empty when the decomposer
    has no cost model or no rank reaches ``speedups[0]``."""
    if not hasattr(decomposer, "macs"):
        return []
    base = conv_macs(geo, in_hw)
    form = (options or {}).get("form")
    kw = {"form": form} if form else {}
    cands = _candidates(decomposer, weight_shape, geo.groups, options or {})
    theo = {}

    def speedup(rank) -> float:
        key = _hashable(rank)
        if key not in theo:
            theo[key] = base / max(decomposer.macs(geo, rank, in_hw, **kw), 1)
        return theo[key]

    def reaches(s: float) -> Callable[[Any], bool]:
        return lambda c: speedup(c) >= s

    out: dict[Any, float] = {}
    for s in speedups:
        r = _largest(cands, reaches(s))
        if r is not None and _hashable(r) not in out:
            out[_hashable(r)] = speedup(r)
    ranked = sorted(out.items(), key=lambda kv: kv[1])
    return [(list(r) if isinstance(r, tuple) else r, s) for r, s in ranked]


def layer_candidates(layer: str, decomposers: list[Any], weight_shape: tuple[int, ...], geo: ConvGeometry,
                     in_hw: tuple[int, int], speedups: list[float],
                     options: dict[str, dict] | None = None) -> list[Candidate]:
    """Every candidate of one layer: :func:`keep`, then each decomposer's grid (lowest speedup first)."""
    out = [keep(layer)]
    for dec in decomposers:
        for rank, s in rank_grid(dec, weight_shape, geo, in_hw, speedups, (options or {}).get(dec.name)):
            if math.isfinite(s):
                out.append(Candidate(layer, dec.name, rank, s))
    return out


def between(held: Candidate, lost: Candidate, decomposers: dict[str, Any], weight_shape: tuple[int, ...],
            geo: ConvGeometry, in_hw: tuple[int, int]) -> list[Candidate]:
    """Candidates of one layer midway between the choice of a plan that held the accuracy drop
    (``held``) and the choice of a faster one that lost it (``lost``): for the method of each of the two
    that is not :func:`keep`, the rank at the geometric mean of their theoretical speedups (keep: 1),
    when it lies strictly between them. ``decomposers``: by name. A grid spaced for the whole span of
    speedups is coarse where a tune's answer lies: the character network's conv2 had cp-nls ranks 66
    and 27 and nothing between, so a plan that held 1 point at 10.1x and one that lost it at 11.3x left
    nothing to search between them."""
    lo, hi = sorted((held.theoretical_speedup, lost.theoretical_speedup))
    if hi / lo < 1.05:
        return []
    mid = math.sqrt(lo * hi)
    out: list[Candidate] = []
    for method in dict.fromkeys(c.method for c in (held, lost) if not c.is_keep):
        for rank, s in rank_grid(decomposers[method], weight_shape, geo, in_hw, [mid]):
            c = Candidate(held.layer, method, rank, s)
            if lo < s < hi and c.label not in (held.label, lost.label):
                out.append(c)
    return out


def _parsed(label: str) -> tuple[str, tuple[int, ...]] | None:
    """``"tucker2:32x16"`` as ``("tucker2", (32, 16))``; None for :data:`KEEP`."""
    if label == KEEP:
        return None
    method, _, rank = label.rpartition(":")
    return method, tuple(int(r) for r in rank.split("x"))


def at_least_as_compressed(label: str, than: str) -> bool:
    """Whether the layer choice ``label`` replaces a layer at least as coarsely as ``than``: anything against
    :data:`KEEP`; the same method at ranks no higher in every mode. Choices of two methods are not ordered
    (a cp-nls rank and a tucker2 rank measure different things)."""
    a, b = _parsed(label), _parsed(than)
    if b is None:
        return True
    if a is None or a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(x <= y for x, y in zip(a[1], b[1]))


def dominates(plan: dict[str, str], other: dict[str, str]) -> bool:
    """Whether ``plan`` (layer -> label; a layer it does not name is kept) compresses every layer at least as
    coarsely as ``other`` does (:func:`at_least_as_compressed`) and is not ``other``. A fine-tuned network
    loses at least about what one of coarser ranks everywhere loses: lower ranks fit every layer worse,
    and fine-tuning starts from there with fewer parameters to recover with."""
    names = set(plan) | set(other)
    if all(plan.get(n, KEEP) == other.get(n, KEEP) for n in names):
        return False
    return all(at_least_as_compressed(plan.get(n, KEEP), other.get(n, KEEP)) for n in names)
