"""Two-level intervals and timing flags on fake clocks and fake processes: no real time measured."""
from __future__ import annotations

import numpy as np
import pytest

from cpbench.measure.cell_timing import timing_row_fields
from cpbench.measure.intervals import WIDE_REL, flag_labels, row_flags, two_level_interval
from cpbench.measure.noise import summarize
from cpbench.measure.stats import speedup_ci
from cpbench.measure.timing import TimingBudget, time_pair
from cpbench.measure.workers import ProcessRun

from test_stats_timing import FakeClock, arm

BUDGET = TimingBudget(warmup=1, min_rounds=40, max_rounds=40, budget_s=100.0, min_round_s=0.0)


def fake_process(seed: int, *, ratio_shift: float = 1.0, burst: tuple[int, int] | None = None):
    """One 'process' on a fake clock: baseline 2 ms, compressed 1 ms * ratio_shift, 3% round noise.

    ``ratio_shift`` is a process-level effect (this process's memory layout makes the compressed arm
    slower throughout); ``burst`` = (first, last) round in which other load slows the compressed arm
    by half (a neighbour's job landing on our core mid-measurement)."""
    clock = FakeClock()
    rng = np.random.default_rng(seed)
    rounds = {"n": 0}

    def comp_cost():
        slow = 1.5 if burst and burst[0] <= rounds["n"] // 2 < burst[1] else 1.0
        rounds["n"] += 1
        return 0.001 * ratio_shift * slow * (1 + 0.03 * rng.standard_normal())

    pt = time_pair(arm(clock, lambda: 0.002 * (1 + 0.03 * rng.standard_normal())), arm(clock, comp_cost),
                   BUDGET, clock=clock)
    return pt.baseline_samples_ms, pt.compressed_samples_ms


def test_agreeing_processes_give_a_tight_interval_around_the_truth():
    iv = two_level_interval([fake_process(s) for s in range(5)])
    assert iv.ci[0] < 2.0 < iv.ci[1]
    assert iv.half_width_rel < WIDE_REL
    assert not iv.wide and not iv.disagree
    assert len(iv.processes) == 5 and all(p.rounds == 40 for p in iv.processes)


def test_a_process_level_shift_widens_the_interval():
    same = two_level_interval([fake_process(s) for s in range(5)])
    shifts = [1.0, 1.08, 0.93, 1.05, 0.97]  # each process lands its tensors differently
    shifted = [fake_process(s, ratio_shift=f) for s, f in enumerate(shifts)]
    iv = two_level_interval(shifted)
    assert iv.ci[1] - iv.ci[0] > 2.5 * (same.ci[1] - same.ci[0])
    # every process's own speedup lies inside the interval...
    assert all(iv.ci[0] <= p.speedup <= iv.ci[1] for p in iv.processes)
    # ...while pooling the rounds as if one process had measured them all (the old interval) misses some
    pooled = speedup_ci(np.concatenate([a for a, _ in shifted]), np.concatenate([b for _, b in shifted]))[1]
    assert any(not pooled[0] <= p.speedup <= pooled[1] for p in iv.processes)


def test_few_processes_pay_for_estimating_their_spread():
    shifted = [fake_process(s, ratio_shift=f) for s, f in enumerate([1.0, 1.06, 0.95])]
    three = two_level_interval(shifted)
    many = two_level_interval(shifted * 4)  # the same spread seen in 12 processes
    assert (three.ci[1] - three.ci[0]) > 2 * (many.ci[1] - many.ci[0])


def test_a_burst_of_load_during_one_process_is_flagged_disagree():
    procs = [fake_process(s) for s in range(4)] + [fake_process(9, burst=(0, 40))]
    iv = two_level_interval(procs)
    assert iv.disagreeing == [4]
    assert iv.disagree


def test_a_burst_seen_by_the_probe_flags_the_row_busy():
    quiet = [{"t": float(i), "other_runnable": 0, "cpu_jiffies": [i * 100.0, 0, 0, 0, 0, 0, 0, 0]}
             for i in range(5)]
    loaded = [{**s, "other_runnable": 2} for s in quiet]
    procs = [fake_process(s) for s in range(5)]
    runs = [ProcessRun(100 + i, {"m": {"baseline_ms": a, "compressed_ms": b, "calls_per_round": [1, 1]}}, None,
                       summarize(loaded if i == 2 else quiet), 1.0, "process") for i, (a, b) in enumerate(procs)]
    fields = timing_row_fields(two_level_interval(procs), runs, "m")
    assert fields["timing_flags"] == {"wide": False, "busy": True, "disagree": False}
    assert [p["busy"] for p in fields["timing_processes"]] == [False, False, True, False, False]
    assert flag_labels(fields) == ["busy"]


def test_one_process_keeps_its_own_interval():
    a, b = fake_process(0)
    iv = two_level_interval([(a, b)])
    assert iv.ci == pytest.approx(speedup_ci(a, b)[1], rel=0.02)


def test_rows_of_old_runs_keep_their_noisy_flag():
    assert row_flags({"noisy": True}) == {"noisy": True}
    assert flag_labels({"noisy": True}) == ["noisy"]
    assert flag_labels({"noisy": False, "timing_flags": {"wide": True, "busy": False, "disagree": True}}) == [
        "disagree", "wide"]
    assert row_flags({}) == {}


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        two_level_interval([])
    with pytest.raises(ValueError):
        two_level_interval([([1.0, 2.0], [1.0])])


def test_a_row_of_an_unfinished_run_of_passes_is_flagged_partial():
    row = {"timing_flags": {"wide": False, "busy": False, "disagree": False}, "timing_pass": 1, "timing_passes": 5}
    assert flag_labels(row) == ["partial"]
    assert flag_labels({**row, "timing_pass": 5}) == []
    assert flag_labels({"timing_flags": {"busy": True}}) == ["busy"]  # rows without passes: as before
