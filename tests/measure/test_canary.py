"""The host-contention canary: the reference, and workers timed in an episode set aside or marked busy."""
from __future__ import annotations

import pytest
import torch

from cpbench.measure import workers
from cpbench.measure.canary import CONTENDED_RATIO, CanaryReference, canary_ms, contention_now
from cpbench.measure.timing import TimingBudget
from cpbench.measure.workers import CONTENDED_WAIT_S, PairSpec, time_in_processes
from cpbench.plugin.manager import get_plugins

TINY = TimingBudget(warmup=1, min_rounds=5, max_rounds=20, budget_s=0.2, min_round_s=0.0005)


def test_the_canary_times_a_gemm():
    ms = canary_ms(samples=3)
    assert 0 < ms < 1000


def test_the_reference_is_a_low_quantile_of_a_window_that_persists(tmp_path):
    path = tmp_path / "machine" / "canary.json"
    ref = CanaryReference(path, "host")
    ref.add(1, [1.0] * 8 + [1.6] * 2)  # a fifth of the canaries in an episode leaves the level quiet
    assert ref.level(1) == 1.0 and ref.ratio(1, 1.3) == pytest.approx(1.3)
    assert ref.level(2) is None and ref.ratio(2, 1.0) is None  # per thread count
    again = CanaryReference(path, "host")
    assert again.level(1) == 1.0
    assert CanaryReference(path, "another host").level(1) is None
    ref.add(1, [2.0] * 400)  # a window: a move to a slower host is learnt
    assert CanaryReference(path, "host").level(1) == 2.0
    path.write_text("{not json")
    assert CanaryReference(path, "host").level(1) is None  # unreadable: a new window, no traceback


class FakeServer:
    """Answers each worker request with fake rounds and the next canary pair of ``canaries``."""

    def __init__(self, canaries):
        self.canaries, self.calls = list(canaries), 0

    def run(self, payload, cores):
        c = self.canaries[min(self.calls, len(self.canaries) - 1)]
        self.calls += 1
        return {"pid": 1000 + self.calls, "pairs": {"m": {"baseline_ms": [2.0] * 5, "compressed_ms": [1.0] * 5,
                                                          "calls_per_round": [1, 1]}},
                "cores": None, "seconds": 0.1, "canary_ms": [c, c]}


class QuietSampler:
    def __init__(self, **kw):
        self.samples = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _time(monkeypatch, tmp_path, canaries, processes=3, retries=2):
    server = FakeServer(canaries)
    monkeypatch.setattr(workers, "_server", lambda: server)
    ref = CanaryReference(tmp_path / "c.json", "k")
    ref.add(1, [1.0] * 20)
    sleeps = []
    conv = torch.nn.Conv2d(4, 4, 3).eval()
    runs = time_in_processes(get_plugins().backends.get("torch-cpu"), [PairSpec("m", conv, conv, torch.randn(1, 4, 6, 6), TINY)],
                             threads=1, processes=processes, sampler=QuietSampler, canary_reference=ref, sleep=sleeps.append,
                             contended_retries=retries)
    return runs, sleeps, server


def test_a_worker_timed_in_a_contention_episode_is_set_aside_and_another_timed(monkeypatch, tmp_path):
    runs, sleeps, server = _time(monkeypatch, tmp_path, [1.0, 1.5, 1.0, 1.0])
    assert server.calls == 4 and len(runs) == 3 and sleeps == [CONTENDED_WAIT_S]
    assert [r.pid for r in runs] == [1001, 1003, 1004]
    assert all(not r.noise.get("busy") and r.noise["canary_ratio"] == pytest.approx(1.0) for r in runs)
    assert runs[-1].noise["contended_set_aside"][0]["pid"] == 1002


def test_contention_that_outlasts_the_retries_is_kept_and_marked_busy(monkeypatch, tmp_path):
    runs, sleeps, server = _time(monkeypatch, tmp_path, [1.5])
    assert len(sleeps) == 2 and len(runs) == 3
    assert all(r.noise["busy"] and r.noise["canary_ratio"] > CONTENDED_RATIO for r in runs)
    assert any("host contention" in reason for reason in runs[0].noise["reasons"])


def test_real_workers_report_their_canary():
    conv = torch.nn.Conv2d(4, 4, 3).eval()
    runs = time_in_processes(get_plugins().backends.get("torch-cpu"), [PairSpec("m", conv, conv, torch.randn(1, 4, 6, 6), TINY)],
                             threads=1, processes=1, canary_reference=CanaryReference())
    assert len(runs[0].noise["canary_ms"]) == 2 and runs[0].noise["canary_ratio"] is not None


@pytest.fixture(autouse=True)
def _no_standing_contention():
    workers._STANDING.clear()
    yield
    workers._STANDING.clear()


def test_standing_contention_stops_the_retries_until_a_quiet_process(monkeypatch, tmp_path):
    _, sleeps, _ = _time(monkeypatch, tmp_path, [1.5])  # retries run out: a standing state, not an episode
    assert len(sleeps) == 2 and 1 in workers._STANDING
    runs, sleeps, server = _time(monkeypatch, tmp_path, [1.5])  # the next cell keeps its processes at once
    assert sleeps == [] and server.calls == 3
    assert all(r.noise["busy"] and r.noise["contention_standing"] for r in runs)
    runs, sleeps, _ = _time(monkeypatch, tmp_path, [1.5, 1.0, 1.0])  # a quiet process ends the state
    assert sleeps == [] and 1 not in workers._STANDING
    assert [bool(r.noise.get("busy")) for r in runs] == [True, False, False]
    _, sleeps, _ = _time(monkeypatch, tmp_path, [1.5, 1.0, 1.0, 1.0])  # and episodes are set aside again
    assert sleeps == [CONTENDED_WAIT_S]


def test_contention_now_times_at_the_asked_threads_and_joins_the_window():
    ref, before = CanaryReference(), torch.get_num_threads()
    first = contention_now(1, ref=ref, samples=1)
    assert first["canary_ratio"] is None and first["window"] == 0 and first["canary_ms"] > 0
    second = contention_now(1, ref=ref, samples=1)
    assert second["window"] == 1 and second["canary_ratio"] == pytest.approx(second["canary_ms"] / first["canary_ms"])
    assert torch.get_num_threads() == before


def test_by_default_a_contended_process_is_kept_at_once_and_flags_the_row(monkeypatch, tmp_path):
    runs, sleeps, server = _time(monkeypatch, tmp_path, [1.0, 1.5, 1.0], retries=None)
    assert workers.CONTENDED_RETRIES == 0 and sleeps == [] and server.calls == 3
    assert [bool(r.noise.get("busy")) for r in runs] == [False, True, False]
    assert "contended_set_aside" not in runs[-1].noise


def test_the_matrix_sets_the_retries_and_rejects_bad_ones(monkeypatch, tmp_path):
    from cpbench.errors import CpbenchError
    from cpbench.measure import cell_timing
    from cpbench.run.matrix import parse_matrix

    seen = {}
    monkeypatch.setattr(cell_timing, "time_in_processes", lambda *a, **kw: seen.update(kw) or [])
    cell_timing.measure_pairs(get_plugins().backends.get("torch-cpu"), [], threads=1, processes=3, contended_retries=2)
    assert seen["contended_retries"] == 2
    def matrix(retries):
        return {"matrix": {"model": ["charnet"], "decomposer": ["cp-nls"], "rank": [4]}, "timing": {"contended_retries": retries}}

    assert parse_matrix(matrix(3)).timing["contended_retries"] == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(CpbenchError, match="contended_retries must be a whole number >= 0"):
            parse_matrix(matrix(bad))
