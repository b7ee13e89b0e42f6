"""The latency table: injected timer, cached per machine/backend/threads/shape/candidate."""
import pytest
import torch
from torch import nn

from cpbench.tune.candidates import Candidate, keep
from cpbench.tune.latency import (CALIBRATION_BOUNDS, LatencyTable, Timed, calibrated, predicted_cost,
                                  savings_calibration)

MACHINE = {"cpu_model": "fake", "logical_cores": 2}


class CountingTimer:
    """Speedup = reference parameter count / candidate parameter count; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, ref, cand, x_ref, x_cand):
        self.calls += 1
        def n(m):
            return sum(p.numel() for p in m.parameters())
        return Timed(n(ref) / n(cand), (0.9 * n(ref) / n(cand), 1.1 * n(ref) / n(cand)), float(n(ref)), float(n(cand)))


def _table(tmp_path, timer, **kw):
    return LatencyTable.for_run(tmp_path, backend=kw.get("backend", "mkl"), threads=kw.get("threads", 1),
                                timer=timer, machine=kw.get("machine", MACHINE))


def _cands():
    return [Candidate("conv", "m", r, 2.0) for r in (2, 4, 8)]


def test_second_table_times_nothing(tmp_path):
    conv = nn.Conv2d(8, 16, 3)
    build = {c.rank: (lambda r=c.rank: nn.Conv2d(8, r, 1)) for c in _cands()}
    t1 = CountingTimer()
    first = [_table(tmp_path, t1).layer_speedup(c, conv, (1, 8, 10, 10), build[c.rank]) for c in _cands()]
    assert t1.calls == 3
    t2 = CountingTimer()
    table = _table(tmp_path, t2)
    again = [table.layer_speedup(c, conv, (1, 8, 10, 10), build[c.rank]) for c in _cands()]
    assert t2.calls == 0 and table.timed == 0
    assert again == first


@pytest.mark.parametrize("change", [{"backend": "channels-last"}, {"threads": 2},
                                    {"machine": {"cpu_model": "other", "logical_cores": 2}}])
def test_other_context_is_timed_afresh(tmp_path, change):
    conv = nn.Conv2d(8, 16, 3)
    c = _cands()[0]
    _table(tmp_path, CountingTimer()).layer_speedup(c, conv, (1, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    t = CountingTimer()
    _table(tmp_path, t, **change).layer_speedup(c, conv, (1, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    assert t.calls == 1


def test_batch_shape_and_rank_are_part_of_the_key(tmp_path):
    conv = nn.Conv2d(8, 16, 3)
    t = CountingTimer()
    table = _table(tmp_path, t)
    c2, c4 = _cands()[:2]
    table.layer_speedup(c2, conv, (1, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    table.layer_speedup(c2, conv, (32, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    table.layer_speedup(c4, conv, (1, 8, 10, 10), lambda: nn.Conv2d(8, 4, 1))
    table.layer_speedup(c2, nn.Conv2d(8, 16, 5), (1, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    assert t.calls == 4
    # same geometry, another layer name and other weights: shared
    table.layer_speedup(Candidate("other", "m", 2), nn.Conv2d(8, 16, 3), (1, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    assert t.calls == 4


def test_keep_is_never_timed(tmp_path):
    t = CountingTimer()
    got = _table(tmp_path, t).layer_speedup(keep("conv"), nn.Conv2d(8, 16, 3), (1, 8, 10, 10), lambda: None)
    assert got.speedup == 1.0 and t.calls == 0


def test_network_ratio_cached(tmp_path):
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    def smaller():
        return nn.Sequential(nn.Identity(), nn.Conv2d(16, 16, 3))
    t = CountingTimer()
    got = _table(tmp_path, t).network_ratio("net", "without 0", net, smaller, (1, 8, 10, 10))
    assert got.speedup == pytest.approx(sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in smaller().parameters()))
    t2 = CountingTimer()
    assert _table(tmp_path, t2).network_ratio("net", "without 0", net, smaller, (1, 8, 10, 10)) == got
    assert t2.calls == 0
    _table(tmp_path, t2).network_ratio("net", "without 1", net, smaller, (1, 8, 10, 10))
    _table(tmp_path, t2).network_ratio("net", "without 0", net, smaller, (32, 8, 10, 10))
    assert t2.calls == 2


def test_a_recorded_timing_is_the_first_one_on_every_later_run(tmp_path):
    """A fine-tuned plan's timing is taken by the cell's stages, not by the table; the table keeps the first
    so a repeated tune's drop rounds decide on the numbers its first run did."""
    from cpbench.tune.latency import plan_variant

    first, later = Timed(8.5, (8.0, 9.0), 10.0, 1.18), Timed(10.3, (9.2, 11.2), 10.0, 0.97)
    variant = plan_variant({"conv2": "cp-nls:66", "conv1": "cp-nls:42"}, "fine-tuned plan")
    assert variant == "fine-tuned plan conv1=cp-nls:42,conv2=cp-nls:66"  # sorted: the same plan, one name
    assert _table(tmp_path, CountingTimer()).recorded("net", variant, (1, 1, 24, 24), first) == first
    again = _table(tmp_path, CountingTimer())
    assert again.recorded("net", variant, (1, 1, 24, 24), later) == first
    assert again.recorded("net", variant, (32, 1, 24, 24), later) == later  # another batch: its own record
    assert again.timed == 0  # recording is not timing


