"""The results file: ``results.jsonl``, one JSON object per finished cell, appended and flushed.

A crash can leave at most a torn last line; :func:`read_results` detects and drops it (and
:class:`ResultSink` truncates it before appending), so ``--resume`` never sees a corrupt row.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["RESULTS_FILE", "ResultSink", "read_results", "finished_keys", "jsonable"]

RESULTS_FILE = "results.jsonl"


def jsonable(value: Any) -> Any:
    """Plain JSON types only: tensors → lists, tuples → lists, NaN/inf → None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return repr(value)


def _scan(path: Path) -> tuple[list[dict], int, bool]:
    """Rows, the byte offset after the last good line, and whether a torn line followed."""
    rows, good_end, torn = [], 0, False
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        end = len(data) if nl < 0 else nl + 1
        if line.strip():
            try:
                row = json.loads(line)
                if nl < 0 or not isinstance(row, dict):
                    raise ValueError("unterminated")
                rows.append(row)
            except ValueError:
                torn = True
                break
        good_end = end
        pos = end
    return rows, good_end, torn


def read_results(path: str | Path) -> list[dict]:
    """Every complete row of a results file (or of ``DIR/results.jsonl``); a torn tail is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise UsageError(f"no results file at {path}")
    return _scan(path)[0]


def finished_keys(path: str | Path) -> set[str]:
    path = Path(path)
    if not path.is_file():
        return set()
    return {r["cell_key"] for r in _scan(path)[0] if "cell_key" in r}


class ResultSink:
    """Appends rows to a results file, one flushed and fsynced line per row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_torn_line = False
        if self.path.exists():
            _, good_end, torn = _scan(self.path)
            if torn or good_end != self.path.stat().st_size:
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
                self.dropped_torn_line = True
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(jsonable(row), sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
