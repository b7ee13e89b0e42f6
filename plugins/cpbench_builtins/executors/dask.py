"""``dask``: run cells on Dask's distributed scheduler (an existing cluster, or a LocalCluster).

Options (from ``cpbench run --executor dask ...``):
  scheduler        address of an existing scheduler, e.g. ``tcp://host:8786`` (``--scheduler``).
  workers          start a ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`` on
                   this machine (``--workers N``); default 1 when no scheduler is given.
  cell_timeout_s   a cell running longer becomes an error row "timed out after N s" (the cell then
                   runs in a child process of the worker, which is killed on overrun).
  retries [1]      Dask retries of a cell task that raised (cells record their own errors, so this
                   covers failures of the task wrapper itself).
  allowed_failures [3]  for the LocalCluster: how many workers may die running one cell before it
                   is given up (an error row); an existing scheduler uses its own setting.

Timing exclusivity: every cell task requires the worker resource ``cpbench-slot: 1`` and every
worker offers exactly one slot, so a worker runs at most one cell — hence at most one timing — at
a time. Workers of an existing cluster must be started with ``--resources cpbench-slot=1``.

Results stream back as cells finish (``distributed.as_completed``) and go through ``emit`` in the
client, which writes them to the results file. Each row gets ``worker`` (the worker's address);
``host`` is recorded by ``run_cell`` itself. Before submitting, the plugin set of every worker is
compared with the client's; each task checks again (for workers that join later).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import threading
import uuid

from cpbench import hookimpl
from cpbench.errors import UsageError

from ._cellproc import CellProcess, error_row

SLOT = "cpbench-slot"
WORKER_WAIT_S = 60.0

_CELLPROC = threading.local()  # one child per worker thread, used only with cell_timeout_s


def _plugin_versions() -> dict:
    from cpbench.plugin.manager import get_plugins

    return get_plugins().versions()


def _plugin_diff(mine: dict, theirs: dict) -> str:
    parts = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a != b:
            parts.append(f"{name}: client {a or 'missing'}, worker {b or 'missing'}")
    return "; ".join(parts)


def run_on_worker(cell, run_cell, timeout_s, expected_plugins) -> dict:
    """The task: one cell on a Dask worker (module-level, so workers unpickle it by reference)."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:  # not on a worker (a direct call)
        address = None
    have = _plugin_versions()
    if have != expected_plugins:
        row = error_row(cell, f"worker {address} has a different plugin set than the client: "
                              f"{_plugin_diff(expected_plugins, have)}")
    elif timeout_s:
        proc = getattr(_CELLPROC, "proc", None)
        if proc is None:
            proc = _CELLPROC.proc = CellProcess()
        row = proc.run(run_cell, cell, timeout_s)
    else:
        row = run_cell(cell)
    row["worker"] = address
    return row


