"""The machine-noise probe on fake snapshots and clocks, and one real probe of this machine."""
from __future__ import annotations

import pytest

from cpbench.measure.noise import (
    BUSY_OTHER_RUNNABLE,
    BUSY_STEAL,
    NoiseSampler,
    format_machine_report,
    machine_report,
    snapshot,
    summarize,
    verdict,
    wait_for_quiet,
)


def snap(t: float, others: int, steal_jiffies: float = 0.0, busy_jiffies: float = 100.0, freq=None, max_freq=None):
    # jiffies: user nice system idle iowait irq softirq steal
    return {"t": t, "other_runnable": others, "cpu_jiffies": [t * busy_jiffies, 0, 0, 0, 0, 0, 0, t * steal_jiffies],
            "freq_mhz": freq, "max_freq_mhz": max_freq, "load_average": [0.1, 0.1, 0.1], "governor": None}


def test_quiet_machine():
    s = summarize([snap(t, 0) for t in range(5)])
    assert not s["busy"] and s["reasons"] == [] and verdict(s) == "quiet"
    assert s["steal"] == 0.0 and s["other_runnable_mean"] == 0


def test_other_runnable_threads_make_it_busy():
    s = summarize([snap(t, 2 if t % 2 else 0) for t in range(6)])  # another job runnable half the time
    assert s["other_runnable_mean"] == pytest.approx(1.0) and 1.0 >= BUSY_OTHER_RUNNABLE
    assert s["busy"] and verdict(s).startswith("busy: 1.0 other runnable")


def test_steal_time_makes_it_busy():
    s = summarize([snap(t, 0, steal_jiffies=10.0, busy_jiffies=90.0) for t in range(4)])
    assert s["steal"] == pytest.approx(0.10) and 0.10 >= BUSY_STEAL
    assert s["busy"] and "10% steal" in verdict(s)


def test_a_slowed_clock_makes_it_busy():
    s = summarize([snap(t, 0, freq=1800.0, max_freq=3000.0) for t in range(3)])
    assert s["freq_ratio_min"] == pytest.approx(0.6)
    assert s["busy"] and "60% of its maximum frequency" in verdict(s)


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_wait_for_quiet_returns_once_the_load_is_gone():
    ft = FakeTime()
    probe = lambda own_threads=0: snap(ft.now, 3 if ft.now < 5 else 0)  # noqa: E731  a job that ends at t=5 s
    out = wait_for_quiet(60, probe=probe, sleep=ft.sleep, clock=ft.clock, window_s=2.0)
    assert out["quiet"] and 5 <= out["waited_s"] <= 10


def test_wait_for_quiet_gives_up_and_says_so():
    ft = FakeTime()
    probe = lambda own_threads=0: snap(ft.now, 3)  # noqa: E731
    out = wait_for_quiet(6, probe=probe, sleep=ft.sleep, clock=ft.clock, window_s=2.0)
    assert not out["quiet"] and 6 <= out["waited_s"] <= 8.5
    assert out["last"]["busy"]


def test_sampler_takes_samples_before_during_and_after():
    calls = []
    probe = lambda own_threads=0: calls.append(own_threads) or snap(len(calls), 0)  # noqa: E731
    with NoiseSampler(own_threads=2, interval_s=0.01, probe=probe) as s:
        pass
    assert len(s.samples) >= 2 and set(calls) == {2}


def test_the_real_probe_reads_this_machine():
    s = snapshot(names=True)
    assert s["procs_running"] is None or s["procs_running"] >= 1
    assert s["other_runnable"] is None or s["other_runnable"] >= 0
    assert isinstance(s["other_processes"], list)
    report = machine_report(window_s=0.3)
    assert report["verdict"] == "quiet" or report["verdict"].startswith("busy: ")
    assert report["facts"]["cores_allowed"]


def test_host_contention_makes_a_quiet_guest_busy():
    host = lambda: {"threads": 1, "canary_ms": 0.40, "reference_ms": 0.30, "window": 200, "canary_ratio": 4 / 3}  # noqa: E731
    report = machine_report(window_s=0.1, host=host)
    assert report["verdict"].endswith("host contention: the reference GEMM ran 1.33x its quiet time")
    assert any("other tenants" in a for a in report["advice"])
    assert "1.33x its quiet level (0.300 ms, from 200 past canaries)" in format_machine_report(report)


def test_no_quiet_level_yet_says_so_and_stays_quiet():
    host = lambda: {"threads": 1, "canary_ms": 0.31, "reference_ms": None, "window": 0, "canary_ratio": None}  # noqa: E731
    report = machine_report(window_s=0.1, host=host)
    assert "host contention" not in report["verdict"]
    assert "no quiet level learned yet" in format_machine_report(report)


def test_wait_for_quiet_waits_out_host_contention():
    ft = FakeTime()
    probe = lambda own_threads=0: snap(ft.now, 0)  # noqa: E731  an idle guest ...
    ratios = iter([1.4, 1.3, 1.0])  # ... on a host whose contention ends at the third window
    out = wait_for_quiet(60, probe=probe, sleep=ft.sleep, clock=ft.clock, window_s=2.0, canary=lambda: next(ratios))
    assert out["quiet"] and 4 <= out["waited_s"] <= 7 and out["last"]["canary_ratio"] == 1.0
    ft = FakeTime()
    out = wait_for_quiet(3, probe=probe, sleep=ft.sleep, clock=ft.clock, window_s=2.0, canary=lambda: 1.4)
    assert not out["quiet"] and out["last"]["reasons"] == ["host contention: the reference GEMM ran 1.40x its quiet time"]
