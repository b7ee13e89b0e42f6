"""Thread pools: torch intra-op threads plus the MKL/OpenMP/BLAS pools via threadpoolctl, restored after."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from threadpoolctl import threadpool_info, threadpool_limits

__all__ = ["thread_limits", "thread_state"]


def thread_state() -> dict:
    """What the pools are set to now: torch intra/inter-op threads and each native pool."""
    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "pools": [
            {"api": p.get("internal_api"), "lib": p.get("prefix"), "version": p.get("version"),
             "threads": p.get("num_threads")}
            for p in threadpool_info()
        ],
    }


@contextlib.contextmanager
def thread_limits(threads: int | None, *, user_api: str | None = None) -> Iterator[dict]:
    """Set torch's intra-op threads and the native pools to ``threads``; restore both on exit.

    ``threads=None`` leaves everything as it is. Yields :func:`thread_state` as set.
    """
    if threads is None:
        yield thread_state()
        return
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=threads, user_api=user_api):
            torch.set_num_threads(threads)
            yield thread_state()
    finally:
        torch.set_num_threads(before)
