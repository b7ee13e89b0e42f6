"""Matrix files: TOML whose ``[matrix]`` table lists axes; the run is their cartesian product.

Pure: parsing, validation and expansion. Names are checked against the registries passed in.

```toml
[matrix]
model = ["charnet"]                  # or inline tables {name = "conv", in_channels = 64, ...}
layers = [["conv2", "conv3"]]        # optional; "auto" = the model's default layers
decomposer = ["cp-nls", "cp-als"]    # or {name = "cp-als", impl = "tensorly"} for options
rank = [64, "speedup:4"]             # or {conv2 = 64, conv3 = 128} per layer
backend = ["torch-cpu"]
threads = [1]
batch = [1, 32]
finetune_epochs = [0, 1]
seed = [0]

[timing]                             # optional: per-cell timing budget
budget_s = 6.0

[train]                              # optional: base training of a model that has a data set
epochs = 10                          # and no weights (fields of cpbench.training.Recipe)
```

Several ``[[matrix]]`` blocks instead of one ``[matrix]`` table: the run is the union of their
products (e.g. a different rank list per layer shape).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MatrixError

__all__ = ["AXES", "Cell", "Matrix", "parse_matrix", "load_matrix", "expand", "cell_key"]

AXES = ("model", "layers", "decomposer", "rank", "backend", "threads", "batch", "finetune_epochs", "seed")
DEFAULTS: dict[str, list] = {
    "layers": ["auto"], "backend": ["torch-cpu"], "threads": [1], "batch": [1],
    "finetune_epochs": [0], "seed": [0],
}
REQUIRED = ("model", "decomposer", "rank")
SECTIONS = ("matrix", "timing", "run", "train")
TIMING_KEYS = ("warmup", "min_rounds", "max_rounds", "budget_s", "min_round_s", "target_ci_rel", "processes", "pin",
               "passes", "contended_retries")
RUN_KEYS = ("description", "dataset_size", "finetune_samples", "finetune_control", "per_layer_timing",
            "cell_timeout_s", "fold_bn")


@dataclass(frozen=True)
class Cell:
    """One point of the matrix. ``model``/``decomposer`` are ``{"name": ..., **params}`` dicts."""

    model: dict
    layers: Any
    decomposer: dict
    rank: Any
    backend: str
    threads: int
    batch: int
    finetune_epochs: int
    seed: int

    def axes(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        return cell_key(self.axes())


def cell_key(axes: dict) -> str:
    """Stable identity of a cell (for --resume): hash of its canonical JSON axes."""
    canon = json.dumps({k: axes.get(k) for k in AXES}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


@dataclass
class Matrix:
    """One or more blocks of axes; the run is the union of each block's cartesian product."""

    blocks: list[dict[str, list]]
    timing: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    source: str = "<inline>"
    train: dict = field(default_factory=dict)  # Recipe fields for base training (cpbench.run.inputs)

    @property
    def axes(self) -> dict[str, list]:
        return self.blocks[0]

    def cells(self) -> list[Cell]:
        return expand(self)

    def __len__(self) -> int:
        return len(self.cells())


def _named(value: Any, axis: str) -> dict:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise MatrixError(f"matrix axis {axis!r}: each entry must be a name or an inline table with a name, got {value!r}")


def _positive_ints(values: list, axis: str, minimum: int) -> list[int]:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise MatrixError(f"matrix axis {axis!r}: {v!r} is not allowed; allowed: integers ≥ {minimum}")
    return values


