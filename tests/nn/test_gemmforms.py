"""cpbench.nn.gemmforms: convolutions run as GEMMs inside training and evaluation, exact and given back."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpbench.nn.gemmforms import MIN_TAPS, gemm_forms
from cpbench.nn.training import FINETUNE_RECIPE, evaluate, train

CL, NC = torch.channels_last, torch.contiguous_format


def _pair(conv: nn.Conv2d, x: torch.Tensor, *, training: bool, fmt=NC):
    """Output and gradients of ``conv`` on ``x``, plainly and inside :func:`gemm_forms`."""
    out = []
    for swap in (False, True):
        conv.zero_grad(set_to_none=True)
        xi = x.detach().clone().contiguous(memory_format=fmt).requires_grad_(x.shape[1] > 1)
        if swap:
            with gemm_forms(conv, training=training, memory_format=fmt) as names:
                assert names == [""]
                y = conv(xi)
        else:
            y = conv(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g)
        grads = [conv.weight.grad, *([conv.bias.grad] if conv.bias is not None else []),
                 *([xi.grad] if xi.requires_grad else [])]
        out.append((y.detach(), [t.clone() for t in grads]))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * float(b.abs().max()), float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("fmt", [NC, CL])
@pytest.mark.parametrize("cin,cout,kh,kw,bias", [(64, 48, 8, 8, True), (32, 10, 4, 3, False), (3, 7, 5, 5, True)])
def test_full_cover_conv_is_linear_exactly(cin, cout, kh, kw, bias, fmt):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, (kh, kw), bias=bias).to(memory_format=fmt)
    (y0, g0), (y1, g1) = _pair(conv, torch.randn(6, cin, kh, kw), training=False, fmt=fmt)
    _close(y1, y0)
    for a, b in zip(g1, g0):
        _close(a, b)


def test_full_cover_form_falls_back_on_a_larger_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    x = torch.randn(2, 8, 7, 5)
    with gemm_forms(conv, training=False):
        y = conv(x)
    assert y.shape == (2, 4, 5, 3)
    _close(y, F.conv2d(x, conv.weight, conv.bias))


@pytest.mark.parametrize("k,stride,padding,size", [(9, 1, 0, 24), (7, 1, 3, 28), (7, 2, 1, 21), ((9, 7), 1, (1, 2), 16)])
def test_one_channel_form_matches_conv_in_training(k, stride, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 12, k, stride=stride, padding=padding)
    (y0, g0), (y1, g1) = _pair(conv, torch.randn(5, 1, size, size), training=True)
    _close(y1, y0)
    assert y1.is_contiguous()
    for a, b in zip(g1, g0):
        _close(a, b)


def test_one_channel_form_is_not_used_in_channels_last_training():
    seen = []
    conv = nn.Conv2d(1, 12, 9, padding=1)
    with gemm_forms(conv, training=True, memory_format=CL) as names:
        assert names == []  # oneDNN measured as fast or faster there
    with gemm_forms(conv, training=True) as names:
        assert names == [""]
        x = torch.randn(2, 1, 12, 12)
        conv.register_forward_hook(lambda m, i, o: seen.append(o))
        conv(x)
    assert "forward" not in vars(conv) and seen[0].shape == (2, 12, 6, 6)


def test_which_convs_are_swapped():
    class Sub(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.ModuleDict({
        "grey9": nn.Conv2d(1, 8, 9), "grey5": nn.Conv2d(1, 8, 5), "rgb9": nn.Conv2d(3, 8, 9),
        "padded": nn.Conv2d(8, 8, 3, padding=1), "grouped": nn.Conv2d(8, 8, 3, groups=2),
        "dilated": nn.Conv2d(8, 8, 3, dilation=2), "reflect": nn.Conv2d(8, 8, 3, padding_mode="reflect"),
        "pointwise": nn.Conv2d(8, 8, 1), "sub": Sub(8, 8, 3), "valid": nn.Conv2d(8, 8, 3),
    })
    assert MIN_TAPS == 49
    with gemm_forms(net, training=True) as names:
        assert names == ["grey9", "grey5", "rgb9", "valid"]  # grey5: the full-cover form (checked per input)
        assert "forward" in vars(net["grey9"])
    with gemm_forms(net, training=False) as names:
        assert names == ["grey9", "grey5", "rgb9", "valid"]
    assert not any("forward" in vars(m) for m in net.values())


def test_forms_are_given_back_after_an_error():
    conv = nn.Conv2d(1, 4, 9)
    with pytest.raises(RuntimeError, match="boom"):
        with gemm_forms(conv, training=True):
            raise RuntimeError("boom")
    assert "forward" not in vars(conv)


def test_graph_capture_sees_the_convolution():
    conv = nn.Conv2d(16, 4, 4).eval()
    with gemm_forms(conv, training=False), torch.no_grad():
        graph = str(torch.jit.trace(conv, torch.randn(1, 16, 4, 4)).graph)
    assert "_convolution" in graph and "linear" not in graph


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 7)        # one channel, 49 taps: the training form
        self.c2 = nn.Conv2d(6, 5, 6)        # 6x6 over 6x6: the full-cover form

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))).flatten(1)


def test_train_and_evaluate_run_the_forms_and_match_plain_training(monkeypatch):
    import contextlib

    import cpbench.nn.training as training

    seen: list[tuple[bool, bool]] = []

    def record(m, inp, out):
        seen.append((m.training, "forward" in vars(m)))

    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 12, 12), torch.randint(0, 5, (256,))
    recipe = replace(FINETUNE_RECIPE, epochs=1, batch_size=64)
    nets = []
    for forms in (True, False):
        torch.manual_seed(1)
        net = _Net()
        if not forms:
            monkeypatch.setattr(training, "gemm_forms", lambda *a, **k: contextlib.nullcontext([]))
        hooks = [net.c1.register_forward_hook(record), net.c2.register_forward_hook(record)]
        train(net, (x, y), recipe)
        acc = evaluate(net, (x, y))
        for h in hooks:
            h.remove()
        nets.append((net, acc))
        if forms:
            assert seen and all(swapped for _, swapped in seen)  # every forward, training and evaluation
            assert {t for t, _ in seen} == {True, False}
            seen.clear()
    (a, acc_a), (b, acc_b) = nets
    for pa, pb in zip(a.parameters(), b.parameters()):
        _close(pa.detach(), pb.detach(), 1e-4)  # the same training, to float rounding
    assert abs(acc_a - acc_b) <= 2 / 256
