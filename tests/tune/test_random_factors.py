"""random_factorization: the layout of a real decomposition, so the block timed is the block used."""
import pytest
import torch
from torch import nn

import cpbench


@pytest.mark.parametrize("method,rank", [("cp-als", 5), ("cp-nls", 5), ("tucker2", [3, 2]), ("spatial-svd", 4)])
@pytest.mark.parametrize("groups", [1, 2])
def test_random_factors_build_the_same_block(method, rank, groups):
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
    dec = cpbench.get_decomposer(method)
    opts = {"groups": groups} if groups > 1 else {}
    real = dec.build(conv, dec.decompose(conv.weight.detach(), rank, **opts))
    fake = dec.build(conv, dec.random_factorization(tuple(conv.weight.shape), rank, **opts))
    assert type(real) is type(fake)
    assert [(n, p.shape) for n, p in real.named_parameters()] == [(n, p.shape) for n, p in fake.named_parameters()]
    x = torch.randn(1, 4, 6, 6)
    assert real(x).shape == fake(x).shape == conv(x).shape
