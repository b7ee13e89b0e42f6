"""Kernels in any memory layout — transposed storage, channels-last, a size-1 axis with an odd stride,
shared between layers — decompose, cache, compress, save and load like contiguous ones."""
import pytest
import torch
from torch import nn

import cpbench
from cpbench.run.cache import Cache, key_of, tensor_digest


def _layouts():
    w = torch.randn(16, 8, 3, 3)
    kx1 = torch.randn(16, 8, 1, 3).transpose(2, 3)  # (16, 8, 3, 1): "contiguous" with stride 3 on the last axis
    return {
        "transposed": torch.randn(8, 16, 3, 3).transpose(0, 1),
        "channels_last": w.contiguous(memory_format=torch.channels_last),
        "sliced": torch.randn(16, 8, 3, 6)[..., ::2],
        "kx1-odd-stride": kx1,
    }


RANKS = {"cp-nls": 3, "cp-als": 3, "tucker2": [4, 4], "spatial-svd": 2}


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("method", list(RANKS))
def test_every_decomposer_and_the_cache_take_any_layout(layout, method, tmp_path):
    w = _layouts()[layout]
    dense = w.contiguous().clone()
    assert tensor_digest(w) == tensor_digest(dense)  # the cache key does not depend on the layout
    f = cpbench.decompose(w, RANKS[method], method=method)
    g = cpbench.decompose(dense, RANKS[method], method=method)
    assert f.rel_error == pytest.approx(g.rel_error, rel=1e-4, abs=1e-6)
    cache = Cache(tmp_path)
    cache.put("factorizations", key_of(w, method), f.factors, {"rel_error": f.rel_error})
    got, _ = cache.get("factorizations", key_of(dense, method))
    assert all(torch.equal(got[k], f.factors[k].contiguous()) for k in f.factors)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))
        with torch.no_grad():
            self.a.weight = nn.Parameter(torch.randn(8, 8, 3, 3).contiguous(memory_format=torch.channels_last))
            self.b.weight = self.a.weight  # shared
            self.c.weight = nn.Parameter(torch.randn(8, 8, 1, 3).transpose(2, 3))

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def test_compress_save_and_load_a_network_with_odd_layouts_and_a_shared_kernel(tmp_path):
    net = _Net().eval()
    x = torch.randn(2, 8, 8, 8)
    small = cpbench.compress(net, {"a": ("spatial-svd", 24), "b": ("cp-als", 4), "c": ("spatial-svd", 8)})
    with torch.no_grad():
        assert torch.allclose(small.a(x), net.a(x), atol=1e-4)  # full-rank spatial SVD is exact
    path = cpbench.save(small, tmp_path / "small.safetensors")
    again = cpbench.load(path, base=_Net())
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
