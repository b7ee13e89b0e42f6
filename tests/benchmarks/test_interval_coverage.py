"""benchmarks/scripts/interval_coverage.py on two hand-made runs: what counts as agreeing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))

import interval_coverage  # noqa: E402


def _run(tmp_path: Path, name: str, cells: list[tuple[str, float, list, bool]]) -> Path:
    d = tmp_path / name
    d.mkdir()
    rows = [{"cell_key": k, "status": "ok", "model": "conv", "speedup": sp, "speedup_ci": ci, "started_at": 1e9,
             "wall_seconds": 1.0, "timing_flags": {"wide": False, "busy": busy, "disagree": False}}
            for k, sp, ci, busy in cells]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_coverage_counts_both_ways_and_sets_busy_rows_apart(tmp_path, capsys):
    a = _run(tmp_path, "a", [("c1", 2.0, [1.9, 2.1], False), ("c2", 3.0, [2.9, 3.1], False),
                             ("c3", 4.0, [3.0, 5.0], False)])
    b = _run(tmp_path, "b", [("c1", 2.05, [1.95, 2.15], False),  # agrees both ways
                             ("c2", 3.05, [3.04, 3.06], False),   # A's 3.0 lies outside B's interval
                             ("c3", 9.0, [8.0, 10.0], True)])     # timed on a busy machine
    code = interval_coverage.main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "all cells 1/3 agree (33%)" in out
    assert "flagged busy in neither run 1/2 agree (50%)" in out
    assert code == 1  # the un-flagged coverage is below 90%
    res = interval_coverage.coverage(interval_coverage.pairs_of(interval_coverage._rows(str(a)),
                                                                interval_coverage._rows(str(b)))["network"])
    assert res["flags_b"] == {"busy": 1} and [d["cell"].split()[0] for d in res["disagree"]] == ["conv", "conv"]
