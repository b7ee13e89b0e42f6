"""``alexnet``: the paper's AlexNet (Krizhevsky et al. 2012, Caffe layout with grouped conv2/4/5).

Randomly initialised (no weights can be downloaded here): for timing, not accuracy.
conv2 is 5×5, 96→256 in 2 groups (2×48→2×128), on 27×27. Params: num_classes [1000],
input_size [227], features_only [false] (drop the classifier).
"""
from __future__ import annotations

import torch
from torch import nn

from cpbench import hookimpl
from cpbench.errors import UsageError


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, features_only: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.MaxPool2d(3, 2)
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.features_only = features_only
        if not features_only:
            self.fc6 = nn.Linear(256 * 6 * 6, 4096)
            self.fc7 = nn.Linear(4096, 4096)
            self.fc8 = nn.Linear(4096, num_classes)

    def forward(self, x):
        x = self.pool(self.lrn(self.relu(self.conv1(x))))
        x = self.pool(self.lrn(self.relu(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.pool(self.relu(self.conv5(x)))
        if self.features_only:
            return x
        x = torch.flatten(x, 1)
        x = self.relu(self.fc6(x))
        x = self.relu(self.fc7(x))
        return self.fc8(x)


class AlexNetModel:
    name = "alexnet"
    description = "the paper's AlexNet (grouped conv2/4/5); no data set"
    dataset = None
    default_layers = ["conv2"]
    ALLOWED = ("num_classes", "input_size", "features_only")

    def _check(self, params):
        unknown = sorted(set(params) - set(self.ALLOWED))
        if unknown:
            raise UsageError(f"model 'alexnet' got unknown params {unknown}; allowed: {', '.join(self.ALLOWED)}")

    def build(self, **params):
        self._check(params)
        return AlexNet(params.get("num_classes", 1000), params.get("features_only", False))

    def input_shape(self, **params):
        self._check(params)
        s = params.get("input_size", 227)
        return (3, s, s)


@hookimpl
def cpbench_register_models(registry):
    registry.add(AlexNetModel())