def test_without_a_cache_root_nothing_is_written(tmp_path):
    t = CountingTimer()
    table = LatencyTable.for_run(None, backend="mkl", threads=1, timer=t, machine=MACHINE)
    table.layer_speedup(_cands()[0], nn.Conv2d(8, 16, 3), (1, 8, 10, 10), lambda: nn.Conv2d(8, 2, 1))
    assert t.calls == 1 and not any(tmp_path.iterdir())


def test_predicted_cost():
    shares = {"a": 0.6, "b": 0.3}
    assert predicted_cost(0.1, shares, {}) == pytest.approx(1.0)
    assert predicted_cost(0.1, shares, {"a": 6.0, "b": 3.0}) == pytest.approx(0.1 + 0.1 + 0.1)


def test_calibration_makes_the_fastest_plan_its_measurement_and_keeps_the_baseline():
    rest, shares, fastest = 0.1, {"a": 0.6, "b": 0.3}, {"a": 6.0, "b": 3.0}
    predicted = predicted_cost(rest, shares, fastest)  # 0.3
    k = savings_calibration(predicted, 0.44)  # in place the layers save 0.56 of the 0.7 predicted
    assert k == pytest.approx(0.8)
    assert predicted_cost(rest, shares, fastest, k) == pytest.approx(0.44)
    assert predicted_cost(rest, shares, {}, k) == pytest.approx(1.0)  # nothing replaced: the baseline
    # a plan in between: each layer's saving scaled alike
    assert predicted_cost(rest, shares, {"a": 2.0}, k) == pytest.approx(0.1 + (0.6 - 0.8 * 0.3) + 0.3)
    assert calibrated(0.3, 0.1, 1.2) == pytest.approx(0.3 - 1.2 * 0.2)
    assert calibrated(0.3, 0.05, 2.0) == 0.0  # never a negative cost


def test_a_kept_layer_costs_what_it_costs_beside_compressed_ones_and_the_refit_leaves_that_alone():
    rest, shares, kept = 0.1, {"a": 0.6, "b": 0.3}, {"a": 0.2}  # "a" kept beside a compressed "b": 0.2, not 0.6
    assert predicted_cost(rest, shares, {}, 1.0, kept) == pytest.approx(1.0)  # nothing replaced: the baseline
    assert predicted_cost(rest, shares, {"b": 3.0}, 1.0, kept) == pytest.approx(0.1 + 0.2 + 0.1)
    assert predicted_cost(rest, shares, {"b": 3.0}, 0.0, kept) == pytest.approx(0.1 + 0.2 + 0.3)  # before savings
    # a measured 0.36 refits only the replaced layer's saving: 0.3 - k * 0.2 = 0.36 - 0.3
    k = savings_calibration(0.4, 0.36, unscaled=0.6)
    assert k == pytest.approx(1.2)
    assert predicted_cost(rest, shares, {"b": 3.0}, k, kept) == pytest.approx(0.36)
    assert predicted_cost(rest, shares, {"a": 6.0, "b": 3.0}, k, kept) == pytest.approx(0.1 + 0.6 - 1.2 * 0.5 + 0.3 - 1.2 * 0.2)


def test_calibration_factor_bounds():
    assert savings_calibration(1.0, 0.7) == 1.0  # nothing predicted saved: nothing to scale
    assert savings_calibration(0.5, 0.5) == 1.0
    assert savings_calibration(0.5, 1.2) == CALIBRATION_BOUNDS[0]  # slower than the baseline: a bad timing
    assert savings_calibration(0.9, 0.0) == CALIBRATION_BOUNDS[1]


def test_real_timer_runs_on_a_tiny_layer(tmp_path):
    # the default timer through a real backend: a positive speedup with an interval around it
    from cpbench.plugin.manager import get_plugins
    from cpbench.measure.timing import TimingBudget
    from cpbench.tune.latency import backend_timer

    timer = backend_timer(get_plugins().backends.get("torch-cpu"), 1,
                          TimingBudget(warmup=1, min_rounds=3, max_rounds=6, budget_s=0.2, min_round_s=0.0005))
    got = timer(nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    assert got.speedup > 0 and got.speedup_ci[0] <= got.speedup <= got.speedup_ci[1]


def test_a_new_fused_kernel_build_is_another_machine_for_cached_latencies(tmp_path, monkeypatch):
    # latencies timed with one build of the fused kernel are not read back for another build
    from cpbench.kernels import fused
    from cpbench.tune.latency import machine_key

    monkeypatch.setattr(fused, "loaded_build_key", lambda march=fused.NATIVE: "build-a")
    a = machine_key()
    monkeypatch.setattr(fused, "loaded_build_key", lambda march=fused.NATIVE: "build-b")
    b = machine_key()
    assert a != b and a["fused_kernel"] == "build-a"
    t = CountingTimer()
    net = nn.Sequential(nn.Conv2d(8, 16, 3))
    LatencyTable.for_run(tmp_path, backend="mkl", threads=1, timer=t, machine=a).network_ratio(
        "net", "v", net, lambda: nn.Sequential(nn.Conv2d(8, 4, 3)), (1, 8, 10, 10))
    LatencyTable.for_run(tmp_path, backend="mkl", threads=1, timer=t, machine=b).network_ratio(
        "net", "v", net, lambda: nn.Sequential(nn.Conv2d(8, 4, 3)), (1, 8, 10, 10))
    assert t.calls == 2  # timed again under the new build
