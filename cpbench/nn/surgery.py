"""Whole-model surgery: replace named Conv2d layers by decomposed blocks; save and load the result.

``compress(model, plan)`` checks every layer and rank before touching anything, works on a deep
copy (the input model is left as it was), and keeps dtype and train/eval mode.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CpbenchError, UsageError, with_context
from ..decomposition.factorization import Factorization
from .layers import geometry

__all__ = ["LayerPlan", "normalize_plan", "conv_layers", "layer_input_shapes", "decompose_layer",
           "replace_layers", "compress", "save", "load"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    method: str
    rank: Any
    options: dict = field(default_factory=dict)


def normalize_plan(plan) -> dict[str, LayerPlan]:
    """Accept ``{layer: LayerPlan | (method, rank) | {"method": m, "rank": r, **options}}``, a plan file
    written by ``cpbench tune`` (a path) or its :class:`cpbench.tune.Plan`."""
    if isinstance(plan, (str, Path)):
        from ..tune.plan import read_plan

        plan = read_plan(plan)
    if hasattr(plan, "compress_plan"):
        plan = plan.compress_plan()
        if not plan:
            raise UsageError("the plan leaves every layer as it is; there is nothing to compress")
    if not isinstance(plan, dict) or not plan:
        raise UsageError("plan must be a non-empty dict {layer_name: (method, rank)}")
    out = {}
    for name, entry in plan.items():
        if isinstance(entry, LayerPlan):
            out[name] = entry
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            out[name] = LayerPlan(str(entry[0]), entry[1])
        elif isinstance(entry, dict) and "rank" in entry:
            opts = {k: v for k, v in entry.items() if k not in ("method", "rank")}
            out[name] = LayerPlan(entry.get("method", "cp-nls"), entry["rank"], opts)
        else:
            raise UsageError(f"plan entry for layer {name!r} must be (method, rank) or "
                             f"{{'method': ..., 'rank': ...}}, got {entry!r}")
    return out


def conv_layers(model: nn.Module, names: list[str] | None = None) -> dict[str, nn.Conv2d]:
    """The named Conv2d layers (all of them when ``names`` is None); a clear error for a bad name."""
    modules = dict(model.named_modules())
    convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d)}
    if names is None:
        return convs
    out = {}
    for n in names:
        if n not in modules:
            raise UsageError(f"layer {n!r} does not exist; Conv2d layers: {', '.join(convs) or 'none'}")
        if n not in convs:
            raise UsageError(f"layer {n!r} is a {type(modules[n]).__name__}, not a Conv2d; "
                             f"Conv2d layers: {', '.join(convs)}")
        out[n] = convs[n]
    return out


def layer_input_shapes(model: nn.Module, example_input: torch.Tensor, names) -> dict[str, tuple]:
    """Input shape of each named layer on ``example_input`` (one forward pass, no grad)."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}

    def recorder(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is left as it is
        return hook

    hooks = [modules[n].register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def decompose_layer(conv: nn.Conv2d, decomposer, rank, *, name: str = "?", seed: int = 0,
                    in_hw=None, options: dict | None = None) -> tuple[Factorization, Any]:
    """Resolve the rank spec and decompose one conv; errors name the layer."""
    from ..decomposition.ranks import resolve_rank

    options = dict(options or {})
    if conv.groups > 1:
        options.setdefault("groups", conv.groups)
    geo = geometry(conv)
    if options.get("group_mode") == "block-diagonal":
        geo = dataclasses.replace(geo, groups=1)
    weight = conv.weight.detach()

    def run(r):
        try:
            return decomposer.decompose(weight, r, seed=seed, **options)
        except CpbenchError as exc:
            raise with_context(exc, f"layer {name!r}") from None
        except TypeError as exc:
            raise UsageError(f"layer {name!r}: decomposer {decomposer.name!r} rejected options "
                             f"{sorted(options)}: {exc}") from None

    try:
        r, fact = resolve_rank(rank, decomposer, weight, geo, in_hw, decompose=run, options=options, layer=name)
    except CpbenchError as exc:
        if f"layer {name!r}" in getattr(exc, "contexts", ()):  # raised by run(): already says which layer
            raise
        raise with_context(exc, f"layer {name!r}") from None
    if fact is None:
        fact = run(r)
    return fact, r


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_layers(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with each named layer replaced; dtype, device and mode kept."""
    new = copy.deepcopy(model)
    for name, block in replacements.items():
        old = new.get_submodule(name)
        p = old.weight
        block = block.to(device=p.device, dtype=p.dtype)
        block.train(old.training)
        _set_module(new, name, block)
    return new


def compress(model: nn.Module, plan: dict, *, example_input: torch.Tensor | None = None,
             seed: int = 0, plugins=None) -> nn.Module:
    """Replace the layers named in ``plan`` by their decompositions; returns a new model.

    ``plan`` maps layer names (as in ``model.named_modules()``) to ``(method, rank)`` or
    ``{"method": ..., "rank": ..., **options}``; or it is a plan file of ``cpbench tune`` (``plan-12.toml``). Rank specs like "speedup:4" need ``example_input``.
    Every name, method and rank is checked before anything is decomposed; nothing is half-replaced.
    """
    from ..plugin.manager import get_plugins

    plugins = plugins or get_plugins()
    entries = normalize_plan(plan)
    convs = conv_layers(model, list(entries))
    decomposers = {n: plugins.decomposers.get(e.method) for n, e in entries.items()}
    from ..decomposition.ranks import parse_rank

    for n, e in entries.items():
        parse_rank(e.rank)
    shapes = layer_input_shapes(model, example_input, list(entries)) if example_input is not None else {}
    replacements, record = {}, {}
    for n, e in entries.items():
        in_hw = shapes[n][-2:] if n in shapes else None
        fact, r = decompose_layer(convs[n], decomposers[n], e.rank, name=n, seed=seed, in_hw=in_hw,
                                  options=e.options)
        replacements[n] = decomposers[n].build(convs[n], fact)
        record[n] = {"method": e.method, "rank": r, "options": e.options, "rel_error": fact.rel_error,
                     "factorization": fact}
    new = replace_layers(model, replacements)
    new._cpbench_plan = record  # read by save(); not part of the module's state
    if hasattr(model, "_cpbench_spec"):
        new._cpbench_spec = model._cpbench_spec
    return new


# -- save / load: safetensors weights + JSON plan; no pickle ------------------------------------
def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a compressed model to ``path`` (a .safetensors file with the plan in its metadata).

    The model must come from :func:`compress` (it carries its plan). The base architecture is
    rebuilt at load time from the model plugin spec it was built with, or from ``base=``.
    """
    from safetensors.torch import save_file

    plan = getattr(model, "_cpbench_plan", None)
    if plan is None:
        raise UsageError("save() takes a model returned by cpbench.compress (it carries the plan)")
    tensors = {f"state/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    meta_plan = {}
    for name, rec in plan.items():
        fact: Factorization = rec["factorization"]
        for k, t in fact.factors.items():
            tensors[f"factors/{name}/{k}"] = t.detach().contiguous()
        meta_plan[name] = {"method": rec["method"], "rank": rec["rank"],
                           "options": {k: _jsonable(v) for k, v in rec["options"].items()},
                           "rel_error": fact.rel_error,
                           "info": {k: _jsonable(v) for k, v in fact.info.items() if k != "per_group"}}
    metadata = {"cpbench_format": str(FORMAT_VERSION), "plan": json.dumps(meta_plan),
                "spec": json.dumps(getattr(model, "_cpbench_spec", None))}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load(path: str | Path, *, base: nn.Module | None = None, plugins=None) -> nn.Module:
    """Load a model written by :func:`save`. ``base`` is the uncompressed architecture when the
    model was not built from a registered model plugin."""
    from safetensors import safe_open

    from ..plugin.manager import get_plugins

    plugins = plugins or get_plugins()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "cpbench_format" not in meta:
            raise UsageError(f"{path} is not a cpbench model file (no cpbench metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    plan = json.loads(meta["plan"])
    spec = json.loads(meta.get("spec") or "null")
    if base is None:
        if not spec:
            raise UsageError(f"{path} holds a model not built from a model plugin; pass base=<the original nn.Module>")
        base = plugins.models.get(spec["name"]).build(**spec.get("params", {}))
    replacements, record = {}, {}
    convs = conv_layers(base, list(plan))
    for name, p in plan.items():
        prefix = f"factors/{name}/"
        factors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        fact = Factorization(factors, p["rel_error"], p["info"])
        replacements[name] = plugins.decomposers.get(p["method"]).build(convs[name], fact)
        record[name] = {**p, "factorization": fact}
    model = replace_layers(base, replacements)
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    model.load_state_dict(state)
    model._cpbench_plan = record
    if spec:
        model._cpbench_spec = spec
    return model
