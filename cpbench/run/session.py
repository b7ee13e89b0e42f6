"""Running a whole matrix: skip finished cells, hand the rest to an executor, write every result.

The client process owns the results file: each row is appended and flushed the moment it arrives,
then ``cpbench_cell_finished`` is called. A crash loses no finished cell; ``resume`` skips them and
runs again the cells whose last attempt failed (unless ``keep_errors``). The run directory is
locked for the whole run (:class:`~cpbench.rundir.RunLock`): a second run on it stops at once.
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .inputs import check_model_specs
from .matrix import Matrix
from ..plugin.manager import get_plugins
from .results import RESULTS_FILE, ResultSink, finished_keys, latest_rows, read_results
from .rundir import RunLock, check_writable
from .cell import RunContext, retime_cell, run_cell

__all__ = ["RunSummary", "run_matrix"]


def _later_passes(rows: list, cells: dict, sink: ResultSink, ctx: RunContext, plugins, progress, stream) -> int:
    """Every timing pass after the first (``[timing] passes``), over the cells of this run in order: each
    cell timed again in its share of the processes, its row appended again with the interval over all
    of them (and replaced in ``rows``). Runs in this process, whatever the executor: it is the cheap
    part (the networks come from the cache). A cell that fails here keeps the row it has."""
    step = progress.step if progress is not None else (lambda s: None)
    passes = max((r.get("timing_passes") or 1 for r in rows if "_timing_runs" in r), default=1)
    for p in range(2, passes + 1):  # pass p of every cell before pass p + 1 of any
        for i, row in enumerate(rows):
            cell = cells.get(row.get("cell_key"))
            if cell is None or row.get("status") != "ok" or "_timing_runs" not in row or row["timing_pass"] != p - 1:
                continue
            step(f"timing pass {p} of {passes}: {row.get('model')} {row.get('decomposer')} {row.get('backend')} "
                 f"batch {row.get('batch')}")
            try:
                new = retime_cell(cell, row, ctx, plugins=plugins, step=step)
            except Exception as exc:  # noqa: BLE001 - the earlier pass's row stands
                print(f"cpbench: timing pass {p} of a cell failed ({type(exc).__name__}: {exc}); its row keeps "
                      f"the processes of the passes before", file=stream)
                continue
            sink.write(new)
            rows[i] = new
    for r in rows:  # what the caller gets is what the file holds
        for k in [k for k in r if k.startswith("_")]:
            del r[k]
    return passes


def compact_results(path: Path) -> None:
    """Rewrite the results file without the rows a later timing pass superseded (atomically: a crash
    leaves the old file, which readers handle the same way), so that the file holds one row per cell."""
    import os
    import tempfile

    from .results import jsonable

    rows = read_results(path)  # superseded rows dropped
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.writelines(json.dumps(jsonable(r), sort_keys=True) + "\n" for r in rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class RunSummary:
    out_dir: Path
    total: int
    skipped: int
    ok: int
    failed: int
    rows: list
    errors_in_file: int = 0  # cells of the results file whose last row is an error (this run's or kept)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.errors_in_file else 0


def run_matrix(matrix: Matrix, out_dir: str | Path, *, resume: bool = False, keep_errors: bool = False,
               executor: str = "local", executor_options: dict | None = None, ctx: RunContext | None = None,
               progress=None, plugins=None, stream=None) -> RunSummary:
    """Run every cell of ``matrix`` not yet in ``out_dir/results.jsonl`` (with ``resume``; a cell whose
    last row is an error runs again unless ``keep_errors``)."""
    stream = stream or sys.stderr
    out_dir = check_writable(out_dir)
    with RunLock(out_dir) as lock:
        if lock.stale_owner:
            print(f"cpbench: {out_dir} was locked by a run that is gone (pid {lock.stale_owner.get('pid')} on "
                  f"{lock.stale_owner.get('host')}); taking it over", file=stream)
        return _run_locked(matrix, out_dir, resume=resume, keep_errors=keep_errors, executor=executor,
                           executor_options=executor_options, ctx=ctx, progress=progress, plugins=plugins,
                           stream=stream)


def _run_locked(matrix, out_dir: Path, *, resume, keep_errors, executor, executor_options, ctx, progress,
                plugins, stream) -> RunSummary:
    plugins = plugins or get_plugins()
    path = out_dir / RESULTS_FILE
    if path.exists() and path.stat().st_size and not resume:
        raise UsageError(f"{path} already holds results; pass --resume to finish that run, or choose another --out")
    ctx = ctx or RunContext.from_matrix(matrix)
    cells = matrix.cells()
    check_model_specs([c.model for c in cells], ctx, plugins)  # bad inputs fail now, not in every cell
    src = Path(matrix.source)
    if src.is_file() and not (out_dir / "matrix.toml").exists():
        shutil.copyfile(src, out_dir / "matrix.toml")  # the report shows what produced the run
    done = finished_keys(path, errors_count=keep_errors) if resume else set()
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
        passes = _later_passes(rows, {c.key: c for c in todo}, sink, ctx, plugins, progress, stream)
    finally:
        sink.close()
        if progress is not None:
            progress.stop()
    if passes > 1:
        compact_results(path)
    keys = {c.key for c in cells}
    latest, _ = latest_rows(read_results(path)) if path.is_file() else ([], None)
    errors_in_file = sum(r.get("status") != "ok" for r in latest if r.get("cell_key") in keys)
    return RunSummary(out_dir, len(cells), len(cells) - len(todo), ok, failed, rows, errors_in_file)
