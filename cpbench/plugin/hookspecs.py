"""Every hook cpbench calls, grouped by the phase that calls it. This module is the table of contents.

A plugin is a module or object with functions marked ``@cpbench.hookimpl`` whose names are these.
Built-ins (``plugins/cpbench_builtins``) and third-party packages register the same way: an entry
point in group ``cpbench``. Hooks are called through pluggy with keyword arguments, so an
implementation may take fewer of them; ``@cpbench.hookimpl(wrapper=True)`` wrappers work too.

Loading (once, when the plugins load): ``cpbench_register_decomposers``, ``_backends``, ``_models``,
``_datasets``, ``_executors``: each receives a typed :class:`~cpbench.plugin.registry.Registry` and calls
``registry.add(obj)`` once per object it provides (the contracts: :mod:`cpbench.plugin.contracts`).

The command line (when the CLI is built): ``cpbench_add_commands``.

A run (in the client process, as each cell ends): ``cpbench_cell_finished``.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .contracts import Backend, Dataset, Decomposer, Executor, Model
    from .registry import Registry

hookspec = pluggy.HookspecMarker("cpbench")


# -- loading: what the plugins provide -----------------------------------------------------------
@hookspec
def cpbench_register_decomposers(registry: Registry[Decomposer]) -> None:
    """Called once when the plugins load. Add decomposers with ``registry.add(obj)``.

    A decomposer has ``name: str``, ``decompose(weight, rank, *, seed=0, **options) -> Factorization``
    and ``build(conv: nn.Conv2d, factorization) -> nn.Module`` (:class:`~cpbench.plugin.contracts.Decomposer`).
    """


@hookspec
def cpbench_register_backends(registry: Registry[Backend]) -> None:
    """Called once when the plugins load. Add execution backends with ``registry.add(obj)``.

    A backend has ``name: str`` and ``prepare(model, example_input, *, threads) -> Prepared``
    (:class:`~cpbench.plugin.contracts.Backend`).
    """


@hookspec
def cpbench_register_models(registry: Registry[Model]) -> None:
    """Called once when the plugins load. Add model builders with ``registry.add(obj)``.

    A model has ``name``, ``dataset`` (a dataset name or None), ``default_layers`` (list of conv
    names or None for every Conv2d), ``build(**params) -> nn.Module`` and
    ``input_shape(**params) -> tuple | None`` (C, H, W; None: the spec's or the data set's).
    Optional: ``from_dataset`` (params such as ``num_classes``, ``in_channels`` the core fills from
    the model's data set), ``trained(**params) -> bool`` (what ``build`` returns already holds
    trained weights), ``label(**params) -> str``. The spec keys ``dataset``, ``weights`` and
    ``input_shape`` are the core's and never reach ``build`` (see :mod:`cpbench.run.inputs`). See :class:`~cpbench.plugin.contracts.Model`.
    """


@hookspec
def cpbench_register_datasets(registry: Registry[Dataset]) -> None:
    """Called once when the plugins load. Add data sets with ``registry.add(obj)``.

    A data set has ``name``, ``num_classes`` and ``load(split, *, seed=0, size=None) -> TensorDataset``
    for split in ``train``, ``val``, ``test``. A data set that takes parameters from a spec
    (``{name = "imagefolder", path = "DIR"}``) has ``open(**params)``, returning an object with
    ``num_classes``, ``input_shape`` and ``load(split, *, seed=0, size=None)`` for ``train``/``test``. See :class:`~cpbench.plugin.contracts.Dataset`.
    """


@hookspec
def cpbench_register_executors(registry: Registry[Executor]) -> None:
    """Called once when the plugins load. Add executors with ``registry.add(obj)``.

    An executor has ``name`` and ``execute(cells, run_cell, emit, *, step=None, **options) -> None``: it
    calls ``run_cell(cell, step=step)`` for each cell (anywhere it likes) and ``emit(result)`` in the
    client process as each result arrives (:class:`~cpbench.plugin.contracts.Executor`).
    """


# -- the command line ----------------------------------------------------------------------------
@hookspec
def cpbench_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Called when the CLI is built. Add sub-commands with ``subparsers.add_parser(name, ...)``.

    Set ``parser.set_defaults(func=callable)``; the callable gets the parsed ``argparse.Namespace``
    and returns an exit code (int) or None for 0.
    """


# -- a run ---------------------------------------------------------------------------------------
@hookspec
def cpbench_cell_finished(result: dict) -> None:
    """Called in the client process after each matrix cell's result has been written to disk.

    ``result`` is the JSON object appended to ``results.jsonl`` (status "ok" or "error"). Return
    value ignored; an exception here is reported and does not stop the run.
    """
