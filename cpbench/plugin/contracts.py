"""The backend contract: how a model is prepared for timed CPU inference.

A backend is any object with ``name: str`` and::

    prepare(model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared

called inside :func:`cpbench.threads.thread_limits` (the harness sets and restores the pools; a
backend that must set more, e.g. MKL/OpenMP explicitly, does so inside ``prepare``/``Prepared`` and
restores it in ``Prepared.close``). ``Prepared`` is callable on an input tensor, returns the output
tensor, and has ``info`` (a JSON-serialisable dict: e.g. ``compile_seconds``, what it set).
Equivalence with the eager model is the backend's promise; the conformance suite checks it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Backend", "Prepared"]


@dataclass
class Prepared:
    """A model ready to time. ``run(x)`` must do the whole inference (no lazy work left)."""

    run: Callable[[torch.Tensor], Any]
    info: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    # Optional: convert an input once, outside the timed region (e.g. to channels_last).
    convert_input: Callable[[torch.Tensor], Any] = lambda x: x

    def __call__(self, x):
        return self.run(x)


@runtime_checkable
class Backend(Protocol):
    name: str

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared: ...
