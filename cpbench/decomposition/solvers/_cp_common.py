"""Shared numerical kernels of the CP solvers (:mod:`cp_als`, :mod:`cp_nls`).

Conventions
-----------
A CP model of rank ``R`` of an ``N``-way tensor ``W`` of shape ``(I_0, ..., I_{N-1})`` is a list
of factor matrices ``A_k`` of shape ``(I_k, R)``; the model tensor is
``[[A_0, ..., A_{N-1}]] = sum_r a_0[:, r] o a_1[:, r] o ... o a_{N-1}[:, r]``.
Unfoldings are C-ordered: ``W.reshape(prod(I_0..I_{m-1}), prod(I_m..I_{N-1}))`` equals
``khatri_rao(A_0..A_{m-1}) @ khatri_rao(A_m..A_{N-1}).T`` for the model, where the first matrix
of a Khatri-Rao product varies slowest.

Everything here is a pure function on ``torch.Tensor`` objects; the solvers compute in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

# bad input is a UsageError of cpbench's one exception tree (see cpbench/errors.py)
from ...errors import SolverInputError, SolverMemoryError

__all__ = [
    "CPResult",
    "SolverInputError",
    "SolverMemoryError",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "validate_inputs",
    "estimate_working_memory",
    "khatri_rao",
    "reconstruct",
    "rel_error",
    "degeneracy",
    "term_norms",
    "grams",
    "hadamard",
    "mttkrp",
    "mttkrp_all",
    "tree_split",
    "balance_columns",
    "svd_init",
    "random_init",
    "make_init",
    "model_norm_sq",
]

#: Default cap on a solver's estimated working memory (2 GiB).
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3


@dataclass
class CPResult:
    """Result of a CP solver.

    Attributes
    ----------
    factors : list of torch.Tensor
        One per mode; ``factors[k]`` has shape ``(tensor.shape[k], rank)`` and the input's dtype.
    info : dict
        ``iterations`` (int), ``objective`` (float, final value of the minimised function),
        ``grad_norm`` (float), ``converged`` (bool), ``degeneracy`` (float), ``rel_error``
        (float), ``seconds`` (float), ``stop_reason`` (str), plus solver-specific keys.
    """

    factors: list[torch.Tensor]
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# input checks


def estimate_working_memory(shape: Sequence[int], rank: int, solver: str = "nls") -> int:
    """Estimate the peak working memory (bytes) of a CP solver, float64.

    Parameters
    ----------
    shape : sequence of int
        Tensor shape ``(I_0, ..., I_{N-1})``.
    rank : int
        CP rank ``R``.
    solver : {"nls", "als"}
        ``"nls"`` also counts the ``N^2`` Gram/Hadamard ``R x R`` blocks and CG work vectors.

    Returns
    -------
    int
        Bytes: a float64 copy of the tensor, the two Khatri-Rao matrices and partial MTTKRPs of
        the dimension tree (``2 (P_left + P_right) R``; split at :func:`tree_split` for
        ``"nls"``, at ``N // 2`` for ``"als"``), the ``R x R`` Gram blocks and
        ``~12 sum(I_k) R`` factor-sized work arrays.
    """
    n = len(shape)
    numel = math.prod(shape)
    m = tree_split(shape) if solver == "nls" else max(1, n // 2)
    p_left = math.prod(shape[:m])
    p_right = math.prod(shape[m:])
    words = 2 * numel + 2 * (p_left + p_right) * rank
    if solver == "nls":
        words += (n * n + 2 * n) * rank * rank + 12 * sum(shape) * rank
    else:
        words += (2 * n + 2) * rank * rank + 4 * sum(shape) * rank
    return 8 * int(words)


def validate_inputs(
    tensor: torch.Tensor,
    rank: int,
    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES,
    solver: str = "nls",
) -> torch.Tensor:
    """Check solver inputs and return the tensor as a contiguous float64 copy.

    Parameters
    ----------
    tensor : torch.Tensor
        Real floating tensor with at least 2 modes, shape ``(I_0, ..., I_{N-1})``.
    rank : int
        CP rank, a Python/NumPy integer ``>= 1`` (bool is rejected).
    memory_budget_bytes : int or None
        Cap on :func:`estimate_working_memory`; ``None`` disables the check.
    solver : {"nls", "als"}
        Which solver's working memory to estimate.

    Returns
    -------
    torch.Tensor
        float64, contiguous, same shape as ``tensor``.

    Raises
    ------
    SolverInputError
        Rank not an int or < 1; not a floating tensor; fewer than 2 modes or an empty mode;
        NaN/inf entries; estimated working memory above the budget.
    """
    if not isinstance(tensor, torch.Tensor):
        raise SolverInputError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        try:
            import numpy as np

            ok = isinstance(rank, np.integer)
        except Exception:  # pragma: no cover - numpy always there
            ok = False
        if not ok:
            raise SolverInputError(f"rank must be an int >= 1, got {rank!r} ({type(rank).__name__})")
    rank = int(rank)
    if rank < 1:
        raise SolverInputError(f"rank must be an int >= 1, got {rank}")
    if not (tensor.is_floating_point()):
        raise SolverInputError(f"tensor must have a real floating dtype, got {tensor.dtype}")
    if tensor.dim() < 2:
        raise SolverInputError(
            f"tensor must have at least 2 modes, got {tensor.dim()} (shape {tuple(tensor.shape)})"
        )
    if any(s < 1 for s in tensor.shape):
        raise SolverInputError(f"tensor has an empty mode: shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise SolverInputError(
            f"tensor must be finite, got {n_nan} NaN and {n_inf} inf entries"
        )
    if memory_budget_bytes is not None:
        need = estimate_working_memory(tuple(tensor.shape), rank, solver)
        if need > memory_budget_bytes:
            raise SolverMemoryError(
                f"rank {rank} needs ~{need / 2**20:.1f} MiB of working memory for shape "
                f"{tuple(tensor.shape)}, more than memory_budget_bytes="
                f"{memory_budget_bytes} ({memory_budget_bytes / 2**20:.1f} MiB); "
                f"use a smaller rank or a larger budget"
            )
    return tensor.detach().to(dtype=torch.float64).contiguous()


# --------------------------------------------------------------------------------------------
# basic algebra


def khatri_rao(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, first matrix slowest.

    Parameters
    ----------
    mats : sequence of torch.Tensor
        Matrices of shapes ``(I_k, R)``; may be empty only if ``R`` cannot be inferred, which is
        an error.

    Returns
    -------
    torch.Tensor
        Shape ``(prod I_k, R)``; row ``(i_0, ..., i_{m-1})`` (C order) holds ``prod_k A_k[i_k, :]``.
    """
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, m.shape[1])
    return out


def reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full tensor of a CP model.

    Parameters
    ----------
    factors : sequence of torch.Tensor
        ``N >= 2`` matrices of shapes ``(I_k, R)``.

    Returns
    -------
    torch.Tensor
        Shape ``(I_0, ..., I_{N-1})``.
    """
    n = len(factors)
    m = max(1, n // 2)
    shape = tuple(f.shape[0] for f in factors)
    left = khatri_rao(factors[:m])
    right = khatri_rao(factors[m:])
    return (left @ right.T).reshape(shape)


def grams(factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gram matrices ``A_k^T A_k``, each ``(R, R)``."""
    return [f.T @ f for f in factors]


def hadamard(mats: Sequence[torch.Tensor], rank: int, like: torch.Tensor) -> torch.Tensor:
    """Element-wise product of ``(R, R)`` matrices (all-ones if ``mats`` is empty)."""
    out = torch.ones((rank, rank), dtype=like.dtype, device=like.device)
    for m in mats:
        out = out * m
    return out


def model_norm_sq(gram_list: Sequence[torch.Tensor]) -> float:
    """``||[[A_0..A_{N-1}]]||^2 = sum(G_0 * ... * G_{N-1})`` from the Gram matrices."""
    out = gram_list[0]
    for g in gram_list[1:]:
        out = out * g
    return float(out.sum())


