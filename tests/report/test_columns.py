"""The end-of-run table fits the terminal: 80, 120 and 200 columns, COLUMNS honoured when piped."""
from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from cpbench.report.columns import DEFAULT_COLUMNS, fitted_table, parse_columns, print_run_end, rank_text, table_width
from cpbench.errors import UsageError

_spec = importlib.util.spec_from_file_location("_report_rows", Path(__file__).with_name("_report_rows.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def _rows():
    """The default matrix's shape: 4 decomposers × 2 rank tables × 2 backends × 2 batches, one failed."""
    rows = []
    for d, dec in enumerate(["cp-nls", "cp-als", "tucker2", "spatial-svd"]):
        for k in range(2):
            for backend in ("torch-cpu", "mkl"):
                for batch in (1, 32):
                    i = len(rows)
                    r = R.ok_row(dec, 8 * (k + 1), i % 5, backend=backend)
                    r.update(batch=batch, cell_key=f"c{i}", rank={"conv2": 40 + i, "conv3": 90 + i} if dec != "tucker2"
                             else {"conv2": [40, 20], "conv3": [90, 60]})
                    rows.append(r)
    rows[-1] = dict(R.failed_row(), error="RuntimeError: " + "the solver diverged " * 8)
    return rows


def _render(renderable_fn, width: int) -> list[str]:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    renderable_fn(console)
    return buf.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_table_fits_and_cuts_no_cell(width):
    rows = _rows()
    lines = _render(lambda c: print_run_end(c, rows, title="default: 31 ok, 1 failed", width=width,
                                            report="cpbench-runs/default/report/report.html"), width)
    assert max(len(l) for l in lines) <= width, "\n".join(lines)
    text = "\n".join(lines)
    assert "…" not in text.split("failed:")[0]  # no cell cut (only the failure line may be shortened)
    header = next(l for l in lines if "speedup [95% CI]" in l)
    for name in ("decomposer", "rank", "backend", "batch", "drop pt"):
        assert name in header
    # every ok row on one line, whole: its speedup and interval
    for r in rows[:-1]:
        sp = f"{r['speedup']:.2f} [{r['speedup_ci'][0]:.2f}–{r['speedup_ci'][1]:.2f}]"
        assert any(sp in l and f"{r['rank']['conv2'] if not isinstance(r['rank']['conv2'], list) else 40}" in l
                   for l in lines), sp
    # per-layer values summarised, not spelled out
    assert "conv2:" not in text and "40/90" in text and "rank per layer: conv2/conv3" in text
    # the verdict closes it, with the report's path
    assert lines[-2].startswith("32 cells: 31 ok, 1 failed") and lines[-1] == "report: cpbench-runs/default/report/report.html"
    assert any(l.startswith("Verdict") for l in lines)


def test_wide_terminal_keeps_requested_columns_narrow_one_says_what_it_left_out():
    rows = _rows()
    extra = parse_columns("theo,rel_error,ms,acc")
    wide = _render(lambda c: c.print(fitted_table(rows, width=200, title="t", extra=extra)), 200)
    assert all(h in wide[1] for h in ("theo ×", "rel err", "base→comp ms", "acc % base→dec→ft"))
    narrow = _render(lambda c: c.print(fitted_table(rows, width=80, title="t", extra=extra)), 80)
    assert max(len(l) for l in narrow) <= 80
    assert any("left out for width:" in l for l in narrow)
    # columns that are the same in every row went to the title first
    assert narrow[0].startswith("t · model charnet")


def test_columns_option():
    assert parse_columns("all")[0] not in DEFAULT_COLUMNS
    with pytest.raises(UsageError, match="unknown column"):
        parse_columns("speed")


def test_rank_text():
    assert rank_text({"rank": {"conv2": 8, "conv3": 8}}) == "8"
    assert rank_text({"rank": {"conv2": [32, 16], "conv3": 8}}) == "32x16/8"
    assert rank_text({"rank": None, "rank_spec": {"conv2": "speedup:4"}}) == "conv2=speedup:4"


def test_width_from_columns_when_piped(monkeypatch):
    piped = Console(file=io.StringIO(), force_terminal=False)
    monkeypatch.setenv("COLUMNS", "93")
    assert table_width(piped) == 93
    monkeypatch.delenv("COLUMNS")
    assert table_width(piped) == 120


MATRIX = textwrap.dedent("""
    [matrix]
    model = [{name = "conv", in_channels = 4, out_channels = 8, kernel_size = 3, input_size = 6, padding = 1}]
    decomposer = ["spatial-svd", "cp-als"]
    rank = [2]
    [timing]
    budget_s = 0.1
    min_rounds = 3
    warmup = 1
    processes = 0  # about the table's layout: timed in the harness
    [run]
    per_layer_timing = false
""")


def test_a_real_run_piped_at_80_columns(tmp_path):
    """The progress bar ends before the table; the table and verdict fit COLUMNS=80."""
    (tmp_path / "m.toml").write_text(MATRIX)
    env = {**os.environ, "COLUMNS": "80", "CPBENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "cpbench.cli", "run", "--matrix", str(tmp_path / "m.toml"),
                           "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert max(len(l) for l in lines) <= 80, proc.stdout
    bar = max(i for i, l in enumerate(lines) if re.search(r"cells .* 2/2", l))
    header = next(i for i, l in enumerate(lines) if "speedup [95% CI]" in l)
    verdict = next(i for i, l in enumerate(lines) if l.startswith("Verdict"))
    assert bar < header < verdict
    end = lines[next(i for i, l in enumerate(lines) if l.startswith("2 cells: 2 ok, 0 failed")):]
    assert "report: not written (add --report, or run: cpbench report" in " ".join(end)
    assert any("no accuracy: the model has no data set" in l for l in lines)
    assert "drop pt" not in lines[header] and "no drop column: no accuracy (no data set)" in " ".join(proc.stdout.split())
