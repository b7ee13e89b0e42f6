"""A cell's inputs: the network and the data its model spec names, ready to decompose.

A model spec is ``{"name": plugin, **params}``. Three keys belong to the core, for every model
plugin alike, and are not passed to the plugin's ``build``:

``dataset``
    a data-set name (``"synthchars"``) or an inline spec (``{name = "imagefolder", path = "images"}``);
    overrides the plugin's own ``dataset``. A spec's parameters go to the data-set plugin's
    ``open(**params)``, which returns the data set (``num_classes``, ``input_shape``, ``load``).
``weights``
    a ``.safetensors`` file or a ``.pt``/``.pth`` state dict (read with ``weights_only=True``; a
    checkpoint dict holding ``state_dict`` or ``model`` is accepted). A model given weights is
    never trained.
``input_shape``
    [C, H, W] of one sample; else the data set's, else the plugin's ``input_shape(**params)``.

A model plugin may list in ``from_dataset`` the params (``num_classes``, ``in_channels``) the core
fills from its data set when the spec does not give them, and may say with ``trained(**params)``
that what it builds already holds trained weights (an ONNX file). A model with a data set and no
weights is trained by the recipe (the plugin's ``train_recipe`` or :data:`DEFAULT_RECIPE`, with the
matrix's ``[train]`` table on top), cached under a hash of the recipe, the model's content
(architecture, initial weights, source of its classes) and the training data's content.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .cache import Cache, key_of
from ..errors import CpbenchError, UsageError
from .paths import resolve_path

__all__ = ["CORE_MODEL_KEYS", "TRAIN_KEYS", "DataSource", "Network", "split_model_spec", "open_dataset",
           "load_weights", "check_input_shape", "build_network", "check_model_specs", "model_content"]

CORE_MODEL_KEYS = ("dataset", "weights", "input_shape")
# the [train] table: fields of cpbench.training.Recipe a matrix may set
TRAIN_KEYS = ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "momentum", "schedule", "warmup",
              "grad_clip", "label_smoothing", "n_train", "seed")


class DataSource(Protocol):
    """A data set as a cell uses it."""

    num_classes: int

    def load(self, split: str, *, seed: int = 0, size: int | None = None) -> Any: ...


@dataclass
class Network:
    """The base network of a cell and where its weights came from."""

    module: nn.Module
    input_shape: tuple[int, ...]
    data: DataSource | None
    data_spec: Any  # the data-set name or inline spec (None: no data set)
    weights_from: str  # "weights file", "plugin", "trained", "cache", "shipped" or "init" (random initialisation)


def split_model_spec(spec: dict) -> tuple[str, dict, dict]:
    """(plugin name, the plugin's params, the core's keys) of a model spec."""
    params = {k: v for k, v in spec.items() if k != "name" and k not in CORE_MODEL_KEYS}
    core = {k: spec[k] for k in CORE_MODEL_KEYS if k in spec}
    return spec["name"], params, core


def open_dataset(spec: Any, plugins) -> DataSource:
    """The data set a spec names: a registered name, or ``{name, **params}`` opened by its plugin."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise UsageError(f"dataset {spec!r} is not allowed; allowed: a data-set name or an inline table "
                         "{name = \"imagefolder\", path = \"DIR\", ...}")
    plugin = plugins.datasets.get(name)
    if hasattr(plugin, "open"):
        return plugin.open(**params)
    if params:
        raise UsageError(f"dataset {name!r} takes no parameters, got {sorted(params)}")
    return plugin


# -- weights ----------------------------------------------------------------------------------
def _read_state(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):  # a training checkpoint rather than a bare state dict
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if isinstance(obj, nn.Module):  # pragma: no cover - weights_only refuses modules
            obj = obj.state_dict()
        if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise UsageError(f"weights {path}: not a state dict (a dict of tensor names to tensors, or a "
                             "checkpoint holding one under 'state_dict' or 'model')")
        return obj
    raise UsageError(f"weights {path}: suffix {suffix!r} is not allowed; allowed: .safetensors, .pt, .pth")


