import os

import pytest
import torch
from torch import nn

# Tests share two cores with whatever else runs; keep torch to one thread unless a test says otherwise.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache dir unless a test sets one."""
    if "CPBENCH_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("CPBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cpbench-cache"))
    yield
    from cpbench.kernels.forms import use_choice_store

    use_choice_store(None)  # a run's remembered form choices do not follow into the next test


@pytest.fixture
def plugins():
    from cpbench.plugin.manager import get_plugins

    return get_plugins()


@pytest.fixture
def fresh_state():
    """No memoised models/decompositions and a freshly loaded plugin set, before and after."""
    from cpbench.plugin.manager import reset_plugins
    from cpbench.run.cell import clear_memo

    clear_memo()
    reset_plugins()  # whatever an earlier test left: the entry-point plugin set
    yield
    clear_memo()
    reset_plugins()


# -- a small conv net with a CP block (random factors): the kernel-form and backend tests ---------------
def make_cp_net(seed: int = 0, *, groups: int = 1) -> nn.Sequential:
    from cpbench.nn.layers import CPBlock, geometry

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
