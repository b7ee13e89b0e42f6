"""The TensorLy-Torch comparison times the same function on both sides (skipped without tensorly-torch,
a benchmark-only dependency: pip install --no-deps tensorly-torch)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tltorch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))
import layer_suite  # noqa: E402
import tltorch_compare  # noqa: E402


@pytest.mark.parametrize("implementation", tltorch_compare.TLTORCH_FORWARDS)
def test_tltorch_conv_holds_the_blocks_factors(implementation):
    layer = layer_suite.Layer("t", 6, 10, 3, 1, 9, 1, (5,))
    _, block = layer_suite.build(layer, 5)
    peer = tltorch_compare.tltorch_conv(layer, block, implementation)
    x = torch.randn(2, 6, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(peer(x), block(x), rtol=1e-4, atol=1e-5)
