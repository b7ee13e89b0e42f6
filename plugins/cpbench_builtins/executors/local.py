"""``local``: run cells one after another in this process (the default executor)."""
from __future__ import annotations

from cpbench import hookimpl
from cpbench.errors import UsageError


class LocalExecutor:
    name = "local"

    def execute(self, cells, run_cell, emit, *, step=None, **options):
        if options:
            raise UsageError(f"executor 'local' takes no options, got {sorted(options)}")
        for cell in cells:
            emit(run_cell(cell, step=step))


@hookimpl
def cpbench_register_executors(registry):
    registry.add(LocalExecutor())
