"""``onnx``: a network from an ONNX file, converted to PyTorch modules that surgery can replace.

```toml
model = [{name = "onnx", path = "model.onnx"}]      # input_shape = [C, H, W] if H, W are symbolic
```

The file's weights are the network's: it is never trained (a ``dataset`` measures its accuracy and
fine-tunes the compressed network). The input shape is read from the graph; a symbolic batch is
fine, symbolic channels or spatial sizes need ``input_shape`` in the spec. Conversion:
:mod:`cpbench_builtins.models.onnx_import` (the ops it takes are listed there and in the README).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from torch import nn

from cpbench import hookimpl, resolve_path
from cpbench.errors import UsageError

from .onnx_import import convert, graph_input_shape, load_model

__all__ = ["OnnxModel"]

ALLOWED = ("path",)


@lru_cache(maxsize=4)
def _model(path: Path, mtime: int):
    return load_model(path)


class OnnxModel:
    name = "onnx"
    dataset = None
    default_layers = None

    def _load(self, params: dict):
        unknown = sorted(set(params) - set(ALLOWED))
        if unknown:
            raise UsageError(f"model 'onnx' got unknown params {unknown}; allowed: path (and the core's "
                             "input_shape, dataset)")
        if "path" not in params:
            raise UsageError("model 'onnx' needs path = \"model.onnx\"")
        path = resolve_path(params["path"]).resolve()
        if not path.is_file():
            raise UsageError(f"model 'onnx': no such file {path}")
        return path, _model(path, path.stat().st_mtime_ns)

    def build(self, **params) -> nn.Module:
        return convert(self._load(params)[1])

    def input_shape(self, **params) -> tuple:
        path, model = self._load(params)
        dims, name = graph_input_shape(model)
        sample = dims[1:]
        if len(sample) != 3 or not all(isinstance(d, int) and d > 0 for d in sample):
            raise UsageError(f"{path}: input {name!r} has shape {dims} with symbolic sizes; "
                             "give input_shape = [C, H, W] in the model spec")
        return tuple(sample)

    def trained(self, **params) -> bool:
        return True  # the file holds the weights

    def label(self, **params) -> str:
        return Path(str(params.get("path", "onnx"))).name


@hookimpl
def cpbench_register_models(registry) -> None:
    registry.add(OnnxModel())
