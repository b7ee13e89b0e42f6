"""``vgg``: VGG-11/13/16/19 with BatchNorm (Simonyan & Zisserman 2015, configurations A/B/D/E) for
32×32 inputs, as trained on CIFAR: five stages of 3×3 conv+BN+ReLU each ending in a 2×2 max-pool,
then global average pooling and one linear layer (the 4096-wide classifier of the ImageNet version
is the wrong size for 32×32 images, where the features are 1×1×512).

Module names follow torchvision (``features.0``, ``features.1``, ... and ``classifier``). Params:
``depth`` [16] (11, 13, 16, 19), ``num_classes`` and ``in_channels`` (from the data set when the
model has one; else 10 and 3), ``input_size`` [32] (at least 32: five pools halve it), used only when
there is no data set.
"""
from __future__ import annotations

import torch
from torch import nn

from cpbench import hookimpl
from cpbench.errors import UsageError

__all__ = ["VGG", "VGGModel", "CONFIGS"]

CONFIGS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class VGGModel:
    name = "vgg"
    dataset = None
    default_layers = None
    from_dataset = ("num_classes", "in_channels")
    ALLOWED = ("depth", "num_classes", "in_channels", "input_size")

    def _check(self, params: dict) -> None:
        unknown = sorted(set(params) - set(self.ALLOWED))
        if unknown:
            raise UsageError(f"model 'vgg' got unknown params {unknown}; allowed: {', '.join(self.ALLOWED)}")
        if params.get("depth", 16) not in CONFIGS:
            raise UsageError(f"model 'vgg': depth {params['depth']!r} is not allowed; allowed: 11, 13, 16, 19")

    def build(self, **params) -> nn.Module:
        self._check(params)
        return VGG(params.get("depth", 16), params.get("num_classes", 10), params.get("in_channels", 3))

    def input_shape(self, **params) -> tuple:
        self._check(params)
        s = params.get("input_size", 32)
        return (params.get("in_channels", 3), s, s)

    def label(self, **params) -> str:
        return f"VGG-{params.get('depth', 16)}"


@hookimpl
def cpbench_register_models(registry) -> None:
    registry.add(VGGModel())
