"""Example cpbench plugin: a decomposer and a backend, registered through hooks.

``channel-svd`` (Zhang et al. 2015 style): the kernel reshaped to (T, S·kh·kw) and truncated by SVD
becomes a kh×kw conv S→R with the original geometry, then a 1×1 conv R→T with the bias.
``torch-jit``: the model traced and frozen with TorchScript.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from cpbench import Factorization, hookimpl
from cpbench.plugin.contracts import Prepared
from cpbench.decomposition.decomposer import check_rank, check_weight, rel_error
from cpbench.errors import UsageError


class ChannelSVD:
    name = "channel-svd"
    version = "1"
    supports_groups = False  # grouped convs are refused: the conformance suite skips its grouped checks
    exact_at_full_rank = True

    def max_rank(self, weight_shape, groups=1, group_mode="per-group"):
        t, s, kh, kw = weight_shape
        return min(t, s * kh * kw)

    def decompose(self, weight, rank, *, seed=0, groups=1, **options):
        if options:
            raise UsageError(f"channel-svd takes no options, got {sorted(options)}")
        if groups != 1:
            raise UsageError("channel-svd handles groups=1 convs only")
        weight = check_weight(weight)
        rank = check_rank(rank, self.max_rank(tuple(weight.shape)))
        start = time.perf_counter()
        m = weight.double().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        out = (u[:, :rank] * s[:rank]).to(weight.dtype)
        basis = vh[:rank].reshape(rank, *weight.shape[1:]).to(weight.dtype)
        err = rel_error(weight, (out.double() @ basis.double().reshape(rank, -1)).reshape(weight.shape))
        return Factorization({"out": out, "basis": basis}, err,
                             {"rank": rank, "seconds": time.perf_counter() - start, "converged": True})

    def build(self, conv: nn.Conv2d, factorization: Factorization) -> nn.Module:
        f = factorization.factors
        rank = f["out"].shape[1]
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                          dilation=conv.dilation, padding_mode=conv.padding_mode, bias=False,
                          dtype=f["basis"].dtype)
        first.weight.data.copy_(f["basis"])
        last = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, dtype=f["out"].dtype)
        last.weight.data.copy_(f["out"][:, :, None, None])
        if conv.bias is not None:
            last.bias.data.copy_(conv.bias.detach())
        return nn.Sequential(first, last)


class TorchJIT:
    name = "torch-jit"

    def prepare(self, model, example_input, *, threads):
        start = time.perf_counter()
        with torch.inference_mode():
            traced = torch.jit.freeze(torch.jit.trace(model.eval(), example_input))
            traced(example_input)
        seconds = time.perf_counter() - start

        def run(x):
            with torch.inference_mode():
                return traced(x)

        return Prepared(run=run, info={"compile_seconds": seconds, "threads": threads})


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(ChannelSVD())


@hookimpl
def cpbench_register_backends(registry):
    registry.add(TorchJIT())
