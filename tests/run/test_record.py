"""CellResult: the one spelling of a row's keys, and rows of any age read back through it."""
from __future__ import annotations

import dataclasses

from cpbench.report.compare import compare_rows
from cpbench.report.tables import accuracy_drop, row_summary
from cpbench.run.record import OPTIONAL_KEYS, STAGE_KEYS, CellResult

# a row as cpbench wrote it before CellResult existed (an older results.jsonl), with a key it no longer knows
OLD_ROW = {"cell_key": "abc", "status": "ok", "model": "charnet", "decomposer": "cp-nls", "rank": {"conv2": 64},
           "rank_spec": 64, "backend": "torch-cpu", "threads": 1, "batch": 1, "speedup": 3.0,
           "speedup_ci": [2.9, 3.1], "accuracy_base": 0.9, "accuracy_decomposed": 0.7, "accuracy_finetuned": 0.88,
           "rel_error": {"conv2": 0.2}, "retired_field": [1, 2]}


def test_every_field_is_one_key_of_one_stage():
    names = [f.name for f in dataclasses.fields(CellResult) if f.name != "extra"]
    assert sorted(names) == sorted(k for keys in STAGE_KEYS.values() for k in keys)
    assert list(STAGE_KEYS) == ["cell", "base", "compress", "evaluate", "fidelity", "flops", "timing", "tune"]
    assert OPTIONAL_KEYS <= set(names)


def test_an_old_row_reads_back_and_keeps_what_this_version_does_not_know():
    c = CellResult.from_row(OLD_ROW)
    assert c.ok and c.speedup == 3.0 and c.extra == {"retired_field": [1, 2]}
    assert c.accuracy_drop() == accuracy_drop(OLD_ROW) == 100 * (0.9 - 0.88)
    row = c.to_row()
    assert {k: row[k] for k in OLD_ROW} == OLD_ROW  # nothing lost or changed
    assert "finetune_cached" not in row and "layer_speedup" not in row  # optional keys left out while None
    assert "predicted_speedup" not in row and "tune_rounds" not in row  # a tuned plan's keys only on its rows


def test_report_and_compare_read_old_rows():
    s = row_summary(OLD_ROW)
    assert s["speedup_lo"] == 2.9 and s["acc_finetuned"] == "88.0" and s["theoretical_speedup"] is None
    slower = {**OLD_ROW, "speedup": 2.0, "speedup_ci": [1.9, 2.1]}
    cmp = compare_rows(OLD_ROW, slower)
    assert [m.metric for m in cmp.regressions] == ["speedup"]


def test_the_drop_is_measured_from_the_better_of_base_and_its_control_arm():
    c = CellResult(accuracy_base=0.80, accuracy_base_finetuned=0.85, accuracy_decomposed=0.5, accuracy_finetuned=0.84)
    assert c.reference_accuracy() == 0.85 and round(c.accuracy_drop(), 6) == 1.0
    assert CellResult(accuracy_base=0.8, accuracy_decomposed=0.7).accuracy_drop() == 100 * (0.8 - 0.7)
    assert CellResult().accuracy_drop() is None
