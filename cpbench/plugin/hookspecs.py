"""Every hook cpbench calls, in the order a run meets them. This module is the table of contents.

A plugin is a module or object with functions marked ``@cpbench.hookimpl`` whose names are these.
Built-ins (``plugins/cpbench_builtins``) and third-party packages register the same way: an entry
point in group ``cpbench``. Registration hooks hand the plugin a :class:`cpbench.registry.Registry`;
the plugin calls ``registry.add(obj)`` once per object it provides.
"""
from __future__ import annotations

import argparse
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("cpbench")


@hookspec
def cpbench_register_decomposers(registry: Any) -> None:
    """Called once when the plugins load. Add decomposer objects with ``registry.add(obj)``.

    A decomposer has ``name: str``, ``decompose(weight, rank, *, seed=0, **options) -> Factorization``
    and ``build(conv: nn.Conv2d, factorization) -> nn.Module`` (see README, "Decomposer contract").
    """


@hookspec
def cpbench_register_backends(registry: Any) -> None:
    """Called once when the plugins load. Add execution backends with ``registry.add(obj)``.

    A backend has ``name: str`` and ``prepare(model, example_input, *, threads) -> Prepared``
    (see :class:`cpbench.backend.Backend`).
    """


@hookspec
def cpbench_register_models(registry: Any) -> None:
    """Called once when the plugins load. Add model builders with ``registry.add(obj)``.

    A model has ``name``, ``dataset`` (a dataset name or None), ``default_layers`` (list of conv
    names or None for every Conv2d), ``build(**params) -> nn.Module`` and
    ``input_shape(**params) -> tuple | None`` (C, H, W; None: the spec's or the data set's).
    Optional: ``from_dataset`` (params such as ``num_classes``, ``in_channels`` the core fills from
    the model's data set), ``trained(**params) -> bool`` (what ``build`` returns already holds
    trained weights), ``label(**params) -> str``. The spec keys ``dataset``, ``weights`` and
    ``input_shape`` are the core's and never reach ``build`` (see :mod:`cpbench.run.inputs`).
    """


@hookspec
def cpbench_register_datasets(registry: Any) -> None:
    """Called once when the plugins load. Add data sets with ``registry.add(obj)``.

    A data set has ``name``, ``num_classes`` and ``load(split, *, seed=0, size=None) -> TensorDataset``
    for split in ``train``, ``val``, ``test``. A data set that takes parameters from a spec
    (``{name = "imagefolder", path = "DIR"}``) has ``open(**params)``, returning an object with
    ``num_classes``, ``input_shape`` and ``load(split, *, seed=0, size=None)`` for ``train``/``test``.
    """


@hookspec
def cpbench_register_executors(registry: Any) -> None:
    """Called once when the plugins load. Add executors with ``registry.add(obj)``.

    An executor has ``name`` and ``execute(cells, run_cell, emit, **options) -> None``: it calls
    ``run_cell(cell)`` for each cell (anywhere it likes) and ``emit(result)`` in the client process
    as each result arrives.
    """


@hookspec
def cpbench_cell_finished(result: dict) -> None:
    """Called in the client process after each matrix cell's result has been written to disk.

    ``result`` is the JSON object appended to ``results.jsonl`` (status "ok" or "error"). Return
    value ignored; an exception here is reported and does not stop the run.
    """


@hookspec
def cpbench_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Called when the CLI is built. Add sub-commands with ``subparsers.add_parser(name, ...)``.

    Set ``parser.set_defaults(func=callable)``; the callable gets the parsed ``argparse.Namespace``
    and returns an exit code (int) or None for 0.
    """
