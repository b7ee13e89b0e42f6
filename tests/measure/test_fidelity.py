"""Fidelity over every output tensor; top-1 agreement on the classifier output."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from _nets import multihead  # noqa: E402

from cpbench.measure.fidelity import SEEDED_SAMPLES, evaluation_inputs, fidelity, fidelity_fields  # noqa: E402
from cpbench.nn.outputs import classifier_output, output_rel_error, output_tensors  # noqa: E402


def test_identical_networks_have_zero_error_and_full_agreement():
    m = multihead()
    x = evaluation_inputs(None, (3, 16, 16))
    assert x.shape == (SEEDED_SAMPLES, 3, 16, 16) and torch.equal(x, evaluation_inputs(None, (3, 16, 16)))
    f = fidelity(m, copy.deepcopy(m), x, batch_size=16)
    assert f.rel_error == 0.0 and f.top1_agreement == 1.0 and f.samples == SEEDED_SAMPLES


@pytest.mark.parametrize("outputs", ["tuple", "dict", "list"])
def test_error_is_over_every_output_tensor_and_agreement_on_the_logits(outputs):
    base = multihead(outputs)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.head.bias += 0.5  # changes only the dense map, not the logits
    x = torch.randn(40, 3, 16, 16)
    f = fidelity(base, other, x, batch_size=7)  # batches that do not divide the sample
    with torch.no_grad():
        yb, yc = base(x), other(x)
    assert f.rel_error == pytest.approx(output_rel_error(yc, yb), rel=1e-6) and f.rel_error > 0
    assert f.top1_agreement == 1.0
    logits = classifier_output(yb)
    assert logits.shape == (40, 5) and logits is output_tensors(yb)[0]


def test_no_classifier_output_gives_no_agreement_and_fields_without_finetuning():
    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return (self.conv(x),)

    m = Dense()
    f = fidelity(m, m, torch.randn(4, 3, 8, 8))
    assert f.top1_agreement is None
    row = fidelity_fields(f, None)
    assert row["rel_error"] == 0.0 and row["rel_error_finetuned"] is None and row["top1_agreement_finetuned"] is None
