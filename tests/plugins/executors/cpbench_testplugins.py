"""A test-only decomposer plugin, importable by Dask worker processes (tests put this directory on
PYTHONPATH and preload this module on workers, where ``dask_setup`` registers it).

``crashy-svd`` is ``spatial-svd`` plus two options:
  sleep_s [0]   sleep before decomposing (a slow cell).
  crash [false] if the file named by $CPBENCH_TEST_CRASH_MARKER exists, claim it (rename: only one
                process wins) and kill this process with ``os._exit(1)``; later calls run normally.
  fail [false]  if the file named by $CPBENCH_TEST_FAIL_MARKER exists, raise RuntimeError (a failure
                that depends on the computation: the cell becomes an error row; remove the file and it runs).
Each call appends a line "pid" to $CPBENCH_TEST_CALL_LOG when that is set.
"""
from __future__ import annotations

import os
import time

from cpbench import hookimpl

NAME = "cpbench-testplugins"


class CrashySVD:
    name = "crashy-svd"
    version = "1"

    def __init__(self):
        from cpbench_builtins.decomposers.spatial_svd import SpatialSVD

        self._inner = SpatialSVD()

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def decompose(self, weight, rank, *, seed=0, sleep_s=0, crash=False, fail=False, **options):
        log = os.environ.get("CPBENCH_TEST_CALL_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        marker = os.environ.get("CPBENCH_TEST_CRASH_MARKER")
        if crash and marker:
            try:
                os.rename(marker, f"{marker}.claimed-{os.getpid()}")
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        fail_marker = os.environ.get("CPBENCH_TEST_FAIL_MARKER")
        if fail and fail_marker and os.path.exists(fail_marker):
            raise RuntimeError("the solver diverged (test failure)")
        if sleep_s:
            time.sleep(sleep_s)
        return self._inner.decompose(weight, rank, seed=seed, **options)

    def build(self, conv, factorization):
        return self._inner.build(conv, factorization)


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(CrashySVD())


def install() -> None:
    """Make this module part of the process-wide plugin set (client or worker)."""
    import sys

    from cpbench.plugin.manager import Plugins, reset_plugins

    reset_plugins(Plugins(extra={NAME: sys.modules[__name__]}))


def dask_setup(worker=None):  # Dask preload hook
    install()
