"""Seeded layers and inputs of the micro-benchmarks (the same fixed layers as the asv suite)."""
from __future__ import annotations

import math

import torch
from torch import nn

# The two fixed layers of the asv suite: (in, out, kernel, padding, input H×W).
LAYERS = {
    "charnet-conv2": (48, 128, 9, 0, (16, 16)),
    "alexnet-conv2": (64, 192, 5, 2, (27, 27)),
}


def make_conv(name: str, seed: int = 0) -> nn.Conv2d:
    """A seeded conv whose kernel is a rank-32 CP tensor plus 5 % noise (so rel_error means something)."""
    cin, cout, k, pad, _ = LAYERS[name]
    g = torch.Generator().manual_seed(seed)
    r = 32
    a, b, c, d = (torch.randn(n, r, generator=g, dtype=torch.float64) for n in (cout, cin, k, k))
    w = torch.einsum("r,tr,sr,hr,wr->tshw", 0.85 ** torch.arange(r, dtype=torch.float64), a, b, c, d)
    w = w / w.norm()
    noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
    w = w + 0.05 * noise / noise.norm()
    conv = nn.Conv2d(cin, cout, k, padding=pad)
    with torch.no_grad():
        conv.weight.copy_((w / w.std() / math.sqrt(cin * k * k)).float())
    return conv.eval()


def make_input(name: str, batch: int = 1, seed: int = 1) -> torch.Tensor:
    cin, _, _, _, hw = LAYERS[name]
    return torch.randn(batch, cin, *hw, generator=torch.Generator().manual_seed(seed))
