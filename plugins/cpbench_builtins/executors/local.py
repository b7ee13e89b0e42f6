"""``local``: run cells one after another in this process (the default executor).

Option ``cell_timeout_s``: a cell running longer becomes an error row "timed out after N s" and the
run goes on. With it set, cells run in one child process (started once, replaced after a timeout),
since a running cell cannot be stopped inside this process.
"""
from __future__ import annotations

from cpbench import hookimpl
from cpbench.errors import UsageError


class LocalExecutor:
    name = "local"
    description = "cells one after another in this process (default)"

    def execute(self, cells, run_cell, emit, *, step=None, cell_timeout_s=None, **options):
        if options:
            raise UsageError(f"executor 'local' takes only the option cell_timeout_s, got {sorted(options)}")
        if cell_timeout_s is None:
            for cell in cells:
                emit(run_cell(cell, step=step))
            return
        if isinstance(cell_timeout_s, bool) or not isinstance(cell_timeout_s, (int, float)) or cell_timeout_s <= 0:
            raise UsageError(f"executor 'local': cell_timeout_s must be a positive number, got {cell_timeout_s!r}")
        from ._cellproc import CellProcess

        proc = CellProcess()
        try:
            for cell in cells:
                emit(proc.run(run_cell, cell, float(cell_timeout_s), step=step))
        finally:
            proc.close()


@hookimpl
def cpbench_register_executors(registry):
    registry.add(LocalExecutor())
