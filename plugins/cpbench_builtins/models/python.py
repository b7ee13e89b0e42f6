"""``python``: any ``nn.Module`` a Python callable builds, named by ``module:callable``.

```toml
[[matrix.model]]
name = "python"
target = "nets.py:ResNet"
params = {num_classes = 10}
weights = "resnet.safetensors"
input_shape = [3, 32, 32]
```

``target`` is ``package.module:callable`` (imported as usual) or ``path/to/file.py:callable``
(relative to the matrix file; the file's folder is on ``sys.path`` while it loads, so it may import
its neighbours). The callable (a class or a function; ``Outer.attr`` reaches nested attributes) is
called with ``params`` as keyword arguments and must return an ``nn.Module``. ``weights``,
``input_shape`` and ``dataset`` are the core's model-spec keys (README, "Your own network").
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from cpbench import hookimpl, resolve_path
from cpbench.errors import UsageError

__all__ = ["PythonModel", "resolve_target"]

ALLOWED = ("target", "params")


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1]}" if text else type(exc).__name__


def _import_file(path: Path):
    if not path.is_file():
        raise UsageError(f"model 'python': no such file {path}")
    # one module per file (by its path), so two models from same-named files do not collide
    name = f"cpbench_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules and getattr(sys.modules[name], "_cpbench_mtime", None) == path.stat().st_mtime_ns:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"model 'python': importing {path} failed: {_last_line(exc)}") from None
    finally:
        sys.path.remove(str(path.parent))
    module._cpbench_mtime = path.stat().st_mtime_ns
    sys.modules[name] = module  # pickling the network (workers, deepcopy) finds its classes
    return module


def resolve_target(target: str):
    """The callable ``target`` names; a target that does not import is a one-line error."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise UsageError(f"model 'python': target {target!r} is not allowed; allowed: \"package.module:callable\" "
                         "or \"path/to/file.py:callable\"")
    where, attr = target.split(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(resolve_path(where).resolve())
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise UsageError(f"model 'python': cannot import {where}: {_last_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
            raise UsageError(f"model 'python': {where} has no {attr!r}; it defines {', '.join(public) or 'nothing'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"model 'python': {target} is a {type(obj).__name__}, not a callable that builds a module")
    return obj


class PythonModel:
    name = "python"
    dataset = None
    default_layers = None

    def _check(self, params: dict) -> tuple[str, dict]:
        unknown = sorted(set(params) - set(ALLOWED))
        if unknown:
            raise UsageError(f"model 'python' got unknown params {unknown}; allowed: {', '.join(ALLOWED)} "
                             "(and the core's weights, input_shape, dataset); the callable's own go in params = {...}")
        if "target" not in params:
            raise UsageError("model 'python' needs target = \"package.module:callable\" or \"file.py:callable\"")
        kwargs = params.get("params", {})
        if not isinstance(kwargs, dict):
            raise UsageError(f"model 'python': params must be a table of keyword arguments, not {kwargs!r}")
        return params["target"], kwargs

    def build(self, **params) -> nn.Module:
        target, kwargs = self._check(params)
        fn = resolve_target(target)
        try:
            model = fn(**kwargs)
        except Exception as exc:
            raise UsageError(f"model 'python': {target}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                             f"raised {_last_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"model 'python': {target} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def input_shape(self, **params):
        self._check(params)
        return None  # the spec's input_shape or the data set's (cpbench.inputs)

    def label(self, **params) -> str:
        return str(params.get("target", "python")).rsplit("/", 1)[-1]


@hookimpl
def cpbench_register_models(registry) -> None:
    registry.add(PythonModel())
