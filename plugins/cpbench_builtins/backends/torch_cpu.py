"""``torch-cpu``: eager PyTorch, the model exactly as given (the reference every backend is checked against)."""
from __future__ import annotations

import torch
from torch import nn

from cpbench import hookimpl
from cpbench.plugin.contracts import Prepared


class TorchCPU:
    """Eager PyTorch in eval mode under ``torch.inference_mode()``; nothing else changed."""

    name = "torch-cpu"
    description = "eager PyTorch, the model as it is (the reference)"

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared:
        model.eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return Prepared(run=run, info={"threads": threads, "layout": "contiguous"})


@hookimpl
def cpbench_register_backends(registry):
    registry.add(TorchCPU())
