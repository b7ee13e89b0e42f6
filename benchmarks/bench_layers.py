"""asv benchmarks of compressed layers: time ratio compressed/baseline (lower is better) and forward times.

The ratio is measured side by side (interleaved rounds, :func:`cpbench.timing.time_pair`, so machine
drift cancels) in fresh worker processes, as ``cpbench run`` times a cell (:mod:`cpbench.measure.workers`); asv treats a larger tracked value as worse, which is what a ratio
``compressed_ms / baseline_ms`` means (1 / speedup).
"""
from __future__ import annotations

import torch

from ._fixtures import (
    BACKENDS,
    DECOMPOSER_NAMES,
    LAYER_NAMES,
    RANKS,
    THREADS,
    build_block,
    setup_cache_decompositions,
    make_conv,
    make_input,
    random_cp_block,
)

# Short paired timing: enough rounds for a stable median ratio, bounded to ~1 s per cell, split over
# PROCESSES fresh processes (cpbench's own worker processes, as `cpbench run` times a cell): asv runs a
# track_ benchmark once per round, and the ratio should not hang on one process's memory placement.
PROCESSES = 2
_BUDGET = dict(warmup=2, min_rounds=10, max_rounds=200, budget_s=0.6, min_round_s=0.005, target_ci_rel=0.02)
# TrackCPBlock has only four cells and gates the regression demo: three processes of one second each,
# so one burst of load from other processes does not decide it.
_LONG_BUDGET = dict(warmup=3, min_rounds=20, max_rounds=400, budget_s=3.0, min_round_s=0.005, target_ci_rel=0.01)


def _ratio(base: torch.nn.Module, comp: torch.nn.Module, x: torch.Tensor, backend: str, threads: int,
           budget: dict = _BUDGET, processes: int = PROCESSES) -> float:
    """compressed/baseline time ratio: 1 / the two-level speedup over ``processes`` fresh processes."""
    from cpbench import get_plugins
    from cpbench.measure.cell_timing import measure_pairs
    from cpbench.threads import thread_limits
    from cpbench.timing import TimingBudget

    be = get_plugins().backends.get(backend)
    with thread_limits(threads):
        intervals, _, _ = measure_pairs(be, [("pair", base, comp, x, TimingBudget(**budget))], threads=threads,
                                        processes=processes)
    return 1.0 / intervals["pair"].speedup


class TrackSpeedup:
    """compressed_ms / baseline_ms of each decomposer's replacement block (lower is better)."""

    params = (LAYER_NAMES, DECOMPOSER_NAMES, RANKS, BACKENDS, THREADS)
    param_names = ["layer", "decomposer", "rank", "backend", "threads"]
    unit = "ratio"
    rounds = 1
    timeout = 600

    setup_cache = setup_cache_decompositions  # shared: the decompositions are made once per commit

    def setup(self, cache, layer, decomposer, rank, backend, threads):
        self.conv, self.block = build_block(cache, layer, decomposer, rank)
        self.x = make_input(layer)

    def track_time_ratio(self, cache, layer, decomposer, rank, backend, threads):
        return _ratio(self.conv, self.block, self.x, backend, threads)


class TrackCPBlock:
    """compressed_ms / baseline_ms of the paper's CP4 block (seeded random factors), eager torch, 1 thread.

    Needs no decomposition, so it runs in seconds: the benchmark the regression demo uses.
    """

    params = (LAYER_NAMES, RANKS)
    param_names = ["layer", "rank"]
    unit = "ratio"
    rounds = 1
    timeout = 120

    def setup(self, layer, rank):
        self.conv, self.block = random_cp_block(layer, rank)
        self.x = make_input(layer)

    def track_time_ratio(self, layer, rank):
        return _ratio(self.conv, self.block, self.x, "torch-cpu", 1, _LONG_BUDGET, processes=3)


class TrackCPForm:
    """compressed_ms / baseline_ms of each exact execution form of the CP4 block (cpbench.execution),
    eager NCHW, 1 thread: a regression in the fused kernel or the banded form shows here first."""

    params = (LAYER_NAMES, RANKS, ["cp4", "cp4-band", "cp4-fused"])
    param_names = ["layer", "rank", "form"]
    unit = "ratio"
    rounds = 1
    timeout = 180

    def setup(self, layer, rank, form):
        from cpbench.execution import build_form

        self.conv, block = random_cp_block(layer, rank)
        self.x = make_input(layer)
        try:
            self.block = build_form(block, form, tuple(self.x.shape))
        except Exception as exc:  # e.g. the fused kernel cannot be built here
            raise NotImplementedError(str(exc)) from exc

    def track_time_ratio(self, layer, rank, form):
        return _ratio(self.conv, self.block, self.x, "torch-cpu", 1, _BUDGET)


class _Threads:
    def _set_threads(self, threads):
        from threadpoolctl import threadpool_limits

        self._torch_threads = torch.get_num_threads()
        self._pools = threadpool_limits(limits=threads)
        torch.set_num_threads(threads)

    def teardown(self, *args):
        torch.set_num_threads(self._torch_threads)
        self._pools.restore_original_limits()


class TimeForward(_Threads):
    """Wall time of one forward pass of the CP4 block (batch 1, eager, inference mode)."""

    params = (LAYER_NAMES, RANKS, THREADS)
    param_names = ["layer", "rank", "threads"]
    repeat = (3, 20, 4.0)
    timeout = 120

    def setup(self, layer, rank, threads):
        self._set_threads(threads)
        self.conv, self.block = random_cp_block(layer, rank)
        self.x = make_input(layer)
        self._mode = torch.inference_mode()
        self._mode.__enter__()

    def teardown(self, *args):
        self._mode.__exit__(None, None, None)
        super().teardown(*args)

    def time_cp_block_forward(self, layer, rank, threads):
        self.block(self.x)


class TimeConvForward(_Threads):
    """Wall time of the original conv's forward pass (the baseline of TimeForward)."""

    params = (LAYER_NAMES, THREADS)
    param_names = ["layer", "threads"]
    repeat = (3, 20, 4.0)
    timeout = 120

    def setup(self, layer, threads):
        self._set_threads(threads)
        self.conv = make_conv(layer)
        self.x = make_input(layer)
        self._mode = torch.inference_mode()
        self._mode.__enter__()

    def teardown(self, *args):
        self._mode.__exit__(None, None, None)
        super().teardown(*args)

    def time_conv_forward(self, layer, threads):
        self.conv(self.x)
