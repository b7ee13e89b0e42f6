"""Fidelity: how closely a compressed network reproduces its base network's outputs.

What a user without labels judges a compression by. On a fixed evaluation sample — the data set's
test split, or, without a data set, :data:`SEEDED_SAMPLES` seeded normal inputs of the model's input
shape — both networks run in eval mode and we record

* ``rel_error``: ‖y_c − y_b‖ / ‖y_b‖ over every output tensor of every sample together
  (:func:`cpbench.nn.outputs.output_rel_error`'s norm, accumulated batch by batch);
* ``top1_agreement``: the fraction of samples whose arg-max class agrees, on the classifier output
  (:func:`cpbench.nn.outputs.classifier_output`), or None when the network has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn.outputs import classifier_output, output_tensors

__all__ = ["SEEDED_SAMPLES", "Fidelity", "evaluation_inputs", "fidelity", "fidelity_fields"]

SEEDED_SAMPLES = 64


@dataclass(frozen=True)
class Fidelity:
    rel_error: float
    top1_agreement: float | None
    samples: int


def evaluation_inputs(test_data: Any, input_shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """The images of the test split, or seeded normal inputs of ``input_shape`` when there is no data."""
    if test_data is not None:
        from ..nn.training import as_tensors

        return as_tensors(test_data)[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SEEDED_SAMPLES, *input_shape, generator=g)


@torch.no_grad()
def fidelity(base: nn.Module, compressed: nn.Module, inputs: torch.Tensor, *, batch_size: int = 256) -> Fidelity:
    """Compare ``compressed`` against ``base`` on ``inputs`` (both in eval mode; modes restored)."""
    modes = (base.training, compressed.training)
    base.eval()
    compressed.eval()
    num = den = 0.0
    agree, classified = 0, 0
    has_classifier = True
    try:
        for i in range(0, len(inputs), batch_size):
            x = inputs[i:i + batch_size]
            yb, yc = base(x), compressed(x)
            for a, b in zip(output_tensors(yc), output_tensors(yb), strict=True):
                a, b = a.double(), b.double()
                num += float((a - b).pow(2).sum())
                den += float(b.pow(2).sum())
            cb, cc = classifier_output(yb), classifier_output(yc)
            if cb is None or cb.dim() != 2:
                has_classifier = False
                continue
            agree += int((cb.argmax(1) == cc.argmax(1)).sum())
            classified += len(cb)
    finally:
        base.train(modes[0])
        compressed.train(modes[1])
    rel = (num / den) ** 0.5 if den > 0 else num ** 0.5
    top1 = agree / classified if has_classifier and classified else None
    return Fidelity(rel, top1, len(inputs))


def fidelity_fields(before: Fidelity, after: Fidelity | None) -> dict:
    """The ``fidelity`` field of a result row; ``*_finetuned`` are None without fine-tuning."""
    return {"rel_error": before.rel_error, "top1_agreement": before.top1_agreement,
            "rel_error_finetuned": None if after is None else after.rel_error,
            "top1_agreement_finetuned": None if after is None else after.top1_agreement,
            "samples": before.samples}
