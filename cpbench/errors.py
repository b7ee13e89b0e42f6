"""One exception hierarchy for cpbench.

Everything cpbench raises on purpose derives from :class:`CpbenchError`. The CLI prints such an
error as one line and exits with code 2 (a user's mistake) or 1 (a run that finished with failed
cells); anything else that escapes is a bug and keeps its traceback.

    CpbenchError
    ├── UsageError            bad input from the user: a name, a file, a value out of range
    │   ├── UnknownNameError  a plugin/layer name that is not registered; lists the available ones
    │   ├── MatrixError       a matrix file that cannot be read or holds unknown keys/values
    │   └── RankError         a rank < 1, too large for the kernel, or an unparsable rank spec
    ├── WeightError           NaN/inf or a wrong-shaped kernel
    ├── PluginError           a plugin that misbehaves: duplicate name, bad hook, failed import
    ├── BackendError          a backend that cannot prepare or run a model
    └── CacheError            a cache entry that cannot be read or written
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CpbenchError",
    "UsageError",
    "UnknownNameError",
    "MatrixError",
    "RankError",
    "WeightError",
    "PluginError",
    "BackendError",
    "CacheError",
]


class CpbenchError(Exception):
    """Base class of every error cpbench raises on purpose."""

    exit_code = 1


class UsageError(CpbenchError, ValueError):
    """The user asked for something that is not allowed; the message says what is."""

    exit_code = 2


class UnknownNameError(UsageError, KeyError):
    """A name that is not registered. The message lists the names that are."""

    def __init__(self, kind: str, name: object, available: Iterable[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        avail = ", ".join(self.available) or "none registered"
        super().__init__(f"unknown {kind} {name!r}; available: {avail}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class MatrixError(UsageError):
    """A matrix file that cannot be parsed or validated."""


class RankError(UsageError):
    """A rank that is out of range for the kernel, or a rank spec that cannot be parsed."""


class WeightError(CpbenchError, ValueError):
    """A kernel with NaN/inf values or a shape a decomposer cannot take."""

    exit_code = 2


class PluginError(CpbenchError):
    """A plugin broke the contract: duplicate name, misspelled hook, import failure."""


class BackendError(CpbenchError):
    """A backend could not prepare or run a model."""


class CacheError(CpbenchError):
    """A cache entry could not be read or written."""
