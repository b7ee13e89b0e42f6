"""asv: the user suite's median efficiency over a fixed subset of its cells (benchmarks/scripts/user_suite.py).

The whole suite (144 cells) takes hours; asv tracks 6 of its cells per commit: the three layer shapes
whose blocks are most GEMM-bound (ResNet 128→128 at 28×28 and 512→512 at 7×7, the detector layer) at
``speedup:2`` and ``speedup:4``, batch 1, one thread, each timed as the suite times it (every backend of
the matrix except torch-compile, whose compile time would dominate; one final pass). Efficiency is larger
when better: a drop is the regression (asv itself flags rises, so read its graphs for the direction).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

LAYERS = ("128-128-k3@28", "512-512-k3@7", "256-512-k3@13")
SPECS = ("speedup:2", "speedup:4")
BACKENDS = ("torch-cpu", "mkl", "channels-last", "onnxruntime")


def _scripts():
    here = Path(__file__).resolve().parent / "scripts"
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    import layer_suite
    import user_suite

    return layer_suite, user_suite


class TrackUserSuite:
    """Median efficiency (fastest baseline / fastest compressed / theoretical speedup) of 6 cells."""

    unit = "efficiency"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 1800

    def track_median_efficiency(self):
        from cpbench.kernels import fused
        from cpbench.kernels.forms import configure_malloc
        from cpbench.plugin.manager import Plugins

        layer_suite, user_suite = _scripts()
        configure_malloc()
        fused.build_kernel()  # the explicit build step (a no-op once built for this machine)
        plugins = Plugins()
        suite, specs, _ = user_suite.suite_from_matrix(user_suite.MATRIX, plugins)
        chosen = [layer_suite.Layer(**{**lay.__dict__, "ranks": tuple(r for r in lay.ranks if specs[(lay.name, r)] in SPECS)})
                  for lay in suite if lay.name in LAYERS]
        cells = layer_suite.run_suite([plugins.backends.get(n) for n in BACKENDS], quick=True, log=lambda s: None,
                                      threads_list=(1,), batches=(1,), suite=chosen, passes=1)
        effs = [c["efficiency"] for c in cells if c["status"] == "ok"]
        return statistics.median(effs) if len(effs) == len(cells) else float("nan")
