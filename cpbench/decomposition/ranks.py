"""Rank selection: turn a rank spec from a matrix into an integer (or a Tucker-2 pair).

Specs: ``64`` (an int), ``[32, 16]`` (a Tucker-2 pair), ``"speedup:4"`` (largest rank whose
theoretical layer speedup is at least 4), ``"params:0.25"`` (largest rank keeping at most 25% of the
layer's parameters), ``"error:0.2"`` (smallest rank whose relative error is at most 0.2; found by
bisection, decomposing), ``"vbmf"`` (Tucker-2: empirical variational Bayesian matrix factorization of
the two channel unfoldings, Kim et al. 2016). Pure functions; the decomposer is passed in.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import RankError
from ..nn.flops import conv_macs
from ..nn.layers import ConvGeometry

__all__ = ["RankSpec", "parse_rank", "resolve_rank", "vbmf_rank", "evbmf"]

SPEC_KINDS = ("speedup", "params", "error")


@dataclass(frozen=True)
class RankSpec:
    kind: str  # "fixed", "speedup", "params", "error", "vbmf"
    value: Any

    def __str__(self) -> str:
        return str(self.value) if self.kind == "fixed" else (
            "vbmf" if self.kind == "vbmf" else f"{self.kind}:{self.value:g}")


def parse_rank(spec: Any) -> RankSpec:
    """Parse a rank spec; one-line :class:`RankError` naming what is allowed."""
    allowed = 'an integer ≥ 1, a pair [r_out, r_in], "speedup:X" (X > 1), "params:F" (0 < F ≤ 1), "error:E" (0 < E < 1) or "vbmf"'
    if isinstance(spec, RankSpec):
        return spec
    if isinstance(spec, bool):
        raise RankError(f"rank {spec!r} is not allowed; allowed: {allowed}")
    if isinstance(spec, int):
        if spec < 1:
            raise RankError(f"rank {spec} is out of range; allowed: {allowed}")
        return RankSpec("fixed", spec)
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in spec):
        return RankSpec("fixed", (int(spec[0]), int(spec[1])))
    if isinstance(spec, str):
        if spec == "vbmf":
            return RankSpec("vbmf", None)
        kind, _, value = spec.partition(":")
        if kind in SPEC_KINDS:
            try:
                v = float(value)
            except ValueError:
                raise RankError(f"rank {spec!r}: {value!r} is not a number; allowed: {allowed}") from None
            ok = {"speedup": v > 1, "params": 0 < v <= 1, "error": 0 < v < 1}[kind]
            if ok:
                return RankSpec(kind, v)
    raise RankError(f"rank {spec!r} is not allowed; allowed: {allowed}")


def _candidates(decomposer, weight_shape, groups, options) -> list:
    if hasattr(decomposer, "rank_candidates"):
        return list(decomposer.rank_candidates(weight_shape, groups))
    mr = max_rank_for(decomposer, weight_shape, groups, options) if hasattr(decomposer, "max_rank") else None
    if isinstance(mr, tuple):  # a pair of ranks: scale both together
        n = max(mr)
        return sorted({(max(1, round(mr[0] * i / n)), max(1, round(mr[1] * i / n))) for i in range(1, n + 1)})
    if mr is None:
        raise RankError(f"decomposer {decomposer.name!r} has no max_rank; give an integer rank")
    return list(range(1, mr + 1))


def max_rank_for(decomposer, weight_shape, groups, options) -> Any:
    """``decomposer.max_rank(weight_shape, groups, **opts)`` with the cell's options that max_rank names
    (e.g. ``group_mode``, ``form``)."""
    import inspect

    params = inspect.signature(decomposer.max_rank).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in (options or {}).items()
          if k not in ("weight_shape", "groups") and (var_kw or k in params)}
    return decomposer.max_rank(tuple(weight_shape), groups, **kw)


def _largest(cands: list, ok: Callable[[Any], bool]) -> Any:
    """Largest candidate with ok(c), assuming ok is monotone (true up to a point)."""
    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(cands[mid]):
            best, lo = cands[mid], mid + 1
        else:
            hi = mid - 1
    return best


def resolve_rank(
    spec: Any,
    decomposer: Any,
    weight: torch.Tensor,
    geo: ConvGeometry,
    in_hw: tuple[int, int] | None,
    *,
    decompose: Callable[[Any], Any] | None = None,
    options: dict | None = None,
    layer: str = "?",
) -> tuple[Any, Any]:
    """Resolve ``spec`` for one layer → ``(rank, factorization or None)``.

    ``decompose(rank) -> Factorization`` is used by "error:" specs; the factorization found is
    returned so it need not be computed again.
    """
    options = options or {}
    rs = parse_rank(spec)
    shape = tuple(weight.shape)
    if rs.kind == "fixed":
        return rs.value, None
    if rs.kind == "vbmf":
        if getattr(decomposer, "rank_kind", "int") != "pair":  # a declared capability (contracts.Decomposer)
            raise RankError(f'rank "vbmf" gives a rank pair [r_out, r_in]: it is for decomposers whose rank is a '
                            f'pair (rank_kind = "pair"), not {decomposer.name!r} (layer {layer!r})')
        return vbmf_rank(weight, geo.groups), None
    cands = _candidates(decomposer, shape, geo.groups, options)
    form = options.get("form")
    if rs.kind == "speedup":
        if in_hw is None:
            raise RankError(f"rank {rs} needs the layer's input size (layer {layer!r})")
        if not hasattr(decomposer, "macs"):
            raise RankError(f"decomposer {decomposer.name!r} has no cost model; give an integer rank")
        base = conv_macs(geo, in_hw)
        kw = {"form": form} if form else {}
        r = _largest(cands, lambda c: base / decomposer.macs(geo, c, in_hw, **kw) >= rs.value)
    elif rs.kind == "params":
        if not hasattr(decomposer, "params"):
            raise RankError(f"decomposer {decomposer.name!r} has no parameter count; give an integer rank")
        base = weight.numel() + (geo.out_channels if geo.bias else 0)
        kw = {"form": form} if form else {}
        r = _largest(cands, lambda c: decomposer.params(geo, c, **kw) <= rs.value * base)
    else:  # error: smallest rank meeting the budget
        if decompose is None:
            raise RankError(f"rank {rs} needs a decomposer run (layer {layer!r})")
        found: dict[Any, Any] = {}

        def too_big_error(c):
            found[c] = found.get(c) or decompose(c)
            return found[c].rel_error > rs.value

        lo, hi = 0, len(cands) - 1
        if too_big_error(cands[hi]):  # no rank meets the budget: the best one, flagged
            found[cands[hi]].info["rank_spec_unmet"] = f"no rank reaches {rs}; took the largest"
            return cands[hi], found[cands[hi]]
        while lo < hi:
            mid = (lo + hi) // 2
            if too_big_error(cands[mid]):
                lo = mid + 1
            else:
                hi = mid
        return cands[lo], found.get(cands[lo]) or decompose(cands[lo])
    if r is None:
        raise RankError(f"no rank of {decomposer.name!r} reaches {rs} on layer {layer!r}")
    return r, None


# -- VBMF (Nakajima, Sugiyama, Babacan, Tomioka 2013: analytic empirical VB matrix factorization) ---
def _tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_sigma2(sigma2, L, M, s, residual, xubar):
    H = len(s)
    alpha = L / M
    x = s ** 2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    return (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
            + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (M * sigma2) + (L - H) * np.log(sigma2))


def evbmf(y: np.ndarray) -> int:
    """Rank the empirical VBMF solution keeps for matrix ``y`` (noise variance estimated)."""
    from scipy.optimize import minimize_scalar

    L, M = y.shape
    if L > M:
        y = y.T
        L, M = M, L
    s = np.linalg.svd(y, compute_uv=False)
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    residual = max(float(np.sum(y ** 2) - np.sum(s ** 2)), 0.0)
    upper = (np.sum(s ** 2) + residual) / (L * M)
    tail = s[eh_ub + 1:] if eh_ub + 1 < len(s) else s[-1:]
    lower = max(tail[0] ** 2 / (M * xubar), np.mean(tail ** 2) / M)
    lower = max(lower, 1e-300)
    if lower >= upper:
        return len(s)
    res = minimize_scalar(_evb_sigma2, args=(L, M, s, residual, xubar), bounds=[lower, upper], method="bounded")
    threshold = math.sqrt(M * res.x * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))


def vbmf_rank(weight: torch.Tensor, groups: int = 1) -> tuple[int, int]:
    """Tucker-2 ranks (r_out, r_in) from VBMF on the output- and input-mode unfoldings (per group: max)."""
    t = weight.shape[0]
    w = weight.detach().double().reshape(groups, t // groups, *weight.shape[1:]).numpy()
    ro = ri = 1
    for g in range(groups):
        k = w[g]
        ro = max(ro, evbmf(k.reshape(k.shape[0], -1)))
        ri = max(ri, evbmf(np.moveaxis(k, 1, 0).reshape(k.shape[1], -1)))
    return (min(ro, t // groups), min(ri, weight.shape[1]))
