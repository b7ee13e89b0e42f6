"""A rich progress display over matrix cells, with the current step of the running cell."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["CellProgress"]


class CellProgress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                                  transient=False)
        self._task = None

    def start(self, total: int, skipped: int = 0) -> None:
        if skipped:
            self.console.print(f"resuming: {skipped} finished cell(s) kept, {total} to run")
        self._progress.start()
        self._task = self._progress.add_task("cells", total=total)

    def step(self, description: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, description=f"cells · {description}")

    def advance_cell(self, row: dict) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, description="cells")
        if row.get("status") != "ok":
            self._progress.console.print(f"[red]cell failed[/red] ({row.get('decomposer')}, rank {row.get('rank_spec')}, "
                                         f"{row.get('backend')}): {row.get('error')}")

    def stop(self) -> None:
        self._progress.stop()
