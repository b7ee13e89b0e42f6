"""Paired, interleaved latency measurement of two callables in one process.

The clock is injected (``clock`` returns seconds), so tests drive this with a fake clock.
Rounds alternate A,B then B,A so slow drift and order effects cancel in the ratio.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .stats import ArmStats, arm_stats, speedup_ci

__all__ = ["TimingBudget", "PairedTiming", "time_pair", "time_one"]


@dataclass(frozen=True)
class TimingBudget:
    """How long to time. Rounds continue past ``min_rounds`` until the CI is tight or the budget ends."""

    warmup: int = 3
    min_rounds: int = 15
    max_rounds: int = 400
    budget_s: float = 6.0
    min_round_s: float = 0.002   # calls per round are batched up to this, above clock resolution
    target_ci_rel: float = 0.02  # stop early once the CI half-width is this fraction of the ratio


@dataclass
class PairedTiming:
    baseline: ArmStats
    compressed: ArmStats
    speedup: float
    speedup_ci: tuple[float, float]
    calls_per_round: tuple[int, int]
    baseline_samples_ms: list[float]
    compressed_samples_ms: list[float]

    @property
    def noisy(self) -> bool:
        return self.baseline.noisy or self.compressed.noisy


def _calibrate(fn: Callable[[], object], clock: Callable[[], float], min_round_s: float) -> int:
    n = 1
    while True:
        t0 = clock()
        for _ in range(n):
            fn()
        dt = clock() - t0
        if dt >= min_round_s or n >= 1 << 16:
            return n
        n = max(n * 2, int(n * min_round_s / max(dt, 1e-9)) + 1) if dt > 0 else n * 2


def _round(fn: Callable[[], object], n: int, clock: Callable[[], float]) -> float:
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n * 1e3


def time_pair(
    baseline: Callable[[], object],
    compressed: Callable[[], object],
    budget: TimingBudget = TimingBudget(),
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTiming:
    """Time two zero-argument callables interleaved; return both arms' stats and the speedup CI."""
    for _ in range(budget.warmup):
        baseline()
        compressed()
    na = _calibrate(baseline, clock, budget.min_round_s)
    nb = _calibrate(compressed, clock, budget.min_round_s)
    a: list[float] = []
    b: list[float] = []
    start = clock()
    while len(a) < budget.max_rounds:
        if len(a) % 2 == 0:
            a.append(_round(baseline, na, clock))
            b.append(_round(compressed, nb, clock))
        else:
            b.append(_round(compressed, nb, clock))
            a.append(_round(baseline, na, clock))
        if len(a) < budget.min_rounds:
            continue
        if clock() - start >= budget.budget_s:
            break
        if len(a) % 10 == 0:
            point, (lo, hi) = speedup_ci(a, b, resamples=500)
            if (hi - lo) / 2 <= budget.target_ci_rel * point:
                break
    point, ci = speedup_ci(a, b)
    return PairedTiming(arm_stats(a), arm_stats(b), point, ci, (na, nb), a, b)


def time_one(
    fn: Callable[[], object],
    budget: TimingBudget = TimingBudget(),
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> ArmStats:
    """Latency stats of a single callable (for per-arm reports such as compile-free runs)."""
    for _ in range(budget.warmup):
        fn()
    n = _calibrate(fn, clock, budget.min_round_s)
    samples: list[float] = []
    start = clock()
    while len(samples) < budget.max_rounds:
        samples.append(_round(fn, n, clock))
        if len(samples) >= budget.min_rounds and clock() - start >= budget.budget_s / 2:
            break
    return arm_stats(samples)
