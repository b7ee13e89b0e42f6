"""``tucker2``: Tucker-2 on the output and input channel modes (TensorLy's partial Tucker, HOOI).

rank: an int r (both ranks r) or a pair (r_out, r_in); ``"vbmf"`` ranks are resolved by the harness
(:mod:`cpbench.decomposition.ranks`). Options: n_iter_max [100], tol [1e-6], init ["svd"], group_mode ["per-group"].
Exact when r_out = T/G and r_in = S/G.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from cpbench import hookimpl
from cpbench.decomposition.decomposer import build_geometry, check_rank, check_weight, group_kernels, rel_error
from cpbench.errors import RankError, UsageError
from cpbench.decomposition.factorization import Factorization
from cpbench.nn.layers import Tucker2Block, tucker2_kernel


def _pair(rank):
    if isinstance(rank, (list, tuple)) and len(rank) == 2:
        return rank[0], rank[1]
    if isinstance(rank, int) and not isinstance(rank, bool):
        return rank, rank
    raise RankError(f"tucker2 rank must be an integer or a pair [r_out, r_in], got {rank!r}")


class Tucker2:
    name = "tucker2"
    rank_kind = "pair"  # a rank is [r_out, r_in]; also what the "vbmf" rank spec gives
    description = "Tucker-2 on the channel modes; rank [r_out, r_in]"
    version = "1"
    exact_at_full_rank = True

    def max_rank(self, weight_shape, groups=1, group_mode="per-group"):
        t, sg = weight_shape[0], weight_shape[1]
        return (t // groups, sg) if group_mode == "per-group" else (t, sg * groups)

    def decompose(self, weight, rank, *, seed=0, groups=1, group_mode="per-group", n_iter_max=100,
                  tol=1e-6, init="svd", **unknown) -> Factorization:
        if unknown:
            raise UsageError(f"tucker2 got unknown options {sorted(unknown)}; allowed: n_iter_max, tol, init, groups, group_mode")
        weight = check_weight(weight)
        mo, mi = self.max_rank(tuple(weight.shape), groups, group_mode)
        ro, ri = _pair(rank)
        ro = check_rank(ro, mo, what="tucker2 output rank")
        ri = check_rank(ri, mi, what="tucker2 input rank")
        from tensorly.decomposition import partial_tucker
        import tensorly as tl

        kernels = group_kernels(weight, groups, group_mode)
        start = time.perf_counter()
        outs, ins, cores = [], [], []
        for g in range(kernels.shape[0]):
            x = kernels[g].double().numpy()
            with warnings.catch_warnings(), tl.backend_context("numpy"):
                warnings.simplefilter("ignore")
                (core, (u_out, u_in)), _ = partial_tucker(
                    x, rank=[ro, ri], modes=[0, 1], n_iter_max=n_iter_max, tol=tol, init=init,
                    random_state=seed + g)
            outs.append(torch.from_numpy(np.array(u_out)))
            ins.append(torch.from_numpy(np.array(u_in)))
            cores.append(torch.from_numpy(np.array(core)))
        f = {"out": torch.stack(outs).to(weight.dtype), "in": torch.stack(ins).to(weight.dtype),
             "core": torch.stack(cores).to(weight.dtype)}
        err = rel_error(kernels, tucker2_kernel(f["out"].double(), f["in"].double(), f["core"].double()))
        info = {"rank": [ro, ri], "groups": groups, "group_mode": group_mode,
                "seconds": time.perf_counter() - start, "iterations": n_iter_max, "converged": True}
        return Factorization(f, err, info)

    def random_factorization(self, weight_shape, rank, *, seed=0, groups=1, group_mode="per-group", **_):
        """Factors in the layout of :meth:`decompose` with random values: a block to time, not to use."""
        t, sg, kh, kw = weight_shape
        G = groups if group_mode == "per-group" else 1
        tg, s = (t // groups, sg) if group_mode == "per-group" else (t, sg * groups)
        ro, ri = _pair(rank)
        g = torch.Generator().manual_seed(seed)
        f = {"out": torch.randn(G, tg, ro, generator=g), "in": torch.randn(G, s, ri, generator=g),
             "core": torch.randn(G, ro, ri, kh, kw, generator=g)}
        return Factorization(f, float("nan"), {"rank": [ro, ri], "groups": groups, "group_mode": group_mode,
                                               "random": True})

    def build(self, conv, factorization):
        geo = build_geometry(conv, factorization)
        f = factorization.factors
        return Tucker2Block(geo, f["out"], f["in"], f["core"], bias=conv.bias)

    def params(self, geo, rank):
        ro, ri = _pair(rank)
        G = geo.groups
        return (G * (geo.in_channels // G * ri + ro * ri * geo.kh * geo.kw + geo.out_channels // G * ro)
                + (geo.out_channels if geo.bias else 0))

    def macs(self, geo, rank, in_hw):
        from cpbench.nn.flops import conv_out_hw

        ro, ri = _pair(rank)
        G = geo.groups
        ho, wo = conv_out_hw(geo, in_hw)
        return (in_hw[0] * in_hw[1] * G * ri * (geo.in_channels // G)
                + ho * wo * G * ro * ri * geo.kh * geo.kw + ho * wo * geo.out_channels * ro)


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(Tucker2())
