"""The TensorLy-Torch comparison times the same function on both sides (skipped without tensorly-torch,
a benchmark-only dependency: pip install --no-deps tensorly-torch)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tltorch") is None,
                                reason="tensorly-torch is not installed (pip install --no-deps tensorly-torch)")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))
import layer_suite  # noqa: E402
import tltorch_compare  # noqa: E402


@pytest.fixture
def tensorly_backend():
    """Importing tltorch switches TensorLy's global backend to pytorch; the rest of the suite expects
    the one it had."""
    import tensorly as tl

    before = tl.get_backend()
    yield
    tl.set_backend(before)


@pytest.mark.parametrize("implementation", tltorch_compare.TLTORCH_FORWARDS)
def test_tltorch_conv_holds_the_blocks_factors(implementation, tensorly_backend):
    layer = layer_suite.Layer("t", 6, 10, 3, 1, 9, 1, (5,))
    _, block = layer_suite.build(layer, 5)
    peer = tltorch_compare.tltorch_conv(layer, block, implementation)
    x = torch.randn(2, 6, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(peer(x), block(x), rtol=1e-4, atol=1e-5)


def test_with_the_dense_layer_each_sides_efficiency_comes_from_the_same_passes(tensorly_backend):
    """--dense: the dense layer is timed against cpbench's block in each pass; TensorLy-Torch's efficiency is
    cpbench's over their ratio, and the efficiency a 1.5x lead needs is 1.5 times TensorLy-Torch's."""
    from cpbench.plugin.manager import Plugins

    plugins = Plugins()
    layer = layer_suite.Layer("t", 6, 10, 3, 1, 9, 1, (5,))
    backends = [plugins.backends.get("torch-cpu")]
    cell = tltorch_compare.run_cell(layer, 5, 1, 1, backends, dense=backends)
    assert cell["status"] == "ok" and cell["dense"] == "torch-cpu" and not cell["errors"]
    (p,) = cell["passes"]
    assert p["dense_speedup"] > 0 and p["dense_ms"] > 0
    assert cell["efficiency_cpbench"] == pytest.approx(p["dense_speedup"] / cell["theo"])
    assert cell["efficiency_tltorch"] == pytest.approx(cell["efficiency_cpbench"] / cell["speedup"])
    assert cell["efficiency_needed"] == pytest.approx(tltorch_compare.TARGET * cell["efficiency_tltorch"])
    assert "efficiency cpbench" in tltorch_compare.format_row(cell)
