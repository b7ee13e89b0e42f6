"""BatchNorm folding: exact to 1e-5, only where a BatchNorm directly follows a conv."""
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))
from _nets import multihead, randomize_bn  # noqa: E402

from cpbench.nn.bnfold import conv_bn_pairs, fold_batchnorm  # noqa: E402
from cpbench.nn.outputs import output_rel_error  # noqa: E402


def test_folded_network_equals_the_original_to_1e5_and_the_input_is_untouched():
    model = multihead()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 3, 16, 16)
    folded, names = fold_batchnorm(model)
    assert names == {"stem.1": "stem.0", "layer1.bn1": "layer1.conv1", "layer1.bn2": "layer1.conv2",
                     "layer2.bn1": "layer2.conv1", "layer2.bn2": "layer2.conv2"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert output_rel_error(folded(x), model(x)) < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Branchy(nn.Module):
    """conv1's output is read twice (by bn1 and by the add): folding bn1 into conv1 would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)  # follows a relu, not the conv
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.conv1(x)
        b = self.bn1(a) + a
        c = self.bn2(F.relu(self.conv2(b)))
        return self.bn3(self.conv3(c))


def test_only_a_batchnorm_whose_input_is_the_conv_output_alone_is_folded():
    model = randomize_bn(_Branchy())
    assert conv_bn_pairs(model) == [("conv3", "bn3")]
    folded, names = fold_batchnorm(model)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert output_rel_error(folded(x), model(x)) < 1e-5


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; only the Sequential pair is provable."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # fx cannot follow this
            y = -y
        return self.bn(self.conv(y))  # adjacent in code, but not provably so from module order


def test_untraceable_network_folds_only_provable_sequential_pairs():
    model = randomize_bn(_Untraceable())
    folded, names = fold_batchnorm(model)
    assert names == {"body.1": "body.0"}
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert output_rel_error(folded(x), model(x)) < 1e-5


def test_train_mode_batchnorm_and_shared_kernels_are_handled():
    model = multihead()
    model.train()
    assert fold_batchnorm(model)[1] == {}  # batch statistics: not an affine map
    model.eval()
    model.layer1.conv2.weight = model.layer1.conv1.weight  # one kernel, two layers, different BNs
    x = torch.randn(2, 3, 16, 16)
    folded, names = fold_batchnorm(model)
    assert "layer1.bn1" in names and "layer1.bn2" in names
    with torch.no_grad():
        assert output_rel_error(folded(x), model(x)) < 1e-5


def test_a_module_called_twice_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    assert fold_batchnorm(randomize_bn(Twice()))[1] == {}