def parse_matrix(data: dict, *, registries: dict | None = None, source: str = "<inline>") -> Matrix:
    """Validate a parsed TOML document. ``registries`` (kind → Registry) checks plugin names."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise MatrixError(f"{source}: unknown table(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    m = data.get("matrix")
    if isinstance(m, list) and m and all(isinstance(b, dict) for b in m):
        blocks = [_parse_block(b, registries, f"{source} [[matrix]] #{i + 1}") for i, b in enumerate(m)]
    elif isinstance(m, dict):
        blocks = [_parse_block(m, registries, source)]
    else:
        raise MatrixError(f"{source}: no [matrix] table (or [[matrix]] blocks); it holds the axes {', '.join(AXES)}")
    timing = data.get("timing", {})
    bad = sorted(set(timing) - set(TIMING_KEYS))
    if bad:
        raise MatrixError(f"{source}: unknown [timing] key(s) {bad}; allowed: {', '.join(TIMING_KEYS)}")
    if "processes" in timing and (isinstance(timing["processes"], bool) or not isinstance(timing["processes"], int)
                                  or timing["processes"] < 0):
        raise MatrixError(f"{source}: [timing] processes must be a whole number >= 0 (0: time in the harness "
                          f"process), not {timing['processes']!r}")
    if "passes" in timing and (isinstance(timing["passes"], bool) or not isinstance(timing["passes"], int)
                               or timing["passes"] < 1):
        raise MatrixError(f"{source}: [timing] passes must be a whole number >= 1 (1: every process of a cell "
                          f"when it runs), not {timing['passes']!r}")
    if "contended_retries" in timing and (isinstance(timing["contended_retries"], bool)
                                          or not isinstance(timing["contended_retries"], int)
                                          or timing["contended_retries"] < 0):
        raise MatrixError(f"{source}: [timing] contended_retries must be a whole number >= 0 (0: keep a contended "
                          f"process and flag the row busy), not {timing['contended_retries']!r}")
    if "pin" in timing and not isinstance(timing["pin"], bool):
        raise MatrixError(f"{source}: [timing] pin must be true or false, not {timing['pin']!r}")
    run = data.get("run", {})
    bad = sorted(set(run) - set(RUN_KEYS))
    if bad:
        raise MatrixError(f"{source}: unknown [run] key(s) {bad}; allowed: {', '.join(RUN_KEYS)}")
    for key in ("finetune_control", "per_layer_timing", "fold_bn"):
        if key in run and not isinstance(run[key], bool):
            raise MatrixError(f"{source}: [run] {key} must be true or false, not {run[key]!r}")
    return Matrix(blocks, dict(timing), dict(run), source, _parse_train(data.get("train", {}), source))


def _parse_train(train: Any, source: str) -> dict:
    """The [train] table: a recipe's fields, checked here so a typo fails before any cell runs."""
    from .inputs import TRAIN_KEYS

    if not isinstance(train, dict):
        raise MatrixError(f"{source}: [train] must be a table of {', '.join(TRAIN_KEYS)}")
    bad = sorted(set(train) - set(TRAIN_KEYS))
    if bad:
        raise MatrixError(f"{source}: unknown [train] key(s) {bad}; allowed: {', '.join(TRAIN_KEYS)}")
    choices = {"optimizer": ("adam", "sgd"), "schedule": ("onecycle", "cosine", "constant")}
    for key, value in train.items():
        if key in choices:
            if value not in choices[key]:
                raise MatrixError(f"{source}: [train] {key} = {value!r} is not allowed; allowed: {', '.join(choices[key])}")
        elif key in ("epochs", "batch_size", "n_train", "seed"):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
                raise MatrixError(f"{source}: [train] {key} = {value!r} is not allowed; allowed: a positive integer")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise MatrixError(f"{source}: [train] {key} = {value!r} is not allowed; allowed: a number ≥ 0")
    return dict(train)


def _parse_block(m: dict, registries: dict | None, source: str) -> dict[str, list]:
    unknown = sorted(set(m) - set(AXES))
    if unknown:
        raise MatrixError(f"{source}: unknown matrix key(s) {unknown}; allowed: {', '.join(AXES)}")
    for req in REQUIRED:
        if req not in m:
            raise MatrixError(f"{source}: matrix axis {req!r} is required")
    axes: dict[str, list] = {}
    for axis in AXES:
        values = m.get(axis, DEFAULTS.get(axis))
        if not isinstance(values, list) or not values:
            raise MatrixError(f"{source}: matrix axis {axis!r} must be a non-empty list, got {values!r}")
        axes[axis] = values
    axes["model"] = [_named(v, "model") for v in axes["model"]]
    axes["decomposer"] = [_named(v, "decomposer") for v in axes["decomposer"]]
    for v in axes["backend"]:
        if not isinstance(v, str):
            raise MatrixError(f"{source}: matrix axis 'backend': {v!r} must be a backend name")
    _positive_ints(axes["threads"], "threads", 1)
    _positive_ints(axes["batch"], "batch", 1)
    _positive_ints(axes["finetune_epochs"], "finetune_epochs", 0)
    _positive_ints(axes["seed"], "seed", 0)
    from ..nn.selection import check_layer_spec

    for v in axes["layers"]:
        try:
            check_layer_spec(v, "matrix axis 'layers'")
        except Exception as exc:
            raise MatrixError(f"{source}: {exc}") from None
    from ..decomposition.ranks import parse_rank

    from ..tune.cell import check_target_spec, is_target_spec

    for v in axes["rank"]:
        if is_target_spec(v):  # a tuned plan: {target_speedup = 8}
            try:
                check_target_spec(v, (registries or {}).get("decomposer"))
            except Exception as exc:
                raise MatrixError(f"{source}: matrix axis 'rank': {exc}") from None
            continue
        specs = v.values() if isinstance(v, dict) else [v]
        for s in specs:
            try:
                parse_rank(s)
            except Exception as exc:
                raise MatrixError(f"{source}: matrix axis 'rank': {exc}") from None
    if registries:
        for axis, kind in (("model", "model"), ("decomposer", "decomposer"), ("backend", "backend")):
            reg = registries.get(kind)
            if reg is None:
                continue
            for v in axes[axis]:
                name = v["name"] if isinstance(v, dict) else v
                if name not in reg:
                    raise MatrixError(f"{source}: unknown {kind} {name!r} in axis {axis!r}; available: {', '.join(reg.names())}")
    return axes


def load_matrix(path: str | Path, *, registries: dict | None = None) -> Matrix:
    from .paths import read_toml

    data = read_toml(path, "matrix", MatrixError)
    return parse_matrix(data, registries=registries, source=str(path))


def expand(matrix: Matrix) -> list[Cell]:
    """Each block's cartesian product in file order (model outermost, seed innermost); a cell that
    two blocks both produce appears once."""
    cells, seen = [], set()
    for block in matrix.blocks:
        for combo in itertools.product(*(block[a] for a in AXES)):
            cell = Cell(*combo)
            if cell.key not in seen:
                seen.add(cell.key)
                cells.append(cell)
    return cells
