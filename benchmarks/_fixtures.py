"""Fixed layers, seeded kernels and bounded decomposer settings shared by the asv suite.

Everything here is deterministic: the kernels are seeded (a low-rank CP structure plus 5 % noise, so
the reconstruction error of a decomposer means something and moves when its quality changes),
decomposers run single-threaded with bounded iterations, and inputs are seeded. No file or cache is
read, so two commits are always measured on the same data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Layer", "LAYERS", "LAYER_NAMES", "DECOMPOSERS", "DECOMPOSER_NAMES", "RANKS", "BACKENDS",
    "THREADS", "BATCH", "make_conv", "make_input", "rank_for", "decompose", "decompose_all",
    "build_block", "random_cp_block", "single_thread", "setup_cache_decompositions",
]


@dataclass(frozen=True)
class Layer:
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    padding: int
    in_hw: tuple[int, int]
    seed: int


LAYERS = {
    # Lebedev et al. 2015, character network conv2: 48→128, 9×9, on the 16×16 map after conv1.
    "charnet-conv2": Layer("charnet-conv2", 48, 128, 9, 0, (16, 16), seed=1),
    # AlexNet conv2 (ungrouped): 64→192, 5×5, padding 2, on 27×27.
    "alexnet-conv2": Layer("alexnet-conv2", 64, 192, 5, 2, (27, 27), seed=2),
}
LAYER_NAMES = list(LAYERS)

# Bounded iteration counts keep every decomposition well under 2 s on one core.
DECOMPOSERS = {
    "cp-nls": {"max_iter": 20},
    "cp-als": {"n_iter_max": 50},
    "tucker2": {"n_iter_max": 5},
    "spatial-svd": {},
}
DECOMPOSER_NAMES = list(DECOMPOSERS)
RANKS = [16, 64]
BACKENDS = ["torch-cpu", "channels-last"]
THREADS = [1, 2]
BATCH = 1
KERNEL_TRUE_RANK = 32
KERNEL_NOISE = 0.05


class single_thread:
    """torch and the native BLAS/OpenMP pools at ``n`` threads inside the block (restored after)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self._torch = torch.get_num_threads()
        self._pools = threadpool_limits(limits=self.n)
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self._torch)
        self._pools.restore_original_limits()


def _kernel(layer: Layer) -> torch.Tensor:
    """A seeded (T, S, k, k) kernel: a rank-32 CP tensor with decaying terms plus 5 % Gaussian noise."""
    g = torch.Generator().manual_seed(layer.seed)
    t, s, k, r = layer.out_channels, layer.in_channels, layer.kernel, KERNEL_TRUE_RANK
    a, b, c, d = (torch.randn(n, r, generator=g, dtype=torch.float64) for n in (t, s, k, k))
    lam = 0.85 ** torch.arange(r, dtype=torch.float64)
    w = torch.einsum("r,tr,sr,hr,wr->tshw", lam, a, b, c, d)
    w = w / w.norm()
    noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
    w = w + KERNEL_NOISE * noise / noise.norm()
    # the scale of a default-initialised conv (std ≈ 1/sqrt(fan_in)); no denormals anywhere
    w = w / w.std() / math.sqrt(s * k * k)
    return w.float()


def make_conv(name: str) -> nn.Conv2d:
    layer = LAYERS[name]
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, padding=layer.padding)
    g = torch.Generator().manual_seed(layer.seed + 100)
    with torch.no_grad():
        conv.weight.copy_(_kernel(layer))
        conv.bias.copy_(torch.randn(layer.out_channels, generator=g) * 0.01)
    return conv.eval()


def make_input(name: str, batch: int = BATCH) -> torch.Tensor:
    layer = LAYERS[name]
    g = torch.Generator().manual_seed(layer.seed + 200)
    return torch.randn(batch, layer.in_channels, *layer.in_hw, generator=g)


def rank_for(decomposer: str, rank: int, conv: nn.Conv2d):
    """The rank argument for ``decomposer``: an int, or the pair (R, R) capped by the channels for Tucker-2."""
    if decomposer == "tucker2":
        return (min(rank, conv.out_channels), min(rank, conv.in_channels))
    return rank


def decompose(layer: str, decomposer: str, rank: int):
    """Decompose a layer's seeded kernel single-threaded with the bounded settings; a Factorization."""
    import cpbench

    conv = make_conv(layer)
    dec = cpbench.get_decomposer(decomposer)
    with single_thread(1):
        return dec.decompose(conv.weight.detach(), rank_for(decomposer, rank, conv), seed=0,
                             **DECOMPOSERS[decomposer])


def decompose_all() -> dict:
    """Every (layer, decomposer, rank) factorization as plain picklable data (for asv's setup_cache)."""
    out = {}
    for layer in LAYER_NAMES:
        for dec in DECOMPOSER_NAMES:
            for rank in RANKS:
                f = decompose(layer, dec, rank)
                out[(layer, dec, rank)] = {
                    "factors": {k: v.clone() for k, v in f.factors.items()},
                    "rel_error": float(f.rel_error),
                    "info": {k: v for k, v in f.info.items() if isinstance(v, (int, float, str, bool, list))},
                }
    return out


def setup_cache_decompositions(self):
    """asv ``setup_cache`` shared by every class that needs the factorizations: asv keys the cache by
    this function's module and line, so TrackSpeedup and TrackRelError decompose only once per commit."""
    return decompose_all()


setup_cache_decompositions.timeout = 900


def build_block(cache: dict, layer: str, decomposer: str, rank: int) -> tuple[nn.Conv2d, nn.Module]:
    """The original conv and its replacement built by the decomposer from a cached factorization."""
    import cpbench
    from cpbench.factorization import Factorization

    entry = cache[(layer, decomposer, rank)]
    conv = make_conv(layer)
    fact = Factorization(entry["factors"], entry["rel_error"], entry["info"])
    return conv, cpbench.get_decomposer(decomposer).build(conv, fact).eval()


def random_cp_block(layer: str, rank: int) -> tuple[nn.Conv2d, nn.Module]:
    """The conv and a CP4 block (cpbench.layers.CPBlock) of seeded random factors: timing needs no fit."""
    from cpbench.layers import CPBlock, geometry

    conv = make_conv(layer)
    geo = geometry(conv)
    g = torch.Generator().manual_seed(LAYERS[layer].seed + 300)
    t, s, k = conv.out_channels, conv.in_channels, conv.kernel_size[0]

    def f(*shape):
        return torch.randn(1, *shape, generator=g) / math.sqrt(shape[0])

    block = CPBlock(geo, f(t, rank), f(s, rank), h=f(k, rank), w=f(k, rank), bias=conv.bias.detach())
    return conv, block.eval()
