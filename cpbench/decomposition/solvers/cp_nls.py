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
from dataclasses import dataclass
from typing import Sequence

import torch

from ._cp_common import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    CPResult,
    SolverInputError,
    balance_columns,
    degeneracy,
    grams,
    hadamard,
    khatri_rao,
    make_init,
    rel_error,
    tree_split,
    validate_inputs,
)
from .cp_als import _als_sweeps

__all__ = ["cp_nls", "CONDITIONING_MODES", "INIT_MODES", "CG_PRECISIONS"]

CONDITIONING_MODES = ("terms", "none")
INIT_MODES = ("als", "svd", "random")
CG_PRECISIONS = {"double": torch.float64, "single": torch.float32}

# relative fit (f_fit / ||W||^2) below which f and g are computed from the explicit residual
# instead of the Gram-matrix expansion, whose cancellation error is ~1e-16 ||W||^2
_EXACT_RESIDUAL_BELOW = 1e-6

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


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(xs, ys)))


def _partial_mttkrps(p: torch.Tensor, mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """All MTTKRPs of a partial product, by recursive halving.

    ``p`` has shape ``(d_0, ..., d_{k-1}, R)`` (a dimension-tree node over ``k`` modes);
    returns ``out[j][i, r] = sum p[.., i, .., r] prod_{l != j} mats[l][i_l, r]`` (shape
    ``(d_j, R)``). Each level contracts one half of the modes away with one multiply-and-sum
    over the node (plain element-wise ops; ``einsum`` was slower on this batched-over-``r``
    contraction: 31 vs 19 ms for a 256 x 96 x 200 node at 1 thread, and far slower with 2
    threads on a loaded machine).
    """
    k = len(mats)
    rank = p.shape[-1]
    if k == 1:
        return [p.reshape(p.shape[0], rank)]
    dims = tuple(p.shape[:-1])
    h = k // 2
    pa, pb = math.prod(dims[:h]), math.prod(dims[h:])
    p3 = p.reshape(pa, pb, rank)
    left = (p3 * khatri_rao(mats[h:])).sum(dim=1).reshape(dims[:h] + (rank,))
    right = (p3 * khatri_rao(mats[:h]).unsqueeze(1)).sum(dim=0).reshape(dims[h:] + (rank,))
    return _partial_mttkrps(left, mats[:h]) + _partial_mttkrps(right, mats[h:])


class _Problem:
    """Evaluation of f, g and J^T J products for one tensor (float64).

    MTTKRPs go through a two-node dimension tree split at :func:`tree_split` (``m = 1`` for
    conv kernels): ``f`` needs one ``numel x R`` matmul (``W_(left) @ khatri_rao(right)``, whose
    inner product with ``khatri_rao(left)`` is ``<W, [[A]]>``), the gradient one more.
    """

    def __init__(self, t: torch.Tensor, rank: int):
        self.t = t
        self.n = t.dim()
        self.shape = tuple(t.shape)
        self.rank = rank
        self.m = tree_split(self.shape)
        self.t2 = t.reshape(math.prod(self.shape[: self.m]), -1)
        self.norm_sq = float((t * t).sum())

    # -- objective ---------------------------------------------------------------------------
    def evaluate(self, factors: list[torch.Tensor], mu: float) -> dict:
        """f and the cached pieces needed for the gradient at ``factors``."""
        m = self.m
        g = grams(factors)
        krl = khatri_rao(factors[:m])
        krr = khatri_rao(factors[m:])
        pl = self.t2 @ krr
        inner = float(torch.dot(pl.reshape(-1), krl.reshape(-1)))
        had = g[0]
        for x in g[1:]:
            had = had * x
        model_sq = float(had.sum())
        f_fit = 0.5 * (self.norm_sq - 2.0 * inner + model_sq)
        resid = None
        if f_fit < _EXACT_RESIDUAL_BELOW * self.norm_sq:
            resid = self.t2 - krl @ krr.T
            f_fit = 0.5 * float((resid * resid).sum())
        f_fit = max(f_fit, 0.0)
        sq = float(torch.diagonal(had).sum())  # sum_r ||term_r||^2
        return {
            "factors": factors,
            "grams": g,
            "krl": krl,
            "krr": krr,
            "pl": pl,
            "resid": resid,
            "f_fit": f_fit,
            "sq": sq,  # sum_r ||term_r||^2
            "f": f_fit + 0.5 * mu * sq,
        }

    def gradient(self, ev: dict, mu: float) -> list[torch.Tensor]:
        """Gradient of f at the evaluated point (one more big matmul).

        The fit part does not depend on ``mu`` and is kept in ``ev``: a penalty schedule that moves
        ``mu`` after every accepted step (:meth:`_LMRun.set_mu`) then costs no second MTTKRP (it had
        been half of all gradient time; a 512x64x8x8 kernel at R=112: 537 -> 271 MTTKRPs).
        """
        if "grad_fit" not in ev:
            ev["grad_fit"] = self._fit_gradient(ev)
        pen = self.penalty_grad(ev["factors"], ev["grams"], mu)
        return [fit + p for fit, p in zip(ev["grad_fit"], pen)]

    def _fit_gradient(self, ev: dict) -> list[torch.Tensor]:
        n, m, rank = self.n, self.m, self.rank
        factors, g = ev["factors"], ev["grams"]
        if ev["resid"] is not None:
            x2, pl = ev["resid"], ev["resid"] @ ev["krr"]
        else:
            x2, pl = self.t2, ev["pl"]
        # (krl^T x2)^T: x2^T @ krl ran at ~0.6x its speed here (torch 2.13 CPU BLAS, 512x4096 at R=112)
        pr = torch.mm(ev["krl"].T, x2).T.contiguous()
        mk = _partial_mttkrps(pl.reshape(self.shape[:m] + (rank,)), factors[:m])
        mk += _partial_mttkrps(pr.reshape(self.shape[m:] + (rank,)), factors[m:])
        if ev["resid"] is not None:  # MTTKRP of the residual is minus the fit gradient
            return [-mk[k] for k in range(n)]
        out = []
        for k in range(n):
            gam = hadamard([g[j] for j in range(n) if j != k], rank, mk[k])
            out.append(torch.addmm(mk[k], factors[k], gam, beta=-1.0))
        return out

    def penalty_grad(self, factors, g, mu):
        if mu == 0.0:
            return [0.0] * self.n
        diags = [torch.diagonal(x) for x in g]
        out = []
        for k in range(self.n):
            d = torch.ones_like(diags[0])
            for j in range(self.n):
                if j != k:
                    d = d * diags[j]
            out.append(mu * factors[k] * d)
        return out


class _GramOperator:
    """``(J^T J + H_pen + lam I) X`` and its block-Jacobi preconditioner at one point.

    ``H_pen`` is the Gauss-Newton matrix of the penalty ``mu/2 sum_r ||term_r||^2`` (itself a
    least-squares term whose Jacobian has the CP structure with the cross-term products
    removed): ``J^T J`` with every ``Gamma_ab`` replaced by ``mu Diag(diag(Gamma_ab))``, so it
    folds into a modified ``Gamma``.

    Vectors are packed either row-stacked, shape ``(sum_k I_k, R)``, or, when the modes are
    small (``batched``), zero-padded to ``(N, max_k I_k, R)`` so that every product is one
    batched call; padded rows stay exactly zero under ``apply`` and ``precondition``.

    Everything here is float64; :meth:`lowered` gives a scaled single-precision copy for PCG.
    """

    def __init__(
        self,
        factors: list[torch.Tensor],
        g: list[torch.Tensor],
        mu: float,
        lam: float,
        batched: bool | None = None,
    ):
        n = len(factors)
        rank = factors[0].shape[1]
        self.sizes = [f.shape[0] for f in factors]
        self.n = n
        self.lam = lam
        imax = max(self.sizes)
        if batched is None:
            extra = n * imax - sum(self.sizes)
            batched = extra * rank * rank <= 300_000
        self.batched = batched
        like = factors[0]
        eye = torch.eye(rank, dtype=like.dtype)
        gam_off, gam_diag = _gamma_blocks(g, mu, rank, like)
        mats = gam_diag + lam * eye  # the diagonal blocks of the damped operator
        chol, info = torch.linalg.cholesky_ex(mats)
        j = 0
        while bool((info != 0).any()) and j < 8:  # tiny shift only: pad the diagonal
            bump = (10.0**j) * 1e-12 * float(torch.diagonal(mats, dim1=-2, dim2=-1).abs().max() + 1e-300)
            chol, info = torch.linalg.cholesky_ex(mats + bump * eye)
            j += 1
        self.gam_off = gam_off
        self.gam_diag = gam_diag  # undamped diagonal blocks
        self.mats = mats  # damped diagonal blocks, Gamma_aa + lam I
        self.pinv = torch.cholesky_inverse(chol)  # (N, R, R): one GEMM per application
        self.factors = factors
        self.a = self.pack(factors) if batched else None

    # packing ------------------------------------------------------------------------------
    def pack(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.batched:
            return torch.cat(list(xs))
        imax = max(self.sizes)
        out = torch.zeros((self.n, imax, xs[0].shape[1]), dtype=xs[0].dtype)
        for k, x in enumerate(xs):
            out[k, : x.shape[0]] = x
        return out

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.batched:
            return list(torch.split(x, self.sizes))
        return [x[k, :s] for k, s in enumerate(self.sizes)]

    # products -----------------------------------------------------------------------------
    def _products(self, x, factors, a, gam_off, diag) -> torch.Tensor:
        """``X_a diag_a + A_a sum_{b != a} (X_b^T A_b) * Gamma_ab`` for every mode ``a``."""
        n = self.n
        if self.batched:
            z = torch.bmm(x.transpose(1, 2), a)  # X_m^T A_m, (N, R, R)
            # s_a = sum_b Gamma_ab * z_b in one op (Gamma_aa is zero): the per-pair loop of _cross
            # was 22% of a small kernel's fit (32x32x3x3, R=32: 12 addcmuls per CG iteration)
            s = (gam_off * z.unsqueeze(0)).sum(dim=1)
            return torch.baddbmm(torch.bmm(x, diag), a, s)
        xs = torch.split(x, self.sizes)
        z = [xs[k].T @ factors[k] for k in range(n)]  # X_m^T A_m
        s = _cross(z, gam_off, n)
        y = torch.empty_like(x)
        for xa, ya, fa, da, sa in zip(xs, torch.split(y, self.sizes), factors, diag, s):
            torch.mm(xa, da, out=ya)
            ya.addmm_(fa, sa)
        return y

    def _precondition(self, r, pinv) -> torch.Tensor:
        if self.batched:
            return torch.bmm(r, pinv)
        out = torch.empty_like(r)
        for ra, oa, p in zip(torch.split(r, self.sizes), torch.split(out, self.sizes), pinv):
            torch.mm(ra, p, out=oa)
        return out

    def apply(self, x: torch.Tensor, damped: bool = True) -> torch.Tensor:
        """``(J^T J + H_pen + lam I) x``, or without ``lam I`` if not ``damped`` (float64)."""
        diag = self.mats if damped else self.gam_diag
        return self._products(x, self.factors, self.a, self.gam_off, diag)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        return self._precondition(r, self.pinv)

    def lowered(self, dtype: torch.dtype) -> "_LoweredOperator":
        """The damped operator divided by ``scale`` (its largest diagonal entry), in ``dtype``.

        The blocks scale like ``||A||^(2N-2)``: without the division a tensor with entries of
        order 1e10 (or 1e-10) would overflow (underflow) float32.
        """
        scale = float(torch.diagonal(self.mats, dim1=-2, dim2=-1).max())
        if not (math.isfinite(scale) and scale > 0.0):
            scale = 1.0
        return _LoweredOperator(self, dtype, scale)


class _LoweredOperator:
    """``(J^T J + H_pen + lam I) / scale`` and ``scale * preconditioner`` in a lower precision.

    The factors are stored divided by ``c``, their largest column norm, and the off-diagonal
    blocks multiplied by ``c^2 / scale``, which leaves the product unchanged and every stored
    number O(1) for balanced factors.
    """

    def __init__(self, op: _GramOperator, dtype: torch.dtype, scale: float):
        self.op = op
        self.scale = scale
        c2 = max(float((f * f).sum(dim=0).max()) for f in op.factors)
        if not (math.isfinite(c2) and c2 > 0.0):
            c2 = 1.0
        c = math.sqrt(c2)
        self.factors = [(f / c).to(dtype) for f in op.factors]
        self.a = op.pack(self.factors) if op.batched else None
        self.gam_off = (op.gam_off * (c2 / scale)).to(dtype)
        self.mats = (op.mats / scale).to(dtype)
        self.pinv = (op.pinv * scale).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.op._products(x, self.factors, self.a, self.gam_off, self.mats)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        return self.op._precondition(r, self.pinv)


# Below this many entries of the (N, N, N, R, R) stack the Gamma blocks are formed in two batched ops
# rather than N(N+1)/2 Python-level Hadamard products (32x32x3x3 at R=32: 0.43 -> 0.2 ms per step)
_BATCHED_GAMMA_ENTRIES = 2_000_000


def _gamma_blocks(g: list[torch.Tensor], mu: float, rank: int, like: torch.Tensor):
    """``Gamma_ab = *_{k != a, b} G_k`` (plus ``mu diag`` on the diagonal of each): the off-diagonal
    blocks ``(N, N, R, R)`` with zero ``(a, a)`` blocks, and the diagonal ones ``(N, R, R)``."""
    n = len(g)
    if n ** 3 * rank * rank <= _BATCHED_GAMMA_ENTRIES:
        stack = torch.stack(list(g))  # (N, R, R)
        k = torch.arange(n)
        keep = (k[None, None, :] != k[:, None, None]) & (k[None, None, :] != k[None, :, None])  # (a, b, k)
        ones = torch.ones((), dtype=like.dtype)
        full = torch.where(keep[..., None, None], stack, ones).prod(dim=2)  # (N, N, R, R)
        if mu > 0.0:
            full = full + mu * torch.diag_embed(torch.diagonal(full, dim1=-2, dim2=-1))
        gam_diag = torch.diagonal(full, dim1=0, dim2=1).permute(2, 0, 1).clone()
        full[k, k] = 0.0
        return full, gam_diag
    gam_off = torch.zeros((n, n, rank, rank), dtype=like.dtype)
    gam_diag = torch.empty((n, rank, rank), dtype=like.dtype)
    for a in range(n):
        for b in range(a, n):
            h = hadamard([g[k] for k in range(n) if k != a and k != b], rank, like)
            if mu > 0.0:
                h = h + mu * torch.diag(torch.diagonal(h))
            if a == b:
                gam_diag[a] = h
            else:
                gam_off[a, b] = h
                gam_off[b, a] = h
    return gam_off, gam_diag


def _cross(z, gam_off: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``s_a = sum_{b != a} Gamma_ab * z_b`` (element-wise), one fused op per pair."""
    out = []
    for a in range(n):
        acc = None
        for b in range(n):
            if b != a:
                acc = gam_off[a, b] * z[b] if acc is None else acc.addcmul_(gam_off[a, b], z[b])
        out.append(acc if acc is not None else torch.zeros_like(z[0]))
    return out


def _vdot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1), y.reshape(-1)))


def _pcg(op, b: torch.Tensor, max_iter: int, rtol: float):
    """Preconditioned CG for ``op.apply(x) = b`` from ``x = 0``, in ``b``'s dtype.

    Returns (x, iterations).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    z = op.precondition(r)
    d = z.clone()
    rz = _vdot(r, z)
    bnorm = math.sqrt(_vdot(b, b))
    if bnorm == 0.0:
        return x, 0
    it = 0
    for it in range(1, max_iter + 1):
        q = op.apply(d)
        dq = _vdot(d, q)
        if dq <= 0 or not math.isfinite(dq):
            it -= 1
            break
        alpha = rz / dq
        x.add_(d, alpha=alpha)
        r.add_(q, alpha=-alpha)
        if math.sqrt(_vdot(r, r)) <= rtol * bnorm:
            break
        z = op.precondition(r)
        rz_new = _vdot(r, z)
        beta = rz_new / rz
        rz = rz_new
        d = z.add_(d, alpha=beta)
    return x, it


def _solve(op: _GramOperator, b: torch.Tensor, max_iter: int, rtol: float, dtype: torch.dtype):
    """PCG for ``op.apply(x) = b`` (float64 ``b`` and result) with the iterations in ``dtype``.

    In lower precision the system is rescaled to ``(H / s) x' = b / max|b|`` so that the
    working numbers are O(1) whatever the scale of the tensor; the relative residual test is
    unchanged. Returns (x, iterations).
    """
    if dtype == b.dtype:
        return _pcg(op, b, max_iter, rtol)
    bmax = float(b.abs().max())
    if not (bmax > 0.0 and math.isfinite(bmax)):
        return torch.zeros_like(b), 0
    low = op.lowered(dtype)
    x, it = _pcg(low, (b / bmax).to(dtype), max_iter, rtol)
    return x.to(b.dtype).mul_(bmax / low.scale), it


@dataclass
class _StepRule:
    """How one Levenberg-Marquardt step is computed and when a run stops (see :func:`cp_nls`)."""

    cg_max_iter: int = 10
    cg_tol: float = 1e-2
    cg_dtype: torch.dtype = torch.float32
    tol: float = 1e-8
    tol_step: float = 1e-10
    tol_grad: float = 1e-13
    deadline: float | None = None


class _LMRun:
    """Levenberg-Marquardt on ``f = f_fit + mu/2 sum_r ||term_r||^2`` from one point.

    ``mu`` may be changed between steps (:meth:`set_mu`): the gain ratio of a step compares ``f``
    at one ``mu``, so a schedule that moves ``mu`` after each accepted step is still a descent
    method on the current objective. Used by :func:`cp_nls` (its phases) and by the
    error-preserving correction (:mod:`cp_epc`).
    """

    def __init__(self, prob: _Problem, factors: list[torch.Tensor], mu: float, rule: _StepRule,
                 lam: float | None = None, damping_start: float = 1e-3):
        self.prob = prob
        self.rule = rule
        self.mu = float(mu)
        self.ev = prob.evaluate(factors, self.mu)
        self.grad = prob.gradient(self.ev, self.mu)
        self.gnorm = math.sqrt(_dot(self.grad, self.grad))
        if lam is None:
            rank, n, g = prob.rank, prob.n, self.ev["grams"]
            diag_max = max(
                float(torch.diagonal(hadamard([g[j] for j in range(n) if j != k], rank, prob.t)).max())
                for k in range(n)
            )
            lam = damping_start * max(diag_max, 1e-300)
        self.lam = lam
        self.nu = 2.0
        self.iterations = 0
        self.accepted = 0
        self.cg_total = 0
        self.history = [self.ev["f_fit"]]

    @property
    def rel_error(self) -> float:
        """``||W - [[A]]|| / ||W||`` at the current point (from the tracked fit objective)."""
        return math.sqrt(2.0 * self.ev["f_fit"] / self.prob.norm_sq)

    @property
    def degeneracy(self) -> float:
        return self.ev["sq"] / self.prob.norm_sq

    def set_mu(self, mu: float) -> None:
        self.mu = float(mu)
        self.ev["f"] = self.ev["f_fit"] + 0.5 * self.mu * self.ev["sq"]
        self.grad = self.prob.gradient(self.ev, self.mu)
        self.gnorm = math.sqrt(_dot(self.grad, self.grad))

    def converged_by_gradient(self) -> bool:
        return self.gnorm <= self.rule.tol_grad * self.prob.norm_sq

    def step(self) -> tuple[bool, float, float, bool]:
        """One LM iteration. Returns ``(accepted, decrease, f_before, step_is_tiny)``.

        On acceptance the previous point is kept in :attr:`previous` (so a caller may go back).
        """
        rule, ev = self.rule, self.ev
        self.iterations += 1
        op = _GramOperator(ev["factors"], ev["grams"], self.mu, self.lam)
        gp = op.pack(self.grad)
        step, cg_it = _solve(op, -gp, int(rule.cg_max_iter), float(rule.cg_tol), rule.cg_dtype)
        self.cg_total += cg_it
        hp = op.apply(step, damped=False)
        pred = -_vdot(gp, step) - 0.5 * _vdot(step, hp)
        xnorm = math.sqrt(sum(float((f * f).sum()) for f in ev["factors"]))
        pnorm = math.sqrt(_vdot(step, step))
        trial = balance_columns([f + p for f, p in zip(ev["factors"], op.unpack(step))])
        ev_new = self.prob.evaluate(trial, self.mu)
        actual = ev["f"] - ev_new["f"]
        rho = actual / pred if pred > 0 else -1.0
        f_before = ev["f"]
        accepted = rho > 0 and math.isfinite(ev_new["f"])
        if accepted:
            self.previous = (self.ev, self.grad, self.gnorm)
            self.accepted += 1
            self.ev = ev_new
            self.lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            self.nu = 2.0
            self.grad = self.prob.gradient(ev_new, self.mu)
            self.gnorm = math.sqrt(_dot(self.grad, self.grad))
            self.history.append(ev_new["f_fit"])
        else:
            self.lam *= self.nu
            self.nu *= 2.0
        tiny = pnorm <= rule.tol_step * xnorm or not math.isfinite(self.lam)
        return accepted, actual, f_before, tiny

    def go_back(self) -> None:
        """Return to the point before the last accepted step."""
        self.ev, self.grad, self.gnorm = self.previous
        self.history.pop()

    def out_of_time(self) -> bool:
        return self.rule.deadline is not None and time.perf_counter() >= self.rule.deadline


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
    rule = _StepRule(int(cg_max_iter), float(cg_tol), CG_PRECISIONS[cg_precision], float(tol),
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

    prob = _Problem(t, rank)
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

    run = _LMRun(prob, factors, weight, rule, damping_start=damping_start)
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


def _raise_to_cap(run: _LMRun, limit: int, tol: float, cap: float) -> int:
    """Raise the penalty ×:data:`_RAISE_STEP` (at most :data:`_RAISES` times), descending from the point
    reached at each, until the degeneracy is within ``cap``; returns how many raises it took (the
    polish then lowers the penalty from there, holding the cap)."""
    for k in range(1, _RAISES + 1):
        if run.iterations >= limit or run.degeneracy <= cap:
            return k - 1
        run.set_mu(run.mu * _RAISE_STEP)
        _descend(run, limit, tol)
    return _RAISES


def _hold_cap(run: _LMRun, limit: int, tol: float, cap: float, *, low: float, high: float) -> str:
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


def _descend(run: _LMRun, limit: int, tol: float, *, cap: float = math.inf, schedule=None) -> str:
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
