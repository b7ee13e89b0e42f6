"""CP decomposition by matrix-free damped Gauss-Newton (Levenberg-Marquardt), as Tensorlab's
``cpd_nls`` and Lebedev et al. (ICLR 2015).

Objective (float64)::

    f(A) = 1/2 ||W - [[A_0, ..., A_{N-1}]]||^2 + mu/2 sum_r ||term_r||^2,
    ||term_r|| = prod_k ||A_k[:, r]||

The Jacobian ``J`` of the model is never formed. With ``G_k = A_k^T A_k`` and
``Gamma_nm = hadamard_{k != n, m} G_k`` (Sorber, Van Barel, De Lathauwer, SIAM J. Optim. 2013):

* gradient   ``g_n = A_n Gamma_nn - W_(n) khatri_rao(A_k, k != n) + mu A_n diag(Gamma_nn)``
  (MTTKRP through a two-node dimension tree: two ``numel(W) x R`` matmuls give all modes; the
  tree is split where the partial products are smallest, :func:`tree_split`, i.e. after mode 0
  for a conv kernel ``(C_out, C_in, k, k)``; the first matmul also gives ``f``);
* Gram-vector ``(J^T J X)_n = X_n Gamma_nn + A_n sum_{m != n} (X_m^T A_m) * Gamma_nm``; the
  penalty is itself a sum of squares whose Gauss-Newton matrix is the same expression with
  every ``Gamma`` replaced by ``mu Diag(diag(Gamma))``.

Each iteration solves ``(J^T J + H_pen + lambda I) p = -g`` by preconditioned CG with the
block-Jacobi preconditioner ``(Gamma_nn + mu Diag(Gamma_nn) + lambda I)^{-1}`` (batched
Cholesky, in float64), and adapts the damping ``lambda`` from the gain ratio
``rho = actual / predicted decrease`` (Nielsen's rule). The PCG iterations run in single
precision by default (``cg_precision``), on the system rescaled to O(1) numbers (so the
objective stays scale-free): the step is only solved to a loose tolerance (on the kernel suite
10 PCG iterations end at 15-35 % relative residual), and it is then checked in float64
(predicted decrease, ``f`` at the trial point).
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
    tree_split,
    validate_inputs,
)
from ._lm import LMRun, Problem, StepRule
from .cp_als import _als_sweeps

__all__ = ["cp_nls", "CONDITIONING_MODES", "INIT_MODES", "CG_PRECISIONS"]

CONDITIONING_MODES = ("terms", "none")
INIT_MODES = ("als", "svd", "random")
CG_PRECISIONS = {"double": torch.float64, "single": torch.float32}

# The polish may raise the degeneracy by this factor over where the conditioned phase left it (or
# up to degeneracy_cap): the penalty pulls an exact fit's terms in by O(mu), so an exact solution
# whose degeneracy is above the cap sits just above the conditioned point's.
_CAP_SLACK = 1.1
# ... but only there: a conditioned fit with a relative error above _NEAR_EXACT is not near an exact
# solution, so the cap holds as given; where it ended above the cap, its penalty is raised (×_RAISE_STEP,
# at most _RAISES times, descending at each) until the cap holds, and the polish lowers it from there.
# With the slack everywhere (version 5) the character network's conv3 at R = 442 (512×64×8×8) ended at a
# degeneracy of 2.56 for a cap of 2.
_NEAR_EXACT = 0.05
_RAISE_STEP, _RAISES = 2.0, 6

# 1/_POLISH_SHARE of max_iter is kept for the polish when the conditioned phase does not converge
_POLISH_SHARE = 5

# cap_restarts apply to tensors of at most this many entries (the kernel suite's small class)
_CAP_RESTART_ENTRIES = 100_000

# a relative error at round-off: restarts stop there (nothing is left to improve)
_EXACT_FIT = 1e-9
_POLISH_STEP, _POLISH_STAGES = 0.1, 3
# When a polish stage crosses the cap, the penalty that holds it lies between that stage's and the
# last one that held: it is bisected (in log) this many times, each time descending from the point
# reached. The cap is a constraint and the penalty its multiplier; ending at the first crossing left
# the constraint slack, often after one step (kernel suite, 10 trained kernels <= 1e5 entries: median
# degeneracy 1.92 -> 1.97, a lower error on 9, down to 0.9942x from 0.9960x ALS's; about 1.35x the
# time, median 0.84x ALS's against 0.62x).
_CAP_BISECT = 4


def cp_nls(
    tensor: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    init: str | Sequence[torch.Tensor] = "als",
    max_iter: int = 400,
    tol: float = 1e-8,
    tol_step: float = 1e-10,
    tol_grad: float = 1e-13,
    time_budget_s: float | None = None,
    conditioning: str = "terms",
    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES,
    penalty: float = 3e-3,
    penalty_start: float = 1e-2,
    penalty_decay: float = 0.9,
    polish: bool = True,
    degeneracy_cap: float = 2.0,
    conditioned_tol: float | None = 1e-5,
    als_sweeps: int = 10,
    cg_max_iter: int = 10,
    cg_tol: float = 1e-2,
    damping_start: float = 1e-3,
    cg_precision: str = "single",
    restarts: int = 0,
    cap_restarts: int = 1,
) -> CPResult:
    """CP decomposition by matrix-free Levenberg-Marquardt (damped Gauss-Newton) with PCG.

    Parameters
    ----------
    tensor : torch.Tensor
        Real tensor of shape ``(I_0, ..., I_{N-1})``, ``N >= 2``, finite. Computed in float64.
    rank : int
        Number of rank-1 terms ``R >= 1``.
    seed : int, default 0
        Seed of the ``torch.Generator`` for the random parts of the initialisation.
    init : {"als", "svd", "random"} or sequence of torch.Tensor, default "als"
        ``"svd"``: TensorLy's SVD initialisation (see :func:`cp_als`); ``"als"``: that plus
        ``als_sweeps`` ALS sweeps; ``"random"``: standard normal factors scaled to ``||W||``;
        a sequence: initial factors of shapes ``(I_k, R)`` (copied).
    max_iter : int, default 400
        Maximum number of LM iterations (accepted or rejected steps, both phases; 400 rather than
        250 because on trained 3x3 and 5x5 kernels the conditioned phase often runs past 200:
        at 250, VGG conv1_2 at R=34 stopped at 1.0016x ALS's error, at 400 1.0007x). One
        iteration costs two ``numel x R`` matmuls, ``N^2 / 2`` Hadamard products and ``N``
        Cholesky factorisations of ``R x R`` blocks, and up to ``cg_max_iter`` Gram-vector
        products (``~3 sum_k I_k R^2`` multiply-adds each).
    tol : float, default 1e-8
        A phase ends when an accepted step decreases ``f`` by less than ``tol * f`` (the
        conditioned phase only once ``mu`` has reached ``penalty``).
    tol_step : float, default 1e-10
        Stop when ``||p|| <= tol_step * ||A||`` (step relative to the factors' norm).
    tol_grad : float, default 1e-13
        Stop when ``||g|| <= tol_grad * ||W||^2``.
    time_budget_s : float or None, default None
        Wall-clock budget, checked after every iteration (the ALS warm start counts).
    conditioning : {"terms", "none"}, default "terms"
        ``"terms"``: two phases. First minimise
        ``f = 1/2 ||W - [[A]]||^2 + mu/2 sum_r ||term_r||^2`` (``= ... + mu/2 degeneracy ||W||^2``,
        so ``mu`` is scale-free); ``mu`` starts at ``penalty_start`` and is multiplied by
        ``penalty_decay`` after every accepted step down to ``penalty``. The penalty is a sum of
        squares itself, so the Gauss-Newton structure is kept; it keeps out the cancelling,
        growing terms that ALS runs into. It also costs error, and it never vanishes: on an
        exactly low-rank tensor it leaves a relative error of order ``mu``. So, with
        ``polish``, the penalty is then lowered in stages (``mu/10``, ``mu/100``, then 0), each
        stage converged to ``conditioned_tol`` (the last to ``tol``), for as long as the
        degeneracy stays within ``degeneracy_cap`` (a fit within 5 % of exact: ``max(degeneracy_cap,
        1.1 x the degeneracy reached)``, where an exact solution sits; a fit above the cap, not near
        exact, first has its penalty doubled until the cap holds, at most 6 times): the step
        that would cross it is undone, and the penalty that holds the cap is found by bisection
        between the stage that crossed it and the last that held (4 halvings in log, each
        descending from the point reached; ``stop_reason="degeneracy_cap"`` if it still binds). The
        stages follow the error-against-degeneracy front more closely than switching the penalty
        off at once (kernel suite, 8 trained pairs at max_iter 400: a lower error on 5, worst
        error ratio to ALS 1.0007 against 1.0010). An exact fit is reached (its degeneracy is the
        conditioned point's plus O(mu)); on a degenerate problem the polish stops at the cap. A
        conditioned phase that does not converge stops at 4/5 of ``max_iter``, leaving the rest
        to the polish.
        ``"none"``: plain least squares from the start (its degeneracy is then often far
        higher than ALS's). In both modes each rank-1 term's columns are rescaled to equal
        norms after every step (the model is unchanged; it keeps ``J^T J`` well scaled).
    memory_budget_bytes : int or None, default 2 GiB
        Raise :class:`SolverInputError` if the estimated working memory exceeds it.
    penalty, penalty_start, penalty_decay : float, default 3e-3, 1e-2, 0.9
        Final ``mu``, its start, and its decay factor per accepted step (``penalty=0`` with
        ``penalty_decay < 1``: a schedule that vanishes; below 1e-12 it is switched off).
    polish : bool, default True
        Polish without the penalty after the conditioned phase (see ``conditioning``).
    degeneracy_cap : float, default 2.0
        The degeneracy the polish may not exceed (for a fit within 5 % of exact, 1.1 x the one the
        conditioned phase reached, if higher).
    conditioned_tol : float or None, default 1e-5
        ``tol`` of the conditioned phase when a polish follows (``None``: ``tol``). Its optimum is
        not the one returned, so it need not be reached closely: on 1 %-noise rank-16 and exact
        rank-48 kernels, 1e-5 took 47 and 16 iterations in all where ``tol`` took 91 and 19, to
        the same error.
    als_sweeps : int, default 10
        Sweeps of the ``"als"`` initialisation.
    cg_max_iter : int, default 10
        Maximum PCG iterations per LM step (inexact Gauss-Newton).
    cg_tol : float, default 1e-2
        PCG stops at ``||residual|| <= cg_tol * ||g||``.
    cg_precision : {"single", "double"}, default "single"
        Arithmetic of the PCG iterations (the operator's blocks and their Cholesky factors are
        always formed in float64, and the step is accepted or rejected in float64).
        ``"single"`` halves the cost of the Gram-vector products. Use ``"double"`` with a
        ``cg_tol`` below ~1e-5, which single precision cannot resolve.
    damping_start : float, default 1e-3
        Initial ``lambda`` relative to the largest diagonal entry of ``J^T J``.
    restarts : int, default 0
        Further runs from ``init="random"`` (seeds ``seed + 1``, ...), each with every other option
        as given; the run of lowest ``rel_error`` is returned (``info["starts"]``: every run's
        ``rel_error``, ``info["best_start"]``: its index, 0 being ``init``'s); they stop early at an
        exact fit (``rel_error <= 1e-9``). Each restart costs about one more run. Small trained kernels have many local minima of nearly equal error
        at a bounded degeneracy, and ALS's SVD-based start is not always in the best (kernel
        suite, 10 trained kernels <= 1e5 entries: 3 above 1.001x ALS's error with ``restarts=0``
        and with 1, 1 with ``restarts=3``, at 3.4x the time; the one left, a 16x16x3x3 kernel at
        R=7, is where ALS buys its 0.13 % lower error with a degeneracy of 261, beyond the cap);
        a random start alone is not the default because it does not recover exactly low-rank kernels (rank 48 of 128x64x3x3: 1.6e-2 where
        ``init="als"`` reaches 4e-12).
    cap_restarts : int, default 1
        With ``restarts=0`` and ``init`` given by name: further random starts (seeds ``seed + 1``, ...)
        when the polish ended at the degeneracy cap on a tensor of at most 1e5 entries; the lowest
        error wins (``info["starts"]``, ``info["best_start"]`` as for ``restarts``). A fit stopped by
        the cap is in a basin that leads to degenerate terms, and another start often holds the cap
        at a lower error; on small tensors a run costs a fraction of ALS's seconds. Measured (kernel
        suite, 10 trained kernels <= 1e5 entries, one thread): 1 of 10 above 1.001x ALS's error
        without it (1.0015), none with it; median time 0.57 -> 0.84x ALS's (a restart on the 5 pairs
        the cap stopped), median degeneracy 1.94 either way. Always restarting took 1.23x; above 1e5
        entries a run costs minutes and the fits are within 1.001 without it. ``0`` switches it off.

    Returns
    -------
    CPResult
        ``factors[k]`` of shape ``(I_k, R)`` in the input dtype. ``info`` has ``iterations``,
        ``objective`` (final ``f`` including the penalty), ``grad_norm`` (of ``f``),
        ``converged`` (stopped by ``tol``/``tol_step``/``tol_grad``/``degeneracy_cap``),
        ``degeneracy``, ``rel_error``, ``seconds``, ``stop_reason`` (``"tol"``,
        ``"tol_step"``, ``"tol_grad"``, ``"degeneracy_cap"``, ``"max_iter"``,
        ``"time_budget"``), and ``cg_iterations_total``, ``damping`` (final ``lambda``),
        ``penalty`` (final ``mu``), ``penalty_value`` (``mu/2 sum_r ||term_r||^2``),
        ``fit_objective`` (``0.5 ||W - [[A]]||^2``), ``accepted_steps``, ``init_seconds``,
        ``polish_iterations``, ``conditioned_rel_error`` and ``conditioned_degeneracy`` (where
        the conditioned phase ended) and ``rel_error_history`` (after each accepted step).

    Raises
    ------
    SolverInputError
        Bad rank, non-finite or < 2-mode tensor, memory estimate above the budget, unknown
        ``init``/``conditioning``/``cg_precision``, or bad numeric options.
    """
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise SolverInputError(f"restarts must be an integer >= 0, got {restarts!r}")
    if isinstance(cap_restarts, bool) or not isinstance(cap_restarts, int) or cap_restarts < 0:
        raise SolverInputError(f"cap_restarts must be an integer >= 0, got {cap_restarts!r}")
    options = dict(
        max_iter=max_iter, tol=tol, tol_step=tol_step, tol_grad=tol_grad, conditioning=conditioning,
        memory_budget_bytes=memory_budget_bytes, penalty=penalty, penalty_start=penalty_start,
        penalty_decay=penalty_decay, polish=polish, degeneracy_cap=degeneracy_cap,
        conditioned_tol=conditioned_tol, als_sweeps=als_sweeps, cg_max_iter=cg_max_iter, cg_tol=cg_tol,
        damping_start=damping_start, cg_precision=cg_precision, cap_restarts=0)
    if restarts:
        return _best_of_starts(tensor, rank, seed, init, restarts, time_budget_s, options=options)
    if cap_restarts and isinstance(init, str):
        first = cp_nls(tensor, rank, seed=seed, init=init, time_budget_s=time_budget_s, **options)
        entries = math.prod(f.shape[0] for f in first.factors)
        if first.info["stop_reason"] != "degeneracy_cap" or entries > _CAP_RESTART_ENTRIES:
            return first
        return _best_of_starts(tensor, rank, seed, init, cap_restarts, time_budget_s, options=options, first=first)
    t_start = time.perf_counter()
    t = validate_inputs(tensor, rank, memory_budget_bytes, solver="nls")
    rank = int(rank)
    if conditioning not in CONDITIONING_MODES:
        raise SolverInputError(
            f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}"
        )
    if isinstance(init, str) and init not in INIT_MODES:
        raise SolverInputError(f"init must be one of {INIT_MODES} or a list of factors, got {init!r}")
    if int(max_iter) < 0 or int(cg_max_iter) < 1 or int(als_sweeps) < 0:
        raise SolverInputError(
            f"max_iter >= 0, cg_max_iter >= 1 and als_sweeps >= 0 required, got "
            f"{max_iter}, {cg_max_iter}, {als_sweeps}"
        )
    if not (0.0 < penalty_decay <= 1.0) or penalty < 0 or penalty_start < 0:
        raise SolverInputError(
            f"penalty, penalty_start >= 0 and 0 < penalty_decay <= 1 required, got "
            f"{penalty}, {penalty_start}, {penalty_decay}"
        )
    if not degeneracy_cap > 0:
        raise SolverInputError(f"degeneracy_cap must be > 0, got {degeneracy_cap}")
    if cg_precision not in CG_PRECISIONS:
        raise SolverInputError(f"cg_precision must be one of {tuple(CG_PRECISIONS)}, got {cg_precision!r}")
    deadline = None if time_budget_s is None else t_start + float(time_budget_s)
    rule = StepRule(int(cg_max_iter), float(cg_tol), CG_PRECISIONS[cg_precision], float(tol),
                     float(tol_step), float(tol_grad), deadline)
    gen = torch.Generator().manual_seed(int(seed))

    # ---- initialisation
    if isinstance(init, str) and init == "als":
        factors = make_init(t, rank, "svd", gen)
        if als_sweeps > 0:
            factors, _, _ = _als_sweeps(
                t, factors, int(als_sweeps), 0.0, deadline, split=tree_split(tuple(t.shape))
            )
    else:
        factors = make_init(t, rank, init, gen)
    factors = balance_columns(factors)
    init_seconds = time.perf_counter() - t_start

    prob = Problem(t, rank)
    norm_sq = prob.norm_sq
    if norm_sq == 0.0:
        info = {
            "iterations": 0, "objective": 0.0, "grad_norm": 0.0, "converged": True,
            "degeneracy": 0.0, "rel_error": 0.0, "seconds": time.perf_counter() - t_start,
            "stop_reason": "zero_tensor", "cg_iterations_total": 0, "damping": 0.0,
            "penalty": 0.0, "penalty_value": 0.0, "fit_objective": 0.0,
            "accepted_steps": 0, "init_seconds": init_seconds, "polish_iterations": 0,
            "conditioned_rel_error": 0.0, "conditioned_degeneracy": 0.0, "rel_error_history": [0.0],
        }
        return CPResult([torch.zeros_like(f).to(tensor.dtype) for f in factors], info)

    use_penalty = conditioning == "terms" and max(penalty, penalty_start) > 0
    weight = float(max(penalty_start, penalty)) if use_penalty else 0.0
    weight_final = float(penalty) if use_penalty else 0.0

    run = LMRun(prob, factors, weight, rule, damping_start=damping_start)
    iters = int(max_iter)
    # the conditioned phase leaves the polish a share of the iterations: a conditioned phase that
    # ran to max_iter used to end the run unpolished, its error the penalty's (measured: VGG conv1_2
    # at R=34 spent all 250 iterations there and stopped at 1.0020x ALS's error; now 1.0007x)
    phase_iters = iters - iters // _POLISH_SHARE if use_penalty and polish else iters

    # ---- phase 1: conditioned (or plain least squares with conditioning="none")
    phase_tol = tol if conditioned_tol is None or not use_penalty or not polish else float(conditioned_tol)

    def schedule() -> bool:
        """Move ``mu`` one step down its schedule; True when it was already at its end."""
        nonlocal weight
        done = weight <= weight_final
        if use_penalty:
            weight = max(weight * penalty_decay, weight_final)
            if weight < 1e-12:  # a schedule that decays to 0 switches off for good
                weight = 0.0
            run.set_mu(weight)
        return done

    stop = _descend(run, phase_iters, phase_tol, schedule=schedule)
    conditioned_rel_error, conditioned_degeneracy = run.rel_error, run.degeneracy

    # ---- phase 2: polish the plain least-squares fit while the degeneracy stays within the cap
    polish_iterations = 0
    raised = 0
    if polish and run.mu > 0 and stop in ("tol", "tol_step", "max_iter") and run.iterations < iters:
        start_it = run.iterations
        cap = float(degeneracy_cap)
        near_exact = run.rel_error <= _NEAR_EXACT
        if run.degeneracy > cap and not near_exact:
            raised = _raise_to_cap(run, iters, phase_tol, cap)
        if near_exact or run.degeneracy > cap:  # heading for an exact fit, or the cap out of the raises' reach
            cap = max(cap, _CAP_SLACK * run.degeneracy)
        stages = [run.mu * _POLISH_STEP ** k for k in range(1, _POLISH_STAGES)] + [0.0]
        held = run.mu  # the lowest penalty so far at which the degeneracy stayed within the cap
        for mu in stages:
            run.set_mu(mu)
            stage_tol = tol if mu == 0.0 else phase_tol
            stop = _descend(run, iters, stage_tol, cap=cap)
            if stop == "degeneracy_cap":
                stop = _hold_cap(run, iters, phase_tol, cap, low=mu if mu > 0 else held * _POLISH_STEP, high=held)
                break
            if stop not in ("tol", "tol_step"):
                break
            held = mu
        if run.mu > 0:  # a stage ended the polish: the point is that stage's, scored without the penalty
            run.set_mu(0.0)
        polish_iterations = run.iterations - start_it

    factors = run.ev["factors"]
    info = {
        "iterations": run.iterations,
        "objective": run.ev["f"],
        "grad_norm": run.gnorm,
        "converged": stop in ("tol", "tol_step", "tol_grad", "degeneracy_cap"),
        "degeneracy": degeneracy(factors, norm_sq),
        "rel_error": rel_error(t, factors),
        "seconds": time.perf_counter() - t_start,
        "stop_reason": stop,
        "cg_iterations_total": run.cg_total,
        "damping": run.lam,
        "penalty": run.mu,
        "penalty_value": 0.5 * run.mu * run.ev["sq"],
        "fit_objective": run.ev["f_fit"],
        "accepted_steps": run.accepted,
        "init_seconds": init_seconds,
        "polish_iterations": polish_iterations,
        "conditioned_rel_error": conditioned_rel_error,
        "conditioned_degeneracy": conditioned_degeneracy,
        "penalty_raises": raised,
        "rel_error_history": [math.sqrt(2.0 * h / norm_sq) for h in run.history],
    }
    return CPResult(factors=[f.to(tensor.dtype) for f in factors], info=info)



def _best_of_starts(tensor, rank, seed, init, restarts: int, time_budget_s, options: dict,
                    first: CPResult | None = None) -> CPResult:
    """``restarts`` more runs from random starts; the lowest error wins (a shared time budget).
    ``first``: the run from ``init``, already done (its seconds count)."""
    start = time.perf_counter() - (first.info["seconds"] if first is not None else 0.0)
    results: list[CPResult] = [first] if first is not None else []
    for k in range(len(results), restarts + 1):
        left = None if time_budget_s is None else float(time_budget_s) - (time.perf_counter() - start)
        if results and left is not None and left <= 0:
            break
        results.append(cp_nls(tensor, rank, seed=int(seed) + k, init=init if k == 0 else "random",
                              time_budget_s=left, **options))
        if results[-1].info["rel_error"] <= _EXACT_FIT:  # an exact fit: no start can do better
            break
    best = min(range(len(results)), key=lambda i: results[i].info["rel_error"])
    info = dict(results[best].info)
    info.update(starts=[r.info["rel_error"] for r in results], best_start=best,
                seconds=time.perf_counter() - start)
    return CPResult(results[best].factors, info)


def _raise_to_cap(run: LMRun, limit: int, tol: float, cap: float) -> int:
    """Raise the penalty ×:data:`_RAISE_STEP` (at most :data:`_RAISES` times), descending from the point
    reached at each, until the degeneracy is within ``cap``; returns how many raises it took (the
    polish then lowers the penalty from there, holding the cap)."""
    for k in range(1, _RAISES + 1):
        if run.iterations >= limit or run.degeneracy <= cap:
            return k - 1
        run.set_mu(run.mu * _RAISE_STEP)
        _descend(run, limit, tol)
    return _RAISES


def _hold_cap(run: LMRun, limit: int, tol: float, cap: float, *, low: float, high: float) -> str:
    """Bisect the penalty between ``low`` (crossed the cap) and ``high`` (held it), descending from
    the current point at each; ends at a point within the cap. Returns the last stop reason,
    ``"degeneracy_cap"`` when the cap still binds."""
    stop = "degeneracy_cap"
    for _ in range(_CAP_BISECT):
        if run.iterations >= limit:
            break
        mid = math.sqrt(low * high)
        run.set_mu(mid)
        stop = _descend(run, limit, tol, cap=cap)
        if stop == "degeneracy_cap":
            low = mid
        elif stop in ("tol", "tol_step"):
            high = mid
        else:  # out of iterations or time, or at a stationary point: where it is
            break
    return stop


def _descend(run: LMRun, limit: int, tol: float, *, cap: float = math.inf, schedule=None) -> str:
    """LM steps until ``run.iterations`` reaches ``limit``; returns why it stopped (both phases' loop).

    An accepted step that takes the degeneracy above ``cap`` is undone (``"degeneracy_cap"``).
    ``schedule``, called after every other accepted step, moves ``mu`` and says whether it was already
    at its end: only then may a decrease below ``tol * f`` stop the loop (``"tol"``)."""
    while run.iterations < limit:
        if (reason := _stop_before_step(run)) is not None:
            return reason
        accepted, decrease, f_before, tiny = run.step()
        if accepted:
            if run.degeneracy > cap:
                run.go_back()
                return "degeneracy_cap"
            settled = schedule() if schedule is not None else True
            if settled and decrease <= tol * f_before:
                return "tol"
        if tiny:
            return "tol_step"
    return "max_iter"


def _stop_before_step(run) -> str | None:
    """Why both phases stop before taking another step: the time budget is spent, or the gradient is small."""
    if run.out_of_time():
        return "time_budget"
    if run.converged_by_gradient():
        return "tol_grad"
    return None
