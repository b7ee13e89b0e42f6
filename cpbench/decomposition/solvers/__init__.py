"""CP (CANDECOMP/PARAFAC) solvers: matrix-free Gauss-Newton :func:`cp_nls`, fast :func:`cp_als`, and
the error-preserving correction :func:`cp_epc` of a fit."""
from ._cp_common import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    CPResult,
    SolverInputError,
    degeneracy,
    reconstruct,
    rel_error,
)
from .cp_als import cp_als
from .cp_epc import cp_epc
from .cp_nls import cp_nls

__all__ = [
    "CPResult",
    "SolverInputError",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "cp_als",
    "cp_epc",
    "cp_nls",
    "degeneracy",
    "reconstruct",
    "rel_error",
]
