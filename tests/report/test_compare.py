"""`cpbench compare`: synthetic results files → regressions (or not), missing cells, bad input."""
from __future__ import annotations

import json

import pytest

from cpbench.cli import main
from cpbench.report.compare import compare_runs, print_comparison
from cpbench.errors import UsageError


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps narrow tables; keep words whole for the asserts


def row(key="k1", **kw):
    r = {
        "cell_key": key, "status": "ok", "error": None, "model": "charnet", "model_params": {},
        "layers": ["conv2"], "decomposer": "cp-nls", "decomposer_options": {}, "rank_spec": 16,
        "rank": {"conv2": 16}, "backend": "torch-cpu", "threads": 1, "batch": 1, "finetune_epochs": 0,
        "seed": 0, "rel_error": {"conv2": 0.20}, "speedup": 2.0, "speedup_ci": [1.95, 2.05],
        "noisy": False, "accuracy_base": 0.95, "accuracy_decomposed": 0.90, "accuracy_finetuned": None,
    }
    r.update(kw)
    return r


def write(tmp_path, name, rows, *, as_dir=True):
    d = tmp_path / name
    d.mkdir()
    f = d / "results.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d if as_dir else f)


def cli(*args):
    return main(["compare", *map(str, args)])


def test_identical_runs_have_no_regression(tmp_path, capsys):
    rows = [row("k1"), row("k2", decomposer="cp-als", rel_error={"conv2": 0.25})]
    a, b = write(tmp_path, "a", rows), write(tmp_path, "b", rows, as_dir=False)
    res = compare_runs(a, b)
    assert len(res.cells) == 2 and not res.regressions and not res.only_a and not res.only_b
    assert cli(a, b) == 0
    assert "no regressions" in capsys.readouterr().out


def test_clearly_slower_with_disjoint_cis_is_a_regression_and_exits_1(tmp_path, capsys):
    a = write(tmp_path, "a", [row(speedup=2.0, speedup_ci=[1.95, 2.05])])
    b = write(tmp_path, "b", [row(speedup=1.5, speedup_ci=[1.45, 1.55])])
    res = compare_runs(a, b)
    [(cell, m)] = res.regressions
    assert m.metric == "speedup" and m.change == pytest.approx(-0.25)
    assert cli(a, b) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "1 regression" in out
    # the other way round it is an improvement, not a regression
    assert cli(b, a) == 0
    assert compare_runs(b, a).improvements


def test_overlapping_cis_are_not_a_regression(tmp_path):
    # 20 % slower, but the CIs overlap: noise, not a regression
    a = write(tmp_path, "a", [row(speedup=2.0, speedup_ci=[1.5, 2.5])])
    b = write(tmp_path, "b", [row(speedup=1.6, speedup_ci=[1.2, 2.1])])
    res = compare_runs(a, b)
    assert not res.regressions
    assert res.cells[0].metric("speedup").reason.startswith("change within noise")
    assert cli(a, b) == 0


def test_disjoint_cis_below_threshold_are_not_a_regression(tmp_path):
    a = write(tmp_path, "a", [row(speedup=2.0, speedup_ci=[1.99, 2.01])])
    b = write(tmp_path, "b", [row(speedup=1.94, speedup_ci=[1.93, 1.95])])  # -3 %
    assert not compare_runs(a, b).regressions
    assert compare_runs(a, b, threshold=0.02).regressions  # the threshold is an option


def test_accuracy_drop_in_points(tmp_path):
    a = write(tmp_path, "a", [row(finetune_epochs=1, accuracy_finetuned=0.930)])
    b_small = write(tmp_path, "b", [row(finetune_epochs=1, accuracy_finetuned=0.927)])  # -0.3 points
    b_big = write(tmp_path, "c", [row(finetune_epochs=1, accuracy_finetuned=0.910)])    # -2 points
    assert not compare_runs(a, b_small).regressions
    [(_, m)] = compare_runs(a, b_big).regressions
    assert m.metric == "accuracy" and m.change == pytest.approx(-2.0)
    assert not compare_runs(a, b_big, accuracy_threshold=3.0).regressions


