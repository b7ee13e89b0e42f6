"""The verdict: per decomposer the fastest cell within the accuracy budget, with its interval; counts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from cpbench.report.verdict import make_verdict, row_flags, verdict_lines

_spec = importlib.util.spec_from_file_location("_report_rows", Path(__file__).with_name("_report_rows.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def test_best_within_budget_per_decomposer():
    rows = R.synthetic_rows()  # drops 2, 3 (cp-nls, speedups 1.5, 2.25) and 4, 5 points (tucker2, 3.0, 3.75)
    v = make_verdict(rows, max_drop=3.5)
    by = {b.decomposer: b for b in v.best}
    assert by["cp-nls"].row is rows[1] and by["cp-nls"].closest is None   # 2.25× at 3 points beats 1.5× at 2
    assert by["tucker2"].row is None and by["tucker2"].closest is rows[2]  # none within: the smallest drop
    assert (v.total, v.ok, v.failed, v.flagged) == (5, 4, 1, 1) and v.flag_names == ["noisy"]
    lines = verdict_lines(v, report="r/report.html")
    assert lines[0] == "Verdict — the fastest cell per decomposer within a 3.5-point accuracy drop:"
    assert lines[1] == "  cp-nls   2.25× [2.15–2.45]  drop 3.00 pt  (rank 16)"
    assert lines[2] == "  tucker2  none within 3.5 pt; closest: drop 4.00 pt at 3.00× [2.90–3.20] (rank 8x4)"
    assert lines[-2:] == ["5 cells: 4 ok, 1 failed, 1 flagged (noisy)", "report: r/report.html"]


def test_the_budget_is_inclusive_and_default_one_point():
    r = R.ok_row("cp-als", 8, 0)
    r.update(accuracy_base=0.95, accuracy_finetuned=0.94)  # exactly 1 point
    (b,) = make_verdict([r]).best
    assert b.row is r


def test_without_accuracy_the_fastest_measured_cell():
    rows = [R.ok_row("cp-als", 8, i, model="conv", with_accuracy=False) for i in range(3)]
    rows[1]["backend"] = "mkl"
    (b,) = make_verdict(rows).best
    assert b.row is rows[2] and not b.has_accuracy
    lines = verdict_lines(make_verdict(rows))
    assert "no accuracy" in lines[1] and "torch-cpu" in lines[1]  # backend varies: named
    assert "the model has no data set" in lines[2]


def test_a_decomposer_whose_cells_all_failed_still_has_a_line():
    v = make_verdict([R.failed_row()])
    assert [b.decomposer for b in v.best] == ["cp-nls"] and v.best[0].row is None
    assert verdict_lines(v)[1].endswith("no cell finished")


def test_several_models_are_judged_apart():
    rows = [R.ok_row("cp-nls", 8, 0), R.ok_row("cp-nls", 8, 1, model="alexnet", with_accuracy=False)]
    v = make_verdict(rows)
    assert v.multi_model and sorted(b.model for b in v.best) == ["alexnet", "charnet"]


def test_flags_are_any_flag():
    assert row_flags({"noisy": True}) == ["noisy"]
    assert row_flags({"layer_noisy": {"conv2": True}}) == ["noisy layer timing"]
    assert row_flags({"timing_flags": {"wide": False, "busy": True, "disagree": True}}) == ["busy", "disagree"]
    assert row_flags({"timing_flags": {"busy": False}, "layer_timing_flags": {"conv2": {"wide": True}}}) == [
        "wide layer timing"]
    assert row_flags({"noisy": False, "flags": []}) == []
