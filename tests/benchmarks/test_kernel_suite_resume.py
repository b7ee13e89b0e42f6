"""benchmarks/scripts/kernel_suite.py --jsonl: a stopped run resumes, and finished pairs are kept."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))

import kernel_suite  # noqa: E402

ARGS = ["--classes", "synthetic", "--nets", "none", "--solvers", "cp-nls", "--no-pyttb"]


def test_a_stopped_run_resumes_from_its_jsonl(tmp_path, capsys):
    out = tmp_path / "suite.jsonl"
    assert kernel_suite.main([*ARGS, "--jsonl", str(out)]) == 0
    full = out.read_text().splitlines()
    assert len(full) == 6  # the synthetic class: exactly and nearly low-rank kernels
    out.write_text("\n".join(full[:2]) + "\n")  # as if the run had stopped after two pairs
    capsys.readouterr()
    assert kernel_suite.main([*ARGS, "--jsonl", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 pairs already in" in captured.err
    again = out.read_text().splitlines()
    assert again[:2] == full[:2]  # the finished pairs are kept, not run again
    keys = [(r["kernel"], r["rank"]) for r in map(json.loads, again)]
    assert sorted(keys) == sorted((r["kernel"], r["rank"]) for r in map(json.loads, full)) and len(set(keys)) == 6
    assert "6 pairs" in captured.out  # the table reports all of them
