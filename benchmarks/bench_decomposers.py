"""asv benchmarks of the registered decomposers: reconstruction error, wall time and peak memory.

All on the seeded kernels of :mod:`benchmarks._fixtures`, single-threaded, with bounded iterations.
"""
from __future__ import annotations

from ._fixtures import (
    DECOMPOSER_NAMES,
    LAYER_NAMES,
    RANKS,
    decompose,
    setup_cache_decompositions,
    single_thread,
)


class TrackRelError:
    """||W - Ŵ|| / ||W|| of each decomposer at fixed ranks (lower is better)."""

    params = (LAYER_NAMES, DECOMPOSER_NAMES, RANKS)
    param_names = ["layer", "decomposer", "rank"]
    unit = "relative error"
    rounds = 1
    timeout = 600

    setup_cache = setup_cache_decompositions  # shared: the decompositions are made once per commit

    def track_rel_error(self, cache, layer, decomposer, rank):
        return cache[(layer, decomposer, rank)]["rel_error"]


class TimeDecompose:
    """Wall time of one decomposition at rank 16 (bounded iterations, one thread)."""

    params = (LAYER_NAMES, DECOMPOSER_NAMES)
    param_names = ["layer", "decomposer"]
    number = 1
    repeat = (2, 4, 6.0)
    warmup_time = 0
    timeout = 120

    def setup(self, layer, decomposer):
        import cpbench

        from ._fixtures import DECOMPOSERS, make_conv, rank_for

        conv = make_conv(layer)
        self.w = conv.weight.detach()
        self.rank = rank_for(decomposer, RANKS[0], conv)
        self.dec = cpbench.get_decomposer(decomposer)
        self.options = DECOMPOSERS[decomposer]
        self._threads = single_thread(1).__enter__()

    def teardown(self, layer, decomposer):
        self._threads.__exit__(None, None, None)

    def time_decompose(self, layer, decomposer):
        self.dec.decompose(self.w, self.rank, seed=0, **self.options)


class PeakmemDecompose:
    """Peak resident memory of the process while decomposing at rank 16 (includes torch itself)."""

    params = (LAYER_NAMES, DECOMPOSER_NAMES)
    param_names = ["layer", "decomposer"]
    timeout = 120

    def peakmem_decompose(self, layer, decomposer):
        decompose(layer, decomposer, RANKS[0])
