"""CharNet: the 4-layer maxout character CNN of Jaderberg et al. (2014), as used by Lebedev et al.

Input (N, 1, 24, 24); no pooling; every conv has stride 1 and padding 0::

    conv1  9x9,   1 ->  96, maxout 2 ->  48 maps 16x16
    conv2  9x9,  48 -> 128, maxout 2 ->  64 maps  8x8     (~88% of the FLOPs)
    conv3  8x8,  64 -> 512, maxout 4 -> 128 maps  1x1
    conv4  1x1, 128 -> 144, maxout 4 ->  36 logits, flattened to (N, 36)

``conv1``..``conv4`` are direct ``nn.Conv2d`` attributes so the harness can replace conv2/conv3 by
name. Maxout groups *consecutive* channels: ``x.view(N, C/k, k, H, W).amax(2)`` (in training with
``k == 2``, the same maximum by :class:`_PairMaxout`).

Dropout (``dropout=p``, default 0.0 = off): optional ``nn.Dropout`` applied to the input of conv3
and conv4. Jaderberg et al. trained with dropout; the default recipe here is short (3 epochs) and
was tuned without it, so it is off by default (dropout's effect on SynthChars was not measured).
It is a no-op in ``eval()`` mode, so it never affects timing or accuracy measurements.
"""
from __future__ import annotations

import torch
from torch import nn

from cpbench.nn.layers import capturing_graph

__all__ = ["Maxout", "CharNetModule", "CharNet", "conv_macs", "cpbench_register_models"]


class _PairMaxout(torch.autograd.Function):
    """Maxout over pairs of consecutive channels, for training: the same values as ``amax`` over the
    pair, with a backward of two masked copies.

    Why by hand: autograd's ``amax`` backward compares the input with the broadcast output, counts the
    ties and divides, in broadcasting kernels over a 5-d view; on the character network's fine-tuning
    (channels-last, batch 128, 2 threads) act1's forward and backward took ~20 ms a step, a quarter of
    the compressed network's step, for 12.6 MB of activations. Here the forward is one ``maximum`` of
    the even and odd channels and the backward two ``where`` into the strided halves of the gradient.
    A tie sends the whole gradient to the first of the pair (a subgradient, as max-pooling's backward
    does); ``amax`` splits it. Without ties the gradients are equal (tested). Measured here (2 threads,
    batch 128, SGD steps of the two versions in alternating rounds, 8 rounds of 5 steps): the network
    with conv1-conv3 replaced by CP blocks (ranks 42, 66, 74; channels-last) 110.8 -> 60.7 ms a step
    (1.81x), the dense network (contiguous) 294.9 -> 281.1 ms (1.05x).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        first, second = x[:, 0::2], x[:, 1::2]
        ctx.save_for_backward(first, second)
        return torch.maximum(first, second)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        first, second = ctx.saved_tensors
        mask = first >= second
        zero = grad.new_zeros(())
        out = torch.empty(first.shape[0], first.shape[1] * 2, *first.shape[2:], dtype=grad.dtype,
                          device=grad.device, memory_format=_layout_of(first))
        torch.where(mask, grad, zero, out=out[:, 0::2])
        torch.where(mask, zero, grad, out=out[:, 1::2])
        return out


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.stride(1) < x.stride(3) else torch.contiguous_format


class Maxout(nn.Module):
    """Maxout over groups of ``k`` consecutive channels: (N, C, H, W) -> (N, C/k, H, W).

    Inference (and any graph capture: ONNX export, torch.compile) runs ``amax`` over the group, one
    operator. Training with ``k == 2`` runs :class:`_PairMaxout`: forward and backward 2.0-2.6x faster
    than ``amax``'s in channels-last, 1.2-1.4x in NCHW (act1 and act2's shapes at batch 128, 2 threads).
    For ``k == 4`` (the character network's 1x1 maps) ``amax`` was as fast or faster.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 2 and x.requires_grad and torch.is_grad_enabled() and not capturing_graph():
            return _PairMaxout.apply(x)
        n, c, h, w = x.shape
        return x.view(n, c // self.k, self.k, h, w).amax(2)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class CharNetModule(nn.Module):
    def __init__(self, num_classes: int = 36, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 96, 9)
        self.act1 = Maxout(2)
        self.conv2 = nn.Conv2d(48, 128, 9)
        self.act2 = Maxout(2)
        self.drop3 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv3 = nn.Conv2d(64, 512, 8)
        self.act3 = Maxout(4)
        self.drop4 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv4 = nn.Conv2d(128, num_classes * 4, 1)
        self.act4 = Maxout(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(self.drop3(x)))
        x = self.act4(self.conv4(self.drop4(x)))
        return x.flatten(1)


def conv_macs(model: nn.Module, input_shape: tuple = (1, 24, 24)) -> dict[str, int]:
    """Multiply-accumulates per image of every ``nn.Conv2d`` (by module name), via forward hooks."""
    macs: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            def hook(m, inp, out, name=name):
                k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
                macs[name] = int(out.shape[1] * out.shape[2] * out.shape[3] * k)
            hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return macs


class CharNet:
    """The model plugin object (registered as ``charnet``)."""

    name = "charnet"
    description = "the paper's character CNN, trained on synthchars"
    dataset = "synthchars"
    # Trained weights shipped with the package, laid out like the cache (models/<k2>/<key>.safetensors,
    # keyed by the recipe hash), so a fresh machine skips base training. Made by `cpbench train charnet`
    # with the default recipe (test accuracy 89.18%); a changed recipe or data set has another key and
    # trains afresh.
    weights_root = __import__("pathlib").Path(__file__).parent / "weights"
    default_layers = ["conv2", "conv3"]
    # the paper's headline for this network, drawn on the report's Pareto plot
    reference_points = [{"speedup": 8.5, "drop": 1.0, "label": "Lebedev et al. 2015 (8.5×, 1 pt)"}]

    def build(self, *, num_classes: int = 36, dropout: float = 0.0, seed: int | None = None,
              **params) -> nn.Module:
        """A fresh CharNet. ``seed`` (optional) makes the initialisation reproducible without
        touching the global RNG; otherwise PyTorch's default init under the global RNG."""
        if params:
            raise TypeError(f"charnet.build: unknown parameter(s) {', '.join(sorted(params))}")
        if seed is None:
            return CharNetModule(num_classes=num_classes, dropout=dropout)
        from torch.random import fork_rng

        with fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return CharNetModule(num_classes=num_classes, dropout=dropout)

    def input_shape(self, **params) -> tuple:
        return (1, 24, 24)

    def __repr__(self) -> str:
        return "CharNet()"


try:  # the hook marker lives in the core package; fall back to an equivalent pluggy marker
    from cpbench.plugin.manager import hookimpl as _hookimpl
except Exception:  # pragma: no cover
    import pluggy

    _hookimpl = pluggy.HookimplMarker("cpbench")


@_hookimpl
def cpbench_register_models(registry) -> None:
    registry.add(CharNet())
