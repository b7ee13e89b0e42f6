"""Replacement layers for a ``torch.nn.Conv2d``, built from factors, exact in geometry.

Every block here reproduces the original layer's stride, padding (ints, tuples, "same", "valid"),
dilation, ``padding_mode``, bias and ``groups``. The vertical geometry goes on the ``kh×1`` layer and
the horizontal one on the ``1×kw`` layer: a pointwise (1×1, bias-free) layer commutes with every
padding mode, and padding along W only copies columns, which a vertical conv treats independently,
so the separable chain equals the original conv whenever the factors are exact.

Factor tensors carry a leading group axis ``G`` (``G = conv.groups``; 1 for an ordinary conv):

========== ======================= ======================================================
block      factors                 layers
========== ======================= ======================================================
CP4        out (G,T/G,R)           1×1 S→GR (groups G); kh×1 depthwise; 1×kw depthwise;
           in (G,S/G,R)            1×1 GR→T (groups G, original bias)
           h (G,kh,R) w (G,kw,R)
CP3        out, in, hw (G,kh·kw,R) 1×1; kh×kw depthwise (full geometry); 1×1
Tucker-2   out (G,T/G,Ro)          1×1 S→G·Ri; kh×kw core G·Ri→G·Ro (groups G); 1×1 → T
           in (G,S/G,Ri)
           core (G,Ro,Ri,kh,kw)
SVD        v (G,R,S/G,kh)          kh×1 S→GR (groups G); 1×kw GR→T (groups G, bias)
           h (G,T/G,R,kw)
========== ======================= ======================================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ConvGeometry",
    "geometry",
    "out_len",
    "CPBlock",
    "Tucker2Block",
    "SpatialSVDBlock",
    "split_groups",
    "block_diagonal",
    "cp_kernel",
    "tucker2_kernel",
    "svd_kernel",
    "capturing_graph",
]


def capturing_graph() -> bool:
    """Whether this forward is being traced into a graph: torch.jit tracing (ONNX export's TorchScript path) or
    dynamo (torch.compile, torch.export, ONNX export's dynamo path). Both checks cost ~0.1-0.2 µs here;
    ``torch.onnx.is_in_onnx_export()`` costs 2.3 µs and adds nothing (that export traces). Modules whose eager
    forward differs from the graph they should export (the tune's stubs, the character network's Maxout in
    training) ask it."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling())


@dataclass(frozen=True)
class ConvGeometry:
    """Per-axis geometry of a conv; ``padding`` is an int pair or the string "same"/"valid"."""

    in_channels: int
    out_channels: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    padding_mode: str
    groups: int
    bias: bool

    def vertical(self) -> dict:
        pad = self.padding if isinstance(self.padding, str) else (self.padding[0], 0)
        return dict(stride=(self.stride[0], 1), padding=pad, dilation=(self.dilation[0], 1),
                    padding_mode=self.padding_mode)

    def horizontal(self) -> dict:
        pad = self.padding if isinstance(self.padding, str) else (0, self.padding[1])
        return dict(stride=(1, self.stride[1]), padding=pad, dilation=(1, self.dilation[1]),
                    padding_mode=self.padding_mode)

    def full(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    padding_mode=self.padding_mode)

    # The conv arithmetic lives here and in :func:`out_len` only; the execution forms, the fused
    # kernel's Python side, ConvGemm and the FLOP formulas all ask these.
    def axis_padding(self, axis: int) -> tuple[int, int]:
        """(before, after) zero padding along ``axis`` (0: H, 1: W); "same" puts the odd one after,
        as PyTorch does."""
        if self.padding == "valid":
            return 0, 0
        if self.padding == "same":
            total = self.dilation[axis] * ((self.kh, self.kw)[axis] - 1)
            return total // 2, total - total // 2
        p = self.padding[axis]
        return p, p

    def symmetric_padding(self) -> tuple[int, int] | None:
        """(ph, pw) when each axis is padded equally on both sides, else None ("same" with an odd total)."""
        pads = [self.axis_padding(axis) for axis in (0, 1)]
        return None if any(a != b for a, b in pads) else (pads[0][0], pads[1][0])

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """The output's (H, W) for an input of ``in_hw``."""
        return tuple(out_len(n, (self.kh, self.kw)[axis], self.stride[axis], self.dilation[axis],
                             *self.axis_padding(axis)) for axis, n in enumerate(in_hw))


def out_len(size: int, k: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula; negative padding crops)."""
    return (size + pad_before + pad_after - dilation * (k - 1) - 1) // stride + 1


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def geometry(conv: nn.Conv2d) -> ConvGeometry:
    """Read a Conv2d's full geometry (no axis assumed equal to the other)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected torch.nn.Conv2d, got {type(conv).__name__}")
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    if padding == "valid":
        padding = (0, 0)
    kh, kw = _pair(conv.kernel_size)
    return ConvGeometry(conv.in_channels, conv.out_channels, kh, kw, _pair(conv.stride), padding,
                        _pair(conv.dilation), conv.padding_mode, conv.groups, conv.bias is not None)


def split_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(T, S/G, kh, kw) → (G, T/G, S/G, kh, kw): each group's own kernel."""
    t = weight.shape[0]
    if t % groups:
        raise ValueError(f"out_channels {t} not divisible by groups {groups}")
    return weight.reshape(groups, t // groups, *weight.shape[1:])


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(T, S/G, kh, kw) → (T, S, kh, kw) with zeros off the diagonal blocks (the paper's AlexNet trick)."""
    g = split_groups(weight, groups)
    G, tg, sg, kh, kw = g.shape
    full = weight.new_zeros(G * tg, G * sg, kh, kw)
    for i in range(G):
        full[i * tg:(i + 1) * tg, i * sg:(i + 1) * sg] = g[i]
    return full


def _conv(cin, cout, k, *, groups=1, bias=False, like: torch.Tensor, **geo) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, groups=groups, bias=bias, device=like.device, dtype=like.dtype, **geo)


def _set_bias(layer: nn.Conv2d, bias: torch.Tensor | None) -> None:
    if bias is not None:
        layer.bias.data.copy_(bias.detach())


class CPBlock(nn.Sequential):
    """The paper's CP replacement: 1×1, kh×1 depthwise, 1×kw depthwise, 1×1 (or CP3: one kh×kw depthwise).

    Parameters
    ----------
    geo : ConvGeometry of the original layer.
    out, in_ : (G, T/G, R), (G, S/G, R) factor tensors.
    h, w : (G, kh, R), (G, kw, R) spatial factors for the CP4 form, or
    hw : (G, kh*kw, R) for the CP3 form.
    bias : the original bias or None.
    """

    def __init__(self, geo: ConvGeometry, out, in_, *, h=None, w=None, hw=None, bias=None):
        G, tg, R = out.shape
        sg = in_.shape[1]
        GR = G * R
        first = _conv(geo.in_channels, GR, 1, groups=G, like=out)
        # first.weight: (G*R, S/G, 1, 1); group g's rows are in_[g].T
        first.weight.data.copy_(in_.permute(0, 2, 1).reshape(GR, sg, 1, 1))
        last = _conv(GR, geo.out_channels, 1, groups=G, bias=geo.bias, like=out)
        last.weight.data.copy_(out.reshape(G * tg, R, 1, 1))
        _set_bias(last, bias)
        if hw is not None:
            mid = _conv(GR, GR, (geo.kh, geo.kw), groups=GR, like=out, **geo.full())
            mid.weight.data.copy_(hw.permute(0, 2, 1).reshape(GR, 1, geo.kh, geo.kw))
            super().__init__(first, mid, last)
            self.form = "cp3"
        else:
            vert = _conv(GR, GR, (geo.kh, 1), groups=GR, like=out, **geo.vertical())
            vert.weight.data.copy_(h.permute(0, 2, 1).reshape(GR, 1, geo.kh, 1))
            hor = _conv(GR, GR, (1, geo.kw), groups=GR, like=out, **geo.horizontal())
            hor.weight.data.copy_(w.permute(0, 2, 1).reshape(GR, 1, 1, geo.kw))
            super().__init__(first, vert, hor, last)
            self.form = "cp4"
        self.geo = geo
        self.rank = R

    def fused(self) -> "CPBlock":
        """The same factors with the two depthwise layers merged into one kh×kw depthwise layer."""
        if self.form == "cp3":
            return self
        first, vert, hor, last = self
        G = self.geo.groups
        R = self.rank
        h = vert.weight.detach().reshape(G, R, self.geo.kh).permute(0, 2, 1)
        w = hor.weight.detach().reshape(G, R, self.geo.kw).permute(0, 2, 1)
        hw = (h[:, :, None, :] * w[:, None, :, :]).reshape(G, self.geo.kh * self.geo.kw, R)
        out = last.weight.detach().reshape(G, -1, R)
        in_ = first.weight.detach().reshape(G, R, -1).permute(0, 2, 1)
        bias = last.bias.detach() if last.bias is not None else None
        block = CPBlock(self.geo, out, in_, hw=hw, bias=bias)
        return block.train(self.training)


class Tucker2Block(nn.Sequential):
    """Tucker-2 replacement: 1×1 S→G·Ri; kh×kw core G·Ri→G·Ro (groups G, full geometry); 1×1 → T."""

    def __init__(self, geo: ConvGeometry, out, in_, core, *, bias=None):
        G, tg, ro = out.shape
        sg, ri = in_.shape[1], in_.shape[2]
        first = _conv(geo.in_channels, G * ri, 1, groups=G, like=out)
        first.weight.data.copy_(in_.permute(0, 2, 1).reshape(G * ri, sg, 1, 1))
        mid = _conv(G * ri, G * ro, (geo.kh, geo.kw), groups=G, like=out, **geo.full())
        mid.weight.data.copy_(core.reshape(G * ro, ri, geo.kh, geo.kw))
        last = _conv(G * ro, geo.out_channels, 1, groups=G, bias=geo.bias, like=out)
        last.weight.data.copy_(out.reshape(G * tg, ro, 1, 1))
        _set_bias(last, bias)
        super().__init__(first, mid, last)
        self.geo = geo
        self.rank = (ro, ri)


class SpatialSVDBlock(nn.Sequential):
    """Jaderberg et al. 2014: kh×1 conv S→G·R (vertical geometry), then 1×kw conv G·R→T (horizontal, bias)."""

    def __init__(self, geo: ConvGeometry, v, h, *, bias=None):
        G, R, sg, kh = v.shape
        tg, kw = h.shape[1], h.shape[3]
        vert = _conv(geo.in_channels, G * R, (geo.kh, 1), groups=G, like=v, **geo.vertical())
        vert.weight.data.copy_(v.reshape(G * R, sg, kh, 1))
        hor = _conv(G * R, geo.out_channels, (1, geo.kw), groups=G, bias=geo.bias, like=v,
                    **geo.horizontal())
        hor.weight.data.copy_(h.reshape(G * tg, R, 1, kw))
        _set_bias(hor, bias)
        super().__init__(vert, hor)
        self.geo = geo
        self.rank = R


# -- reconstructions (the kernel a set of factors stands for), shape (G, T/G, S/G, kh, kw) -------
def cp_kernel(out, in_, h=None, w=None, hw=None) -> torch.Tensor:
    if hw is not None:
        kh_kw = hw
        k = torch.einsum("gtr,gsr,gpr->gtsp", out, in_, kh_kw)
        return k  # caller reshapes p → (kh, kw)
    return torch.einsum("gtr,gsr,gir,gjr->gtsij", out, in_, h, w)


def tucker2_kernel(out, in_, core) -> torch.Tensor:
    return torch.einsum("gto,gsi,goiyx->gtsyx", out, in_, core)


def svd_kernel(v, h) -> torch.Tensor:
    return torch.einsum("grsi,gtrj->gtsij", v, h)
