"""Timing in real fresh worker processes: tiny models, a fraction of a second of rounds each."""
from __future__ import annotations

import os

import torch

from cpbench.measure.cell_timing import MODEL, measure_pairs, timing_row_fields
from cpbench.plugin.manager import get_plugins
from cpbench.measure.timing import TimingBudget
from cpbench.measure.workers import PairSpec, time_in_processes

TINY = TimingBudget(warmup=1, min_rounds=5, max_rounds=20, budget_s=0.2, min_round_s=0.0005)


def _pair():
    torch.manual_seed(0)
    return torch.nn.Conv2d(8, 16, 3, padding=1).eval(), torch.nn.Conv2d(8, 16, 1).eval(), torch.randn(1, 8, 12, 12)


def test_each_process_is_fresh_and_returns_its_rounds():
    a, b, x = _pair()
    be = get_plugins().backends.get("torch-cpu")
    runs = time_in_processes(be, [PairSpec("m", a, b, x, TINY)], threads=1, processes=3)
    pids = [r.pid for r in runs]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert all(r.mode == "process" and len(r.pairs["m"]["baseline_ms"]) >= TINY.min_rounds for r in runs)
    assert all("other_runnable_mean" in r.noise for r in runs)


def test_pinning_pins_the_worker():
    a, b, x = _pair()
    be = get_plugins().backends.get("torch-cpu")
    (run,) = time_in_processes(be, [PairSpec("m", a, b, x, TINY)], threads=1, processes=1, pin=True)
    assert run.cores is not None and len(run.cores) == 1 and run.cores[0] in os.sched_getaffinity(0)


def test_mkl_workers_rebuild_the_forms_the_parent_chose():
    from cpbench.nn.layers import CPBlock  # noqa: F401  (the block class the backend re-expresses)

    a, _, x = _pair()
    comp = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 16, 3, padding=1)).eval()
    be = get_plugins().backends.get("mkl")
    intervals, runs, extra = measure_pairs(be, [(MODEL, a, comp, x, TINY)], threads=1, processes=2)
    row = timing_row_fields(intervals[MODEL], runs)
    assert row["timing_mode"] == "process" and len(row["timing_processes"]) == 2
    assert row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1]
    assert set(row["timing_flags"]) == {"wide", "busy", "disagree"}
    assert extra["noise"]["verdict"] == "quiet" or extra["noise"]["verdict"].startswith("busy")
    assert "cp_forms" in extra["backend_info"]["baseline"]


def test_processes_zero_times_in_this_process():
    a, b, x = _pair()
    be = get_plugins().backends.get("torch-cpu")
    (run,) = time_in_processes(be, [PairSpec("m", a, b, x, TINY)], threads=1, processes=0)
    assert run.pid == os.getpid() and run.mode == "in-process"


def test_a_cell_row_records_processes_flags_and_noise(tmp_path):
    from cpbench.run.matrix import parse_matrix
    from cpbench.run.cell import RunContext, run_cell

    m = parse_matrix({"matrix": {"model": [{"name": "conv", "in_channels": 8, "out_channels": 16, "kernel_size": 3,
                                            "input_size": 10, "padding": 1}],
                                 "decomposer": ["spatial-svd"], "rank": [4]},
                      "timing": {"budget_s": 0.3, "min_rounds": 5, "warmup": 1, "processes": 3, "passes": 2}})
    ctx = RunContext.from_matrix(m, cache_dir=str(tmp_path), require_quiet_s=0.0)
    (cell,) = m.cells()
    first = run_cell(cell, ctx)
    assert first["status"] == "ok", first.get("error")
    # 2 passes: the cell's first pass times 2 of its 3 processes, the second the last
    assert len(first["timing_processes"]) == 2 and (first["timing_pass"], first["timing_passes"]) == (1, 2)
    from cpbench.run.cell import retime_cell

    row = retime_cell(cell, first, ctx)
    assert row["timing_pass"] == 2 and len(row["noise"]["passes"]) == 2
    assert [p["pid"] for p in row["timing_processes"][:2]] == [p["pid"] for p in first["timing_processes"]]
    assert len(row["timing_processes"]) == 3 and row["timing_mode"] == "process"
    assert set(row["timing_flags"]) == {"wide", "busy", "disagree"} and "noisy" not in row
    assert row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1]
    assert set(row["layer_speedup"]) == set(row["layer_timing_flags"]) == set(row["layers"])
    assert row["noise"]["before"]["cores_allowed"] and "verdict" in row["noise"]
    assert row["quiet_wait"]["waited_s"] >= 0
    assert RunContext.from_matrix(m, processes=0).timing_settings()[1] == 0  # --processes overrides [timing]


def test_bad_timing_settings_get_one_line(capsys):
    from cpbench.cli import main
    from cpbench.errors import MatrixError
    from cpbench.run.matrix import parse_matrix

    for bad in ({"processes": -1}, {"processes": 2.5}, {"pin": "yes"}):
        try:
            parse_matrix({"matrix": {"model": ["charnet"], "decomposer": ["cp-als"], "rank": [4]}, "timing": bad})
        except MatrixError as exc:
            assert "[timing]" in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")
    assert main(["run", "--matrix", "smoke", "--processes", "many"]) == 2
    assert main(["run", "--matrix", "smoke", "--require-quiet", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--processes" in err and "--require-quiet" in err and "Traceback" not in err
    assert main(["machine", "--seconds", "0.2"]) == 0
    assert capsys.readouterr().out.startswith("machine: ")


def test_workers_take_the_fused_kernel_the_harness_loaded():
    import pytest

    from cpbench.kernels import fused
    from cpbench.kernels.forms import build_form
    from cpbench.nn.layers import CPBlock, geometry

    if not fused.kernel_available():
        pytest.skip("the fused kernel cannot be built here")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).eval()
    f = lambda n: torch.randn(1, n, 8) / n ** 0.5  # noqa: E731
    block = CPBlock(geometry(conv), f(16), f(16), h=f(3), w=f(3), bias=conv.bias.detach()).eval()
    x = torch.randn(1, 16, 12, 12)
    fast = build_form(block, "cp4-fused", tuple(x.shape))
    be = get_plugins().backends.get("torch-cpu")
    (run,) = time_in_processes(be, [PairSpec("m", conv, fast, x, TINY)], threads=1, processes=1)
    assert run.mode == "process" and len(run.pairs["m"]["compressed_ms"]) >= TINY.min_rounds