def term_norms(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norms of the rank-1 terms, ``prod_k ||A_k[:, r]||``, shape ``(R,)``."""
    out = torch.ones(factors[0].shape[1], dtype=factors[0].dtype, device=factors[0].device)
    for f in factors:
        out = out * torch.linalg.vector_norm(f, dim=0)
    return out


def degeneracy(factors: Sequence[torch.Tensor], tensor_norm_sq: float) -> float:
    """``sum_r ||term_r||^2 / ||W||^2``; values <= 1 mean no cancellation between terms.

    Parameters
    ----------
    factors : sequence of torch.Tensor
        Shapes ``(I_k, R)``.
    tensor_norm_sq : float
        ``||W||^2`` (if 0, returns 0 when all terms are 0 and inf otherwise).
    """
    s = float((term_norms([f.double() for f in factors]) ** 2).sum())
    if tensor_norm_sq <= 0:
        return 0.0 if s == 0 else math.inf
    return s / tensor_norm_sq


def rel_error(tensor: torch.Tensor, factors: Sequence[torch.Tensor]) -> float:
    """``||W - [[factors]]||_F / ||W||_F``, computed explicitly in float64.

    Parameters
    ----------
    tensor : torch.Tensor
        Shape ``(I_0, ..., I_{N-1})``.
    factors : sequence of torch.Tensor
        Shapes ``(I_k, R)``.

    Returns
    -------
    float
        The relative error (``||[[factors]]||`` if ``||W|| = 0``).
    """
    t = tensor.double()
    rec = reconstruct([f.double() for f in factors])
    num = float(torch.linalg.vector_norm((t - rec).reshape(-1)))
    den = float(torch.linalg.vector_norm(t.reshape(-1)))
    return num / den if den > 0 else num


def _contract_partial(p: torch.Tensor, mats: Sequence[torch.Tensor], keep: int) -> torch.Tensor:
    """Contract ``p`` of shape ``(d_0, ..., d_{m-1}, R)`` with ``mats[j]`` on every axis ``j != keep``.

    Returns shape ``(d_keep, R)``:
    ``out[i, r] = sum_{i_j, j != keep} p[i_0, ..., i, ..., r] prod_{j != keep} mats[j][i_j, r]``.
    """
    m = len(mats)
    if m == 1:
        return p.reshape(p.shape[0], p.shape[-1])
    letters = "abcdefghijklmnopqrstuvwxy"
    sub_p = letters[:m] + "z"
    ops = [p]
    subs = [sub_p]
    for j in range(m):
        if j != keep:
            ops.append(mats[j])
            subs.append(letters[j] + "z")
    expr = ",".join(subs) + "->" + letters[keep] + "z"
    return torch.einsum(expr, *ops)


def tree_split(shape: Sequence[int]) -> int:
    """Split point ``m`` of the two-node dimension tree that keeps the partial MTTKRPs smallest.

    Both halves cost one ``numel x R`` matmul whatever ``m`` is; what depends on ``m`` is the
    size of the two partial products ``prod(I_0..I_{m-1}) x R`` and ``prod(I_m..I_{N-1}) x R``
    (and of the Khatri-Rao matrices), which are written, read and contracted further. ``m``
    minimises ``prod(left) + prod(right)`` (ties: the most balanced split). For a conv kernel
    ``(C_out, C_in, k, k)`` this is ``m = 1``: ``(C_out, C_in * k * k)`` instead of
    ``(C_out * C_in, k * k)``, which for ``256 x 96 x 5 x 5`` shrinks the partials ~9x.

    Parameters
    ----------
    shape : sequence of int
        ``(I_0, ..., I_{N-1})``, ``N >= 2``.

    Returns
    -------
    int
        ``1 <= m <= N - 1``.
    """
    n = len(shape)
    if n < 2:
        return 1
    return min(
        range(1, n),
        key=lambda m: (math.prod(shape[:m]) + math.prod(shape[m:]), abs(2 * m - n), m),
    )


def mttkrp(tensor: torch.Tensor, factors: Sequence[torch.Tensor], mode: int) -> torch.Tensor:
    """Matricised-tensor times Khatri-Rao product for one mode.

    Parameters
    ----------
    tensor : torch.Tensor
        Shape ``(I_0, ..., I_{N-1})``.
    factors : sequence of torch.Tensor
        Shapes ``(I_k, R)`` (``factors[mode]`` is not used).
    mode : int

    Returns
    -------
    torch.Tensor
        Shape ``(I_mode, R)``: ``W_(mode) @ khatri_rao(A_k, k != mode)``.
    """
    n = tensor.dim()
    shape = tuple(tensor.shape)
    rank = factors[0].shape[1]
    if mode < n - 1:
        # contract modes after `mode` by one matmul, then the leading ones
        t2 = tensor.reshape(math.prod(shape[: mode + 1]), -1)
        p = (t2 @ khatri_rao(factors[mode + 1 :])).reshape(shape[: mode + 1] + (rank,))
        return _contract_partial(p, list(factors[: mode + 1]), mode)
    t2 = tensor.reshape(-1, shape[-1])
    p = (t2.T @ khatri_rao(factors[:-1])).reshape(shape[-1], rank)
    return p


def mttkrp_all(tensor: torch.Tensor, factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """MTTKRP for every mode at one point, via a two-node dimension tree (2 big matmuls).

    Parameters
    ----------
    tensor : torch.Tensor
        Shape ``(I_0, ..., I_{N-1})``.
    factors : sequence of torch.Tensor
        Shapes ``(I_k, R)``.

    Returns
    -------
    list of torch.Tensor
        ``M_k`` of shape ``(I_k, R)``; ``M_k = W_(k) @ khatri_rao(A_j, j != k)``.
    """
    n = tensor.dim()
    m = max(1, n // 2)
    shape = tuple(tensor.shape)
    rank = factors[0].shape[1]
    t2 = tensor.reshape(math.prod(shape[:m]), -1)
    pl = (t2 @ khatri_rao(factors[m:])).reshape(shape[:m] + (rank,))
    pr = (t2.T @ khatri_rao(factors[:m])).reshape(shape[m:] + (rank,))
    out = [_contract_partial(pl, factors[:m], k) for k in range(m)]
    out += [_contract_partial(pr, factors[m:], k) for k in range(n - m)]
    return out


def balance_columns(factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale each rank-1 term so that its factor columns have equal norms.

    The model is unchanged. Terms with a zero column are left as they are.

    Parameters
    ----------
    factors : sequence of torch.Tensor
        Shapes ``(I_k, R)``.

    Returns
    -------
    list of torch.Tensor
        Same shapes; ``||A_k[:, r]|| = ||term_r||^(1/N)`` for every ``k``.
    """
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    logs = torch.stack([torch.log(nr) for nr in norms])  # (N, R)
    ok = torch.isfinite(logs).all(dim=0)
    target = logs.mean(dim=0)
    out = []
    for k, f in enumerate(factors):
        scale = torch.exp(target - logs[k])
        scale = torch.where(ok, scale, torch.ones_like(scale))
        out.append(f * scale)
    return out


# --------------------------------------------------------------------------------------------
# initialisation


def random_init(shape: Sequence[int], rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Standard-normal factors ``(I_k, R)`` float64, scaled later by the caller."""
    return [torch.randn((s, rank), generator=generator, dtype=torch.float64) for s in shape]


def svd_init(tensor: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """TensorLy-style SVD initialisation (``parafac(init="svd")``).

    Factor ``k`` is the ``min(rank, I_k)`` leading left singular vectors of the mode-``k``
    unfolding; mode 0's are scaled by the singular values; when ``rank > I_k`` the remaining
    columns are uniform ``[0, 1)`` random numbers (as TensorLy pads them).

    Parameters
    ----------
    tensor : torch.Tensor
        float64, shape ``(I_0, ..., I_{N-1})``.
    rank : int
    generator : torch.Generator
        Source of the padding columns.

    Returns
    -------
    list of torch.Tensor
        Shapes ``(I_k, rank)``, float64.
    """
    factors = []
    for mode in range(tensor.dim()):
        unf = torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)
        u, s, _ = torch.linalg.svd(unf, full_matrices=False)
        k = min(rank, u.shape[1])
        u = u[:, :k]
        if mode == 0:
            u = u * s[:k]
        if k < rank:
            pad = torch.rand((unf.shape[0], rank - k), generator=generator, dtype=torch.float64)
            u = torch.cat([u, pad], dim=1)
        factors.append(u.contiguous())
    return factors


def make_init(
    tensor: torch.Tensor, rank: int, init, generator: torch.Generator
) -> list[torch.Tensor]:
    """Initial factors for ``init`` in ``{"svd", "random"}`` or a sequence of factor matrices.

    ``"random"`` draws standard-normal factors and scales them so that the model norm equals
    ``||W||`` (balanced over modes). A user sequence is validated and copied to float64.

    Raises
    ------
    SolverInputError
        Unknown name, or user factors with the wrong count/shapes/values.
    """
    shape = tuple(tensor.shape)
    if isinstance(init, str):
        if init == "svd":
            return svd_init(tensor, rank, generator)
        if init == "random":
            fs = random_init(shape, rank, generator)
            mn = math.sqrt(max(model_norm_sq(grams(fs)), 1e-300))
            tn = float(torch.linalg.vector_norm(tensor.reshape(-1)))
            scale = (tn / mn) ** (1.0 / len(fs)) if tn > 0 else 1.0
            return [f * scale for f in fs]
        raise SolverInputError(f"init must be 'svd', 'random' or a list of factors, got {init!r}")
    fs = list(init)
    if len(fs) != len(shape):
        raise SolverInputError(f"init has {len(fs)} factors, the tensor has {len(shape)} modes")
    out = []
    for k, f in enumerate(fs):
        f = torch.as_tensor(f)
        if tuple(f.shape) != (shape[k], rank):
            raise SolverInputError(
                f"init factor {k} has shape {tuple(f.shape)}, expected {(shape[k], rank)}"
            )
        if not bool(torch.isfinite(f).all()):
            raise SolverInputError(f"init factor {k} has NaN/inf entries")
        out.append(f.detach().to(torch.float64).clone().contiguous())
    return out
