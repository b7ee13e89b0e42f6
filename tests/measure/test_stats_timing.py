"""cpbench.measure.stats and cpbench.measure.timing on a fake clock: exact, fast, no real time measured."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cpbench.measure.stats import NOISY_IQR_RATIO, arm_stats, speedup_ci
from cpbench.measure.timing import TimingBudget, time_one, time_pair


class FakeClock:
    """A clock that only moves when the code under test 'runs' something."""

    def __init__(self):
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def arm(clock: FakeClock, cost_s, *, slowdown=lambda t: 1.0):
    """A callable that costs ``cost_s`` (or ``cost_s()``) times the drift factor at the current time."""
    def fn():
        c = cost_s() if callable(cost_s) else cost_s
        clock.advance(c * slowdown(clock.now))
    return fn


BUDGET = TimingBudget(warmup=2, min_rounds=15, max_rounds=200, budget_s=5.0, min_round_s=0.002,
                      target_ci_rel=0.02)


def test_speedup_two_on_fake_clock():
    clock = FakeClock()
    pt = time_pair(arm(clock, 0.002), arm(clock, 0.001), BUDGET, clock=clock)
    assert pt.speedup == pytest.approx(2.0)
    lo, hi = pt.speedup_ci
    assert lo <= 2.0 <= hi
    assert pt.baseline.median_ms == pytest.approx(2.0)
    assert pt.compressed.median_ms == pytest.approx(1.0)
    assert pt.calls_per_round == (1, 2)  # each round batched up to min_round_s
    assert not pt.noisy
    assert len(pt.baseline_samples_ms) == len(pt.compressed_samples_ms) >= BUDGET.min_rounds


def test_noisy_costs_ci_contains_truth():
    clock = FakeClock()
    rng = np.random.default_rng(0)
    pt = time_pair(arm(clock, lambda: 0.002 * (1 + 0.05 * rng.standard_normal())),
                   arm(clock, lambda: 0.001 * (1 + 0.05 * rng.standard_normal())),
                   TimingBudget(warmup=1, min_rounds=40, max_rounds=80, budget_s=10.0, min_round_s=0.0),
                   clock=clock)
    lo, hi = pt.speedup_ci
    assert lo < 2.0 < hi
    assert hi - lo < 0.2


def test_drift_hitting_both_arms_cancels():
    clock = FakeClock()
    drift = lambda t: 1.0 + 2.0 * t  # the machine gets 3x slower over the run  # noqa: E731
    budget = TimingBudget(warmup=0, min_rounds=30, max_rounds=30, budget_s=100.0, min_round_s=0.0)
    pt = time_pair(arm(clock, 0.02, slowdown=drift), arm(clock, 0.01, slowdown=drift), budget, clock=clock)
    # each arm's latency drifts a lot...
    assert max(pt.baseline_samples_ms) / min(pt.baseline_samples_ms) > 1.5
    # ...but the paired, alternating ratio stays at 2 (within the drift over one round)
    assert pt.speedup == pytest.approx(2.0, rel=0.02)
    assert pt.speedup_ci[0] <= 2.0 * 1.02 and pt.speedup_ci[1] >= 2.0 * 0.98


def test_budget_stops_rounds():
    clock = FakeClock()
    budget = TimingBudget(warmup=0, min_rounds=5, max_rounds=10_000, budget_s=1.0, min_round_s=0.0,
                          target_ci_rel=0.0)
    pt = time_pair(arm(clock, 0.05), arm(clock, 0.05), budget, clock=clock)
    assert 5 <= pt.baseline.rounds <= 12  # ~0.1 s per round pair, stops once 1 s is spent


def test_time_one_fake_clock():
    clock = FakeClock()
    st = time_one(arm(clock, 0.003), BUDGET, clock=clock)
    assert st.median_ms == pytest.approx(3.0)
    assert st.rounds >= BUDGET.min_rounds


def test_arm_stats_and_noisy_flag():
    quiet = arm_stats([10.0, 10.1, 9.9, 10.0, 10.05])
    assert quiet.median_ms == pytest.approx(10.0)
    assert not quiet.noisy
    noisy = arm_stats([10, 8, 12, 9, 11, 7, 13])
    assert noisy.iqr_ms / noisy.median_ms > NOISY_IQR_RATIO
    assert noisy.noisy
    assert noisy.as_dict()["noisy"] is True
    # exactly at the threshold is not noisy; just above is
    assert not arm_stats([9.5, 9.5, 10.0, 10.5, 10.5]).noisy  # IQR 1.0 / 10 = 0.10
    assert arm_stats([9.4, 9.4, 10.0, 10.6, 10.6]).noisy
    with pytest.raises(ValueError):
        arm_stats([])


def test_speedup_ci_basics():
    point, (lo, hi) = speedup_ci([2.0] * 10, [1.0] * 10)
    assert point == 2.0 and lo == hi == 2.0
    point, ci = speedup_ci([4.0], [2.0])
    assert point == 2.0 and ci == (2.0, 2.0)
    a = [2.0, 2.2, 1.9, 2.1, 2.05, 1.95, 2.3, 2.0]
    b = [1.0, 1.1, 0.95, 1.05, 1.0, 0.98, 1.2, 1.01]
    p1, ci1 = speedup_ci(a, b, seed=3)
    p2, ci2 = speedup_ci(a, b, seed=3)
    assert (p1, ci1) == (p2, ci2)  # seeded: reproducible
    assert ci1[0] <= p1 <= ci1[1]
    assert math.isclose(p1, np.median(a) / np.median(b))


def test_speedup_ci_paired_length_error():
    with pytest.raises(ValueError, match="paired"):
        speedup_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        speedup_ci([], [])


def _ar1_runs(seed: int, n: int = 60, phi: float = 0.9):
    """Paired rounds whose compressed arm drifts with AR(1) load (true speedup 2.0)."""
    r = np.random.default_rng(seed)
    e = np.zeros(n)
    for i in range(1, n):
        e[i] = phi * e[i - 1] + r.normal(0, 0.03)
    return 2.0 * (1 + r.normal(0, 0.01, n)), (1 + e) * (1 + r.normal(0, 0.01, n))


def _coverage(block, phi):
    hits = 0
    for s in range(120):
        a, b = _ar1_runs(s, phi=phi)
        _, (lo, hi) = speedup_ci(a, b, block=block, resamples=500)
        hits += lo <= 2.0 <= hi
    return hits / 120


def test_block_bootstrap_covers_autocorrelated_drift_better():
    """Load that lasts many rounds: the i.i.d. bootstrap's interval misses the truth far more often."""
    assert _coverage(None, 0.9) >= _coverage(1, 0.9) + 0.1
    # and with independent rounds it keeps its nominal coverage
    assert _coverage(None, 0.0) >= 0.85


