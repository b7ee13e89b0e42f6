"""The consoles the commands print to: the terminal's, or one as wide as ``$COLUMNS`` when piped."""
from __future__ import annotations

from rich.console import Console

from ..report.columns import table_width

__all__ = ["_console", "_wide_console"]


def _console() -> Console:
    """The terminal's console; when stdout is a file or pipe, one as wide as ``$COLUMNS`` (120 when
    unset)."""
    console = Console()
    return console if console.is_terminal else Console(width=table_width(console))


def _wide_console() -> Console:
    """For the comparison and paper tables, which have many columns: the terminal's console, or a wide
    one when stdout is a file or pipe (rich would squeeze them into 80 columns there)."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 240))
