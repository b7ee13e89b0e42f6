"""An ONNX graph as a ``torch.fx.GraphModule`` whose convs are real ``nn.Conv2d`` modules.

Written here rather than taken from onnx2torch: onnx2torch declares torchvision as a hard
dependency, and ``pip install onnx2torch`` on this project's pinned CPU torch resolves to a new
torch, torchvision and 17 NVIDIA CUDA wheels (``pip install --dry-run onnx2torch``, torch 2.13.0
CPU). The ops converted are those of the CNNs people deploy, checked against graphs that
``torch.onnx.export`` writes with both of its exporters (TorchScript and dynamo):

Conv, ConvTranspose, BatchNormalization, Gemm, MatMul (constant right operand: ``nn.Linear``),
MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Relu, LeakyRelu, Clip, Sigmoid, Tanh,
HardSwish, HardSigmoid, Elu, Softplus, Erf, Gelu, Exp, Log, Sqrt, Neg, Abs, Reciprocal, Pow, Add,
Sub, Mul, Div, Concat, Split, Slice, Gather, Shape, Cast, Constant, ConstantOfShape, Identity,
Dropout, Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Pad, Resize, Upsample, Softmax,
LogSoftmax, ReduceMean, ReduceSum, ReduceMax, Expand, Where, Equal, Max, Min.

Convs, BatchNorms, linear layers and pools become modules, named after their weights (``conv1``,
``layer1.0.conv1`` from a dynamo export) or after the exporter's scope (``/layer1/layer1.0/conv1/Conv``
→ ``layer1.0.conv1``), so surgery and layer globs find them under the names of the original network.
Everything whose inputs are all constants is evaluated once here (the TorchScript exporter's shape
arithmetic). Any other op is an error that names it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from cpbench.errors import UsageError

__all__ = ["convert", "graph_input_shape", "SUPPORTED_OPS"]

Value = Any  # an fx.Node (computed at run time) or a torch.Tensor (a constant)

_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


# -- run-time helpers: ONNX semantics that torch spells differently --------------------------------
def _ints(v) -> list[int]:
    return [int(i) for i in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def _reshape(x: torch.Tensor, shape, allowzero: int = 0, batch_one: bool = False) -> torch.Tensor:
    shape = _ints(shape)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    if batch_one and shape and shape[0] == 1 and -1 not in shape and x.dim() and x.shape[0] != 1:
        # a graph exported at batch 1 spells its flatten as Reshape [1, ...]: keep the real batch
        shape[0] = x.shape[0]
    return x.reshape(shape)


def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(int(math.prod(x.shape[:axis])), -1)


def _slice(x: torch.Tensor, starts, ends, axes=None, steps=None) -> torch.Tensor:
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = x.shape[a]
        if st < 0:  # torch slices forward only
            return torch.flip(x, [a]).__getitem__(tuple(index[:a] + [slice(n - 1 - s if s >= 0 else -1 - s, None, -st)]))
        index[a] = slice(max(-n, min(s, n)), max(-n, min(e, n)), st)
    return x[tuple(index)]


def _gather(x: torch.Tensor, idx, axis: int) -> torch.Tensor:
    idx = torch.as_tensor(idx).long()
    flat = torch.where(idx < 0, idx + x.shape[axis], idx).reshape(-1)
    out = torch.index_select(x, axis, flat)
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def _unsqueeze(x: torch.Tensor, axes) -> torch.Tensor:
    out_rank = x.dim() + len(_ints(axes))
    for a in sorted(a % out_rank for a in _ints(axes)):
        x = x.unsqueeze(a)
    return x


def _squeeze(x: torch.Tensor, axes=None) -> torch.Tensor:
    return x.squeeze() if axes is None else x.squeeze(tuple(_ints(axes)))


def _pad(x: torch.Tensor, pads, value=0.0, mode: str = "constant", axes=None) -> torch.Tensor:
    pads = _ints(pads)
    n = len(pads) // 2
    axes = _ints(axes) if axes is not None else list(range(x.dim() - n, x.dim())) if n < x.dim() else list(range(n))
    torch_pads = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        a = a % x.dim()
        torch_pads[2 * (x.dim() - 1 - a)] = pads[i]
        torch_pads[2 * (x.dim() - 1 - a) + 1] = pads[i + n]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # F.pad's non-constant modes pad trailing dims only
        torch_pads = torch_pads[:-2]
    v = float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) and value.numel() else float(value or 0.0)
    mode = {"edge": "replicate"}.get(mode, mode)
    return F.pad(x, torch_pads, mode=mode, value=v) if mode == "constant" else F.pad(x, torch_pads, mode=mode)


def _resize(x: torch.Tensor, scales=None, sizes=None, mode: str = "nearest", align_corners: bool = False):
    if sizes is not None and len(_ints(sizes)):
        size = _ints(sizes)[2:]
        return F.interpolate(x, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": align_corners}))
    factors = [float(s) for s in (scales.tolist() if isinstance(scales, torch.Tensor) else scales)][2:]
    return F.interpolate(x, scale_factor=factors, mode=mode,
                         **({} if mode == "nearest" else {"align_corners": align_corners}))


def _reduce(fn: str):
    def reduce(x: torch.Tensor, axes=None, keepdims: int = 1, noop: int = 0) -> torch.Tensor:
        if axes is None or not len(_ints(axes)):
            if noop:
                return x
            axes = list(range(x.dim()))
        dims = tuple(_ints(axes))
        if fn == "max":
            return torch.amax(x, dim=dims, keepdim=bool(keepdims))
        return getattr(torch, fn)(x, dim=dims, keepdim=bool(keepdims))

    reduce.__name__ = f"_reduce_{fn}"
    return reduce


_reduce_mean, _reduce_sum, _reduce_max = _reduce("mean"), _reduce("sum"), _reduce("max")


def _expand(x: torch.Tensor, shape) -> torch.Tensor:
    return x * torch.ones(_ints(shape), dtype=x.dtype)  # ONNX Expand broadcasts both ways


def _constant_of_shape(shape, value=None) -> torch.Tensor:
    v = torch.as_tensor(value) if value is not None else torch.zeros(1)
    return torch.full(_ints(shape), v.reshape(-1)[0].item(), dtype=v.dtype)


def _split(x: torch.Tensor, sizes, axis: int):
    return tuple(torch.split(x, _ints(sizes), dim=axis))


def _split_even(x: torch.Tensor, parts: int, axis: int):
    return tuple(torch.tensor_split(x, parts, dim=axis))


def _cast(x: torch.Tensor, to: int) -> torch.Tensor:
    return x.to(_DTYPES[to])


def _clip(x: torch.Tensor, lo=None, hi=None) -> torch.Tensor:
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    return torch.clamp(x, lo, hi)


def _hardsigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


# -- the converter --------------------------------------------------------------------------------
def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _tensor(proto) -> torch.Tensor:
    from onnx import numpy_helper

    return torch.from_numpy(np.array(numpy_helper.to_array(proto), copy=True))


def _ident(part: str) -> str:
    part = re.sub(r"\W", "_", part)
    return part if part and not part[0].isdigit() or part.isdigit() else f"_{part}"


class _Converter:
    def __init__(self, model):
        self.model = model
        self.graph = fx.Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[str, Value] = {}
        self.leaves: set[str] = set()
        self.batch_one = False
        for init in model.graph.initializer:
            self.env[init.name] = _tensor(init)

    # -- values --------------------------------------------------------------------------------
    def node_of(self, v: Value) -> Any:
        """A graph value for ``v``: constants become buffers of the module."""
        if isinstance(v, torch.Tensor):
            name = f"onnx_constants.c{len([k for k in self.root if k.startswith('onnx_constants.')])}"
            self.root[name] = v
            return self.graph.get_attr(name)
        return v

    def call(self, fn: Callable, *args, **kwargs) -> Value:
        """``fn(*args)`` now when every input is a constant (folded), else a node of the graph."""
        if not any(isinstance(a, fx.Node) for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        return self.graph.call_function(fn, tuple(map(self._arg, args)), {k: self._arg(v) for k, v in kwargs.items()})

    def _arg(self, a):
        # small integer constants (shapes, axes, indices) are written into the graph as Python values;
        # a scalar as a number; any other tensor becomes a buffer of the module
        if not isinstance(a, torch.Tensor):
            return a
        if not a.dim():
            return a.item()
        if not a.is_floating_point() and a.numel() <= 16:
            return a.tolist()
        return self.node_of(a)

    def const(self, node, i: int, what: str):
        """Input ``i`` of ``node`` as a constant tensor (None when absent)."""
        if i >= len(node.input) or not node.input[i]:
            return None
        v = self.env[node.input[i]]
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"ONNX op {node.op_type!r} (node {node.name!r}): its {what} is computed in the graph; "
                             "cpbench converts it only when it is a constant")
        return v

    def module(self, node, mod: nn.Module, x: Value, weight_input: str | None) -> Any:
        name = self._module_name(node, weight_input)
        self.root[name] = mod
        self.leaves.add(name)
        return self.graph.call_module(name, (self.node_of(x),))

    def _module_name(self, node, weight_input: str | None) -> str:
        candidates = []
        if weight_input and not weight_input.startswith("onnx::") and weight_input.endswith(".weight"):
            candidates.append(weight_input[: -len(".weight")])
        parts = [p for p in node.name.strip("/").split("/")[:-1] if p]
        if parts:
            dotted = [i for i, p in enumerate(parts) if "." in p]
            start = dotted[-1] if dotted else 0
            candidates.append(".".join([parts[start], *parts[start + 1:]]))
        candidates.append(node.name or node.op_type.lower())
        for c in candidates:
            name = ".".join(_ident(p) for p in c.split("."))
            if self._free(name):
                return name
        base = ".".join(_ident(p) for p in candidates[-1].split("."))
        i = 1
        while not self._free(f"{base}_{i}"):
            i += 1
        return f"{base}_{i}"

    def _free(self, name: str) -> bool:
        # a leaf cannot also be the parent of another, nor share a name
        return name not in self.root and not any(
            k.startswith(name + ".") or name.startswith(k + ".") for k in self.leaves)

    # -- the graph ------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        g = self.model.graph
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            raise UsageError(f"the ONNX graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "cpbench feeds a network one input tensor")
        dims = inputs[0].type.tensor_type.shape.dim
        self.batch_one = bool(dims) and dims[0].dim_value == 1
        self.env[inputs[0].name] = self.graph.placeholder(_ident(inputs[0].name))
        for node in g.node:
            op = OPS.get(node.op_type)
            if op is None or node.domain not in ("", "ai.onnx"):
                raise UsageError(f"ONNX op {node.op_type!r} (node {node.name!r}) cannot be converted; "
                                 f"cpbench converts {', '.join(sorted(OPS))}")
            ins = [self.env[i] if i else None for i in node.input]
            outs = op(self, node, ins, _attrs(node))
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            if len(outs) == 1 and len(node.output) > 1 and isinstance(outs[0], fx.Node):  # a tuple at run time
                import operator

                outs = [self.graph.call_function(operator.getitem, (outs[0], i)) for i in range(len(node.output))]
            for name, v in zip(node.output, outs):
                if name:
                    self.env[name] = v
        results = [self.node_of(self.env[o.name]) for o in g.output]
        self.graph.output(results[0] if len(results) == 1 else tuple(results))
        return fx.GraphModule(self.root, self.graph, class_name="OnnxNetwork")


# -- ops -------------------------------------------------------------------------------------------
def _pairs(attrs: dict, key: str, default: int, n: int = 2) -> tuple[int, ...]:
    return tuple(attrs.get(key, [default] * n))


def _conv_padding(c, node, x, attrs, kernel, strides, dilations):
    pads = list(attrs.get("pads", [0] * 4))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            raise UsageError(f"ONNX op 'Conv' (node {node.name!r}): auto_pad {auto} with stride > 1 is not converted")
        total = [d * (k - 1) for k, d in zip(kernel, dilations)]
        lo = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        pads = lo + [t - l for t, l in zip(total, lo)]
    if pads[:2] == pads[2:]:
        return x, tuple(pads[:2])
    return c.call(_pad, x, [0, 0, *pads[:2], 0, 0, *pads[2:]]), (0, 0)  # asymmetric: pad first


def op_conv(c, node, ins, attrs):
    x, w = ins[0], c.const(node, 1, "weight")
    b = c.const(node, 2, "bias")
    if w.dim() != 4:
        raise UsageError(f"ONNX op 'Conv' (node {node.name!r}) is a {w.dim() - 2}-D convolution; cpbench converts 2-D convs")
    kernel = tuple(w.shape[2:])
    strides, dilations = _pairs(attrs, "strides", 1), _pairs(attrs, "dilations", 1)
    x, padding = _conv_padding(c, node, x, attrs, kernel, strides, dilations)
    groups = int(attrs.get("group", 1))
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], kernel, stride=strides, padding=padding, dilation=dilations,
                     groups=groups, bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
    return c.module(node, conv, x, node.input[1])


def op_conv_transpose(c, node, ins, attrs):
    x, w = ins[0], c.const(node, 1, "weight")
    b = c.const(node, 2, "bias")
    pads = list(attrs.get("pads", [0] * 4))
    if w.dim() != 4 or pads[:2] != pads[2:] or "output_shape" in attrs:
        raise UsageError(f"ONNX op 'ConvTranspose' (node {node.name!r}): only 2-D with symmetric pads is converted")
    groups = int(attrs.get("group", 1))
    conv = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=_pairs(attrs, "strides", 1),
                              padding=tuple(pads[:2]), output_padding=_pairs(attrs, "output_padding", 0),
                              groups=groups, bias=b is not None, dilation=_pairs(attrs, "dilations", 1))
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
    return c.module(node, conv, x, node.input[1])


def op_batchnorm(c, node, ins, attrs):
    scale, bias, mean, var = (c.const(node, i, "statistics") for i in (1, 2, 3, 4))
    bn = nn.BatchNorm2d(scale.numel(), eps=float(attrs.get("epsilon", 1e-5)), momentum=1 - float(attrs.get("momentum", 0.9)))
    with torch.no_grad():
        bn.weight.copy_(scale), bn.bias.copy_(bias), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    bn.eval()
    # BatchNorm2d takes 4-D input only; a BatchNorm over (N, C) or (N, C, L) runs as the same affine map
    if isinstance(ins[0], fx.Node):
        return c.module(node, bn, ins[0], node.input[1])
    return bn(ins[0])


def op_gemm(c, node, ins, attrs):
    a, b = ins[0], ins[1]
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    bias = c.const(node, 2, "bias") if len(ins) > 2 and ins[2] is not None else None
    if isinstance(b, torch.Tensor) and not attrs.get("transA", 0) and b.dim() == 2:
        w = b if attrs.get("transB", 0) else b.t()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(alpha * w)
            if bias is not None:
                lin.bias.copy_((beta * bias).expand(w.shape[0]) if bias.numel() == 1 else beta * bias.reshape(-1))
        return c.module(node, lin, a, node.input[1])
    if attrs.get("transA", 0):
        a = c.call(torch.transpose, a, 0, 1)
    if attrs.get("transB", 0):
        b = c.call(torch.transpose, b, 0, 1)
    out = c.call(torch.matmul, a, b)
    if alpha != 1.0:
        out = c.call(torch.mul, out, alpha)
    return out if bias is None else c.call(torch.add, out, beta * bias)


def op_matmul(c, node, ins, attrs):
    a, b = ins
    if isinstance(b, torch.Tensor) and b.dim() == 2 and isinstance(a, fx.Node):
        lin = nn.Linear(b.shape[0], b.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(b.t())
        return c.module(node, lin, a, node.input[1])
    return c.call(torch.matmul, a, b)


def _pool(kind):
    def op(c, node, ins, attrs):
        kernel = tuple(attrs["kernel_shape"])
        if len(kernel) != 2:
            raise UsageError(f"ONNX op {node.op_type!r} (node {node.name!r}) is {len(kernel)}-D; cpbench converts 2-D pools")
        pads = list(attrs.get("pads", [0] * 4))
        x = ins[0]
        if pads[:2] != pads[2:]:
            x = c.call(_pad, x, [0, 0, *pads[:2], 0, 0, *pads[2:]], -math.inf if kind == "max" else 0.0)
            pads = [0] * 4
        strides, ceil = _pairs(attrs, "strides", 1), bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            mod = nn.MaxPool2d(kernel, strides, tuple(pads[:2]), dilation=_pairs(attrs, "dilations", 1), ceil_mode=ceil)
        else:
            mod = nn.AvgPool2d(kernel, strides, tuple(pads[:2]), ceil_mode=ceil,
                               count_include_pad=bool(attrs.get("count_include_pad", 0)))
        return c.module(node, mod, x, None)

    return op


def _module_op(make: Callable[[dict], nn.Module]):
    def op(c, node, ins, attrs):
        mod = make(attrs)
        return c.module(node, mod, ins[0], None) if isinstance(ins[0], fx.Node) else mod(ins[0])

    return op


def _fn_op(fn: Callable, n_inputs: int | None = None):
    def op(c, node, ins, attrs):
        args = ins if n_inputs is None else ins[:n_inputs]
        return c.call(fn, *args)

    return op


def op_clip(c, node, ins, attrs):
    lo = c.const(node, 1, "min") if len(ins) > 1 else attrs.get("min")
    hi = c.const(node, 2, "max") if len(ins) > 2 else attrs.get("max")
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo == 0.0 and hi == 6.0 and isinstance(ins[0], fx.Node):
        return c.module(node, nn.ReLU6(), ins[0], None)
    if lo == 0.0 and hi is None and isinstance(ins[0], fx.Node):
        return c.module(node, nn.ReLU(), ins[0], None)
    return c.call(_clip, ins[0], lo, hi)


def op_hardsigmoid(c, node, ins, attrs):
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5 and isinstance(ins[0], fx.Node):
        return c.module(node, nn.Hardsigmoid(), ins[0], None)
    return c.call(_hardsigmoid, ins[0], alpha, beta)


def op_reshape(c, node, ins, attrs):
    return c.call(_reshape, ins[0], ins[1], int(attrs.get("allowzero", 0)), c.batch_one)


def op_flatten(c, node, ins, attrs):
    axis = int(attrs.get("axis", 1))
    return c.call(torch.flatten, ins[0], 1) if axis == 1 else c.call(_flatten, ins[0], axis)


def op_slice(c, node, ins, attrs):
    if "starts" in attrs:  # opset < 10
        return c.call(_slice, ins[0], attrs["starts"], attrs["ends"], attrs.get("axes"))
    return c.call(_slice, *ins[:5])


def op_pad(c, node, ins, attrs):
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if "pads" in attrs:  # opset < 11
        return c.call(_pad, ins[0], attrs["pads"], attrs.get("value", 0.0), mode)
    value = ins[2] if len(ins) > 2 and ins[2] is not None else 0.0
    axes = ins[3] if len(ins) > 3 else None
    return c.call(_pad, ins[0], ins[1], value, mode, axes)


def op_resize(c, node, ins, attrs):
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = attrs.get("coordinate_transformation_mode", b"half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    torch_mode = {"nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}.get(mode)
    if torch_mode is None:
        raise UsageError(f"ONNX op {node.op_type!r} (node {node.name!r}): mode {mode!r} is not converted")
    if node.op_type == "Upsample":
        scales, sizes = c.const(node, 1, "scales"), None
    else:
        scales = c.const(node, 2, "scales") if len(ins) > 2 else None
        sizes = c.const(node, 3, "sizes") if len(ins) > 3 else None
        if scales is not None and not scales.numel():
            scales = None
    return c.call(_resize, ins[0], scales, sizes, torch_mode, ctm == "align_corners")


def op_softmax(log: bool):
    def op(c, node, ins, attrs):
        dim = int(attrs.get("axis", -1))
        return c.module(node, (nn.LogSoftmax if log else nn.Softmax)(dim=dim), ins[0], None)

    return op


def op_reduce(fn):
    def op(c, node, ins, attrs):
        axes = attrs.get("axes", ins[1] if len(ins) > 1 else None)
        return c.call(fn, ins[0], axes, int(attrs.get("keepdims", 1)), int(attrs.get("noop_with_empty_axes", 0)))

    return op


def op_concat(c, node, ins, attrs):
    axis = int(attrs["axis"])
    if not any(isinstance(i, fx.Node) for i in ins):
        return torch.cat(ins, axis)
    return c.graph.call_function(torch.cat, ([c.node_of(i) for i in ins],), {"dim": axis})


def op_split(c, node, ins, attrs):
    axis = int(attrs.get("axis", 0))
    sizes = attrs.get("split", ins[1] if len(ins) > 1 else None)
    if sizes is None:
        return c.call(_split_even, ins[0], int(attrs.get("num_outputs", len(node.output))), axis)
    return c.call(_split, ins[0], sizes, axis)


def op_transpose(c, node, ins, attrs):
    perm = attrs.get("perm")
    if perm is None:
        return c.call(lambda x: x.permute(*reversed(range(x.dim()))), ins[0])
    return c.call(torch.permute, ins[0], list(perm))


def op_squeeze(c, node, ins, attrs):
    return c.call(_squeeze, ins[0], attrs.get("axes", ins[1] if len(ins) > 1 else None))


def op_unsqueeze(c, node, ins, attrs):
    return c.call(_unsqueeze, ins[0], attrs.get("axes", ins[1] if len(ins) > 1 else None))


def op_constant(c, node, ins, attrs):
    if "value" in attrs:
        return _tensor(attrs["value"])
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(list(attrs[key]), dtype=dtype)
    raise UsageError(f"ONNX op 'Constant' (node {node.name!r}): attribute {sorted(attrs)} is not converted")


def op_constant_of_shape(c, node, ins, attrs):
    return c.call(_constant_of_shape, ins[0], _tensor(attrs["value"]) if "value" in attrs else None)


def op_shape(c, node, ins, attrs):
    return c.call(_shape, ins[0], int(attrs.get("start", 0)), attrs.get("end"))


def op_gather(c, node, ins, attrs):
    return c.call(_gather, ins[0], ins[1], int(attrs.get("axis", 0)))


def op_cast(c, node, ins, attrs):
    return c.call(_cast, ins[0], int(attrs["to"]))


def op_identity(c, node, ins, attrs):
    return ins[0]


def op_dropout(c, node, ins, attrs):
    return [ins[0]] + ([c.call(torch.ones_like, ins[0])] if len(node.output) > 1 else [])


def op_leaky(c, node, ins, attrs):
    return c.module(node, nn.LeakyReLU(float(attrs.get("alpha", 0.01))), ins[0], None)


def op_elu(c, node, ins, attrs):
    return c.module(node, nn.ELU(float(attrs.get("alpha", 1.0))), ins[0], None)


def op_gelu(c, node, ins, attrs):
    approx = attrs.get("approximate", b"none")
    return c.module(node, nn.GELU(approximate=approx.decode() if isinstance(approx, bytes) else approx), ins[0], None)


OPS: dict[str, Callable] = {
    "Conv": op_conv, "ConvTranspose": op_conv_transpose, "BatchNormalization": op_batchnorm,
    "Gemm": op_gemm, "MatMul": op_matmul,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _module_op(lambda a: nn.AdaptiveAvgPool2d(1)),
    "GlobalMaxPool": _module_op(lambda a: nn.AdaptiveMaxPool2d(1)),
    "Relu": _module_op(lambda a: nn.ReLU()), "Sigmoid": _module_op(lambda a: nn.Sigmoid()),
    "Tanh": _module_op(lambda a: nn.Tanh()), "HardSwish": _module_op(lambda a: nn.Hardswish()),
    "Softplus": _module_op(lambda a: nn.Softplus()),
    "LeakyRelu": op_leaky, "Elu": op_elu, "Gelu": op_gelu, "Clip": op_clip, "HardSigmoid": op_hardsigmoid,
    "Erf": _fn_op(torch.erf), "Exp": _fn_op(torch.exp), "Log": _fn_op(torch.log), "Sqrt": _fn_op(torch.sqrt),
    "Neg": _fn_op(torch.neg), "Abs": _fn_op(torch.abs), "Reciprocal": _fn_op(torch.reciprocal),
    "Pow": _fn_op(torch.pow), "Add": _fn_op(torch.add), "Sub": _fn_op(torch.sub), "Mul": _fn_op(torch.mul),
    "Div": _fn_op(torch.div), "Equal": _fn_op(torch.eq), "Where": _fn_op(torch.where),
    "Max": _fn_op(torch.maximum), "Min": _fn_op(torch.minimum),
    "Concat": op_concat, "Split": op_split, "Slice": op_slice, "Gather": op_gather, "Shape": op_shape,
    "Cast": op_cast, "Constant": op_constant, "ConstantOfShape": op_constant_of_shape,
    "Identity": op_identity, "Dropout": op_dropout, "Flatten": op_flatten, "Reshape": op_reshape,
    "Squeeze": op_squeeze, "Unsqueeze": op_unsqueeze, "Transpose": op_transpose, "Pad": op_pad,
    "Resize": op_resize, "Upsample": op_resize, "Softmax": op_softmax(False), "LogSoftmax": op_softmax(True),
    "ReduceMean": op_reduce(_reduce_mean), "ReduceSum": op_reduce(_reduce_sum), "ReduceMax": op_reduce(_reduce_max),
    "Expand": _fn_op(_expand),
}
SUPPORTED_OPS = tuple(sorted(OPS))


def load_model(path):
    """The ONNX model in ``path``; a file that is not ONNX is a one-line error."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise UsageError(f"{path} is not an ONNX file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not model.graph.node:
        raise UsageError(f"{path} is not an ONNX file (it holds no graph)")
    return model


def convert(model) -> fx.GraphModule:
    """The ONNX ``ModelProto`` as an ``nn.Module`` (see the module docstring)."""
    return _Converter(model).run().eval()


def graph_input_shape(model) -> tuple[list, str]:
    """The dims of the graph's one input (ints, or str for a symbolic dim) and its name."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"the ONNX graph has {len(inputs)} inputs; cpbench feeds a network one input tensor")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inputs[0].type.tensor_type.shape.dim]
    return dims, inputs[0].name
