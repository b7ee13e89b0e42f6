"""``conv``: a one-layer network built from parameters, for layer-level benchmarks.

Params: in_channels, out_channels, kernel_size (int or [kh, kw]), input_size (int or [h, w]),
stride, padding (int, pair, "same", "valid"), dilation, groups, bias [true], padding_mode ["zeros"].
The layer is named ``conv``.
"""
from __future__ import annotations

from torch import nn

from cpbench import hookimpl
from cpbench.errors import UsageError

ALLOWED = ("in_channels", "out_channels", "kernel_size", "input_size", "stride", "padding",
           "dilation", "groups", "bias", "padding_mode")


class OneConv(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.conv = nn.Conv2d(**kw)

    def forward(self, x):
        return self.conv(x)


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


class ConvModel:
    name = "conv"
    description = "one conv layer from parameters (in_channels, ...)"
    dataset = None
    default_layers = ["conv"]

    def _check(self, params):
        unknown = sorted(set(params) - set(ALLOWED))
        if unknown:
            raise UsageError(f"model 'conv' got unknown params {unknown}; allowed: {', '.join(ALLOWED)}")
        for req in ("in_channels", "out_channels", "kernel_size", "input_size"):
            if req not in params:
                raise UsageError(f"model 'conv' needs param {req!r}; allowed: {', '.join(ALLOWED)}")

    def build(self, **params):
        self._check(params)
        kw = {k: _tuple(v) for k, v in params.items() if k != "input_size"}
        try:
            return OneConv(**kw)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"model 'conv' params {params}: {exc}") from None

    def label(self, **params) -> str:
        """A short name for tables: ``conv 64→192 5×5 g2 s2 @27``."""
        k = params.get("kernel_size")
        k = f"{k}×{k}" if isinstance(k, int) else "×".join(map(str, k))
        size = params.get("input_size")
        size = size if isinstance(size, int) else "×".join(map(str, size))
        extra = "".join(f" {tag}{params[key]}" for key, tag in (("groups", "g"), ("stride", "s"), ("dilation", "d"))
                        if params.get(key, 1) != 1)
        return f"conv {params.get('in_channels')}→{params.get('out_channels')} {k}{extra} @{size}"

    def input_shape(self, **params):
        self._check(params)
        size = params["input_size"]
        h, w = (size, size) if isinstance(size, int) else size
        return (params["in_channels"], h, w)


@hookimpl
def cpbench_register_models(registry):
    registry.add(ConvModel())
