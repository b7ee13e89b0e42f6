"""The layer suite's verdict lines: efficiency, slowdowns and the two-run repeat check (no timing)."""
from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))
import layer_suite  # noqa: E402


def _cell(layer, speedup, ci, ci99, theo=4.0, rank=8):
    return {"layer": layer, "rank": rank, "batch": 1, "threads": 1, "theo": theo, "status": "ok",
            "speedup": speedup, "ci": ci, "ci99": ci99, "efficiency": speedup / theo,
            "best_baseline": "torch-cpu", "best_compressed": "mkl"}


def test_expected_agreement_of_exact_intervals():
    assert layer_suite.expected_agreement(0.95) == pytest.approx(0.834, abs=1e-3)
    assert layer_suite.expected_agreement(0.99) == pytest.approx(0.931, abs=1e-3)
    # t-intervals over 4 passes: each run's width is itself estimated
    assert layer_suite.expected_agreement(0.95, passes=4) == pytest.approx(0.82, abs=0.02)
    assert layer_suite.expected_agreement(0.99, passes=4) == pytest.approx(0.96, abs=0.02)


def test_repeat_check_is_judged_on_99_percent_intervals():
    run1 = [_cell(f"l{i}", 3.0, [2.9, 3.1], [2.8, 3.2]) for i in range(10)]
    # run 2 agrees inside the 99% intervals everywhere, but inside the 95% ones in only half the cells
    run2 = [_cell(f"l{i}", 3.15 if i < 5 else 3.05, [3.05, 3.25] if i < 5 else [2.95, 3.15], [2.9, 3.3])
            for i in range(10)]
    s = layer_suite.summarize([run1, run2])
    assert s["repeat_cells"] == 10
    assert s["repeat_fraction"] == 0.5 and s["repeat_99_fraction"] == 1.0
    assert s["target_repeatable"] is True
    assert len(s["repeat_outside"]) == 5 and s["repeat_99_outside"] == []
    out = io.StringIO()
    layer_suite.print_summary(s, out=out)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("[ -- ] repeat at 95% CI: 5/10") for line in lines)
    assert any(line.startswith("[PASS] repeat at 99% CI: 10/10") and "judged here" in line for line in lines)


def test_repeat_check_fails_when_runs_disagree():
    run1 = [_cell(f"l{i}", 3.0, [2.9, 3.1], [2.8, 3.2]) for i in range(10)]
    run2 = [_cell(f"l{i}", 4.0, [3.9, 4.1], [3.8, 4.2]) for i in range(10)]
    s = layer_suite.summarize([run1, run2])
    assert s["repeat_99_fraction"] == 0.0 and s["target_repeatable"] is False


def test_efficiency_and_slowdown_targets():
    cells = [_cell("a", 3.6, [3.5, 3.7], [3.4, 3.8]), _cell("b", 0.9, [0.8, 1.0], [0.7, 1.1], theo=2.5)]
    s = layer_suite.summarize([cells])
    assert math.isclose(s["median_efficiency"], (0.9 + 0.36) / 2)
    assert s["slower_than_baseline_with_theo_ge_2"] == [("b", 8, 1, 1)]
    assert s["target_no_slowdown"] is False and s["target_median_efficiency"] is False


def _pass(speedup, base_ms=2.0, noisy=False):
    from types import SimpleNamespace

    return SimpleNamespace(speedup=speedup, speedup_ci=(speedup * 0.99, speedup * 1.01), noisy=noisy,
                           baseline=SimpleNamespace(median_ms=base_ms, rounds=20),
                           compressed=SimpleNamespace(median_ms=base_ms / speedup))


def test_cell_figures_come_from_all_passes():
    cell = {"theo": 8.0, "passes": []}
    layer_suite.add_pass(cell, _pass(4.0))
    assert cell["speedup"] == 4.0 and cell["ci"] == [3.96, 4.04]  # one pass: its own interval, provisional
    layer_suite.add_pass(cell, _pass(4.4, noisy=True))
    layer_suite.add_pass(cell, _pass(4.2))
    assert cell["speedup"] == pytest.approx((4.0 * 4.4 * 4.2) ** (1 / 3))
    assert cell["ci"][0] < 4.0 and cell["ci"][1] > 4.4  # t-interval over three passes
    assert cell["ci99"][0] < cell["ci"][0] and cell["ci99"][1] > cell["ci"][1]
    assert cell["efficiency"] == pytest.approx(cell["speedup"] / 8.0)
    assert cell["noisy"] is True and cell["rounds"] == 60


