"""Fixtures of the pytest-benchmark micro-benchmarks (skipped by the normal test run).

Run them with ``python -m pytest tests/benchmarks --benchmark-only`` (see docs/regression-tracking.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the seeded layers live once, in the asv suite's fixtures (benchmarks/_fixtures.py)
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def one_thread():
    """torch and the native BLAS/OpenMP pools at one thread: stable numbers on a shared machine."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=1):
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)
