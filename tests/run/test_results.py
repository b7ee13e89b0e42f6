import json

import pytest

from cpbench.errors import UsageError
from cpbench.run.results import ResultSink, finished_keys, jsonable, read_results


def test_rows_are_appended_and_read_back(tmp_path):
    p = tmp_path / "results.jsonl"
    with ResultSink(p) as s:
        s.write({"cell_key": "a", "x": float("nan")})
        s.write({"cell_key": "b", "t": (1, 2)})
    rows = read_results(tmp_path)
    assert [r["cell_key"] for r in rows] == ["a", "b"]
    assert rows[0]["x"] is None and rows[1]["t"] == [1, 2]


def test_torn_last_line_is_dropped_and_truncated_before_appending(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps({"cell_key": "a", "status": "ok"}) + "\n" + '{"cell_key": "b", "spe')
    assert [r["cell_key"] for r in read_results(p)] == ["a"]
    assert finished_keys(p) == {"a"}
    with ResultSink(p) as s:
        assert s.dropped_torn_line
        s.write({"cell_key": "c"})
    lines = p.read_text().splitlines()
    assert [json.loads(l)["cell_key"] for l in lines] == ["a", "c"]


def test_finished_keys_count_failed_cells_only_when_kept(tmp_path):
    p = tmp_path / "results.jsonl"
    rows = [{"cell_key": "a", "status": "ok"}, {"cell_key": "b", "status": "error"},
            {"cell_key": "c", "status": "error"}, {"cell_key": "c", "status": "ok"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finished_keys(p) == {"a", "c"}  # b failed last: --resume runs it again
    assert finished_keys(p, errors_count=True) == {"a", "b", "c"}  # --keep-errors


def test_missing_results_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no results file"):
        read_results(tmp_path / "nope")


def test_jsonable_handles_tensors():
    import torch

    assert jsonable({"t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3)}) == {"t": [1.0, 2.0], "s": 3}


def test_a_bad_line_in_the_middle_loses_no_good_row(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"cell_key": "a"}\n{garbage\n{"cell_key": "b"}\n')
    assert [r["cell_key"] for r in read_results(p)] == ["a", "b"]
    with ResultSink(p) as s:
        assert not s.dropped_torn_line
        s.write({"cell_key": "c"})
    assert [r["cell_key"] for r in read_results(p)] == ["a", "b", "c"]


def test_unparsable_terminated_last_line_is_torn(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"cell_key": "a"}\n{"cell_k\n')
    with ResultSink(p) as s:
        assert s.dropped_torn_line
    assert p.read_text() == '{"cell_key": "a"}\n'
