"""The built-in architectures: ResNet-20/32/56 (CIFAR, option-A shortcuts) and VGG with BatchNorm."""
import pytest
import torch
from torch import nn

from cpbench.errors import UsageError
from cpbench_builtins.models.resnet import ResNetModel
from cpbench_builtins.models.vgg import VGGModel


def _convs(m):
    return [(n, c) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_resnet_depths_have_the_papers_layers_and_parameter_counts(depth, params):
    # He et al. 2016, table 6: ResNet-20 0.27M, -32 0.46M, -56 0.85M parameters; 6n+1 convs, all 3×3
    m = ResNetModel().build(depth=depth)
    convs = _convs(m)
    assert len(convs) == depth - 1
    assert all(c.kernel_size == (3, 3) for _, c in convs)
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_names_follow_torchvision_and_channels_come_from_params():
    m = ResNetModel().build(depth=20, num_classes=7, in_channels=1)
    names = [n for n, _ in _convs(m)]
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert "layer3.2.conv2" in names
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 7)
    assert ResNetModel().input_shape(in_channels=1, input_size=28) == (1, 28, 28)


def test_resnet_shortcut_pads_channels_and_subsamples():
    block = ResNetModel().build(depth=20).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2]) and not s[:, :8].any() and not s[:, 24:].any()


@pytest.mark.parametrize("bad", [{"depth": 21}, {"depth": 2}, {"depht": 20}])
def test_resnet_bad_params_are_one_line_errors(bad):
    with pytest.raises(UsageError) as e:
        ResNetModel().build(**bad)
    assert "\n" not in str(e.value) and ("allowed" in str(e.value))


@pytest.mark.parametrize("depth, convs", [(11, 8), (16, 13)])
def test_vgg_has_its_configurations_convs_each_followed_by_batchnorm(depth, convs):
    m = VGGModel().build(depth=depth, num_classes=5)
    layers = list(m.features)
    conv_idx = [i for i, l in enumerate(layers) if isinstance(l, nn.Conv2d)]
    assert len(conv_idx) == convs
    assert all(isinstance(layers[i + 1], nn.BatchNorm2d) for i in conv_idx)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_vgg_refuses_an_unknown_depth():
    with pytest.raises(UsageError, match="allowed: 11, 13, 16, 19"):
        VGGModel().build(depth=12)
