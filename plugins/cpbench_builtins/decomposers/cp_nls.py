"""``cp-nls``: the paper's CP by non-linear least squares (damped Gauss–Newton, matrix-free, CG steps).

The solver is :func:`cpbench.decomposition.solvers.cp_nls`; every option it takes passes through (see its
docstring for the defaults), plus the CP options of :class:`cpbench.decomposition.decomposer.CPDecomposer`
(groups, group_mode, form). The default decomposer of cpbench.
"""
from __future__ import annotations

from cpbench import hookimpl
from cpbench.decomposition.decomposer import CPDecomposer
from cpbench.errors import UsageError


class CPNLS(CPDecomposer):
    name = "cp-nls"
    description = "the paper's CP by non-linear least squares (Gauss–Newton)"
    # Part of the factorization cache key: bumped whenever the solver's results change.
    # 2: dimension-tree MTTKRPs and single-precision PCG steps (cg_precision), so different iterates.
    # 3: the polish without the penalty after the conditioned phase (exact on exactly low-rank kernels).
    # 4: max_iter 400, the polish keeps 1/5 of it, and lowers the penalty in stages.
    # 5: at the cap, the polish bisects the penalty that holds it instead of ending at the first crossing.
    # 6: a fit far from exact (error > 5 %) holds the cap as given; above it after the conditioned phase,
    #    the penalty is raised until it holds.
    # 7: a fit the cap stopped on a tensor of <= 1e5 entries gets one more start (cap_restarts); the Gram
    #    operator's blocks in batched ops (float32 CG sums in another order).
    version = "7"

    @property
    def accepted_options(self) -> frozenset[str]:
        """The solver's keyword options and the CP ones (fit passes ``**options`` on, so its signature
        cannot say; checked by name before a run)."""
        return _solver_options() | {"groups", "group_mode", "form"}

    def fit(self, tensor, rank, *, seed, **options):
        from cpbench.decomposition.solvers import cp_nls

        allowed = _solver_options()
        unknown = sorted(set(options) - allowed)
        if unknown:  # one line naming what exists, before anything runs
            raise UsageError(f"cp-nls got an unexpected keyword argument {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        res = cp_nls(tensor.double(), rank, seed=seed, **options)
        return res.factors, dict(res.info)


def _solver_options() -> frozenset[str]:
    import inspect

    from cpbench.decomposition.solvers import cp_nls

    return frozenset(inspect.signature(cp_nls).parameters) - {"tensor", "rank", "seed"}


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(CPNLS())
