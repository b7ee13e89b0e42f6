"""CP (CANDECOMP/PARAFAC) solvers: matrix-free Gauss-Newton :func:`cp_nls` and fast :func:`cp_als`."""
from ._cp_common import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    CPResult,
    SolverInputError,
    degeneracy,
    reconstruct,
    rel_error,
)
from .cp_als import cp_als
from .cp_nls import cp_nls

__all__ = [
    "CPResult",
    "SolverInputError",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "cp_als",
    "cp_nls",
    "degeneracy",
    "reconstruct",
    "rel_error",
]
