"""Small networks shaped like the ones people deploy, shared by the tests: BatchNorm after convs,
a residual add, a concatenation, upsampling and several outputs (tuple, list or dict)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))  # residual add


class MultiHead(nn.Module):
    """3×16×16 in; a classifier (N, classes) and a dense map (N, 1, 16, 16) out."""

    def __init__(self, c: int = 16, classes: int = 5, outputs: str = "tuple"):
        super().__init__()
        self.outputs = outputs
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = Block(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.layer2 = Block(2 * c)
        self.fuse = nn.Conv2d(3 * c, c, 3, padding=1)  # on a concatenation
        self.head = nn.Conv2d(c, 1, 1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        a = self.layer1(self.stem(x))
        b = self.layer2(F.relu(self.down(a)))
        up = F.interpolate(b, scale_factor=2, mode="nearest")  # upsampling
        dense = self.head(F.relu(self.fuse(torch.cat([a, up], 1))))  # concatenation
        logits = self.fc(b.mean((2, 3)))
        if self.outputs == "dict":
            return {"logits": logits, "map": dense}
        if self.outputs == "list":
            return [logits, dense]
        return logits, dense


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def multihead(outputs: str = "tuple", seed: int = 0) -> MultiHead:
    torch.manual_seed(seed)
    return randomize_bn(MultiHead(outputs=outputs), seed)
