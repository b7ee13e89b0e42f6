"""A small conv net with a CPBlock (random factors) and the backends under test."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cpbench.layers import CPBlock, geometry


def make_cp_net(seed: int = 0, *, groups: int = 1) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups)
    geo = geometry(conv)
    R = 6
    G = groups
    block = CPBlock(geo, torch.randn(G, 12 // G, R, generator=g) * 0.3, torch.randn(G, 8 // G, R, generator=g) * 0.3,
                    h=torch.randn(G, 3, R, generator=g), w=torch.randn(G, 3, R, generator=g),
                    bias=torch.randn(12, generator=g))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), block, nn.ReLU(),
                         nn.Conv2d(12, 4, 1)).eval()


@pytest.fixture
def cp_net():
    torch.manual_seed(0)
    return make_cp_net()


@pytest.fixture
def example():
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_net():
    return make_cp_net


@pytest.fixture(scope="session")
def plugins():
    from cpbench.pluginmanager import Plugins

    return Plugins()