def _positive(name, value, kind=float):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and value != int(value)):
        raise UsageError(f"executor 'dask': {name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


class DaskExecutor:
    name = "dask"
    cli_options = ("scheduler", "workers")  # `cpbench run --scheduler/--workers` are for this executor
    description = "cells on a Dask cluster (--scheduler or --workers)"

    def execute(self, cells, run_cell, emit, *, step=None, scheduler=None, workers=None, cell_timeout_s=None,
                retries=1, allowed_failures=3, **unknown):
        if unknown:
            raise UsageError(f"executor 'dask' got unknown options {sorted(unknown)}; allowed: scheduler, "
                             "workers, cell_timeout_s, retries, allowed_failures")
        if scheduler is not None and workers is not None:
            raise UsageError("executor 'dask': give --scheduler (an existing cluster) or --workers N (a local one), not both")
        workers = _positive("workers", workers, int)
        cell_timeout_s = _positive("cell_timeout_s", cell_timeout_s)
        cells = list(cells)
        if not cells:
            return
        run_cell = _absolute_cache_dir(run_cell)
        try:
            pickle.dumps((run_cell, cells[0]))
        except Exception as exc:
            raise UsageError(f"executor 'dask': the cell function does not pickle, so it cannot go to workers: "
                             f"{type(exc).__name__}: {exc}") from None

        import dask
        from distributed import Client, LocalCluster

        cluster = client = None
        try:
            if scheduler is None:
                if step:
                    step(f"starting a local Dask cluster with {workers or 1} worker(s)")
                with dask.config.set({"distributed.scheduler.allowed-failures": int(allowed_failures)}):
                    cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1, processes=True,
                                           resources={SLOT: 1}, dashboard_address=None,
                                           silence_logs=logging.ERROR, scheduler_port=0)
                client = Client(cluster)
            else:
                try:
                    client = Client(scheduler, timeout=WORKER_WAIT_S)
                except OSError as exc:
                    raise UsageError(f"executor 'dask': cannot reach scheduler {scheduler}: {exc}") from None
            self._check_workers(client, scheduler)
            self._run(client, cells, run_cell, emit, step, cell_timeout_s, retries)
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()

    @staticmethod
    def _check_workers(client, scheduler) -> None:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise UsageError(f"executor 'dask': no worker joined scheduler {scheduler} within {WORKER_WAIT_S:g} s") from None
        info = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else client.scheduler_info()["workers"]
        if not any((w.get("resources") or {}).get(SLOT, 0) >= 1 for w in info.values()):
            raise UsageError(f"executor 'dask': no worker of {scheduler} offers the resource {SLOT!r}; start workers "
                             f"with `dask worker {scheduler} --nthreads 1 --resources {SLOT}=1`")
        mine = _plugin_versions()
        for address, theirs in client.run(_plugin_versions).items():
            if theirs != mine:
                raise UsageError(f"executor 'dask': worker {address} has a different plugin set than the client "
                                 f"({_plugin_diff(mine, theirs)}); install the same packages on every worker")

    @staticmethod
    def _run(client, cells, run_cell, emit, step, cell_timeout_s, retries) -> None:
        from distributed import as_completed

        expected = _plugin_versions()
        token = uuid.uuid4().hex[:8]
        futures = {}
        for cell in cells:
            fut = client.submit(run_on_worker, cell, run_cell, cell_timeout_s, expected,
                                key=f"cpbench-cell-{cell.key}-{token}", resources={SLOT: 1},
                                retries=int(retries), pure=False)
            futures[fut] = cell
        n_workers = len(client.nthreads())
        if step:
            step(f"{len(cells)} cells on {n_workers} Dask worker(s)")
        try:
            for fut in as_completed(list(futures)):
                cell = futures.pop(fut)
                if fut.status == "finished":
                    row = fut.result()
                else:  # e.g. KilledWorker: the cell killed more workers than allowed_failures
                    exc = fut.exception() if fut.status == "error" else None
                    row = error_row(cell, f"dask task {fut.status}: {type(exc).__name__}: {exc}" if exc
                                    else f"dask task {fut.status}")
                    row["worker"] = None
                fut.release()
                emit(row)
        finally:
            if futures:
                client.cancel(list(futures))


def _absolute_cache_dir(run_cell):
    """A relative ``--cache-dir`` means the client's directory: make it absolute before it travels."""
    ctx = run_cell.keywords.get("ctx") if isinstance(run_cell, functools.partial) else None
    cache_dir = getattr(ctx, "cache_dir", None)
    if cache_dir and not os.path.isabs(cache_dir) and dataclasses.is_dataclass(ctx):
        ctx = dataclasses.replace(ctx, cache_dir=os.path.abspath(cache_dir))
        return functools.partial(run_cell.func, *run_cell.args, **{**run_cell.keywords, "ctx": ctx})
    return run_cell


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


@hookimpl
def cpbench_register_executors(registry):
    registry.add(DaskExecutor())
