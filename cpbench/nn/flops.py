"""FLOPs: measured with ``torch.utils.flop_counter`` for models, and closed forms for rank search.

The closed forms are only used to search ranks quickly ("speedup:4"); the numbers recorded in
results come from :func:`count_flops`, and a test checks the two agree.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import ConvGeometry

__all__ = ["count_flops", "conv_out_hw", "conv_macs", "cp_block_macs", "theoretical_speedup"]


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs (2 × multiply-adds) of one forward pass, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return int(counter.get_total_flops())


def conv_out_hw(geo: ConvGeometry, in_hw: tuple[int, int]) -> tuple[int, int]:
    """The conv's output (H, W): :meth:`ConvGeometry.out_hw` (kept as a function for plugins)."""
    return geo.out_hw(in_hw)


def conv_macs(geo: ConvGeometry, in_hw: tuple[int, int]) -> int:
    ho, wo = conv_out_hw(geo, in_hw)
    return ho * wo * geo.out_channels * (geo.in_channels // geo.groups) * geo.kh * geo.kw


def cp_block_macs(geo: ConvGeometry, rank: int, in_hw: tuple[int, int], *, form: str = "cp4") -> int:
    """Multiply-adds of the CP block (rank per group) on an input of spatial size ``in_hw``."""
    h, w = in_hw
    ho, wo = conv_out_hw(geo, in_hw)
    gr = geo.groups * rank
    first = h * w * gr * (geo.in_channels // geo.groups)
    if form == "cp3":
        middle = ho * wo * gr * geo.kh * geo.kw
    else:
        middle = ho * w * gr * geo.kh + ho * wo * gr * geo.kw
    last = ho * wo * geo.out_channels * rank
    return first + middle + last


def theoretical_speedup(original: nn.Module, compressed: nn.Module, example_input: torch.Tensor) -> float:
    return count_flops(original, example_input) / max(count_flops(compressed, example_input), 1)
