"""Error-preserving correction (EPC) of a CP fit, after Phan et al., "Stable low-rank tensor
decomposition for compression of convolutional neural network" (ECCV 2020).

Given a fit ``[[A]]`` of ``W`` with relative error ``e``, EPC solves::

    minimise  sum_r ||term_r||^2   subject to   ||W - [[B]]|| <= e ||W||

i.e. among the CP models at least as accurate as the fit, the one whose rank-1 terms are smallest
(the least degenerate: the sensitivity of the model to its factors, which is what fine-tuning
perturbs, grows with the term norms). Phan et al. solve it by SQP; here it is solved through its
Lagrangian in the Gauss-Newton machinery of :func:`cp_nls`: for a weight ``mu``, a stationary point
of ``1/2 ||W - [[B]]||^2 + mu/2 sum_r ||term_r||^2`` is a KKT point of the problem above with the
error bound it reaches, and that error grows with ``mu``. So EPC searches ``mu`` (growing it by
10x until the bound is crossed, then bisecting in ``log mu``), each solve warm-started by
matrix-free Levenberg-Marquardt from the best feasible point so far, and returns the feasible
point with the smallest term norms. The fit itself is feasible, so the result is never more
degenerate than the fit and never less accurate than the bound.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from ._cp_common import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    CPResult,
    SolverInputError,
    balance_columns,
    degeneracy,
    make_init,
    rel_error,
    validate_inputs,
)
from ._lm import LMRun, Problem, StepRule
from .cp_nls import CG_PRECISIONS

__all__ = ["cp_epc"]

# mu at or above 1 makes the zero model optimal (its f is 1/2 ||W||^2, at most the penalty of
# any model reaching degeneracy 1): the search never needs more.
_MU_MAX = 1.0


def cp_epc(
    tensor: torch.Tensor,
    factors: Sequence[torch.Tensor],
    *,
    error: float | None = None,
    tol_error: float = 1e-6,
    mu_start: float = 1e-4,
    bisections: int = 5,
    inner_iter: int = 25,
    max_iter: int = 200,
    inner_tol: float = 1e-6,
    cg_max_iter: int = 10,
    cg_tol: float = 1e-2,
    cg_precision: str = "single",
    time_budget_s: float | None = None,
    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES,
) -> CPResult:
    """Error-preserving correction of the CP fit ``factors`` of ``tensor``.

    Parameters
    ----------
    tensor : torch.Tensor
        Shape ``(I_0, ..., I_{N-1})``, ``N >= 2``, finite. Computed in float64.
    factors : sequence of torch.Tensor
        The fit, shapes ``(I_k, R)`` (copied, not modified).
    error : float or None, default None
        The bound on the relative error ``||W - [[B]]|| / ||W||``; ``None``: the fit's own.
    tol_error : float, default 1e-6
        A point is feasible if its relative error is at most ``error * (1 + tol_error)``.
    mu_start : float, default 1e-4
        First weight tried (scale-free, as ``cp_nls``'s ``penalty``).
    bisections : int, default 5
        Bisections of ``log mu`` once the bound is bracketed.
    inner_iter : int, default 25
        LM iterations per weight.
    max_iter : int, default 200
        LM iterations in all.
    inner_tol : float, default 1e-6
        A solve ends when a step decreases its objective by less than ``inner_tol * f``.
    cg_max_iter, cg_tol, cg_precision
        As in :func:`cp_nls`.
    time_budget_s : float or None
        Wall-clock budget (checked after every LM iteration).
    memory_budget_bytes : int or None, default 2 GiB
        As in :func:`cp_nls`.

    Returns
    -------
    CPResult
        Factors in the input dtype; ``info``: ``rel_error``, ``degeneracy``, ``error_bound``,
        ``fit_rel_error`` and ``fit_degeneracy`` (of the input fit), ``mu`` (the weight of the
        returned point; 0 if no correction was feasible), ``trials`` (list of ``[mu, rel_error,
        degeneracy, feasible]``), ``iterations``, ``seconds``, ``converged`` (the bound was
        bracketed and bisected), ``stop_reason``.

    Raises
    ------
    SolverInputError
        Bad tensor or factors, ``error`` not finite and >= 0, bad numeric options.
    """
    t_start = time.perf_counter()
    fs = list(factors)
    rank = fs[0].shape[1] if fs and getattr(fs[0], "dim", lambda: 0)() == 2 else None
    if rank is None:
        raise SolverInputError("factors must be a non-empty list of (I_k, R) matrices")
    t = validate_inputs(tensor, int(rank), memory_budget_bytes, solver="nls")
    start = balance_columns(make_init(t, int(rank), fs, torch.Generator()))
    if error is not None and not (math.isfinite(error) and error >= 0):
        raise SolverInputError(f"error must be a finite number >= 0, got {error!r}")
    if not (tol_error >= 0 and 0 < mu_start < _MU_MAX and int(bisections) >= 0 and int(inner_iter) >= 1
            and int(max_iter) >= 0):
        raise SolverInputError(
            f"tol_error >= 0, 0 < mu_start < {_MU_MAX}, bisections >= 0, inner_iter >= 1 and max_iter >= 0 "
            f"required, got {tol_error}, {mu_start}, {bisections}, {inner_iter}, {max_iter}")
    if cg_precision not in CG_PRECISIONS:
        raise SolverInputError(f"cg_precision must be one of {tuple(CG_PRECISIONS)}, got {cg_precision!r}")
    deadline = None if time_budget_s is None else t_start + float(time_budget_s)
    rule = StepRule(int(cg_max_iter), float(cg_tol), CG_PRECISIONS[cg_precision], float(inner_tol),
                     1e-12, 0.0, deadline)
    prob = Problem(t, int(rank))
    fit_error = rel_error(t, start)
    fit_degeneracy = degeneracy(start, prob.norm_sq) if prob.norm_sq > 0 else 0.0
    bound = fit_error if error is None else float(error)
    limit = bound * (1.0 + tol_error)

    best, best_sq, best_mu = start, fit_degeneracy, 0.0
    if fit_error > limit:
        raise SolverInputError(
            f"the fit's relative error {fit_error:.6g} is above the bound {bound:.6g}: EPC starts from a "
            f"feasible fit")
    trials: list[list] = []
    iterations, lam = 0, None
    lo, hi = 0.0, None  # largest feasible and smallest infeasible mu seen
    mu = float(mu_start)
    stop = "bisected"
    while prob.norm_sq > 0:
        if iterations >= max_iter:
            stop = "max_iter"
            break
        if deadline is not None and time.perf_counter() >= deadline:
            stop = "time_budget"
            break
        run = LMRun(prob, best, mu, rule, lam=lam)
        while run.iterations < min(int(inner_iter), int(max_iter) - iterations):
            accepted, decrease, f_before, tiny = run.step()
            if (accepted and decrease <= inner_tol * f_before) or tiny or run.out_of_time():
                break
        iterations += run.iterations
        lam = run.lam
        err, deg = run.rel_error, run.degeneracy
        feasible = err <= limit
        trials.append([mu, err, deg, feasible])
        if feasible:
            if deg < best_sq:
                best, best_sq, best_mu = run.ev["factors"], deg, mu
            lo = mu
        else:
            hi = mu
        if hi is None:
            if mu >= _MU_MAX:
                stop = "mu_max"
                break
            mu = min(mu * 10.0, _MU_MAX)
            continue
        n_bisected = sum(1 for _ in trials) - _bracket_trials(trials)
        if n_bisected >= int(bisections):
            break
        mu = math.sqrt(lo * hi) if lo > 0 else hi / 10.0
    final_error = rel_error(t, best)
    if final_error > limit:  # the Gram-expansion error was optimistic by round-off: keep the fit
        best, best_mu, final_error = start, 0.0, fit_error
    info = {
        "rel_error": final_error,
        "degeneracy": degeneracy(best, prob.norm_sq) if prob.norm_sq > 0 else 0.0,
        "error_bound": bound,
        "fit_rel_error": fit_error,
        "fit_degeneracy": fit_degeneracy,
        "mu": best_mu,
        "trials": trials,
        "iterations": iterations,
        "seconds": time.perf_counter() - t_start,
        "converged": stop in ("bisected", "mu_max"),
        "stop_reason": stop,
    }
    return CPResult([f.to(tensor.dtype) for f in best], info)


def _bracket_trials(trials: list[list]) -> int:
    """How many trials were spent finding the first infeasible weight (the bracket)."""
    for i, tr in enumerate(trials):
        if not tr[3]:
            return i + 1
    return len(trials)
