"""Shared machinery for decomposers: input checks, groups, and the CP/Tucker/SVD families.

Plugin authors may subclass :class:`CPDecomposer` (implement ``fit``) to get groups, CP3/CP4 forms,
rank checks and the replacement layer for free; or implement the bare contract (see README).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any

import torch
from torch import nn

from ..errors import CpbenchError, RankError, SolverInputError, UsageError, WeightError, with_context
from .factorization import Factorization
from ..nn.layers import (
    CPBlock,
    ConvGeometry,
    block_diagonal,
    cp_kernel,
    geometry,
    split_groups,
)

__all__ = [
    "check_weight",
    "check_rank",
    "rel_error",
    "group_kernels",
    "build_geometry",
    "CPDecomposer",
    "GROUP_MODES",
]

GROUP_MODES = ("per-group", "block-diagonal")


def check_weight(weight: Any, *, layer: str | None = None) -> torch.Tensor:
    """A 4-D finite floating tensor, or a one-line :class:`WeightError`."""
    where = f" of layer {layer!r}" if layer else ""
    if not isinstance(weight, torch.Tensor):
        raise WeightError(f"kernel{where} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise WeightError(
            f"kernel{where} must be 4-D (out_channels, in_channels/groups, kh, kw), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise WeightError(f"kernel{where} must be floating point, got {weight.dtype}")
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise WeightError(f"kernel{where} has {bad} NaN/inf values; decompose only finite weights")
    return weight.detach()


def check_rank(rank: Any, max_rank: int, *, what: str = "rank", layer: str | None = None) -> int:
    where = f" for layer {layer!r}" if layer else ""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise RankError(f"{what}{where} must be an integer, got {rank!r}")
    if rank < 1 or rank > max_rank:
        raise RankError(f"{what} {rank}{where} is out of range; allowed: 1..{max_rank}")
    return rank


def rel_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.double()
    return float(torch.linalg.vector_norm(w - approx.double()) / torch.linalg.vector_norm(w).clamp_min(1e-300))


def group_kernels(weight: torch.Tensor, groups: int, group_mode: str) -> torch.Tensor:
    """(G', T/G', S/G', kh, kw) kernels to decompose: G' = groups (per-group) or 1 (block-diagonal)."""
    if group_mode not in GROUP_MODES:
        raise UsageError(f"group_mode {group_mode!r} is not allowed; allowed: {', '.join(GROUP_MODES)}")
    if groups == 1:
        return weight.unsqueeze(0)
    if group_mode == "block-diagonal":
        return block_diagonal(weight, groups).unsqueeze(0)
    return split_groups(weight, groups)


def build_geometry(conv: nn.Conv2d, factorization: Factorization) -> ConvGeometry:
    """The geometry a replacement block is built with: the conv's own, ungrouped when the
    factorization expanded the groups into one block-diagonal kernel."""
    geo = geometry(conv)
    if factorization.info.get("group_mode") == "block-diagonal" and geo.groups > 1:
        geo = dataclasses.replace(geo, groups=1)
    return geo


def _merge_info(infos: list[dict]) -> dict:
    if len(infos) == 1:
        return dict(infos[0])
    out: dict[str, Any] = {"per_group": infos}
    for key in ("iterations",):
        if all(key in i for i in infos):
            out[key] = max(i[key] for i in infos)
    if all("converged" in i for i in infos):
        out["converged"] = all(i["converged"] for i in infos)
    return out


class CPDecomposer:
    """Base of CP decomposers: subclasses implement :meth:`fit` on one 3- or 4-way tensor.

    Options common to every CP decomposer:

    ``groups`` (int, default 1)
        the conv's groups; set by the harness from the layer.
    ``group_mode`` ("per-group" default, or "block-diagonal")
        per-group decomposes each group's kernel with rank R and builds a grouped block (rank R per
        group, exact structure, G× cheaper); block-diagonal expands the groups into one zero-padded
        kernel as the paper did for AlexNet conv2, and builds an ungrouped block of rank R.
    ``form`` ("cp4" default, or "cp3")
        cp4 fits the 4-way kernel (the paper's four layers); cp3 fits (T, S, kh·kw) and builds one
        kh×kw depthwise middle layer.
    """

    name = "cp"
    version = "1"
    exact_at_full_rank = False

    def fit(self, tensor: torch.Tensor, rank: int, *, seed: int, **options) -> tuple[list[torch.Tensor], dict]:
        raise NotImplementedError

    # -- contract -------------------------------------------------------------------------------
    def max_rank(self, weight_shape, groups: int = 1, group_mode: str = "per-group", form: str = "cp4") -> int:
        t, sg, kh, kw = weight_shape
        dims = [t // groups, sg] if group_mode == "per-group" else [t, sg * groups]
        dims += [kh * kw] if form == "cp3" else [kh, kw]
        return math.prod(dims) // max(dims)  # an exact CP decomposition always exists at this rank

    def decompose(self, weight, rank, *, seed: int = 0, groups: int = 1, group_mode: str = "per-group",
                  form: str = "cp4", **options) -> Factorization:
        weight = check_weight(weight)
        if form not in ("cp4", "cp3"):
            raise UsageError(f"form {form!r} is not allowed; allowed: cp4, cp3")
        if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise UsageError(f"groups {groups!r} must divide out_channels {weight.shape[0]}")
        rank = check_rank(rank, self.max_rank(tuple(weight.shape), groups, group_mode, form))
        kernels = group_kernels(weight, groups, group_mode)
        G, tg, sg, kh, kw = kernels.shape
        start = time.perf_counter()
        outs, ins, hs, ws, hws, infos = [], [], [], [], [], []
        for g in range(G):
            tensor = kernels[g] if form == "cp4" else kernels[g].reshape(tg, sg, kh * kw)
            factors, info = self._fit_checked(tensor, rank, seed + g, options)
            factors = [f.to(weight.dtype) for f in factors]
            outs.append(factors[0])
            ins.append(factors[1])
            if form == "cp4":
                hs.append(factors[2])
                ws.append(factors[3])
            else:
                hws.append(factors[2])
            infos.append(info)
        named = {"out": torch.stack(outs), "in": torch.stack(ins)}
        if form == "cp4":
            named.update(h=torch.stack(hs), w=torch.stack(ws))
            approx = cp_kernel(named["out"], named["in"], named["h"], named["w"])
        else:
            named["hw"] = torch.stack(hws)
            approx = cp_kernel(named["out"], named["in"], hw=named["hw"]).reshape(G, tg, sg, kh, kw)
        err = rel_error(kernels, approx)
        info = _merge_info(infos)
        info.update(rank=rank, groups=groups, group_mode=group_mode, form=form,
                    seconds=time.perf_counter() - start, degeneracy=degeneracy(named, weight))
        return Factorization(named, err, info)

    def random_factorization(self, weight_shape, rank, *, seed: int = 0, **options) -> Factorization:
        """Factors in the layout of :meth:`decompose` (same groups, group_mode, form) with random values:
        a block to time, not to use (a dense kernel's speed does not depend on its values)."""
        layout = {k: v for k, v in options.items() if k in ("groups", "group_mode", "form")}
        return _RandomCP().decompose(torch.zeros(weight_shape), rank, seed=seed, **layout)

    def _fit_checked(self, tensor, rank, seed, options):
        try:  # an option fit() does not take: say which ones it does, before anything runs
            inspect.signature(self.fit).bind(tensor, rank, seed=seed, **options)
        except TypeError as exc:
            raise UsageError(f"{self.name}: {exc}") from None
        try:
            return self.fit(tensor, rank, seed=seed, **options)
        except SolverInputError as exc:  # a UsageError (a RankError for the memory budget): say whose
            raise with_context(exc, self.name) from None
        except ValueError as exc:
            if isinstance(exc, CpbenchError):
                raise
            raise UsageError(f"{self.name}: {exc}") from None

    def build(self, conv: nn.Conv2d, factorization: Factorization) -> nn.Module:
        geo = build_geometry(conv, factorization)
        f = factorization.factors
        bias = conv.bias
        if "hw" in f:
            return CPBlock(geo, f["out"], f["in"], hw=f["hw"], bias=bias)
        return CPBlock(geo, f["out"], f["in"], h=f["h"], w=f["w"], bias=bias)

    # Cost model used by rank selection (multiply-adds for an input of spatial size in_hw).
    def macs(self, geo: ConvGeometry, rank: int, in_hw: tuple[int, int], form: str = "cp4") -> int:
        from ..nn.flops import cp_block_macs

        return cp_block_macs(geo, rank, in_hw, form=form)

    def params(self, geo: ConvGeometry, rank: int, form: str = "cp4") -> int:
        G = geo.groups
        sp = geo.kh * geo.kw if form == "cp3" else geo.kh + geo.kw
        return G * rank * (geo.in_channels // G + geo.out_channels // G + sp) + (geo.out_channels if geo.bias else 0)


def degeneracy(factors: dict[str, torch.Tensor], weight: torch.Tensor) -> float:
    """Σ_r ||rank-1 term r||² / ||W||² over all groups (≤ 1: the terms do not cancel)."""
    norms = None
    for key in ("out", "in", "h", "w", "hw"):
        if key in factors:
            n2 = factors[key].double().pow(2).sum(1)  # (G, R)
            norms = n2 if norms is None else norms * n2
    return float(norms.sum() / weight.double().pow(2).sum().clamp_min(1e-300))


class _RandomCP(CPDecomposer):
    """Random factors for :meth:`CPDecomposer.random_factorization`."""

    name = "random-cp"

    def fit(self, tensor, rank, *, seed, **options):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(d, rank, generator=g, dtype=torch.float64) for d in tensor.shape], {}