def test_rel_error_increase_is_a_regression(tmp_path):
    a = write(tmp_path, "a", [row(rel_error={"conv2": 0.20})])
    b = write(tmp_path, "b", [row(rel_error={"conv2": 0.30})])
    [(_, m)] = compare_runs(a, b).regressions
    assert m.metric == "rel_error[conv2]"
    # round-off on an exact decomposition is ignored
    a0 = write(tmp_path, "a0", [row(rel_error={"conv2": 1e-9})])
    b0 = write(tmp_path, "b0", [row(rel_error={"conv2": 3e-9})])
    assert not compare_runs(a0, b0).regressions


def test_missing_cells_are_listed_and_fallback_matches_on_axes(tmp_path, capsys):
    a = write(tmp_path, "a", [row("k1"), row("k2", backend="channels-last")])
    # k1 renamed (e.g. a new key scheme) but same axes; k2 gone; k3 new
    b = write(tmp_path, "b", [row("k1-new"), row("k3", threads=2)])
    res = compare_runs(a, b)
    assert [c.matched_on for c in res.cells] == ["axes"]
    assert [r["backend"] for r in res.only_a] == ["channels-last"]
    assert [r["threads"] for r in res.only_b] == [2]
    assert not res.regressions
    assert cli(a, b) == 0
    out = capsys.readouterr().out
    assert "only in A" in out and "only in B" in out


def test_a_cell_that_starts_failing_is_a_regression(tmp_path):
    a = write(tmp_path, "a", [row()])
    b = write(tmp_path, "b", [row(status="error", error="boom", speedup=None, speedup_ci=None)])
    [(_, m)] = compare_runs(a, b).regressions
    assert m.metric == "status" and "boom" in m.reason


def test_bad_input_is_a_one_line_usage_error(tmp_path, capsys):
    good = write(tmp_path, "a", [row()])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.jsonl").write_text("")
    with pytest.raises(UsageError, match="not found"):
        compare_runs(tmp_path / "nope", good)
    with pytest.raises(UsageError, match="no result rows"):
        compare_runs(good, empty)
    with pytest.raises(UsageError, match="no results file"):
        compare_runs(good, tmp_path)  # a directory without results.jsonl
    with pytest.raises(UsageError, match="threshold"):
        compare_runs(good, good, threshold=-1)
    assert cli(tmp_path / "nope", good) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpbench: error:") and len(err.strip().splitlines()) == 1


def test_print_comparison_renders_without_console_argument(tmp_path, capsys):
    a = write(tmp_path, "a", [row()])
    print_comparison(compare_runs(a, a))
    assert "speedup A" in capsys.readouterr().out


def test_cells_of_one_batch_that_move_together_are_named_as_a_shared_shift(tmp_path, capsys):
    # six batch-32 cells all ~6% slower in B (overlapping intervals: no verdict changes), four batch-1
    # cells unchanged, and two batch-8 cells (too few to call a group)
    a_rows, b_rows = [], []
    for i, (batch, factor) in enumerate([(32, 0.94)] * 6 + [(1, 1.0)] * 4 + [(8, 0.9)] * 2):
        sp = 2.0 + 0.1 * i
        a_rows.append(row(f"k{i}", batch=batch, speedup=sp, speedup_ci=[sp * 0.9, sp * 1.1]))
        b_rows.append(row(f"k{i}", batch=batch, speedup=sp * factor, speedup_ci=[sp * factor * 0.9, sp * factor * 1.1]))
    a, b = write(tmp_path, "a", a_rows), write(tmp_path, "b", b_rows)
    res = compare_runs(a, b)
    assert not res.regressions
    by_batch = {s.batch: s for s in res.shifts}
    assert set(by_batch) == {1, 32}  # batch 8 has two cells: no group
    assert by_batch[32].median_change == pytest.approx(-0.06) and (by_batch[32].slower, by_batch[32].cells) == (6, 6)
    assert by_batch[1].median_change == pytest.approx(0.0) and by_batch[1].slower == by_batch[1].faster == 0
    assert cli(a, b) == 0
    out = capsys.readouterr().out
    assert "shared shift" in out and "batch 32, 1 thread(s)" in out and "-6.0 %" in out
    assert "batch 1," not in out  # an unmoved group is not printed
