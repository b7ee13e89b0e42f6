"""``resnet``: the CIFAR ResNets of He et al. (2016, section 4.2): ResNet-20/32/44/56/110.

A 3×3 stem conv to 16 channels, three stages of ``n = (depth - 2) / 6`` basic blocks at 16, 32 and
64 channels (the second and third stages start with stride 2), global average pooling, one linear
layer. Shortcuts are the paper's option A: identity, and where the shape changes the input
subsampled and zero-padded to the new channel count, so every conv is a 3×3 conv (ResNet-20: 19 of
them, 0.27 M parameters) and a decomposer sees the paper's network, not one with extra 1×1
projections.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
..., ``fc``), so globs such as ``layer*.conv2`` work. Params: ``depth`` [20] (6n+2), ``num_classes``
and ``in_channels`` (taken from the data set when the model has one; else 10 and 3), ``width`` [16]
(channels of the first stage), ``input_size`` [32] (used only when there is no data set).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpbench import hookimpl
from cpbench.errors import UsageError

__all__ = ["BasicBlock", "CifarResNet", "ResNetModel"]


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN with a shortcut; option A (subsample, zero-pad channels) when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes, stages = width, []
        for i in range(3):
            out = width * 2**i
            blocks = [BasicBlock(planes, out, 1 if i == 0 else 2)] + [BasicBlock(out, out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            planes = out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNetModel:
    name = "resnet"
    dataset = None
    default_layers = None  # every conv
    # filled from the model's data set when not given (see README "Your own network")
    from_dataset = ("num_classes", "in_channels")
    ALLOWED = ("depth", "num_classes", "in_channels", "width", "input_size")

    def _check(self, params: dict) -> None:
        unknown = sorted(set(params) - set(self.ALLOWED))
        if unknown:
            raise UsageError(f"model 'resnet' got unknown params {unknown}; allowed: {', '.join(self.ALLOWED)}")
        depth = params.get("depth", 20)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise UsageError(f"model 'resnet': depth {depth!r} is not allowed; allowed: 6n+2 ≥ 8 (20, 32, 44, 56, 110)")

    def build(self, **params) -> nn.Module:
        self._check(params)
        return CifarResNet(params.get("depth", 20), params.get("num_classes", 10), params.get("in_channels", 3),
                           params.get("width", 16))

    def input_shape(self, **params) -> tuple:
        self._check(params)
        s = params.get("input_size", 32)
        return (params.get("in_channels", 3), s, s)

    def label(self, **params) -> str:
        return f"ResNet-{params.get('depth', 20)}"


@hookimpl
def cpbench_register_models(registry) -> None:
    registry.add(ResNetModel())
