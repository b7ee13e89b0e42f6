"""``cp-epc``: a CP fit followed by the error-preserving correction of Phan et al. (ECCV 2020).

The fit is ``cp-nls`` (default) or ``cp-als`` with their own options; then
:func:`cpbench.decomposition.solvers.cp_epc` minimises the rank-1 terms' norms at the fit's error (the result is
at most as degenerate and at most as inaccurate as the fit). Options:

  fit ["cp-nls"]        the decomposer whose fit is corrected: "cp-nls" or "cp-als".
  fit_options [{}]      options of that decomposer (e.g. ``{max_iter = 100}``).
  epc_* options         passed to :func:`cpbench.decomposition.solvers.cp_epc` without the prefix
                        (``epc_max_iter``, ``epc_bisections``, ``epc_tol_error``, ...).
plus the CP options of :class:`cpbench.decomposition.decomposer.CPDecomposer` (groups, group_mode, form).
"""
from __future__ import annotations

from cpbench import hookimpl
from cpbench.decomposition.decomposer import CPDecomposer
from cpbench.errors import UsageError
from cpbench_builtins.decomposers.cp_als import CPALS
from cpbench_builtins.decomposers.cp_nls import CPNLS

FITS = ("cp-nls", "cp-als")


class CPEPC(CPDecomposer):
    name = "cp-epc"
    # Part of the factorization cache key: EPC's own version and those of the fits it corrects.
    version = f"1+cp-nls.{CPNLS.version}+cp-als.{CPALS.version}"

    def fit(self, tensor, rank, *, seed, fit="cp-nls", fit_options=None, **options):
        from cpbench.decomposition.solvers import cp_epc

        if fit not in FITS:
            raise UsageError(f"cp-epc fit {fit!r} is not allowed; allowed: {', '.join(FITS)}")
        bad = sorted(k for k in options if not k.startswith("epc_"))
        if bad:
            raise UsageError(f"cp-epc got unknown options {bad}; allowed: fit, fit_options, epc_* "
                             f"(options of cpbench.decomposition.solvers.cp_epc), groups, group_mode, form")
        base = {"cp-nls": CPNLS, "cp-als": CPALS}[fit]()
        factors, fit_info = base.fit(tensor, rank, seed=seed, **dict(fit_options or {}))
        res = cp_epc(tensor.double(), [f.double() for f in factors],
                     **{k.removeprefix("epc_"): v for k, v in options.items()})
        info = dict(res.info)
        info["fit"] = {"method": fit, "version": base.version,
                       **{k: v for k, v in fit_info.items() if k != "rel_error_history"}}
        return res.factors, info


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(CPEPC())
