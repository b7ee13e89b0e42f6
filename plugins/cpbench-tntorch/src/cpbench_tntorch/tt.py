"""``tt``: tensor-train decomposition of a conv kernel (TT-SVD by tntorch) and its replacement layer.

The kernel ``W`` of shape ``(T, S, kh, kw)`` (per group: ``(T/G, S/G, kh, kw)``) is put in the order
input channels, space, output channels and decomposed by TT-SVD (``tntorch.Tensor(x, ranks_tt=R)``,
sequential truncated SVDs, quasi-optimal: error ≤ √(d−1) × the best error at those ranks)::

    form "tt3" (default)   X[s, (i,j), t] = W[t, s, i, j]      cores G1 (1,S,r1) G2 (r1,kh·kw,r2) G3 (r2,T,1)
    form "tt4"             X[s, i, j, t]  = W[t, s, i, j]      cores G1 (1,S,r1) G2 (r1,kh,r2) G3 (r2,kw,r3) G4 (r3,T,1)

The replacement (:class:`TTBlock`) is the chain the cores stand for, one conv per core:

    tt3   1×1 conv S→r1;  kh×kw conv r1→r2 (the conv's stride, padding, dilation, padding_mode);
          1×1 conv r2→T with the original bias
    tt4   1×1 conv S→r1;  kh×1 conv r1→r2 (vertical stride/padding/dilation);
          1×kw conv r2→r3 (horizontal ones);  1×1 conv r3→T with the bias

Why this choice: the first core only touches input channels and the last only output channels, so
they are pointwise convs, which commute with every padding mode (and a bias-free pointwise map keeps
zeros zero); all the spatial geometry sits on the middle core(s), so the chain equals a conv with the
reconstructed kernel for every stride/padding/dilation/padding_mode, and equals the original conv at
full TT rank. "tt3" keeps kh×kw together (the TT analogue of Tucker-2, with ranks chosen by
sequential SVD); "tt4" separates the spatial axes like the paper's CP block, cheaper for large
kernels.

Rank: an integer R, the maximal TT rank: each TT rank is ``r_k = min(R, bound_k)`` where
``bound_k = min(prod of the dimensions left of the cut, prod right of it)`` (the largest rank that
cut can have). ``max_rank`` is the largest bound; at that rank the decomposition is exact.
If a group's kernel has lower rank than asked, its cores are zero-padded to ``r_k`` so every group
has the same structure.

Groups: ``groups=G`` (passed by the harness for grouped convs) decomposes each group's kernel
separately with the same ranks and builds grouped convs (``G·r_k`` channels, ``groups=G`` on every
layer); ``group_mode="block-diagonal"`` instead expands the groups into one zero-padded dense kernel
and builds an ungrouped chain. Options: ``form`` ["tt3"], ``groups`` [1], ``group_mode``
["per-group"]. ``seed`` is accepted and unused: TT-SVD is deterministic.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from cpbench.decomposition.decomposer import GROUP_MODES, build_geometry, check_rank, check_weight, group_kernels, rel_error
from cpbench.errors import RankError, UsageError
from cpbench.decomposition.factorization import Factorization
from cpbench.nn.layers import ConvGeometry

__all__ = ["TTDecomposer", "TTBlock", "tt_kernel", "FORMS"]

FORMS = ("tt3", "tt4")


def _mode_dims(tg: int, sg: int, kh: int, kw: int, form: str) -> list[int]:
    return [sg, kh * kw, tg] if form == "tt3" else [sg, kh, kw, tg]


def _bounds(dims: list[int]) -> list[int]:
    """The largest rank each of the d-1 cuts can have: min(prod left, prod right)."""
    return [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))]


def _ranks(rank: int, dims: list[int]) -> list[int]:
    return [min(rank, b) for b in _bounds(dims)]


def _to_tt_order(kernels: torch.Tensor, form: str) -> torch.Tensor:
    """(G, T/G, S/G, kh, kw) → (G, S/G, kh·kw, T/G) or (G, S/G, kh, kw, T/G)."""
    x = kernels.permute(0, 2, 3, 4, 1)
    if form == "tt3":
        g, sg, kh, kw, tg = x.shape
        x = x.reshape(g, sg, kh * kw, tg)
    return x


def tt_kernel(cores: list[torch.Tensor], kh: int, kw: int) -> torch.Tensor:
    """The (G, T/G, S/G, kh, kw) kernels that per-group cores ``(G, r_{k-1}, n_k, r_k)`` stand for."""
    full = cores[0][:, 0]                                     # (G, S, r1)
    for core in cores[1:]:
        full = torch.einsum("g...a,ganb->g...nb", full, core)
    full = full[..., 0]                                       # (G, S, [kh·kw | kh, kw], T)
    g, sg, tg = full.shape[0], full.shape[1], full.shape[-1]
    return full.reshape(g, sg, kh, kw, tg).permute(0, 4, 1, 2, 3)


def _tt_svd(x: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """TT-SVD of one tensor by tntorch, cores zero-padded to exactly ``ranks``."""
    import tntorch

    t = tntorch.Tensor(x.double(), ranks_tt=max(ranks))
    cores = [c.detach().double() for c in t.cores]
    if len(cores) != x.dim() or any(u is not None for u in getattr(t, "Us", [])):
        raise RuntimeError("tntorch returned an unexpected format (expected plain TT cores)")
    full = [1, *ranks, 1]
    out = []
    for k, c in enumerate(cores):
        a, n, b = c.shape
        if a > full[k] or b > full[k + 1]:  # tntorch honoured ranks_tt as a cap; guard anyway
            raise RuntimeError(f"tntorch TT rank {(a, b)} exceeds the requested {(full[k], full[k + 1])}")
        pad = c.new_zeros(full[k], n, full[k + 1])
        pad[:a, :, :b] = c
        out.append(pad)
    return out


def _conv(cin, cout, k, *, groups, bias=False, like: torch.Tensor, **geo) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, groups=groups, bias=bias, dtype=like.dtype, device=like.device, **geo)


class TTBlock(nn.Sequential):
    """The TT replacement chain (see the module docstring): one conv per core, grouped per group.

    ``cores``: the per-group cores ``[(G,1,S/G,r1), (G,r1,n,r2), ..., (G,r,T/G,1)]`` of form "tt3"
    (3 cores, n = kh·kw) or "tt4" (4 cores, n = kh then kw).
    """

    def __init__(self, geo: ConvGeometry, cores: list[torch.Tensor], *, bias: torch.Tensor | None = None):
        G = geo.groups
        first_core, last_core = cores[0], cores[-1]
        sg, r1 = first_core.shape[2], first_core.shape[3]
        rl, tg = last_core.shape[1], last_core.shape[2]
        like = first_core
        first = _conv(geo.in_channels, G * r1, 1, groups=G, like=like)
        first.weight.data.copy_(first_core[:, 0].permute(0, 2, 1).reshape(G * r1, sg, 1, 1))
        layers: list[nn.Module] = [first]
        if len(cores) == 3:
            c = cores[1]                                           # (G, r1, kh·kw, r2)
            r2 = c.shape[3]
            mid = _conv(G * r1, G * r2, (geo.kh, geo.kw), groups=G, like=like, **geo.full())
            mid.weight.data.copy_(c.permute(0, 3, 1, 2).reshape(G * r2, r1, geo.kh, geo.kw))
            layers.append(mid)
            self.form = "tt3"
        elif len(cores) == 4:
            cv, ch = cores[1], cores[2]                            # (G, r1, kh, r2), (G, r2, kw, r3)
            r2, r3 = cv.shape[3], ch.shape[3]
            vert = _conv(G * r1, G * r2, (geo.kh, 1), groups=G, like=like, **geo.vertical())
            vert.weight.data.copy_(cv.permute(0, 3, 1, 2).reshape(G * r2, r1, geo.kh, 1))
            hor = _conv(G * r2, G * r3, (1, geo.kw), groups=G, like=like, **geo.horizontal())
            hor.weight.data.copy_(ch.permute(0, 3, 1, 2).reshape(G * r3, r2, 1, geo.kw))
            layers += [vert, hor]
            self.form = "tt4"
        else:
            raise ValueError(f"TTBlock takes 3 or 4 cores, got {len(cores)}")
        last = _conv(G * rl, geo.out_channels, 1, groups=G, bias=geo.bias, like=like)
        last.weight.data.copy_(last_core[..., 0].permute(0, 2, 1).reshape(G * tg, rl, 1, 1))
        if bias is not None and geo.bias:
            last.bias.data.copy_(bias.detach())
        layers.append(last)
        super().__init__(*layers)
        self.geo = geo
        self.ranks = [c.shape[3] for c in cores[:-1]]


class TTDecomposer:
    """Tensor-train decomposition of a conv kernel (see the module docstring)."""

    name = "tt"
    description = "tensor-train decomposition of a conv kernel (TT-SVD by tntorch)"
    version = "1"
    exact_at_full_rank = True

    def max_rank(self, weight_shape, groups: int = 1, group_mode: str = "per-group", form: str = "tt3") -> int:
        t, sg, kh, kw = weight_shape
        tg, s = (t // groups, sg) if group_mode == "per-group" else (t, sg * groups)
        return max(_bounds(_mode_dims(tg, s, kh, kw, form)))

    def decompose(self, weight, rank, *, seed: int = 0, groups: int = 1, group_mode: str = "per-group",
                  form: str = "tt3", **unknown) -> Factorization:
        if unknown:
            raise UsageError(f"tt got unknown options {sorted(unknown)}; allowed: form, groups, group_mode")
        if form not in FORMS:
            raise UsageError(f"tt form {form!r} is not allowed; allowed: {', '.join(FORMS)}")
        if group_mode not in GROUP_MODES:
            raise UsageError(f"tt group_mode {group_mode!r} is not allowed; allowed: {', '.join(GROUP_MODES)}")
        weight = check_weight(weight)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise UsageError(f"tt: groups {groups!r} must be a positive integer dividing out_channels {weight.shape[0]}")
        if isinstance(rank, (list, tuple)):
            raise RankError(f"tt rank must be one integer (the maximal TT rank), got {rank!r}")
        rank = check_rank(rank, self.max_rank(tuple(weight.shape), groups, group_mode, form), what="tt rank")
        import tntorch  # noqa: F401  (imported here so `import cpbench_tntorch` stays cheap; not timed)

        start = time.perf_counter()
        kernels = group_kernels(weight, groups, group_mode)          # (G', T/G', S/G', kh, kw)
        G, tg, sg, kh, kw = kernels.shape
        ranks = _ranks(rank, _mode_dims(tg, sg, kh, kw, form))
        x = _to_tt_order(kernels.double(), form)
        per_group = [_tt_svd(x[g], ranks) for g in range(G)]
        cores = [torch.stack([pg[k] for pg in per_group]) for k in range(len(ranks) + 1)]
        err = rel_error(kernels, tt_kernel(cores, kh, kw))
        factors = {f"core{k}": c.to(weight.dtype).contiguous() for k, c in enumerate(cores)}
        info = {"rank": rank, "tt_ranks": ranks, "form": form, "groups": groups, "group_mode": group_mode,
                "seconds": time.perf_counter() - start, "iterations": 1, "converged": True}
        return Factorization(factors, err, info)

    def build(self, conv: nn.Conv2d, factorization: Factorization) -> nn.Module:
        geo = build_geometry(conv, factorization)   # ungrouped if the groups were made block-diagonal
        f = factorization.factors
        n = len([k for k in f if k.startswith("core")])
        cores = [f[f"core{k}"] for k in range(n)]
        return TTBlock(geo, cores, bias=conv.bias)

    # -- cost model (enables "params:F" and "speedup:X" rank specs) ----------------------------
    def _geo_ranks(self, geo: ConvGeometry, rank: int, form: str) -> list[int]:
        G = geo.groups
        return _ranks(rank, _mode_dims(geo.out_channels // G, geo.in_channels // G, geo.kh, geo.kw, form))

    def params(self, geo: ConvGeometry, rank: int, form: str = "tt3") -> int:
        G = geo.groups
        r = self._geo_ranks(geo, rank, form)
        sg, tg = geo.in_channels // G, geo.out_channels // G
        if form == "tt3":
            inner = r[0] * r[1] * geo.kh * geo.kw
        else:
            inner = r[0] * r[1] * geo.kh + r[1] * r[2] * geo.kw
        return G * (sg * r[0] + inner + r[-1] * tg) + (geo.out_channels if geo.bias else 0)

    def macs(self, geo: ConvGeometry, rank: int, in_hw: tuple[int, int], form: str = "tt3") -> int:
        from cpbench.nn.flops import conv_out_hw

        G = geo.groups
        r = self._geo_ranks(geo, rank, form)
        h, w = in_hw
        ho, wo = conv_out_hw(geo, in_hw)
        sg, tg = geo.in_channels // G, geo.out_channels // G
        first = h * w * G * sg * r[0]
        last = ho * wo * G * r[-1] * tg
        if form == "tt3":
            mid = ho * wo * G * r[0] * r[1] * geo.kh * geo.kw
        else:
            mid = ho * w * G * r[0] * r[1] * geo.kh + ho * wo * G * r[1] * r[2] * geo.kw
        return first + mid + last