def _first(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict file into ``model``; a file for another architecture is a one-line error
    naming the first missing, unexpected or mis-shaped keys."""
    path = resolve_path(path)
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        state = _read_state(path)
    except CpbenchError:
        raise
    except Exception as exc:
        raise UsageError(f"weights {path}: cannot read: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    # parameters before BatchNorm's batch counters: the first keys named are the telling ones
    unexpected = sorted((k for k in state if k not in own), key=lambda k: k.endswith("num_batches_tracked"))
    shapes = [f"{k} {tuple(state[k].shape)} (the model has {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_first(shapes, 2)}")
    if problems:
        raise UsageError(f"weights {path} do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


# -- input shape ------------------------------------------------------------------------------
def check_input_shape(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run one sample of ``input_shape`` through ``model``; a shape the network cannot take is a
    one-line error naming the first layer that failed and the shape it got."""
    entered: list[tuple[str, nn.Module, tuple]] = []
    hooks = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: entered.append(
                    (name, m, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = ""
        if entered:
            name, mod, shapes = entered[-1]
            where = f" at {name} ({type(mod).__name__}, input {', '.join(map(str, shapes)) or 'none'})"
        raise UsageError(f"input_shape {list(input_shape)} does not fit the network{where}: {msg}") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def _input_shape(core: dict, plugin, params: dict, data) -> tuple[int, ...]:
    shape = core.get("input_shape")
    if shape is None and data is not None:  # the network is trained and evaluated on these samples
        shape = getattr(data, "input_shape", None)
    if shape is None:
        shape = plugin.input_shape(**params)
    if shape is None:
        raise UsageError(f"model {plugin.name!r} needs input_shape = [C, H, W] (or a dataset to take it from)")
    if not (isinstance(shape, (list, tuple)) and len(shape) >= 1
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise UsageError(f"input_shape {shape!r} is not allowed; allowed: [C, H, W] of positive integers")
    return tuple(int(s) for s in shape)


# -- training ---------------------------------------------------------------------------------
def model_content(model: nn.Module) -> str:
    """Hash of what a network is: its structure, its initial weights and the source of every class
    it is made of that is not torch's own (so an edited ``forward`` trains afresh)."""
    h = hashlib.sha256(repr(model).encode())
    h.update(key_of(*[v for _, v in sorted(model.state_dict().items())]).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if cls.__module__.startswith("torch."):
            continue
        try:
            h.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):  # defined in a notebook or generated: its repr stands for it
            h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    return h.hexdigest()[:16]


def data_content(data) -> str:
    """Hash of a data set's training split (images and labels)."""
    x, y = data.load("train", seed=0).tensors
    return key_of(x, y)[:16]


def _recipe(plugin, ctx):
    from ..nn import training

    recipe = getattr(plugin, "train_recipe", training.DEFAULT_RECIPE)
    if ctx.train:
        recipe = recipe.replace(**ctx.train)
    if ctx.dataset_size.get("train"):
        recipe = recipe.replace(n_train=ctx.dataset_size["train"])
    return recipe


def _train_or_load(model, plugin, params, data, data_spec, ctx, load_split, step) -> str:
    from ..nn import training
    from ..measure.threads import thread_limits

    recipe = _recipe(plugin, ctx)
    shipped = getattr(plugin, "weights_root", None)
    if shipped is not None and isinstance(data_spec, str):
        # the key shipped weights were filed under when they were made: recipe, names, data-set version
        key = training.recipe_hash(recipe, model=plugin.name, params=params, dataset=data_spec,
                                   dataset_version=getattr(data, "version", None), dataset_repr=repr(data))
    else:
        key = training.recipe_hash(recipe, model=plugin.name, params=params, model_content=model_content(model),
                                   dataset=data_spec, dataset_content=data_content(data))
    cache = ctx.cache()
    hit = cache.get("models", key)
    source = "cache"
    if hit is None and shipped is not None:
        hit, source = Cache(shipped).get("models", key), "shipped"
    if hit is not None:
        model.load_state_dict(hit[0])
        return source
    if step:
        step(f"training {plugin.name} (first run; cached afterwards)")
    train = load_split(data_spec, data, "train")
    with thread_limits(ctx.train_threads):
        history = training.train(model, train, recipe)
    if history.get("diverged"):
        raise UsageError(f"training {plugin.name} diverged (the loss became NaN/inf); lower [train] lr")
    cache.put("models", key, model.state_dict(),
              {"recipe": dataclasses.asdict(recipe), "seconds": history.get("seconds")})
    return "trained"


def check_model_specs(specs, ctx, plugins) -> None:
    """Build every model spec once, without training: a target that does not import, a file that is
    not ONNX, weights for another architecture, a data folder that is empty, an input shape the network
    cannot take... raise here, before any cell runs, rather than failing every cell after the work."""
    from .paths import spec_dir

    seen = []
    with spec_dir(ctx.spec_dir):
        for spec in specs:
            if spec not in seen:
                seen.append(spec)
                try:
                    build_network(spec, ctx, plugins, train=False)
                except CpbenchError:
                    raise
                except Exception:  # a plugin's own failure: each cell records it with its traceback
                    pass


def build_network(spec: dict, ctx, plugins, *, load_split=None, step=None, train: bool = True) -> Network:
    """The network a model spec names, with weights loaded or trained (``train``), in eval mode.

    ``load_split(data_spec, data, split)`` loads a split of the data set (the caller memoises it).
    """
    from torch.random import fork_rng

    name, params, core = split_model_spec(spec)
    plugin = plugins.models.get(name)
    data_spec = core.get("dataset", getattr(plugin, "dataset", None))
    data = open_dataset(data_spec, plugins) if data_spec else None
    build_params = dict(params)
    if data is not None:
        shape = getattr(data, "input_shape", None)
        for key, value in (("num_classes", getattr(data, "num_classes", None)),
                           ("in_channels", shape[0] if shape else None)):
            if key in getattr(plugin, "from_dataset", ()) and key not in build_params and value is not None:
                build_params[key] = value
    with fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = plugin.build(**build_params)
        except CpbenchError:
            raise
        except TypeError as exc:
            raise UsageError(f"model {name!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    model._cpbench_spec = {"name": name, "params": build_params}
    input_shape = _input_shape(core, plugin, build_params, data)
    check_input_shape(model, input_shape)
    if load_split is None:
        load_split = lambda spec, d, split: d.load(split, seed=0, size=ctx.dataset_size.get(split))  # noqa: E731
    weights_from = "init"
    if core.get("weights"):
        load_weights(model, core["weights"])
        weights_from = "weights file"
    elif getattr(plugin, "trained", None) is not None and plugin.trained(**params):
        weights_from = "plugin"
    elif data is not None and train:
        weights_from = _train_or_load(model, plugin, params, data, data_spec, ctx, load_split, step)
    return Network(model.eval(), input_shape, data, data_spec, weights_from)
