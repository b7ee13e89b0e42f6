"""``cpbench.benchmark``: the cells of a matrix run on an ``nn.Module`` object, from Python.

A notebook user has a module and maybe tensors, not files::

    rows = cpbench.benchmark(net, torch.randn(1, 3, 32, 32), decomposers=["cp-als", "tucker2"],
                             ranks=["speedup:2"], backends=["torch-cpu"],
                             dataset={"name": "imagefolder", "path": "images"}, out="runs/mine")

The module and an in-memory data set are registered, under a hash of their content, as a model
(``nn.Module``) and a data set (``tensors``) of the process's plugin set, so the cells are the
matrix's cells: same rows, same caches, same ``results.jsonl`` and reports. They run in this
process (the ``local`` executor without a time limit): the objects are not files another process
could read.
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import UsageError

__all__ = ["benchmark", "InMemoryModels", "InMemoryDatasets"]


class InMemoryModels:
    """The ``nn.Module`` model plugin: modules handed to :func:`benchmark`, by content key."""

    name = "nn.Module"
    dataset = None
    default_layers = None

    def __init__(self):
        self.modules: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

    def add(self, module: nn.Module, input_shape: tuple[int, ...]) -> str:
        from .inputs import model_content

        key = model_content(module)
        self.modules[key] = (copy.deepcopy(module).eval(), tuple(input_shape))
        return key

    def _get(self, params: dict):
        key = params.get("key")
        if key not in self.modules:
            raise UsageError("model 'nn.Module' runs only modules handed to cpbench.benchmark in this process")
        return self.modules[key]

    def build(self, **params) -> nn.Module:
        return copy.deepcopy(self._get(params)[0])

    def input_shape(self, **params) -> tuple:
        return self._get(params)[1]

    def trained(self, **params) -> bool:
        return True  # the module's weights are what is benchmarked

    def label(self, **params) -> str:
        return str(params.get("class", "nn.Module"))


class InMemoryDatasets:
    """The ``tensors`` data-set plugin: ``{"train": (x, y), "test": (x, y)}`` handed to :func:`benchmark`."""

    name = "tensors"

    def __init__(self):
        self.sets: dict[str, "_TensorSource"] = {}

    def add(self, splits: dict) -> str:
        from .cache import key_of

        source = _TensorSource(splits)
        key = key_of(*(t for s in ("train", "test") for t in source.splits[s]))[:16]
        self.sets[key] = source
        return key

    def open(self, key: str | None = None) -> "_TensorSource":
        if key not in self.sets:
            raise UsageError("dataset 'tensors' holds only data handed to cpbench.benchmark in this process")
        return self.sets[key]

    def load(self, split: str, *, seed: int = 0, size: int | None = None):
        raise UsageError("dataset 'tensors' is filled by cpbench.benchmark(dataset={'train': (x, y), 'test': (x, y)})")


class _TensorSource:
    def __init__(self, splits: dict):
        if not isinstance(splits, dict) or set(splits) != {"train", "test"}:
            raise UsageError("dataset tensors must be {'train': (images, labels), 'test': (images, labels)}")
        self.splits = {}
        for s, pair in splits.items():
            tensors = getattr(pair, "tensors", pair)
            if not (isinstance(tensors, Sequence) and len(tensors) == 2):
                raise UsageError(f"dataset tensors: {s!r} must be (images, labels)")
            x, y = (torch.as_tensor(t) for t in tensors)
            if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
                raise UsageError(f"dataset tensors: {s!r} has images {tuple(x.shape)} and labels {tuple(y.shape)}; "
                                 "allowed: images N×C×H×W and N labels")
            self.splits[s] = (x.float().contiguous(), y.long())
        self.num_classes = int(max(int(y.max()) for _, y in self.splits.values())) + 1
        self.input_shape = tuple(self.splits["train"][0].shape[1:])

    def load(self, split: str, *, seed: int = 0, size: int | None = None) -> TensorDataset:
        if split not in self.splits:
            raise UsageError(f"dataset tensors: no split {split!r}; allowed: train, test")
        x, y = self.splits[split]
        return TensorDataset(x[:size], y[:size]) if size is not None else TensorDataset(x, y)


def _registered(plugins, kind: str, cls):
    registry = plugins.registries[kind]
    if cls.name not in registry:
        registry.bound("cpbench.benchmark").add(cls())
    return registry.get(cls.name)


def benchmark(model: nn.Module, example_input: torch.Tensor, *, decomposers: Sequence[Any] = ("cp-als",),
              ranks: Sequence[Any] = ("speedup:2",), backends: Sequence[str] = ("torch-cpu",),
              layers: Any = "auto", dataset: Any = None, finetune_epochs: Sequence[int] = (0,),
              threads: Sequence[int] = (1,), batch: Sequence[int] | None = None, seeds: Sequence[int] = (0,),
              timing: dict | None = None, train: dict | None = None, run: dict | None = None,
              out: str | Path | None = None, resume: bool = False, progress: bool = False) -> list[dict]:
    """Run every combination of ``decomposers`` × ``ranks`` × ``backends`` (× the other axes) on
    ``model`` and return the result rows (the dicts ``results.jsonl`` holds, one per cell).

    ``example_input``: one batch (N, C, H, W); its sample shape is the network's, its N the batch
    timed unless ``batch`` is given. ``dataset``: None (timing, FLOPs and output error only), a
    data-set name or spec dict as in a matrix file, or ``{"train": (x, y), "test": (x, y)}`` tensors.
    ``layers``: "auto" or a list of conv names. ``timing``/``train``/``run``: the matrix file's
    tables. ``out``: the run directory (a temporary one when None); ``resume`` finishes a run there.
    Relative paths in ``dataset`` start at the current directory.
    """
    from ..plugin.manager import get_plugins
    from .cell import RunContext
    from .matrix import parse_matrix
    from .session import run_matrix

    if not isinstance(model, nn.Module):
        raise UsageError(f"benchmark: model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise UsageError("benchmark: example_input must be a tensor with a batch dimension, e.g. torch.randn(1, 3, 32, 32)")
    plugins = get_plugins()
    key = _registered(plugins, "model", InMemoryModels).add(model, tuple(example_input.shape[1:]))
    spec: dict[str, Any] = {"name": InMemoryModels.name, "class": type(model).__name__, "key": key}
    if dataset is not None:
        if isinstance(dataset, dict) and set(dataset) == {"train", "test"}:
            dataset = {"name": InMemoryDatasets.name, "key": _registered(plugins, "dataset", InMemoryDatasets).add(dataset)}
        spec["dataset"] = dataset
    axes = {"model": [spec], "layers": [layers], "decomposer": list(decomposers), "rank": list(ranks),
            "backend": list(backends), "threads": list(threads),
            "batch": list(batch) if batch is not None else [int(example_input.shape[0])],
            "finetune_epochs": list(finetune_epochs), "seed": list(seeds)}
    doc = {"matrix": axes, "timing": dict(timing or {}), "run": dict(run or {}), "train": dict(train or {})}
    matrix = parse_matrix(doc, registries={"model": plugins.models, "decomposer": plugins.decomposers,
                                           "backend": plugins.backends}, source="cpbench.benchmark")
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="cpbench-"))
    cell_progress = None
    if progress:
        from .progress import CellProgress

        cell_progress = CellProgress()
    summary = run_matrix(matrix, out_dir, resume=resume, ctx=RunContext.from_matrix(matrix), plugins=plugins,
                         progress=cell_progress)
    if resume:
        from .results import read_results

        return read_results(out_dir)
    return summary.rows
