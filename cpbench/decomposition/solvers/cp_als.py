"""Fast CP alternating least squares in torch (TensorLy ``parafac``-equivalent).

The update order, the SVD initialisation and the stopping rule are those of
``tensorly.decomposition.parafac(init="svd", normalize_factors=False, linesearch=False)``:
each sweep updates modes ``0, 1, ..., N-1`` in turn by
``A_n <- W_(n) (khatri_rao(A_k, k != n)) (hadamard_k!=n A_k^T A_k)^{-1}``, then computes the
relative reconstruction error ``e_it`` from the last MTTKRP and the Gram matrices and stops when
``|e_{it-1} - e_it| < tol``.

What makes it fast is the MTTKRP: the modes are split into a left half ``0..m-1`` and a right
half ``m..N-1`` (``m = N // 2``); one matmul ``W_(left x right) @ khatri_rao(right factors)``
gives a partial product from which all left MTTKRPs follow by cheap contractions with the
(current) left factors, and one matmul with ``khatri_rao(left factors)`` serves all right modes.
So a sweep costs two ``numel(W) * R`` matmuls instead of ``N``.
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
    _contract_partial,
    degeneracy,
    grams,
    hadamard,
    khatri_rao,
    make_init,
    model_norm_sq,
    mttkrp_all,
    rel_error,
    validate_inputs,
)

__all__ = ["cp_als"]


def _spd_solve_right(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Return ``m @ inv(v)`` for a symmetric positive (semi)definite ``v`` of shape ``(R, R)``.

    Cholesky first; LU if Cholesky fails; least squares if ``v`` is singular.
    """
    chol, info = torch.linalg.cholesky_ex(v)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, chol).T
    sol, info = torch.linalg.solve_ex(v, m.T)
    if int(info) == 0 and bool(torch.isfinite(sol).all()):
        return sol.T
    return torch.linalg.lstsq(v, m.T).solution.T


