"""Running a whole matrix: skip finished cells, hand the rest to an executor, write every result.

The client process owns the results file: each row is appended and flushed the moment it arrives,
then ``cpbench_cell_finished`` is called. A crash loses no finished cell; ``resume`` skips them.
"""
from __future__ import annotations

import functools
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .inputs import check_model_specs
from .matrix import Matrix
from ..plugin.manager import get_plugins
from .results import RESULTS_FILE, ResultSink, finished_keys
from .cell import RunContext, run_cell

__all__ = ["RunSummary", "run_matrix"]


@dataclass
class RunSummary:
    out_dir: Path
    total: int
    skipped: int
    ok: int
    failed: int
    rows: list

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_matrix(matrix: Matrix, out_dir: str | Path, *, resume: bool = False, executor: str = "local",
               executor_options: dict | None = None, ctx: RunContext | None = None,
               progress=None, plugins=None, stream=None) -> RunSummary:
    """Run every cell of ``matrix`` not yet in ``out_dir/results.jsonl`` (with ``resume``)."""
    plugins = plugins or get_plugins()
    stream = stream or sys.stderr
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    if path.exists() and path.stat().st_size and not resume:
        raise UsageError(f"{path} already holds results; pass --resume to finish that run, or choose another --out")
    ctx = ctx or RunContext.from_matrix(matrix)
    cells = matrix.cells()
    check_model_specs([c.model for c in cells], ctx, plugins)  # bad inputs fail now, not in every cell
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(matrix.source)
    if src.is_file() and not (out_dir / "matrix.toml").exists():
        shutil.copyfile(src, out_dir / "matrix.toml")  # the report shows what produced the run
    done = finished_keys(path) if resume else set()
    todo = [c for c in cells if c.key not in done]
    ex = plugins.executors.get(executor)
    executor_options = dict(executor_options or {})
    if matrix.run.get("cell_timeout_s") is not None:
        executor_options.setdefault("cell_timeout_s", matrix.run["cell_timeout_s"])
    sink = ResultSink(path)
    if sink.dropped_torn_line:
        print(f"cpbench: dropped a torn last line in {path} (a crash mid-write); that cell runs again", file=stream)
    rows, ok, failed = [], 0, 0
    emitted: set[str] = set()

    def emit(row: dict) -> None:
        nonlocal ok, failed
        if row.get("cell_key") in emitted:  # an executor retry must not duplicate a row
            return
        emitted.add(row.get("cell_key"))
        sink.write(row)
        rows.append(row)
        if row.get("status") == "ok":
            ok += 1
        else:
            failed += 1
        try:
            plugins.hook.cpbench_cell_finished(result=row)
        except Exception as exc:
            print(f"cpbench: a cpbench_cell_finished hook failed: {type(exc).__name__}: {exc}", file=stream)
        if progress is not None:
            progress.advance_cell(row)

    if progress is not None:
        progress.start(len(todo), skipped=len(cells) - len(todo))
    try:
        ex.execute(todo, functools.partial(run_cell, ctx=ctx, plugins=plugins), emit,
                   step=(progress.step if progress is not None else None), **executor_options)
    finally:
        sink.close()
        if progress is not None:
            progress.stop()
    return RunSummary(out_dir, len(cells), len(cells) - len(todo), ok, failed, rows)
