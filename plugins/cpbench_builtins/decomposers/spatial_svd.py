"""``spatial-svd``: Jaderberg et al. 2014 scheme 2 — a kh×1 conv S→R then a 1×kw conv R→T.

The kernel of each group is reshaped to the matrix M[(s,i),(t,j)] of shape (S·kh, T·kw) and
truncated by SVD (optimal in Frobenius norm for this structure). Exact at R = min(S·kh, T·kw).
Options: group_mode ["per-group"].
"""
from __future__ import annotations

import time

import torch

from cpbench import hookimpl
from cpbench.decomposition.decomposer import build_geometry, check_rank, check_weight, group_kernels, rel_error
from cpbench.errors import UsageError
from cpbench.decomposition.factorization import Factorization
from cpbench.nn.layers import SpatialSVDBlock, svd_kernel


class SpatialSVD:
    name = "spatial-svd"
    description = "Jaderberg et al. 2014: kh×1 then 1×kw conv, by SVD"
    version = "1"
    exact_at_full_rank = True

    def max_rank(self, weight_shape, groups=1, group_mode="per-group"):
        t, sg, kh, kw = weight_shape
        if group_mode == "block-diagonal":
            return min(sg * groups * kh, t * kw)
        return min(sg * kh, t // groups * kw)

    def decompose(self, weight, rank, *, seed=0, groups=1, group_mode="per-group", **unknown) -> Factorization:
        if unknown:
            raise UsageError(f"spatial-svd got unknown options {sorted(unknown)}; allowed: groups, group_mode")
        weight = check_weight(weight)
        rank = check_rank(rank, self.max_rank(tuple(weight.shape), groups, group_mode))
        kernels = group_kernels(weight, groups, group_mode).double()
        G, tg, sg, kh, kw = kernels.shape
        start = time.perf_counter()
        # M[g, (s,i), (t,j)]
        m = kernels.permute(0, 2, 3, 1, 4).reshape(G, sg * kh, tg * kw)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        root = s[:, :rank].sqrt()
        v = (u[:, :, :rank] * root[:, None, :]).permute(0, 2, 1).reshape(G, rank, sg, kh)
        h = (vh[:, :rank, :] * root[:, :, None]).reshape(G, rank, tg, kw).permute(0, 2, 1, 3)
        f = {"v": v.to(weight.dtype).contiguous(), "h": h.to(weight.dtype).contiguous()}
        err = rel_error(kernels, svd_kernel(v, h))
        info = {"rank": rank, "groups": groups, "group_mode": group_mode,
                "seconds": time.perf_counter() - start, "iterations": 1, "converged": True,
                "singular_values_kept": float((s[:, :rank] ** 2).sum() / (s ** 2).sum())}
        return Factorization(f, err, info)

    def random_factorization(self, weight_shape, rank, *, seed=0, groups=1, group_mode="per-group", **_):
        """Factors in the layout of :meth:`decompose` with random values: a block to time, not to use."""
        t, sg, kh, kw = weight_shape
        G = groups if group_mode == "per-group" else 1
        tg, s = (t // groups, sg) if group_mode == "per-group" else (t, sg * groups)
        g = torch.Generator().manual_seed(seed)
        f = {"v": torch.randn(G, rank, s, kh, generator=g), "h": torch.randn(G, tg, rank, kw, generator=g)}
        return Factorization(f, float("nan"), {"rank": rank, "groups": groups, "group_mode": group_mode, "random": True})

    def build(self, conv, factorization):
        geo = build_geometry(conv, factorization)
        f = factorization.factors
        return SpatialSVDBlock(geo, f["v"], f["h"], bias=conv.bias)

    def params(self, geo, rank):
        G = geo.groups
        return (G * rank * (geo.in_channels // G * geo.kh + geo.out_channels // G * geo.kw)
                + (geo.out_channels if geo.bias else 0))

    def macs(self, geo, rank, in_hw):
        from cpbench.nn.flops import conv_out_hw

        ho, wo = conv_out_hw(geo, in_hw)
        G = geo.groups
        return ho * in_hw[1] * G * rank * (geo.in_channels // G) * geo.kh + ho * wo * geo.out_channels * rank * geo.kw


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(SpatialSVD())
