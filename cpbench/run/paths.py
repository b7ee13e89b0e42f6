"""Where a spec's relative paths point: the directory of the matrix file that names them.

A model or data set spec says ``path = "images"`` or ``target = "nets.py:Net"``; the file is found
next to the matrix file, not in whatever directory the command happened to run from. The run sets
that directory (:func:`spec_dir`) around each cell; plugins call :func:`resolve_path`.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path

__all__ = ["resolve_path", "spec_dir", "read_toml"]

_BASE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cpbench_spec_dir", default=None)


def resolve_path(path: str | Path) -> Path:
    """``path`` as given when absolute, else relative to the matrix file's directory (or the
    current directory when there is no matrix file, as in :func:`cpbench.benchmark`)."""
    p = Path(path).expanduser()
    base = _BASE.get()
    return p if p.is_absolute() or base is None else base / p


@contextlib.contextmanager
def spec_dir(directory: str | Path | None) -> Iterator[None]:
    """Resolve relative spec paths against ``directory`` inside the block (None: the cwd)."""
    token = _BASE.set(Path(directory) if directory is not None else None)
    try:
        yield
    finally:
        _BASE.reset(token)


def read_toml(path: str | Path, what: str, error: type[Exception] | None = None) -> dict:
    """The TOML document at ``path``; ``error`` (default :class:`cpbench.errors.UsageError`) with one line
    naming the file when it is missing, not text or not TOML. ``what``: "matrix", "plan", "model spec"."""
    import tomllib

    from ..errors import UsageError

    error = error or UsageError
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{p}: not a TOML {what} file: {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{p}: not a text file") from None
