"""Fold an eval-mode BatchNorm2d into the Conv2d it directly follows.

In inference a BatchNorm2d is a per-channel affine map, ``y = (x − μ)·γ/√(σ² + ε) + β``; applied to a
conv's output it is the same conv with its kernel scaled per output channel and a new bias. Folding it
before decomposing means the decomposer sees the kernel the network really applies, and the timed
baseline is not slowed by a BatchNorm the compressed network would have folded.

"Directly follows" is decided on the traced graph (``torch.fx.symbolic_trace``): the BatchNorm's only
input is the conv's output, and that output has no other reader, and each module is called once.
Where the network cannot be traced (data-dependent control flow), only pairs that are provably
adjacent are folded: consecutive children of a plain ``nn.Sequential`` (whose forward feeds each child
the previous child's output and nothing else), each module reachable by one path only, no hooks.
Everything else is left as it is.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["conv_bn_pairs", "fold_batchnorm", "fold_into_conv"]


def _plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _foldable_bn(m: nn.Module) -> bool:
    # without running statistics a BatchNorm normalises by the batch even in eval: not an affine map
    return (isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def _single_path(model: nn.Module) -> set[str]:
    """Names of modules reachable by exactly one path (a module registered twice may run elsewhere)."""
    count: dict[int, int] = {}
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
        names.setdefault(id(m), name)
    return {names[k] for k, c in count.items() if c == 1}


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, unsupported ops: fall back to what is provable
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules.get(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or not _plain_conv(modules.get(src.target)):
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1:
            pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, m in model.named_modules():
        if type(m).forward is not nn.Sequential.forward:
            continue
        children = list(m.named_children())
        for (cn, conv), (bn_name, bn) in zip(children, children[1:]):
            if _plain_conv(conv) and _foldable_bn(bn):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cn, prefix + bn_name))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every eval-mode BatchNorm2d that directly follows a Conv2d, in module order."""
    pairs = _pairs_fx(model)
    if pairs is None:
        pairs = _pairs_sequential(model)
    single = _single_path(model)
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    ok = [(c, b) for c, b in pairs
          if c in single and b in single and _no_hooks(modules[c]) and _no_hooks(modules[b])]
    return sorted(ok, key=lambda p: order[p[0]])


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` in eval mode (float64 arithmetic, the conv's dtype kept)."""
    w = conv.weight.detach().double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    shift = bn.bias.double() if bn.bias is not None else 0.0
    new = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    # fresh, contiguous parameters: a kernel shared with another module keeps its old value there
    new.weight = nn.Parameter((w * scale[:, None, None, None]).to(dtype).contiguous(),
                              requires_grad=conv.weight.requires_grad)
    new.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(dtype))
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with each BatchNorm2d that directly follows a conv folded into it and
    replaced by ``nn.Identity``; returns ``(copy, {bn_name: conv_name})``. The input is not changed."""
    pairs = conv_bn_pairs(model)
    if not pairs:
        return model, {}
    new = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        _set(new, conv_name, fold_into_conv(new.get_submodule(conv_name), new.get_submodule(bn_name)))
        _set(new, bn_name, nn.Identity())
    return new, {b: c for c, b in pairs}
