"""The fused CP kernel (form cp4-fused): exact for every geometry, layout, batch and thread count."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cpbench.kernels import fused
from cpbench.errors import BackendError
from cpbench.kernels.forms import optimize_cp_blocks, rel_error
from cpbench.nn.layers import CPBlock, geometry
from cpbench.measure.threads import thread_limits
from cpbench.measure.timing import TimingBudget

pytestmark = pytest.mark.skipif(not fused.kernel_available(), reason=fused.kernel_status() or "")

TINY = TimingBudget(warmup=1, min_rounds=3, max_rounds=6, budget_s=0.05, min_round_s=0.0005)

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2)),
    dict(kernel_size=3, stride=2, padding="valid", groups=2, bias=False),
    dict(kernel_size=(2, 4), padding="same", dilation=2, groups=4),
    dict(kernel_size=5, stride=3, padding=4),  # padding wider than half the kernel
    dict(kernel_size=(7, 1), padding=(3, 0)),
]


def _block(conv: nn.Conv2d, rank: int, seed: int = 0) -> CPBlock:
    g = torch.Generator().manual_seed(seed)
    groups = conv.groups
    t, sg, kh, kw = conv.weight.shape
    return CPBlock(geometry(conv), torch.randn(groups, t // groups, rank, generator=g),
                   torch.randn(groups, sg, rank, generator=g), h=torch.randn(groups, kh, rank, generator=g),
                   w=torch.randn(groups, kw, rank, generator=g),
                   bias=None if conv.bias is None else torch.randn(t, generator=g)).eval()


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
@pytest.mark.parametrize("rank", [3, 21])  # 21: one full 16-channel vector block and a remainder
@pytest.mark.parametrize("shape", [(1, 13, 11), (3, 16, 16)])
@pytest.mark.parametrize("threads", [1, 2])
def test_exact_for_any_geometry(geo, rank, shape, threads):
    block = _block(nn.Conv2d(8, 12, **geo), rank)
    n, h, w = shape
    x = torch.randn(n, 8, h, w, generator=torch.Generator().manual_seed(1))
    fz = fused.CPFusedBlock(block, min_parallel_macs=0)  # split the work even when it is tiny
    with torch.inference_mode(), thread_limits(threads):
        ref = block(x)
        out = fz(x)
        out_cl = fz(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape and out_cl.shape == ref.shape
    assert out.is_contiguous()  # the output keeps the input's layout
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(out, ref) <= 1e-5 and rel_error(out_cl, ref) <= 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 9, 11, 13])  # each compiled tap count, and others
def test_exact_for_every_tap_count_and_panel_shape(k):
    # 70 outputs: two full 32-column panels and a 6-wide one; rank 37: a panel and a 5-wide remainder;
    # 15 x 17 pixels: micro-kernel row tiles of 14 and a remainder, pixel groups of 4 and a remainder
    block = _block(nn.Conv2d(19, 70, (k, 14 - k), padding=(k // 2, 2)), 37)
    x = torch.randn(2, 19, 15, 17)
    fz = fused.CPFusedBlock(block)
    with torch.inference_mode():
        ref = block(x)
        assert rel_error(fz(x), ref) <= 1e-5
        assert rel_error(fz(x.contiguous(memory_format=torch.channels_last)), ref) <= 1e-5


@pytest.mark.parametrize("out_channels", [64, 70])  # whole 32-column panels only, and a partial one
@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_output_is_exact(out_channels, threads):
    # cache_bytes=0: every output, however small, written with non-temporal stores where tiles are whole,
    # and every next band's input rows prefetched
    block = _block(nn.Conv2d(16, out_channels, 3, padding=1), 24)
    x = torch.randn(3, 16, 15, 15)
    fz = fused.CPFusedBlock(block, cache_bytes=0, min_parallel_macs=0)
    with torch.inference_mode(), thread_limits(threads):
        ref = block(x)
        assert rel_error(fz(x), ref) <= 1e-5
        assert rel_error(fz(x.contiguous(memory_format=torch.channels_last)), ref) <= 1e-5


@pytest.mark.parametrize("band_bytes", [1, 4096, 1 << 30])  # one row per band .. the whole image at once
def test_band_size_does_not_change_the_result(band_bytes):
    block = _block(nn.Conv2d(6, 10, 5, padding=2, stride=(2, 1)), 7)
    x = torch.randn(2, 6, 17, 9)
    with torch.inference_mode():
        assert rel_error(fused.CPFusedBlock(block, band_bytes=band_bytes)(x), block(x)) <= 1e-5


def test_rows_split_across_threads_when_fewer_images_than_threads():
    # batch 1 on 2 threads: each thread computes its own range of output rows and their input halo
    block = _block(nn.Conv2d(8, 16, 9), 32)
    x = torch.randn(1, 8, 24, 24)
    with torch.inference_mode(), thread_limits(2):
        assert rel_error(fused.CPFusedBlock(block, min_parallel_macs=0)(x), block(x)) <= 1e-5


def test_refuses_what_it_cannot_compute():
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="zero padding"):
        fused.CPFusedBlock(_block(conv, 2))
    with pytest.raises(ValueError, match="CP4"):
        fused.CPFusedBlock(_block(nn.Conv2d(4, 4, 3), 2).fused())
    fz = fused.CPFusedBlock(_block(nn.Conv2d(4, 4, 3), 2))
    with pytest.raises(BackendError, match="float32 CPU inference only, not torch.float64"):
        fz(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    with pytest.raises(BackendError, match="with gradients"):
        fz(x)


def test_deep_copies_and_state_dict():
    block = _block(nn.Conv2d(4, 6, 3), 5)
    fz = fused.CPFusedBlock(block)
    twin = copy.deepcopy(fz)
    x = torch.randn(2, 4, 7, 7)
    with torch.inference_mode():
        assert torch.equal(twin(x), fz(x))
    assert set(fz.state_dict()) == {"w_in", "w_out", "bias", "taps_v", "taps_h"}


def test_loading_a_state_dict_repacks_the_micro_kernel_weights():
    conv = nn.Conv2d(4, 40, 3, padding=1)  # 40 outputs: a full 32-column panel and a partial one
    a, b = fused.CPFusedBlock(_block(conv, 5)), fused.CPFusedBlock(_block(conv, 5, seed=1))
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        assert not torch.allclose(a(x), b(x))
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x))


def test_moving_the_module_drops_the_kept_call_arguments():
    fz = fused.CPFusedBlock(_block(nn.Conv2d(4, 40, 3), 37))  # 2 weight panels each: 4-d, not degenerate
    x = torch.randn(1, 4, 7, 7)
    with torch.inference_mode():
        before = fz(x)
        assert fz._kept  # arguments kept between calls
        fz.to(torch.float64).to(torch.float32)  # new tensors: the kept arguments would point at the old ones
        assert fz._kept is None
        torch.testing.assert_close(fz(x), before)
        fz.to(memory_format=torch.channels_last)  # as the channels-last backend converts a model
        torch.testing.assert_close(fz(x.contiguous(memory_format=torch.channels_last)), before)


def test_packed_panels_hold_the_weights_column_by_column():
    w = torch.randn(2, 3, 37)  # (G, K, N): two panels of 32, the second 5 wide then zeros
    p = fused.pack_panels(w, 32)
    assert p.shape == (2, 2, 3, 32)
    torch.testing.assert_close(p[:, 0], w[..., :32])
    torch.testing.assert_close(p[:, 1, :, :5], w[..., 32:])
    assert not p[:, 1, :, 5:].any()
    assert fused.pack_panels(w, 0).numel() == 0


def test_optimizer_offers_it_and_keeps_the_function(make_net, example):
    net = make_net()
    _, choices = optimize_cp_blocks(net, example, layout="channels_last", threads=1, budget=TINY,
                                    forms=["cp4", "cp4-fused"])
    tried = choices[0].tried["cp4-fused"]
    assert "error" not in tried and tried["rel_error"] <= 1e-5


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_optimizer_runs_it_on_a_block_with_several_weight_panels(layout):
    # 70 outputs, rank 40: 4-d packed weights that .to(memory_format=channels_last) would restride
    net = nn.Sequential(_block(nn.Conv2d(8, 70, 3, padding=1), 40))
    _, choices = optimize_cp_blocks(net, torch.randn(1, 8, 12, 12), layout=layout, threads=1, budget=TINY,
                                    forms=["cp4", "cp4-fused"])
    tried = choices[0].tried["cp4-fused"]
    assert "error" not in tried and tried["rel_error"] <= 1e-5


@pytest.mark.parametrize("march, simd, panel", [("x86-64-v3", "avx2", 32), ("x86-64-v2", "none", 0)])
def test_the_portable_builds_are_exact(march, simd, panel):
    # Machines without AVX-512: the x86-64-v3 build runs the AVX2 taps and 6x16 micro-kernel, the
    # x86-64-v2 build the plain taps loops and MKL's GEMMs; both made beside the native one by
    # `cpbench build-kernel --march ...` (.ci/run does), checked here on every tap count the AVX2 taps
    # compile (slide widths 8 and 4), both halves of a 16-channel block, and whole and partial tiles.
    flags = fused._cpu_id().split()
    if march == "x86-64-v3" and ("avx2" not in flags or "fma" not in flags):
        pytest.skip("this CPU cannot run an AVX2 build")
    reason = fused.kernel_status(march)
    if reason:
        pytest.skip(reason)
    kernel = fused.load_kernel(march)
    assert (kernel.simd, kernel.panel) == (simd, panel)
    cases = [(dict(kernel_size=3, padding=1), 21), (dict(kernel_size=(5, 6), stride=2, groups=2), 9),
             (dict(kernel_size=(9, 11), padding=(4, 5)), 13), (dict(kernel_size=(7, 2), dilation=(1, 2)), 6)]
    for geo, rank in cases:
        block = _block(nn.Conv2d(8, 70, **geo), rank)
        x = torch.randn(2, 8, 15, 13)
        for cache_bytes in (0, fused.CACHE_BYTES):  # streamed stores and prefetch, and plain ones
            fz = fused.CPFusedBlock(block, cache_bytes=cache_bytes, march=march)
            with torch.inference_mode():
                ref = block(x)
                assert rel_error(fz(x), ref) <= 1e-5
                assert rel_error(fz(x.contiguous(memory_format=torch.channels_last)), ref) <= 1e-5


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_torch_compile_carries_the_operator(layout):
    # fullgraph: one graph, so the block is the operator (traced through its fake implementation), not
    # a graph break around an opaque Python call.
    block = _block(nn.Conv2d(8, 20, (3, 5), stride=(2, 1), padding=(1, 2), groups=2), 9)
    fz = fused.CPFusedBlock(block)
    x = torch.randn(2, 8, 11, 13).contiguous(memory_format=layout)
    compiled = torch.compile(fz, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
        assert rel_error(y, block(x)) <= 1e-5
    assert y.is_contiguous(memory_format=layout)


def test_torch_export_carries_the_operator():
    block = _block(nn.Conv2d(8, 20, 3, padding=1), 9)
    net = nn.Sequential(fused.CPFusedBlock(block), nn.ReLU()).eval()
    x = torch.randn(2, 8, 10, 10)
    exported = torch.export.export(net, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "cpbench.cp_fused.default" in targets
    with torch.no_grad():
        assert rel_error(exported.module()(x), net(x)) <= 1e-5
        fake_shape = [n.meta["val"].shape for n in exported.graph.nodes if str(n.target) == "cpbench.cp_fused.default"]
        assert list(fake_shape[0]) == [2, 20, 10, 10]  # the fake implementation's output shape


def test_build_kernel_command_reports_the_build(capsys):
    from cpbench.cli import main

    assert main(["build-kernel"]) == 0  # built already (the module would be skipped otherwise): a load
    out = capsys.readouterr().out
    assert "already built" in out and fused.build_key() in out and "torch.ops.cpbench.cp_fused" in out
    assert fused.build_inputs()["compiler"]["version"] in out


def test_kernel_arguments_are_what_the_module_passes():
    # the arguments a benchmark hands another build (benchmarks/scripts/fused_ab.py) are the module's own
    block = _block(nn.Conv2d(6, 40, (3, 5), stride=(1, 2), padding=(1, 2), groups=2), 9)
    fz = fused.CPFusedBlock(block)
    kernel = fused.load_kernel()
    x = torch.randn(2, 6, 11, 12)
    with torch.inference_mode():
        direct = kernel.module.cp_fused(x, *fused.kernel_arguments(block, kernel.panel))
        torch.testing.assert_close(direct, fz(x), rtol=0, atol=0)
        assert rel_error(direct, block(x)) <= 1e-5