def test_block_length():
    from cpbench.measure.stats import block_length

    assert [block_length(n) for n in (1, 2, 3, 16, 60, 400)] == [1, 1, 2, 4, 8, 20]


def test_speedup_across_passes():
    from cpbench.measure.stats import speedup_across_passes

    point, (lo, hi) = speedup_across_passes([2.0, 2.0, 2.0])
    assert point == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    point, (lo, hi) = speedup_across_passes([1.9, 2.0, 2.1, 2.0])
    assert point == pytest.approx(math.exp(np.mean(np.log([1.9, 2.0, 2.1, 2.0]))))
    assert lo < 1.9 < 2.1 < hi  # t with 3 degrees of freedom: wider than the passes' range here
    _, ci99 = speedup_across_passes([1.9, 2.0, 2.1, 2.0], confidence=0.99)
    assert ci99[0] < lo and ci99[1] > hi
    with pytest.raises(ValueError, match="at least 2"):
        speedup_across_passes([2.0])
    with pytest.raises(ValueError, match="positive"):
        speedup_across_passes([2.0, 0.0])


def test_passes_interval_covers_run_to_run_shifts():
    """Each pass shifted by a random per-pass effect (load, memory placement): the t-interval over
    passes covers the truth at about its nominal rate; one pass's bootstrap interval does not."""
    from cpbench.measure.stats import speedup_across_passes

    rng = np.random.default_rng(7)
    hits_passes = hits_within = 0
    trials = 150
    for _ in range(trials):
        a_all, b_all, ratios = [], [], []
        for _ in range(4):
            shift = rng.normal(0, 0.03)
            a = 2.0 * (1 + rng.normal(0, 0.01, 30))
            b = (1 + shift) * (1 + rng.normal(0, 0.01, 30))
            ratios.append(np.median(a) / np.median(b))
            a_all.append(a)
            b_all.append(b)
        _, (lo, hi) = speedup_across_passes(ratios)
        hits_passes += lo <= 2.0 <= hi
        _, (lo, hi) = speedup_ci(a_all[0], b_all[0], resamples=300)
        hits_within += lo <= 2.0 <= hi
    assert hits_passes / trials >= 0.88
    assert hits_within / trials <= 0.6
