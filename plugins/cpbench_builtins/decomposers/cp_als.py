"""``cp-als``: CP by alternating least squares — TensorLy's ``parafac``, or an equivalent fast torch ALS.

Options (defaults in brackets):
  impl ["torch"]        "tensorly": ``tensorly.decomposition.parafac`` (numpy backend, float64);
                        "torch": cpbench's direct torch ALS — same update order and stopping rule,
                        same errors, much faster (see benchmarks/scripts/kernel_suite.py).
  init ["svd"]          "svd" or "random" (TensorLy's meaning).
  n_iter_max [500]      iteration cap.
  tol [1e-8]            stop when the relative change of the reconstruction error is below it.
  linesearch [False]    TensorLy's line search (impl="tensorly" only).
plus the CP options of :class:`cpbench.decomposition.decomposer.CPDecomposer` (groups, group_mode, form).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from cpbench import hookimpl
from cpbench.decomposition.decomposer import CPDecomposer
from cpbench.errors import UsageError

IMPLS = ("torch", "tensorly")


class CPALS(CPDecomposer):
    name = "cp-als"
    description = "CP by alternating least squares (torch, or TensorLy parafac)"
    version = "1"

    def fit(self, tensor, rank, *, seed, impl="torch", init="svd", n_iter_max=500, tol=1e-8,
            linesearch=False, **unknown):
        if unknown:
            raise UsageError(f"cp-als got unknown options {sorted(unknown)}; allowed: impl, init, n_iter_max, tol, linesearch, groups, group_mode, form")
        if impl not in IMPLS:
            raise UsageError(f"cp-als impl {impl!r} is not allowed; allowed: {', '.join(IMPLS)}")
        if init not in ("svd", "random"):
            raise UsageError(f"cp-als init {init!r} is not allowed; allowed: svd, random")
        if impl == "torch" and not linesearch:
            from cpbench.decomposition.solvers import cp_als

            res = cp_als(tensor.double(), rank, seed=seed, init=init, max_iter=n_iter_max, tol=tol)
            info = dict(res.info)
            info["impl"] = "torch"
            return res.factors, info
        return _tensorly_parafac(tensor, rank, seed=seed, init=init, n_iter_max=n_iter_max, tol=tol,
                                 linesearch=linesearch)


def _tensorly_parafac(tensor, rank, *, seed, init, n_iter_max, tol, linesearch):
    import tensorly as tl
    from tensorly.decomposition import parafac

    start = time.perf_counter()
    x = tensor.detach().double().cpu().numpy()
    with warnings.catch_warnings(), tl.backend_context("numpy"):
        warnings.simplefilter("ignore")
        cp, errors = parafac(x, rank, n_iter_max=n_iter_max, init=init, tol=tol, random_state=seed,
                             linesearch=linesearch, return_errors=True)
    weights, factors = cp
    factors = [np.array(f, copy=True) for f in factors]
    factors[0] = factors[0] * np.asarray(weights)[None, :]
    iterations = len(errors)
    converged = iterations < n_iter_max
    info = {"impl": "tensorly", "iterations": iterations, "converged": bool(converged),
            "seconds": time.perf_counter() - start}
    return [torch.from_numpy(f) for f in factors], info


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(CPALS())
