"""One exception hierarchy for cpbench.

Everything cpbench raises on purpose derives from :class:`CpbenchError`. Which error a caller gets
depends on what went wrong, and callers (the runner, the conformance suite, the CLI) tell errors apart
by class only, never by words in a message. The CLI prints such an error as one line and exits with
the class's ``exit_code``; anything else that escapes is a bug and keeps its traceback.

    CpbenchError                exit 1  an operation failed (base class)
    ├── UsageError              exit 2  bad input from the user: a name, a file, a value out of range
    │   ├── UnknownNameError    exit 2  a plugin/layer name that is not registered; lists the available ones
    │   ├── MatrixError         exit 2  a matrix file that cannot be read or holds unknown keys/values
    │   ├── RankError           exit 2  a rank < 1, too large for the kernel, or an unparsable rank spec
    │   ├── RunDirectoryError   exit 2  an --out that cannot be written, or that another run owns
    │   └── SolverInputError    exit 2  bad input to a CP solver (cpbench.decomposition.solvers)
    │       └── SolverMemoryError   2   a rank whose estimated working memory exceeds the budget
    │                                   (also a RankError: a smaller rank fits)
    ├── WeightError             exit 2  NaN/inf or a wrong-shaped kernel (the user's kernel file or model)
    ├── PluginError             exit 3  a plugin that misbehaves: duplicate name, bad hook, failed import
    ├── BackendError            exit 1  a backend that cannot prepare or run a model
    └── CacheError              exit 1  a cache entry that cannot be read or written

``cpbench run`` itself exits 1 when the run finished with failed cells (each is recorded with its
message), 130 when interrupted.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

__all__ = [
    "CpbenchError",
    "UsageError",
    "UnknownNameError",
    "MatrixError",
    "RankError",
    "SolverInputError",
    "SolverMemoryError",
    "RunDirectoryError",
    "WeightError",
    "PluginError",
    "BackendError",
    "CacheError",
    "with_context",
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


class SolverInputError(UsageError):
    """Bad input to a CP solver (rank, tensor values/shape, initial factors, options)."""


class SolverMemoryError(SolverInputError, RankError):
    """The rank's estimated working memory is above the solver's ``memory_budget_bytes``."""


class RunDirectoryError(UsageError):
    """A run directory that is a file, cannot be written, or is locked by another live run."""


class WeightError(CpbenchError, ValueError):
    """A kernel with NaN/inf values or a shape a decomposer cannot take."""

    exit_code = 2


class PluginError(CpbenchError):
    """A plugin broke the contract: duplicate name, misspelled hook, import failure."""

    exit_code = 3


class BackendError(CpbenchError):
    """A backend could not prepare or run a model."""


class CacheError(CpbenchError):
    """A cache entry could not be read or written."""


E = TypeVar("E", bound=BaseException)


def with_context(exc: E, context: str) -> E:
    """``exc`` with ``"<context>: "`` before its message: the same class and attributes, made without
    calling its constructor (which may take other arguments than a message, e.g. UnknownNameError).

    The contexts added are kept in ``exc.contexts`` so that a caller can tell whether one is there.
    """
    new = BaseException.__new__(type(exc))
    new.__dict__.update(exc.__dict__)
    new.args = (f"{context}: {exc}",)
    new.contexts = (*getattr(exc, "contexts", ()), context)  # type: ignore[attr-defined]
    return new
