"""Crashes must not cost finished work: a SIGKILLed client resumes with no row lost or duplicated,
a torn last line is dropped, an executor that emits a row twice still records it once, and a cell
that runs past ``cell_timeout_s`` becomes an error row while the run goes on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpbench import hookimpl
from cpbench.run.matrix import load_matrix, parse_matrix
from cpbench.run.session import run_matrix
from cpbench.plugin.manager import Plugins, get_plugins
from cpbench.run.results import read_results
from cpbench.run.cell import RunContext

CONV = {"name": "conv", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "input_size": 8, "padding": 1}
# These tests are about faults, not timing: cells are timed in the harness (processes = 0), so that one
# fits the 3-second cell timeout below without starting a fork server and five workers.
TIMING = {"budget_s": 0.2, "min_rounds": 5, "warmup": 1, "processes": 0}


pytestmark = pytest.mark.usefixtures("fresh_state")  # tests/conftest.py


def matrix(decomposers=("cp-als", "spatial-svd"), ranks=(2,), timing=TIMING):
    return parse_matrix({"run": {"per_layer_timing": False}, "timing": timing,
                         "matrix": {"model": [CONV], "decomposer": list(decomposers), "rank": list(ranks)}},
                        registries=get_plugins().registries)


def ctx(cache_dir, timing=TIMING):
    return RunContext(cache_dir=str(cache_dir), timing=timing, per_layer_timing=False)


def raw_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line is a whole JSON object


MATRIX_TOML = """
[run]
per_layer_timing = false
[matrix]
model = [{name = "conv", in_channels = 8, out_channels = 8, kernel_size = 3, input_size = 8, padding = 1}]
decomposer = ["cp-als", "spatial-svd"]
rank = [1, 2]
[timing]
budget_s = 0.5
min_rounds = 5
max_rounds = 100000
warmup = 1
target_ci_rel = 0.0
"""


def _group_empties(pgid: int, timeout: float) -> bool:
    """True once no live (non-zombie) process is left in process group ``pgid``."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_client_sigkilled_mid_run_then_resume(tmp_path):
    """``cpbench run --executor dask`` is SIGKILLed after its first row; ``--resume`` finishes the rest."""
    pytest.importorskip("distributed")
    mfile = tmp_path / "m.toml"
    mfile.write_text(MATRIX_TOML)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    cmd = [sys.executable, "-m", "cpbench.cli", "run", "--matrix", str(mfile), "--out", str(out),
           "--cache-dir", str(tmp_path / "cache"), "--executor", "dask", "--workers", "1"]
    log = open(tmp_path / "client.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "client.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # the client only; its worker processes are orphaned
        proc.wait()
        assert _group_empties(proc.pid, 60), "worker processes outlived their SIGKILLed client"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever this test started and is still alive
        except ProcessLookupError:
            pass
        log.close()
    before = read_results(out)
    m = load_matrix(mfile, registries=get_plugins().registries)
    assert 1 <= len(before) < len(m), "the kill came too late to test a resume"
    prefix = results.read_bytes()
    summary = run_matrix(m, out, resume=True, ctx=ctx(tmp_path / "cache", timing=m.timing))
    assert summary.skipped == len(before)
    assert len(summary.rows) == len(m) - len(before)  # only the missing cells ran
    rows = raw_lines(results)
    assert sorted(r["cell_key"] for r in rows) == sorted(c.key for c in m.cells())  # none lost, none twice
    assert rows[: len(before)] == before  # finished rows untouched
    good = b"".join(line + b"\n" for line in prefix.split(b"\n")[: len(before)])
    assert results.read_bytes().startswith(good)
    assert all(r["status"] == "ok" for r in rows)
    assert all(r.get("worker", "tcp://").startswith("tcp://") for r in before)


def test_torn_last_line_is_dropped_and_its_cell_reruns(tmp_path, capsys):
    m = matrix(ranks=(2,))
    run_matrix(m, tmp_path, ctx=ctx(tmp_path / "cache"))
    path = tmp_path / "results.jsonl"
    full = path.read_bytes()
    first, second = full.splitlines(keepends=True)
    path.write_bytes(first + second[: len(second) // 2])  # a crash in the middle of writing row 2
    assert [r["cell_key"] for r in read_results(tmp_path)] == [json.loads(first)["cell_key"]]
    capsys.readouterr()
    summary = run_matrix(m, tmp_path, resume=True, ctx=ctx(tmp_path / "cache"))
    assert "dropped a torn last line" in capsys.readouterr().err
    assert (summary.skipped, len(summary.rows)) == (1, 1)
    rows = raw_lines(path)
    assert sorted(r["cell_key"] for r in rows) == sorted(c.key for c in m.cells())
    assert path.read_bytes().startswith(first)


def test_garbage_tail_without_newline_is_dropped(tmp_path):
    m = matrix(decomposers=("spatial-svd",), ranks=(2,))
    run_matrix(m, tmp_path, ctx=ctx(tmp_path / "cache"))
    path = tmp_path / "results.jsonl"
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"cell_key": "0123456789abcdef", "status": "o')
    summary = run_matrix(m, tmp_path, resume=True, ctx=ctx(tmp_path / "cache"))
    assert (summary.skipped, len(summary.rows)) == (1, 0)
    assert path.read_bytes() == good


class _TwiceExecutor:
    """Emits every row twice, as a retrying executor might after a lost acknowledgement."""

    name = "twice"

    def execute(self, cells, run_cell, emit, *, step=None):
        for cell in cells:
            row = run_cell(cell)
            emit(row)
            emit(dict(row, rerun=True))


class _TwicePlugin:
    @hookimpl
    def cpbench_register_executors(self, registry):
        registry.add(_TwiceExecutor())


def test_rows_emitted_twice_are_recorded_once(tmp_path):
    plugins = Plugins(extra={"twice-test": _TwicePlugin()})
    m = matrix()
    summary = run_matrix(m, tmp_path, executor="twice", plugins=plugins, ctx=ctx(tmp_path / "cache"))
    rows = raw_lines(tmp_path / "results.jsonl")
    assert sorted(r["cell_key"] for r in rows) == sorted(c.key for c in m.cells())
    assert not any(r.get("rerun") for r in rows)
    assert summary.ok == 2


class _Progress:
    def __init__(self):
        self.steps, self.cells = [], []

    def start(self, total, skipped=0):
        pass

    def step(self, text):
        self.steps.append(text)

    def advance_cell(self, row):
        self.cells.append(row["status"])

    def stop(self):
        pass


def test_local_cell_timeout(tmp_path, monkeypatch):
    """A cell past ``cell_timeout_s`` on the local executor is an error row; the run goes on."""
    executors_dir = str(Path(__file__).resolve().parents[1] / "plugins" / "executors")
    monkeypatch.syspath_prepend(executors_dir)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([executors_dir, os.environ.get("PYTHONPATH", "")]))
    import cpbench_testplugins  # the child process imports it too (a directly registered plugin)

    cpbench_testplugins.install()
    m = matrix(decomposers=({"name": "crashy-svd", "sleep_s": 300}, "spatial-svd"), ranks=(2,))
    progress = _Progress()
    started = time.monotonic()
    summary = run_matrix(m, tmp_path, executor_options={"cell_timeout_s": 3}, ctx=ctx(tmp_path / "cache"),
                         progress=progress)
    assert time.monotonic() - started < 120
    rows = {r["decomposer"]: r for r in raw_lines(tmp_path / "results.jsonl")}
    assert rows["crashy-svd"]["status"] == "error"
    assert rows["crashy-svd"]["error"] == "timed out after 3 s"
    assert rows["spatial-svd"]["status"] == "ok"
    assert (summary.ok, summary.failed, summary.exit_code) == (1, 1, 1)
    assert progress.cells == ["error", "ok"]
    assert any(s.startswith("decomposing conv") for s in progress.steps)  # relayed from the child
