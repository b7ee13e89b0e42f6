"""Running a matrix: the matrix file, the session over its cells, one cell, the cache and the results file.

Where a change goes: matrix keys and expansion → ``matrix.py``; resume, executors and writing rows →
``session.py``; what one cell does → ``cell.py`` (the order of the stages) and ``stages.py`` (each
stage); the keys of a result row → ``record.py`` (:class:`CellResult`); values shared between cells →
``memo.py`` (in process) and ``cache.py`` (on disk); ``results.jsonl`` → ``results.py``; the progress
display → ``progress.py``; a model spec's network and data set (weights, training, input shape) →
``inputs.py``, where its relative paths point → ``paths.py``; ``cpbench.benchmark`` → ``notebook.py``.

The names below are the public surface for executor plugins and scripts (loaded on first use).
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "RunContext": "cell", "run_cell": "cell", "axes_result": "cell", "versions": "cell", "clear_memo": "cell",
    "base_model": "cell", "CellResult": "record", "run_matrix": "session", "RunSummary": "session",
    "Cell": "matrix", "Matrix": "matrix", "load_matrix": "matrix", "parse_matrix": "matrix",
    "read_results": "results", "ResultSink": "results", "Cache": "cache",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
