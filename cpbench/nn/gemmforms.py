"""Eager training and evaluation of convolutions that oneDNN runs slowly, as the GEMM they are.

:func:`gemm_forms` is a context manager that lets two kinds of ``nn.Conv2d`` run as a matrix product for
the duration of a training run or an evaluation, and gives them back untouched. They compute the same
function (to float rounding: relative error ~1e-6, tested), through the same parameters, so an optimizer's
state, the weights on disk and every timed execution (the backends prepare their own modules and never run
inside this context) are unchanged.

* **A kernel that covers its whole input** (no padding, the input's height and width equal to the kernel's;
  a classifier "fully connected" layer written as a conv, e.g. the character network's conv3, 8×8 over 8×8):
  the conv *is* ``linear(x.flatten(1), W.flatten(1))``. Training and evaluation, in either layout.
* **One input channel, a kernel of 49 taps or more** (a first layer on grey images, e.g. the character
  network's conv1, 9×9): ``unfold`` + one ``addmm``. Training in the contiguous layout only.

Why by hand: PyTorch's CPU convolution (oneDNN) runs both shapes far below its GEMM speed, and no library
swaps the form per shape for eager training. Measured here (``python benchmarks/scripts/gemm_forms.py
--shapes``, run twice; 2-core AMD EPYC, 2 threads, batch 128, 32 for the 7×7 over 7×7; a training step is the
forward and the backward of the weights, and of the input where it has more than one channel; oneDNN's time
over the GEMM form's, > 1: the GEMM form faster):

==================================== ===================================== =====================================
shape                                training, NCHW / channels-last        evaluation, NCHW / channels-last
==================================== ===================================== =====================================
full cover 64→512 8×8 on 8×8         5.73, 3.67 / 3.30, 3.98               3.10, 2.26 / 2.06, 1.59
full cover 512→1024 7×7 on 7×7       3.89, 3.67 / 3.46, 3.68               5.80, 5.29 / 1.54, 2.37
full cover 256→10 4×4 on 4×4         2.14, 2.28 / 2.16, 2.25               2.29, 2.41 / 1.09, 1.60
full cover 32→64 5×5 on 5×5          2.66, 2.42 / 2.18, 2.62               2.61, 2.61 / 1.25, 1.22
one channel 1→96 9×9 on 24×24        2.89, 3.02 / (not used)               (not used)
one channel 1→64 7×7 on 28×28, pad 3 1.69, 2.00 / (not used)               (not used)
one channel 1→48 7×7 on 32×32        1.53, 1.58 / (not used)               (not used)
==================================== ===================================== =====================================

Not used, because they measured slower: the one-channel form in channels-last (0.58-1.02 on the three shapes
above, the same script before that layout was excluded) and, in a one-off comparison of the same kind, in
evaluation (0.39-0.46), below 7×7 (1→20 5×5: 0.91 / 1.18; 1→32 3×3: 0.55 / 0.76) and for three-channel stems
(3→16 3×3: 0.45; 3→64 11×11 stride 4: 0.44).

On the character network (dense, 2 threads), through
:func:`~cpbench.nn.training.train` and :func:`~cpbench.nn.training.evaluate` with the forms and without, in
alternating rounds (``benchmarks/scripts/gemm_forms.py``, run twice): a fine-tuning step at batch 128 1.19×
[1.15, 1.24] and 1.21× [1.15, 1.22] faster (284 → 238 ms), evaluating 3,600 images 1.09× [1.06, 1.11] and 1.07×
[1.05, 1.11] (conv2, which neither form touches, is most of both). In fresh tunes the control's
fine-tuning took 356-382 s, 417-440 s before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import capturing_graph

__all__ = ["MIN_TAPS", "covers_input", "gemm_forms"]

#: The one-channel form's smallest kernel (taps = kh·kw): 49 (7×7) and up measured faster in training.
MIN_TAPS = 49


def _plain(conv: nn.Module) -> bool:
    """A bare ``nn.Conv2d`` (not a subclass with its own forward), zero padding, ungrouped, undilated."""
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and conv.groups == 1
            and conv.padding_mode == "zeros" and tuple(conv.dilation) == (1, 1) and "forward" not in vars(conv))


def covers_input(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv``'s kernel covers all of ``x`` (one output position: the conv is a linear layer)."""
    return (x.dim() == 4 and conv.padding in ((0, 0), "valid") and tuple(x.shape[-2:]) == tuple(conv.kernel_size))


def _as_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)[:, :, None, None]


def _linear_forward(conv: nn.Conv2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if capturing_graph() or not covers_input(conv, x):
            return nn.Conv2d.forward(conv, x)
        return _as_linear(conv, x)
    return forward


def _unfold_forward(conv: nn.Conv2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if capturing_graph() or x.dim() != 4 or isinstance(conv.padding, str):
            return nn.Conv2d.forward(conv, x)
        if covers_input(conv, x):
            return _as_linear(conv, x)
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        n, _, h, w = x.shape
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw)).transpose(1, 2).reshape(n * oh * ow, kh * kw)
        weight = conv.weight.reshape(conv.out_channels, kh * kw).t()
        out = torch.mm(cols, weight) if conv.bias is None else torch.addmm(conv.bias, cols, weight)
        return out.view(n, oh, ow, conv.out_channels).permute(0, 3, 1, 2).contiguous()
    return forward


@contextlib.contextmanager
def gemm_forms(model: nn.Module, *, training: bool,
               memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[list[str]]:
    """Within the block, ``model``'s plain convs of the two shapes above run as GEMMs; yields their names.

    ``training``: also the one-channel form (slower than oneDNN in evaluation), and only when ``memory_format``
    (the training's layout) is contiguous: in channels-last oneDNN was as fast or faster. A conv's kernel is known before the input: the
    full-cover form checks every input and falls back to the conv for any other size."""
    swapped: list[tuple[nn.Conv2d, str]] = []
    try:
        for name, m in model.named_modules():
            if not _plain(m):
                continue
            taps = m.kernel_size[0] * m.kernel_size[1]
            if training and memory_format == torch.contiguous_format and m.in_channels == 1 and taps >= MIN_TAPS:
                m.forward = _unfold_forward(m)  # type: ignore[method-assign]
            elif m.padding in ((0, 0), "valid") and taps > 1:
                m.forward = _linear_forward(m)  # type: ignore[method-assign]
            else:
                continue
            swapped.append((m, name))
        yield [name for _, name in swapped]
    finally:
        for m, _ in swapped:
            del m.forward
