"""--resume finishes the job: a failed cell runs again (unless --keep-errors), and a run whose results
file holds a failed cell exits 1."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cpbench.cli import main
from cpbench.run.results import latest_rows

pytestmark = pytest.mark.usefixtures("fresh_state")

MATRIX = textwrap.dedent("""
    [matrix]
    model = [{name = "conv", in_channels = 4, out_channels = 8, kernel_size = 3, input_size = 6, padding = 1}]
    decomposer = ["spatial-svd", {name = "crashy-svd", fail = true}]
    rank = [2]
    [timing]
    budget_s = 0.1
    min_rounds = 3
    warmup = 1
    [run]
    per_layer_timing = false
""")


@pytest.fixture
def failing(tmp_path, monkeypatch):
    """The crashy-svd test plugin, failing while the marker file exists."""
    executors = str(Path(__file__).resolve().parents[1] / "plugins" / "executors")
    monkeypatch.syspath_prepend(executors)
    import cpbench_testplugins

    cpbench_testplugins.install()
    marker = tmp_path / "fail-now"
    marker.write_text("")
    monkeypatch.setenv("CPBENCH_TEST_FAIL_MARKER", str(marker))
    m = tmp_path / "m.toml"
    m.write_text(MATRIX)
    return m, marker


def run(m, out, *extra):
    """``cpbench run`` with a cache of its own (a cached decomposition would never fail)."""
    return main(["run", "--matrix", str(m), "--out", str(out), "--cache-dir", str(out.parent / "cache"), *extra])


def _rows(out):
    return [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]


def test_resume_runs_failed_cells_again(tmp_path, failing, capsys):
    m, marker = failing
    out = tmp_path / "out"
    assert run(m, out) == 1
    assert [r["status"] for r in _rows(out)] == ["ok", "error"]
    # still failing, failed cells kept: nothing runs, and the run still exits 1
    assert run(m, out, "--resume", "--keep-errors") == 1
    assert len(_rows(out)) == 2
    # the failure is gone: --resume runs it again; the error row stays on disk, superseded
    marker.unlink()
    assert run(m, out, "--resume") == 0
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    latest, dup = latest_rows(rows)
    assert [r["status"] for r in latest] == ["ok", "ok"] and not dup
    # done: another resume runs nothing and exits 0
    assert run(m, out, "--resume") == 0
    assert len(_rows(out)) == 3


def test_resume_of_a_still_failing_cell_exits_1(tmp_path, failing):
    m, _ = failing
    out = tmp_path / "out"
    assert run(m, out) == 1
    assert run(m, out, "--resume") == 1
    assert [r["status"] for r in _rows(out)] == ["ok", "error", "error"]


def test_duplicates_are_counted_not_hidden():
    ok = {"cell_key": "a", "status": "ok", "model": "conv", "decomposer": "cp-als", "rank_spec": 4}
    rows = [ok, {**ok, "speedup": 2.0}, {"cell_key": "b", "status": "error"}, {"cell_key": "b", "status": "ok"}]
    latest, dup = latest_rows(rows)
    assert [r.get("speedup") for r in latest] == [2.0, None] and [r["status"] for r in latest] == ["ok", "ok"]
    assert (dup.cells, dup.extra) == (1, 1)
    assert "1 cell(s) have more than one ok row" in dup.message("x/results.jsonl")
