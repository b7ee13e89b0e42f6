"""The results file: ``results.jsonl``, one JSON object per finished cell, appended and flushed.

A crash can leave at most a torn last line; :func:`read_results` detects and drops it (and
:class:`ResultSink` truncates it before appending), so ``--resume`` never sees a corrupt row.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["RESULTS_FILE", "ResultSink", "read_results", "finished_keys", "latest_rows", "Duplicates", "jsonable"]

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
    """Rows, the byte offset where a torn tail starts (file size if none), and whether there is one.

    Only the tail can be torn by a crash: an unterminated last line, or an unparsable last line.
    A bad line in the middle (e.g. two writers on one file) is skipped, never truncated away, so
    the good rows after it are not lost.
    """
    with open(path, "rb") as f:
        data = f.read()
    rows: list[dict] = []
    lines = data.split(b"\n")
    pos, tail_start = 0, len(data)
    for i, line in enumerate(lines):
        last = i == len(lines) - 1  # the segment after the final newline ("" when the file ends well)
        end = pos + len(line) + (0 if last else 1)
        if line.strip():
            try:
                row = json.loads(line)
                if last or not isinstance(row, dict):
                    raise ValueError("unterminated or not an object")
                rows.append(row)
            except ValueError:
                if last or all(not l.strip() for l in lines[i + 1:]):
                    tail_start = pos
                    break
        pos = end
    return rows, tail_start, tail_start < len(data)


def read_results(path: str | Path, *, superseded: bool = False) -> list[dict]:
    """Every complete row of a results file (or of ``DIR/results.jsonl``); a torn tail is dropped. A row
    that a later timing pass of its cell superseded (``timing_pass``, see README "How timing works") is
    left out unless ``superseded``; the later row takes its place."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise UsageError(f"no results file at {path}")
    rows = _scan(path)[0]
    return rows if superseded else _drop_superseded(rows)


def _drop_superseded(rows: list[dict]) -> list[dict]:
    """Rows without those a later pass of the same cell replaced, each later pass where its first was."""
    last: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.get("timing_pass") and r.get("cell_key") and r.get("status") == "ok":
            last[r["cell_key"]] = i
    out, placed = [], {}
    for i, r in enumerate(rows):
        k = r.get("cell_key")
        if k in last and r.get("timing_pass") and r.get("status") == "ok":
            if k not in placed:
                placed[k] = len(out)
                out.append(rows[last[k]])
            continue
        out.append(r)
    return out


def finished_keys(path: str | Path, *, errors_count: bool = False) -> set[str]:
    """The cells ``--resume`` skips: those with an ok row (and, with ``errors_count``, those whose
    last attempt failed: ``--keep-errors``)."""
    path = Path(path)
    if not path.is_file():
        return set()
    rows, _ = latest_rows(_scan(path)[0])
    return {r["cell_key"] for r in rows if "cell_key" in r and (errors_count or r.get("status") == "ok")}


@dataclass(frozen=True)
class Duplicates:
    """Cells with more than one ok row: two runs wrote into one file (an older cpbench without the run
    lock, or results files concatenated). Not resolved silently: the reader says so."""

    cells: int   # cells with duplicates
    extra: int   # rows beyond one per cell
    example: dict | None = None  # one of the duplicated rows

    def __bool__(self) -> bool:
        return self.cells > 0

    def message(self, where: str | Path) -> str:
        ex = self.example or {}
        what = ", ".join(f"{k} {ex.get(k)}" for k in ("model", "decomposer", "rank_spec", "backend", "batch")
                         if ex.get(k) is not None)
        return (f"{where}: {self.cells} cell(s) have more than one ok row ({self.extra} extra; e.g. {what}): two runs "
                f"wrote into one results file; the last row of each cell is used")


def latest_rows(rows: list[dict]) -> tuple[list[dict], Duplicates]:
    """One row per cell: its last ok row, else its last row (an error that a resume ran again is
    superseded by the new attempt; a cell's first timing pass by its later ones, ``timing_pass``), in
    the order cells first appear; and the duplicated ok rows."""
    by_key: dict[str, dict] = {}
    ok_count: dict[str, int] = {}
    example = None
    for i, r in enumerate(rows):
        k = r.get("cell_key") or f"#{i}"
        ok = r.get("status") == "ok"
        if ok and (r.get("timing_pass") or 1) == 1:  # a later timing pass supersedes its cell's row
            ok_count[k] = ok_count.get(k, 0) + 1
            if ok_count[k] == 2 and example is None:
                example = r
        prev = by_key.get(k)
        if prev is None or ok or prev.get("status") != "ok":
            by_key[k] = r
    dup = [n for n in ok_count.values() if n > 1]
    return list(by_key.values()), Duplicates(len(dup), sum(n - 1 for n in dup), example)


class ResultSink:
    """Appends rows to a results file, one flushed and fsynced line per row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_torn_line = False
        if self.path.exists():
            _, tail_start, torn = _scan(self.path)
            if torn:
                with open(self.path, "r+b") as f:
                    f.truncate(tail_start)
                self.dropped_torn_line = True
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        public = {k: v for k, v in row.items() if not k.startswith("_")}  # in-memory only (cell.run_cell)
        self._f.write(json.dumps(jsonable(public), sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
