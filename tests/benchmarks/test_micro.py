"""Micro-benchmarks (pytest-benchmark) of the decomposers and the CP block forward.

Skipped by the normal test run (``addopts = --benchmark-skip``); run with
``python -m pytest tests/benchmarks --benchmark-only``. Each benchmark records its rank and the
theoretical speedup (FLOPs of the conv / FLOPs of the replacement) in ``benchmark.extra_info``.
"""
from __future__ import annotations

import pytest
import torch

import cpbench
from cpbench.decomposition.factorization import Factorization
from cpbench.nn.flops import count_flops

from benchmarks._fixtures import make_conv, make_input

# bounded iterations: each decomposition well under 2 s on one core
DECOMPOSERS = {
    "cp-nls": {"max_iter": 20},
    "cp-als": {"n_iter_max": 50},
    "tucker2": {"n_iter_max": 5},
    "spatial-svd": {},
}
RANK = 16


def _rank(name, conv, rank=RANK):
    return (min(rank, conv.out_channels), min(rank, conv.in_channels)) if name == "tucker2" else rank


def _theoretical(conv, block, x) -> float:
    return count_flops(conv, x) / max(count_flops(block, x), 1)


@pytest.mark.parametrize("layer", ["charnet-conv2", "alexnet-conv2"])
@pytest.mark.parametrize("name", list(DECOMPOSERS))
def test_decompose(benchmark, name, layer):
    benchmark.group = f"decompose {name}"
    conv = make_conv(layer)
    dec = cpbench.get_decomposer(name)
    w = conv.weight.detach()
    rank = _rank(name, conv)
    fact = benchmark.pedantic(dec.decompose, args=(w, rank), kwargs={"seed": 0, **DECOMPOSERS[name]},
                              rounds=3, iterations=1, warmup_rounds=0)
    assert isinstance(fact, Factorization) and 0 <= fact.rel_error < 1
    block = dec.build(conv, fact).eval()
    x = make_input(layer)
    benchmark.extra_info.update(layer=layer, rank=rank, rel_error=fact.rel_error,
                                theoretical_speedup=_theoretical(conv, block, x))


@pytest.mark.benchmark(group="forward charnet-conv2")
@pytest.mark.parametrize("rank", [None, 16, 64], ids=["conv", "cp16", "cp64"])
def test_forward_charnet_conv2(benchmark, rank):
    _forward(benchmark, "charnet-conv2", rank)


@pytest.mark.benchmark(group="forward alexnet-conv2")
@pytest.mark.parametrize("rank", [None, 16, 64], ids=["conv", "cp16", "cp64"])
def test_forward_alexnet_conv2(benchmark, rank):
    _forward(benchmark, "alexnet-conv2", rank)


@pytest.mark.parametrize("layer", ["charnet-conv2", "alexnet-conv2"])
@pytest.mark.parametrize("form", ["cp4", "cp4-band", "cp4-fused"])
def test_forward_form(benchmark, layer, form):
    """One forward pass of a rank-64 CP4 block (seeded random factors) in each exact execution form."""
    from cpbench.kernels.forms import build_form, rel_error
    from cpbench.nn.layers import CPBlock, geometry

    conv = make_conv(layer)
    x = make_input(layer)
    g = torch.Generator().manual_seed(7)
    k, t, s = conv.kernel_size[0], conv.out_channels, conv.in_channels
    block = CPBlock(geometry(conv), torch.randn(1, t, 64, generator=g), torch.randn(1, s, 64, generator=g),
                    h=torch.randn(1, k, 64, generator=g), w=torch.randn(1, k, 64, generator=g)).eval()
    model = build_form(block, form, tuple(x.shape))
    benchmark.group = f"forward forms {layer}"
    benchmark.extra_info.update(layer=layer, rank=64, form=form, theoretical_speedup=_theoretical(conv, block, x))
    with torch.inference_mode():
        y = benchmark(model, x)
        assert rel_error(y, block(x)) <= 1e-5


def _forward(benchmark, layer, rank):
    """The original conv (rank None) or the CP4 block cp-nls builds at ``rank``, one forward pass."""
    conv = make_conv(layer)
    x = make_input(layer)
    if rank is None:
        model, theo = conv, 1.0
    else:
        dec = cpbench.get_decomposer("cp-nls")
        fact = dec.decompose(conv.weight.detach(), rank, seed=0, max_iter=5)
        model = dec.build(conv, fact).eval()
        theo = _theoretical(conv, model, x)
    benchmark.extra_info.update(layer=layer, rank=rank, theoretical_speedup=theo)
    with torch.inference_mode():
        y = benchmark(model, x)
    assert y.shape == conv(x).shape
