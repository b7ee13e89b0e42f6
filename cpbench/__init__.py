"""cpbench: benchmark low-rank decompositions of CNN conv layers for real CPU speedup.

The public surface is re-exported here; everything else is internal.
"""
from __future__ import annotations

import os as _os

# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning pools of one arm slow
# the other arm of a timed pair (measured: 44 ms -> 4.8 ms for a 2-thread AlexNet conv2 under load).
# Must be set before torch loads; a value already in the environment wins; recorded in results. Not set
# when torch is already loaded: it would have no effect, and the results would record a policy not in use.
# CPBENCH_OMP_WAIT_POLICY=default leaves libgomp's own (spin briefly, then sleep: best on a quiet machine,
# see README "OpenMP wait policy"); ACTIVE or PASSIVE are passed on.
_policy = _os.environ.get("CPBENCH_OMP_WAIT_POLICY", "PASSIVE").strip().upper()
if _policy != "DEFAULT" and "torch" not in __import__("sys").modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", _policy)

from .errors import (  # noqa: E402
    BackendError,
    CacheError,
    CpbenchError,
    MatrixError,
    PluginError,
    RankError,
    RunDirectoryError,
    SolverInputError,
    UnknownNameError,
    UsageError,
    WeightError,
)
from . import _aliases  # noqa: E402
from .decomposition.factorization import Factorization  # noqa: E402
from .run.paths import resolve_path  # noqa: E402
from .plugin.manager import get_plugins, hookimpl  # noqa: E402

_aliases.install()

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "hookimpl",
    "Factorization",
    "get_plugins",
    "resolve_path",
    "benchmark",
    "get_decomposer",
    "decompose",
    "compress",
    "save",
    "load",
    "fold_batchnorm",
    "select_layers",
    "CPDecomposer",
    "Prepared",
    "Backend",
    "CpbenchError",
    "UsageError",
    "UnknownNameError",
    "MatrixError",
    "RankError",
    "RunDirectoryError",
    "SolverInputError",
    "WeightError",
    "PluginError",
    "BackendError",
    "CacheError",
]


def get_decomposer(name: str):
    """The registered decomposer object called ``name`` (raises UnknownNameError listing the others)."""
    return get_plugins().decomposers.get(name)


def decompose(weight, rank, method: str = "cp-nls", **options) -> Factorization:
    """Decompose a conv kernel ``(out_channels, in_channels/groups, kh, kw)`` with a registered method."""
    return get_decomposer(method).decompose(weight, rank, **options)


# Heavier pieces load on first use so `import cpbench` stays cheap for plugins: name -> its home.
_LAZY = {
    "compress": "cpbench.nn.surgery",
    "save": "cpbench.nn.surgery",
    "load": "cpbench.nn.surgery",
    "fold_batchnorm": "cpbench.nn.bnfold",
    "select_layers": "cpbench.nn.selection",
    "CPDecomposer": "cpbench.decomposition.decomposer",
    "Prepared": "cpbench.plugin.contracts",
    "Backend": "cpbench.plugin.contracts",
    "benchmark": "cpbench.run.notebook",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cpbench' has no attribute {name!r}")