def test_near_ties_resolve_by_name_so_repeated_runs_time_the_same_pair():
    # channels-last is 2% slower than mkl in this selection: a tie, resolved by name
    assert layer_suite.pick_fastest({"mkl": 1.00, "channels-last": 1.02, "torch-cpu": 1.50}) == (
        "channels-last", ["channels-last", "mkl"])
    # a clear winner stays the winner, whatever its name
    assert layer_suite.pick_fastest({"mkl": 1.00, "channels-last": 1.10}) == ("mkl", ["mkl"])
    assert layer_suite.pick_fastest({"b": 2.0, "a": 2.0}, tie=0.0) == ("a", ["a", "b"])


def test_baseline_contenders_are_the_two_fastest_within_ten_percent():
    sel = {"torch-cpu": 1.30, "onnxruntime": 1.00, "channels-last": 1.04, "mkl": 1.08}
    assert layer_suite.contenders(sel) == ["onnxruntime", "channels-last"]
    assert layer_suite.contenders({"mkl": 1.0, "channels-last": 1.2}) == ["mkl"]  # a clear winner alone
    assert layer_suite.contenders({"b": 1.0, "a": 1.0}) == ["a", "b"]


def test_each_final_pass_counts_against_the_fastest_baseline_contender(monkeypatch):
    # the fake pairs: a baseline's speedup over the compressed arm, per pass (onnxruntime is the faster
    # baseline in passes 1 and 3, channels-last in pass 2)
    from types import SimpleNamespace

    speedups = iter([30.0, 33.0, 36.0, 35.0, 31.0, 34.0])
    seen = []

    def fake_processes(backend, specs, *, threads, processes):  # one fresh process per pass
        seen.append((processes, [s.label for s in specs]))
        return [SimpleNamespace(pairs={s.label: {} for s in specs}, noise={"busy": len(seen) == 2})]

    monkeypatch.setattr(layer_suite, "time_in_processes", fake_processes)
    monkeypatch.setattr(layer_suite, "_paired", lambda samples: _pass(next(speedups)))
    cell = {"theo": 40.0, "passes": [], "best_baseline": "channels-last", "best_compressed": "mkl", "threads": 1,
            "baseline_contenders": ["onnxruntime", "channels-last"]}
    names = {"onnxruntime": None, "channels-last": None, "mkl": None}
    for _ in range(3):
        layer_suite.final_pass(cell, None, None, None, names, None)
    assert seen == [(1, ["onnxruntime", "channels-last"])] * 3
    assert cell["flags"]["busy"] and [p["busy"] for p in cell["passes"]] == [False, True, False]
    assert [p["speedup"] for p in cell["passes"]] == [30.0, 35.0, 31.0]  # the lower speedup of each pass
    assert [p["baseline"] for p in cell["passes"]] == ["onnxruntime", "channels-last", "onnxruntime"]
    assert cell["passes"][1]["speedup_by_baseline"] == {"onnxruntime": 36.0, "channels-last": 35.0}
    assert cell["best_baseline"] == "onnxruntime"  # fastest in most passes
    assert cell["speedup"] == pytest.approx((30.0 * 35.0 * 31.0) ** (1 / 3))


def test_openmp_settings_are_read_from_the_command_line_before_torch_loads(monkeypatch):
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):  # setenv first: monkeypatch then restores both after
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    assert layer_suite._early_wait_policy(["--repeat", "2"]) == "default"
    assert os.environ["GOMP_SPINCOUNT"] == layer_suite.GOMP_SPINCOUNT
    assert layer_suite._early_wait_policy(["--gomp-spincount=default", "--omp-wait-policy", "passive"]) == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in os.environ
    import _omp_early

    assert _omp_early.early_arg(["--gomp-spincount", "500"], "--gomp-spincount", "x") == "500"
