"""CharNet: layer names and sizes, intermediate shapes, FLOPs share, maxout grouping."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cpbench_builtins.models import charnet as cn
from cpbench_builtins.models.charnet import CharNet, Maxout, conv_macs


def test_output_and_intermediate_shapes():
    model = CharNet().build(seed=0)
    shapes = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
        for name in ("act1", "act2", "act3", "act4")]
    out = model(torch.randn(5, 1, 24, 24))
    for h in hooks:
        h.remove()
    assert out.shape == (5, 36)
    assert shapes["act1"] == (5, 48, 16, 16)
    assert shapes["act2"] == (5, 64, 8, 8)
    assert shapes["act3"] == (5, 128, 1, 1)
    assert shapes["act4"] == (5, 36, 1, 1)


def test_named_convs():
    model = CharNet().build()
    expect = {"conv1": (96, 1, 9, 9), "conv2": (128, 48, 9, 9), "conv3": (512, 64, 8, 8),
              "conv4": (144, 128, 1, 1)}
    for name, shape in expect.items():
        conv = getattr(model, name)
        assert type(conv) is nn.Conv2d, name
        assert tuple(conv.weight.shape) == shape
        assert conv.stride == (1, 1) and conv.padding == (0, 0) and conv.bias is not None
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)] == list(expect)


def test_conv2_dominates_flops():
    macs = conv_macs(CharNet().build())
    assert macs["conv2"] == 128 * 8 * 8 * 48 * 81
    assert macs["conv2"] / sum(macs.values()) > 0.8


def test_maxout_groups_consecutive_channels():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert Maxout(2)(x).flatten().tolist() == [1.0, 3.0, 5.0, 7.0]
    assert Maxout(4)(x).flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_maxout_training_path_matches_amax(fmt):
    """Training with k=2 takes the hand-written pair maxout: the same output and, without ties, the same
    gradient as autograd through ``amax``, in the input's memory format."""
    x0 = torch.randn(3, 8, 5, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    g = torch.randn(3, 4, 5, 4, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    out = Maxout(2)(x)
    out.backward(g)
    ref_x = x0.clone().requires_grad_(True)
    ref = ref_x.view(3, 4, 2, 5, 4).amax(2)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_x.grad)
    assert x.grad.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(Maxout(2), (x0.clone().requires_grad_(True),))


def test_maxout_tie_sends_the_gradient_to_the_first_of_the_pair():
    x = torch.tensor([1.0, 1.0, 2.0, 3.0]).view(1, 4, 1, 1).requires_grad_(True)
    Maxout(2)(x).sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 0.0, 0.0, 1.0]


def test_maxout_inference_and_export_use_amax():
    """No grad (timing) and graph capture keep the one-operator amax (what ONNX Runtime and
    torch.compile see)."""
    m = Maxout(2)
    x = torch.randn(1, 4, 2, 2, requires_grad=True)
    with torch.no_grad():
        assert m(x).grad_fn is None
    assert type(m(x).grad_fn).__name__ != "AmaxBackward0"
    traced = torch.jit.trace(m, torch.randn(1, 4, 2, 2))
    assert "amax" in str(traced.graph)


def test_plugin_object_and_seeded_build():
    plugin = CharNet()
    assert plugin.name == "charnet" and plugin.dataset == "synthchars"
    assert plugin.default_layers == ["conv2", "conv3"]
    assert plugin.input_shape() == (1, 24, 24)
    state = torch.get_rng_state()
    a, b = plugin.build(seed=1), plugin.build(seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = plugin.build(seed=2)
    assert not torch.equal(a.conv2.weight, c.conv2.weight)
    d = plugin.build(dropout=0.5).eval()
    x = torch.randn(2, 1, 24, 24)
    assert torch.equal(d(x), d(x))


def test_registration_hook():
    added = []

    class Reg:
        def add(self, obj):
            added.append(obj)

    cn.cpbench_register_models(registry=Reg())
    assert [o.name for o in added] == ["charnet"]
