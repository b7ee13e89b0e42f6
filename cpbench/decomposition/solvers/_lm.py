"""The Levenberg-Marquardt machinery of :func:`~.cp_nls.cp_nls` and :func:`~.cp_epc.cp_epc`: the objective
and its gradient (:class:`Problem`), the Gauss-Newton operator ``J^T J + H_pen + lambda I`` and its
block-Jacobi preconditioner (:class:`GramOperator`), PCG in single or double precision (:func:`solve`), and
one damped run from a point (:class:`LMRun`). The phases built on it (conditioning, polish, the degeneracy
cap, restarts) are in :mod:`.cp_nls`; the formulas are in its module docstring.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ._cp_common import (
    balance_columns,
    grams,
    hadamard,
    khatri_rao,
    tree_split,
)

__all__ = ["Problem", "GramOperator", "LoweredOperator", "StepRule", "LMRun", "partial_mttkrps", "pcg", "solve",
           "gamma_blocks", "cross_products"]

# relative fit (f_fit / ||W||^2) below which f and g are computed from the explicit residual
# instead of the Gram-matrix expansion, whose cancellation error is ~1e-16 ||W||^2
_EXACT_RESIDUAL_BELOW = 1e-6


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(xs, ys)))


def partial_mttkrps(p: torch.Tensor, mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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
    return partial_mttkrps(left, mats[:h]) + partial_mttkrps(right, mats[h:])


class Problem:
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
        ``mu`` after every accepted step (:meth:`LMRun.set_mu`) then costs no second MTTKRP (it had
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
        mk = partial_mttkrps(pl.reshape(self.shape[:m] + (rank,)), factors[:m])
        mk += partial_mttkrps(pr.reshape(self.shape[m:] + (rank,)), factors[m:])
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


class GramOperator:
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
        gam_off, gam_diag = gamma_blocks(g, mu, rank, like)
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
            # s_a = sum_b Gamma_ab * z_b in one op (Gamma_aa is zero): the per-pair loop of cross_products
            # was 22% of a small kernel's fit (32x32x3x3, R=32: 12 addcmuls per CG iteration)
            s = (gam_off * z.unsqueeze(0)).sum(dim=1)
            return torch.baddbmm(torch.bmm(x, diag), a, s)
        xs = torch.split(x, self.sizes)
        z = [xs[k].T @ factors[k] for k in range(n)]  # X_m^T A_m
        s = cross_products(z, gam_off, n)
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

    def lowered(self, dtype: torch.dtype) -> "LoweredOperator":
        """The damped operator divided by ``scale`` (its largest diagonal entry), in ``dtype``.

        The blocks scale like ``||A||^(2N-2)``: without the division a tensor with entries of
        order 1e10 (or 1e-10) would overflow (underflow) float32.
        """
        scale = float(torch.diagonal(self.mats, dim1=-2, dim2=-1).max())
        if not (math.isfinite(scale) and scale > 0.0):
            scale = 1.0
        return LoweredOperator(self, dtype, scale)


class LoweredOperator:
    """``(J^T J + H_pen + lam I) / scale`` and ``scale * preconditioner`` in a lower precision.

    The factors are stored divided by ``c``, their largest column norm, and the off-diagonal
    blocks multiplied by ``c^2 / scale``, which leaves the product unchanged and every stored
    number O(1) for balanced factors.
    """

    def __init__(self, op: GramOperator, dtype: torch.dtype, scale: float):
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


def gamma_blocks(g: list[torch.Tensor], mu: float, rank: int, like: torch.Tensor):
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


def cross_products(z, gam_off: torch.Tensor, n: int) -> list[torch.Tensor]:
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


def pcg(op, b: torch.Tensor, max_iter: int, rtol: float):
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


def solve(op: GramOperator, b: torch.Tensor, max_iter: int, rtol: float, dtype: torch.dtype):
    """PCG for ``op.apply(x) = b`` (float64 ``b`` and result) with the iterations in ``dtype``.

    In lower precision the system is rescaled to ``(H / s) x' = b / max|b|`` so that the
    working numbers are O(1) whatever the scale of the tensor; the relative residual test is
    unchanged. Returns (x, iterations).
    """
    if dtype == b.dtype:
        return pcg(op, b, max_iter, rtol)
    bmax = float(b.abs().max())
    if not (bmax > 0.0 and math.isfinite(bmax)):
        return torch.zeros_like(b), 0
    low = op.lowered(dtype)
    x, it = pcg(low, (b / bmax).to(dtype), max_iter, rtol)
    return x.to(b.dtype).mul_(bmax / low.scale), it


@dataclass
class StepRule:
    """How one Levenberg-Marquardt step is computed and when a run stops (see :func:`cp_nls`)."""

    cg_max_iter: int = 10
    cg_tol: float = 1e-2
    cg_dtype: torch.dtype = torch.float32
    tol: float = 1e-8
    tol_step: float = 1e-10
    tol_grad: float = 1e-13
    deadline: float | None = None


class LMRun:
    """Levenberg-Marquardt on ``f = f_fit + mu/2 sum_r ||term_r||^2`` from one point.

    ``mu`` may be changed between steps (:meth:`set_mu`): the gain ratio of a step compares ``f``
    at one ``mu``, so a schedule that moves ``mu`` after each accepted step is still a descent
    method on the current objective. Used by :func:`cp_nls` (its phases) and by the
    error-preserving correction (:mod:`cp_epc`).
    """

    def __init__(self, prob: Problem, factors: list[torch.Tensor], mu: float, rule: StepRule,
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
        op = GramOperator(ev["factors"], ev["grams"], self.mu, self.lam)
        gp = op.pack(self.grad)
        step, cg_it = solve(op, -gp, int(rule.cg_max_iter), float(rule.cg_tol), rule.cg_dtype)
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