def _als_sweeps(
    t: torch.Tensor,
    factors: list[torch.Tensor],
    max_iter: int,
    tol: float,
    deadline: float | None = None,
    split: int | None = None,
) -> tuple[list[torch.Tensor], list[float], str]:
    """Run ALS sweeps in place of ``factors`` (float64).

    Parameters
    ----------
    t : torch.Tensor
        float64 tensor, shape ``(I_0, ..., I_{N-1})``.
    factors : list of torch.Tensor
        Initial factors ``(I_k, R)``; the list is updated in place.
    max_iter : int
        Maximum number of sweeps.
    tol : float
        Stop when ``|e_{it-1} - e_it| < tol`` (``e`` = relative error); ``0`` disables.
    deadline : float or None
        ``time.perf_counter()`` value after which to stop.
    split : int or None
        Split point ``m`` of the dimension tree (left modes ``0..m-1``); ``None``: ``N // 2``
        (what :func:`cp_als` uses). :func:`cp_nls` passes :func:`tree_split`'s choice.

    Returns
    -------
    factors, errors, stop_reason
        ``errors`` has one relative error per sweep; ``stop_reason`` is one of ``"tol"``,
        ``"max_iter"``, ``"time_budget"``.
    """
    n = t.dim()
    shape = tuple(t.shape)
    rank = factors[0].shape[1]
    m = max(1, n // 2) if split is None else int(split)
    t2 = t.reshape(math.prod(shape[:m]), -1)
    norm_t = float(torch.linalg.vector_norm(t.reshape(-1)))
    norm_t_sq = norm_t * norm_t
    g = grams(factors)
    errors: list[float] = []
    stop = "max_iter"
    for it in range(max_iter):
        pl = (t2 @ khatri_rao(factors[m:])).reshape(shape[:m] + (rank,))
        mk = None
        for k in range(m):
            mk = _contract_partial(pl, factors[:m], k)
            v = hadamard([g[j] for j in range(n) if j != k], rank, mk)
            factors[k] = _spd_solve_right(v, mk)
            g[k] = factors[k].T @ factors[k]
        pr = (t2.T @ khatri_rao(factors[:m])).reshape(shape[m:] + (rank,))
        for k in range(m, n):
            mk = _contract_partial(pr, factors[m:], k - m)
            v = hadamard([g[j] for j in range(n) if j != k], rank, mk)
            factors[k] = _spd_solve_right(v, mk)
            g[k] = factors[k].T @ factors[k]
        iprod = float((mk * factors[-1]).sum())
        err_sq = abs(norm_t_sq + model_norm_sq(g) - 2.0 * iprod)
        errors.append(math.sqrt(err_sq) / norm_t if norm_t > 0 else math.sqrt(err_sq))
        if tol and it >= 1 and abs(errors[-2] - errors[-1]) < tol:
            stop = "tol"
            break
        if deadline is not None and time.perf_counter() >= deadline:
            stop = "time_budget"
            break
    return factors, errors, stop


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    init: str | Sequence[torch.Tensor] = "svd",
    max_iter: int = 1000,
    tol: float = 1e-10,
    time_budget_s: float | None = None,
    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES,
) -> CPResult:
    """CP decomposition by alternating least squares (TensorLy ``parafac``-equivalent, fast).

    Parameters
    ----------
    tensor : torch.Tensor
        Real tensor of shape ``(I_0, ..., I_{N-1})``, ``N >= 2``, finite. Computation is float64.
    rank : int
        Number of rank-1 terms ``R >= 1``.
    seed : int, default 0
        Seed of the ``torch.Generator`` used for the random parts of the initialisation
        (the padding columns of ``"svd"`` when ``R > I_k``; all of ``"random"``).
    init : {"svd", "random"} or sequence of torch.Tensor, default "svd"
        ``"svd"``: TensorLy's SVD initialisation (leading left singular vectors of each
        unfolding, mode 0 scaled by the singular values, uniform random columns when
        ``R > I_k``). ``"random"``: standard normal, scaled to the tensor's norm. A sequence:
        the initial factors, shapes ``(I_k, R)`` (copied, not modified).
    max_iter : int, default 1000
        Maximum number of sweeps (one sweep updates every mode once).
    tol : float, default 1e-10
        Stop when the relative reconstruction error changes by less than ``tol`` between two
        sweeps (TensorLy's ``cvg_criterion="abs_rec_error"``); ``0`` runs ``max_iter`` sweeps.
    time_budget_s : float or None, default None
        Wall-clock budget; checked after each sweep.
    memory_budget_bytes : int or None, default 2 GiB
        Raise :class:`SolverInputError` if the estimated working memory exceeds it.

    Returns
    -------
    CPResult
        ``factors[k]`` of shape ``(I_k, R)`` in the input dtype; ``info`` has ``iterations``,
        ``objective`` (``0.5 ||W - [[A]]||^2``), ``grad_norm`` (of that objective),
        ``converged`` (stopped by ``tol``), ``degeneracy``, ``rel_error`` (explicit),
        ``seconds``, ``stop_reason`` (``"tol"``, ``"max_iter"``, ``"time_budget"``) and
        ``rel_error_history`` (list of the per-sweep relative errors).

    Raises
    ------
    SolverInputError
        Bad rank, non-finite or < 2-mode tensor, memory estimate above the budget, bad init.
    """
    t0 = time.perf_counter()
    t = validate_inputs(tensor, rank, memory_budget_bytes, solver="als")
    rank = int(rank)
    if int(max_iter) < 0:
        raise SolverInputError(f"max_iter must be >= 0, got {max_iter}")
    gen = torch.Generator().manual_seed(int(seed))
    factors = make_init(t, rank, init, gen)
    deadline = None if time_budget_s is None else t0 + float(time_budget_s)
    factors, errors, stop = _als_sweeps(t, factors, int(max_iter), float(tol), deadline)
    norm_t_sq = float((t * t).sum())
    # final diagnostics at the returned point (one extra MTTKRP pass)
    g = grams(factors)
    mk = mttkrp_all(t, factors)
    n = t.dim()
    grad_sq = 0.0
    for k in range(n):
        gk = factors[k] @ hadamard([g[j] for j in range(n) if j != k], rank, t) - mk[k]
        grad_sq += float((gk * gk).sum())
    rel = rel_error(t, factors)
    info = {
        "iterations": len(errors),
        "objective": 0.5 * rel * rel * norm_t_sq,
        "grad_norm": math.sqrt(grad_sq),
        "converged": stop == "tol",
        "degeneracy": degeneracy(factors, norm_t_sq),
        "rel_error": rel,
        "seconds": time.perf_counter() - t0,
        "stop_reason": stop,
        "rel_error_history": errors,
    }
    dtype = tensor.dtype
    return CPResult(factors=[f.to(dtype) for f in factors], info=info)
