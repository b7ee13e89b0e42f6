"""Timing in passes ([timing] passes): a cell's processes minutes apart, its row superseded by the later
pass, the results file compacted; a failure in a later pass keeps the earlier row."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cpbench.measure.cell_timing import MODEL, merged_intervals, pass_sizes
from cpbench.measure.workers import ProcessRun
from cpbench.run import cell as cell_mod
from cpbench.run.cell import RunContext, clear_memo
from cpbench.run.matrix import parse_matrix
from cpbench.run.results import read_results
from cpbench.run.session import run_matrix

MATRIX = {"matrix": {"model": [{"name": "conv", "in_channels": 4, "out_channels": 8, "kernel_size": 3,
                                "input_size": 6, "padding": 1}],
                     "decomposer": ["spatial-svd"], "rank": [2, 3]},
          "timing": {"budget_s": 0.15, "min_rounds": 3, "warmup": 1, "processes": 3, "passes": 2},
          "run": {"per_layer_timing": False}}


@pytest.fixture
def ctx_of(tmp_path):
    clear_memo()
    yield lambda m: RunContext.from_matrix(m, cache_dir=str(tmp_path / "cache"))
    clear_memo()


def test_pass_sizes_split_the_processes_evenly_first_passes_first():
    assert pass_sizes(5, 2) == [3, 2] and pass_sizes(5, 1) == [5] and pass_sizes(6, 3) == [2, 2, 2]
    assert pass_sizes(1, 2) == [1] and pass_sizes(0, 2) == [0] and pass_sizes(2, 5) == [1, 1]


def test_a_run_in_two_passes_ends_with_one_row_per_cell_holding_every_process(tmp_path, ctx_of):
    m = parse_matrix(MATRIX)
    summary = run_matrix(m, tmp_path / "out", ctx=ctx_of(m))
    raw = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(raw) == len(m.cells()) == summary.ok  # compacted: the first pass's rows are gone
    for r in raw + summary.rows:
        assert (r["timing_pass"], r["timing_passes"]) == (2, 2) and len(r["timing_processes"]) == 3
        assert len(r["noise"]["passes"]) == 2 and not any(k.startswith("_") for k in r)
    pids = [[p["pid"] for p in r["timing_processes"]] for r in raw]
    # every first pass before any second one: fresh processes get increasing pids on Linux
    assert max(p[1] for p in pids) < min(p[2] for p in pids)


def test_a_failing_later_pass_keeps_the_row_of_the_pass_before(tmp_path, ctx_of, monkeypatch, capsys):
    m = parse_matrix(MATRIX)

    def broken(*a, **kw):
        raise RuntimeError("no more processes")

    monkeypatch.setattr("cpbench.run.session.retime_cell", broken)
    summary = run_matrix(m, tmp_path / "out", ctx=ctx_of(m))
    rows = read_results(tmp_path / "out")
    assert summary.ok == len(rows) == 2 and all(r["timing_pass"] == 1 and len(r["timing_processes"]) == 2 for r in rows)
    assert "timing pass 2 of a cell failed (RuntimeError: no more processes)" in capsys.readouterr().err


def test_a_crash_between_passes_leaves_both_kinds_of_rows_and_readers_take_the_latest(tmp_path, ctx_of, monkeypatch):
    m = parse_matrix(MATRIX)
    real = cell_mod.retime_cell
    calls = []

    def once_then_crash(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr("cpbench.run.session.retime_cell", once_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_matrix(m, tmp_path / "out", ctx=ctx_of(m))
    raw = read_results(tmp_path / "out", superseded=True)
    assert [r["timing_pass"] for r in raw] == [1, 1, 2]  # not compacted: the run did not finish
    latest = read_results(tmp_path / "out")
    assert [r["timing_pass"] for r in latest] == [2, 1] and latest[0]["cell_key"] == raw[0]["cell_key"]


def _run(speedup: float, n: int, seed: int) -> list[ProcessRun]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = list(1.0 + 0.01 * rng.standard_normal(40))
        comp = list(np.asarray(base) / speedup * (1 + 0.01 * rng.standard_normal(40)))
        out.append(ProcessRun(1000 + i, {MODEL: {"baseline_ms": base, "compressed_ms": comp, "calls_per_round": [1, 1]}},
                              None, {}, 0.1, "process"))
    return out


def test_a_machine_slower_for_the_compressed_arm_in_the_later_pass_widens_the_interval_to_cover_both():
    first = _run(8.0, 3, 0)
    later = _run(6.8, 2, 1)  # both runs of a drift seen in one run: the compressed arm 15% slower
    (one,) = merged_intervals(first, [MODEL]).values()
    (both,) = merged_intervals(first + later, [MODEL]).values()
    assert one.ci[0] > 7.5  # the first pass alone: a narrow interval around 8
    assert both.ci[0] <= 6.9 and both.ci[1] >= 7.9  # both passes: the interval holds either state


def test_a_cell_timed_in_passes_shares_one_budget_among_all_its_processes(tmp_path, ctx_of, monkeypatch):
    # the cell's budget is for its processes of every pass: a pass of 1 of 3 processes gets a third, not all
    from cpbench.measure import cell_timing, workers

    calls, budgets = [], []
    real_tip, real_pairs = cell_timing.time_in_processes, workers._time_pairs

    def tip(*a, **kw):
        calls.append((kw["processes"], kw.get("share_of")))
        return real_tip(*a, **{**kw, "processes": 0})  # in this process, so the budgets can be seen

    def pairs(backend, specs, threads, **kw):
        budgets.extend(s.budget.budget_s for s in specs)
        return real_pairs(backend, specs, threads, **kw)

    monkeypatch.setattr(cell_timing, "time_in_processes", tip)
    monkeypatch.setattr(workers, "_time_pairs", pairs)
    m = parse_matrix(MATRIX)
    run_matrix(m, tmp_path / "out", ctx=ctx_of(m))
    assert sorted(calls) == [(1, 3), (1, 3), (2, 3), (2, 3)]
    assert budgets == pytest.approx([0.05] * 4)


def test_by_default_every_process_of_a_cell_has_a_pass_of_its_own(ctx_of):
    m = parse_matrix({**MATRIX, "timing": {k: v for k, v in MATRIX["timing"].items() if k != "passes"}})
    assert ctx_of(m).timing_passes() == [1, 1, 1]
    assert RunContext().timing_passes() == [1] * 5  # the default 5 processes
