"""The plugin contracts: what each kind of plugin object provides, as typed Protocols.

A plugin registers objects of five kinds (``registry.add(obj)`` in its ``cpbench_register_*`` hook).
Each kind is a :class:`typing.Protocol` here, so a type checker verifies a plugin against it and the
docs cannot drift from the code; :mod:`cpbench.plugin.registry` checks the required members at
registration. Optional members (capabilities) are listed in each Protocol's docstring and read with
``getattr(obj, name, default)``: the core asks a plugin what it can do, it never tests its name.

==========  ====================================================================================
kind        required
==========  ====================================================================================
decomposer  ``name``, ``decompose(weight, rank, *, seed=0, **options) -> Factorization``,
            ``build(conv, factorization) -> nn.Module``
backend     ``name``, ``prepare(model, example_input, *, threads) -> Prepared``
model       ``name``, ``build(**params) -> nn.Module``, ``input_shape(**params) -> (C, H, W)``
dataset     ``name``, ``load(split, *, seed=0, size=None) -> TensorDataset``
executor    ``name``, ``execute(cells, run_cell, emit, *, step=None, **options) -> None``
==========  ====================================================================================

Every kind may also provide ``version`` (recorded; part of a decomposer's cache key) and
``versions() -> dict[str, str]`` (the versions of the libraries it runs on, recorded in each result
row under ``versions``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from ..decomposition.factorization import Factorization
    from ..run.matrix import Cell

__all__ = ["Prepared", "Decomposer", "Backend", "Model", "Dataset", "Executor", "RunCell", "Emit", "Step"]


@dataclass
class Prepared:
    """A model ready to time. ``run(x)`` must do the whole inference (no lazy work left).

    Returned by :meth:`Backend.prepare`, which the harness calls inside
    :func:`cpbench.measure.thread_limits` (it sets and restores the pools; a backend that must set
    more, e.g. MKL/OpenMP explicitly, does so in ``prepare`` and restores it in ``close``). ``info`` is
    a JSON-able dict (e.g. ``compile_seconds``, what it set). Equivalence with the eager model is the
    backend's promise; the conformance suite checks it.
    """

    run: Callable[[torch.Tensor], Any]
    info: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    # Optional: convert an input once, outside the timed region (e.g. to channels_last).
    convert_input: Callable[[torch.Tensor], Any] = lambda x: x

    def __call__(self, x):
        return self.run(x)


@runtime_checkable
class Decomposer(Protocol):
    """Decomposes a conv kernel ``(out_channels, in_channels/groups, kh, kw)`` and builds its replacement.

    Optional members:

    ``version: str``
        part of the decomposition cache key: change it when results change.
    ``supports_groups: bool`` (default True)
        False when ``decompose`` refuses ``groups > 1``; the conformance suite then skips the grouped
        and depthwise geometry checks instead of expecting them to pass.
    ``rank_kind: str`` (default ``"int"``)
        ``"pair"`` when a rank is ``[r_out, r_in]`` (Tucker-2): the ``"vbmf"`` rank spec needs it.
    ``max_rank(weight_shape, groups=1, group_mode="per-group")``
        the largest rank it accepts (rank specs are clipped to it).
    ``params(geo, rank)``, ``macs(geo, rank, in_hw)``
        the cost model behind the ``"params:"`` and ``"speedup:"`` rank specs.
    """

    name: str

    def decompose(self, weight: torch.Tensor, rank: Any, *, seed: int = 0, **options: Any) -> "Factorization": ...

    def build(self, conv: nn.Conv2d, factorization: "Factorization") -> nn.Module: ...


@runtime_checkable
class Backend(Protocol):
    """Prepares a model for timed CPU inference (see :class:`Prepared`)."""

    name: str

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared: ...


@runtime_checkable
class Model(Protocol):
    """Builds a network from a matrix's model parameters.

    Optional members: ``dataset`` (a data set's name: the network is trained on it and every cell is
    evaluated on it), ``default_layers`` (the conv names ``layers = "auto"`` means; default: every
    Conv2d), ``label(**params) -> str`` (the name tables show), ``train_recipe`` and
    ``finetune_recipe`` (:class:`cpbench.nn.training.Recipe`), ``weights_root`` (a folder of shipped
    trained weights, a cache read before training), ``reference_points`` (published results the
    report marks on its plots: ``[{"speedup": 8.5, "drop": 1.0, "label": "..."}]``), ``from_dataset``
    and ``trained(**params)`` (see :mod:`cpbench.run.inputs`).
    """

    name: str

    def build(self, **params: Any) -> nn.Module: ...

    def input_shape(self, **params: Any) -> Sequence[int] | None: ...  # None: the spec's or the data set's


@runtime_checkable
class Dataset(Protocol):
    """A labelled image data set in splits ``train``, ``val``, ``test``. Optional: ``num_classes``, ``version``,
    ``open(**params)`` for a data set that takes parameters from a spec (see :mod:`cpbench.run.inputs`)."""

    name: str

    def load(self, split: str, *, seed: int = 0, size: int | None = None) -> torch.utils.data.TensorDataset: ...


# What an executor is handed: the harness's function that runs one cell (anywhere: it and its
# arguments pickle), the callback that takes each finished row in the client process, and the
# progress callback for a cell's steps (None when nothing displays progress).
Step = Callable[[str], None]
RunCell = Callable[..., dict]    # run_cell(cell, *, step=None) -> row
Emit = Callable[[dict], None]


@runtime_checkable
class Executor(Protocol):
    """Runs cells: calls ``run_cell(cell, step=step)`` for each (in this process or elsewhere) and
    ``emit(row)`` in the client process as each row arrives. ``options`` come from the CLI or the
    matrix (e.g. ``cell_timeout_s``); an option it does not take is a :class:`~cpbench.errors.UsageError`.

    Optional: ``cli_options: tuple[str, ...]``, the ``cpbench run`` flags it takes (e.g. ``("scheduler",
    "workers")``); the CLI passes those and refuses them for an executor that does not list them.
    """

    name: str

    def execute(self, cells: Iterable["Cell"], run_cell: RunCell, emit: Emit, *, step: Step | None = None,
                **options: Any) -> None: ...
