"""``channels-last``: eager PyTorch with model and input in ``torch.channels_last`` (NHWC storage).

oneDNN runs convolutions natively in NHWC, so no per-call reorders happen. The input is converted by
``Prepared.convert_input``, outside the timed region. ``fuse`` picks how CP blocks execute (see
:mod:`cpbench.kernels.forms`): "auto" (default) times the exact forms per block on its real input and keeps
the fastest; "cp4"/"cp3"/"cp3-gemm" force one form; "none" leaves the model as built.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cpbench import hookimpl
from cpbench.plugin.contracts import Prepared
from cpbench.kernels.forms import apply_forms, optimize_cp_blocks, replayed_choices


class ChannelsLast:
    name = "channels-last"
    description = "eager NHWC; CP blocks in their fastest exact form"

    def __init__(self, fuse: str = "auto"):
        self.fuse = fuse

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared:
        return self._prepare(model, example_input, threads, None)

    def prepare_as(self, model: nn.Module, example_input: torch.Tensor, *, threads: int, info: dict) -> Prepared:
        """As ``prepare``, with the forms an earlier ``prepare`` chose (its ``info``) built, not re-timed."""
        return self._prepare(model, example_input, threads, replayed_choices(info))

    def _prepare(self, model, example_input, threads, chosen) -> Prepared:
        info: dict = {"threads": threads, "layout": "channels_last", "fuse": self.fuse}
        if self.fuse == "auto":
            model, choices = optimize_cp_blocks(model, example_input, layout="channels_last", threads=threads,
                                                    chosen=chosen)
            info["cp_forms"] = [c.as_dict() for c in choices]
        elif self.fuse == "none":
            model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        else:
            model = apply_forms(model, self.fuse, layout="channels_last")
        model.eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return Prepared(run=run, info=info,
                        convert_input=lambda x: x.contiguous(memory_format=torch.channels_last))


@hookimpl
def cpbench_register_backends(registry):
    registry.add(ChannelsLast())
