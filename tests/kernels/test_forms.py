"""optimize_cp_blocks: every form is exact, the choice keeps the model's function."""
from __future__ import annotations

import pytest
import torch

from torch import nn

from cpbench.kernels.forms import (FORMS, CPBandBlock, ConvGemm, CPGemmBlock, apply_forms, band_matrix, build_form,
                               chunk_size, conv_gemm_kind, optimize_cp_blocks, rel_error)
from cpbench.nn.layers import CPBlock, geometry
from cpbench.measure.timing import TimingBudget

TINY = TimingBudget(warmup=1, min_rounds=3, max_rounds=6, budget_s=0.05, min_round_s=0.0005)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_optimize_keeps_outputs(layout, groups, example, make_net):
    net = make_net(groups=groups)
    with torch.inference_mode():
        ref = net(example)
    opt, choices = optimize_cp_blocks(net, example, layout=layout, threads=1, budget=TINY)
    # the CP block first, then the plain convs that are one GEMM: the first (3×3 on 3 channels, im2col)
    # and the last (1×1)
    assert [c.name for c in choices] == ["2", "0", "4"]
    assert choices[0].form in FORMS
    assert {c.form for c in choices[1:]} <= {"conv", "conv-gemm"}
    assert choices[0].input_shape == (2, 8, 10, 10)
    with torch.inference_mode():
        out = opt(example.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else example)
    assert rel_error(out, ref) <= 1e-5
    # the original model is untouched
    assert isinstance(net[2], CPBlock) and net[2].form == "cp4"


@pytest.mark.parametrize("form", FORMS)
def test_every_form_is_exact(form, example, make_net):
    net = make_net()
    block = net[2]
    x = torch.randn(3, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = block(x)
        out = build_form(block, form, tuple(x.shape)).to(memory_format=torch.channels_last)(x)
    assert rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_gemm_is_exact(chunk, make_net):
    block = make_net()[2]
    x = torch.randn(5, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = CPGemmBlock(block, fused=True, chunk=chunk).to(memory_format=torch.channels_last)(x)
        assert rel_error(out, block(x)) <= 1e-5
    assert out.shape == (5, 12, 9, 7)


def test_chunk_size(make_net):
    block = make_net()[2]  # R = 6
    assert chunk_size(block, (4, 8, 10, 10)) == 4  # tiny: the whole batch is one chunk
    assert chunk_size(block, (64, 8, 512, 512)) == 1


def test_gemm_form_in_nchw_input_still_exact(make_net):
    block = make_net()[2]
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        assert rel_error(build_form(block, "cp3-gemm")(x), block(x)) <= 1e-5


def test_model_that_is_a_block(make_net):
    block = make_net()[2]
    x = torch.randn(2, 8, 6, 6)
    opt, choices = optimize_cp_blocks(block, x, layout="channels_last", threads=1, budget=TINY)
    with torch.inference_mode():
        assert rel_error(opt(x.contiguous(memory_format=torch.channels_last)), block(x)) <= 1e-5
    assert choices[0].name == "<model>"


def test_apply_forms(make_net):
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    fused = apply_forms(net, "cp3")
    assert fused[2].form == "cp3"
    with torch.inference_mode():
        assert rel_error(fused(x), net(x)) <= 1e-5


def test_no_blocks_is_a_copy():
    # (6 input channels: not a first-layer im2col candidate; 3×3 on 5×5: neither cover nor pointwise)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 4, 3))
    opt, choices = optimize_cp_blocks(net, torch.randn(1, 6, 5, 5), budget=TINY)
    assert choices == [] and opt is not net


def test_convs_false_leaves_plain_convs(make_net, example):
    _, choices = optimize_cp_blocks(make_net(), example, threads=1, budget=TINY, convs=False)
    assert [c.name for c in choices] == ["2"]


GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=(3, 4), padding="same", dilation=(2, 1)),
    dict(kernel_size=9),
    dict(kernel_size=3, padding="valid", stride=2),
    dict(kernel_size=5, padding=2, groups=2, bias=False),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
@pytest.mark.parametrize("shape", [(1, 13, 11), (3, 16, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_band_form_is_exact_for_any_geometry(geo, shape, layout):
    """The banded matrices carry stride, dilation and zero padding (incl. 'same' with an even kernel)."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(8, 12, **geo)
    groups, R = conv.groups, 5
    kh, kw = conv.kernel_size
    block = CPBlock(geometry(conv), torch.randn(groups, 12 // groups, R, generator=g),
                    torch.randn(groups, 8 // groups, R, generator=g), h=torch.randn(groups, kh, R, generator=g),
                    w=torch.randn(groups, kw, R, generator=g),
                    bias=None if conv.bias is None else torch.randn(12, generator=g)).eval()
    n, h, w = shape
    x = torch.randn(n, 8, h, w, generator=g)
    band = build_form(block, "cp4-band")
    assert isinstance(band, CPBandBlock)
    with torch.inference_mode():
        ref = block(x)
        out = band(x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x)
    assert out.shape == ref.shape
    assert rel_error(out, ref) <= 1e-5


def test_band_matrix_is_a_strided_dilated_correlation():
    taps = torch.tensor([[1.0, 2.0, 3.0]])
    band = band_matrix(taps, 6, stride=2, dilation=2, pad=(1, 1))
    # out = (6 + 2 - 2*2 - 1) // 2 + 1 = 2 rows; row o reads columns 2o - 1 + 2j
    assert band.tolist() == [[[0.0, 2.0, 0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.0, 2.0, 0.0, 3.0]]]
    with pytest.raises(ValueError, match="smaller than the kernel"):
        band_matrix(taps, 2, stride=1, dilation=2, pad=(0, 0))


def test_band_form_refuses_other_padding_modes():
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    block = CPBlock(geometry(conv), torch.randn(1, 4, 2), torch.randn(1, 4, 2), h=torch.randn(1, 3, 2),
                    w=torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match="zero padding"):
        CPBandBlock(block)
    # and the optimiser does not offer it
    _, choices = optimize_cp_blocks(block, torch.randn(1, 4, 6, 6), threads=1, budget=TINY)
    assert "cp4-band" not in choices[0].tried


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("conv,shape,kind", [
    (nn.Conv2d(6, 10, 4), (2, 6, 4, 4), "cover"),
    (nn.Conv2d(6, 10, (3, 5), bias=False), (1, 6, 3, 5), "cover"),
    (nn.Conv2d(6, 10, 1), (3, 6, 5, 7), "pointwise"),
    (nn.Conv2d(6, 10, 1, bias=False), (1, 6, 2, 2), "pointwise"),
    (nn.Conv2d(128, 96, (8, 1)), (1, 128, 8, 8), "rows"),  # a spatial SVD's first layer of charnet's conv3
    (nn.Conv2d(6, 10, (5, 1), stride=(3, 1), bias=False), (3, 6, 5, 7), "rows"),
    (nn.Conv2d(6, 10, (4, 1), dilation=(1, 3)), (2, 6, 4, 5), "rows"),  # a 1-wide kernel: its width dilation is moot
    (nn.Conv2d(1, 96, 9), (2, 1, 24, 24), "im2col"),  # the character network's conv1
    (nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False), (3, 3, 11, 9), "im2col"),
    (nn.Conv2d(2, 5, 3, padding="same", dilation=2), (1, 2, 7, 6), "im2col"),
])
def test_conv_gemm_is_exact(conv, shape, kind, layout):
    assert conv_gemm_kind(conv, shape) == kind
    x = torch.randn(*shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert rel_error(ConvGemm(conv, shape)(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(6, 10, 3, padding=1), (1, 6, 3, 3)),  # padded
    (nn.Conv2d(6, 10, 4, groups=2), (1, 6, 4, 4)),  # grouped
    (nn.Conv2d(6, 10, 1, stride=2), (1, 6, 4, 4)),  # strided 1×1
    (nn.Conv2d(6, 10, 3), (1, 6, 5, 5)),  # an ordinary conv
    (nn.Conv2d(3, 4, 4, padding="same"), (1, 3, 6, 6)),  # 'same' with an odd total padding: not unfoldable
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (1, 3, 6, 6)),
    (nn.Conv2d(6, 10, (8, 1), padding=(0, 1)), (1, 6, 8, 8)),  # rows, but padded
    (nn.Conv2d(6, 10, (8, 1), stride=(1, 2)), (1, 6, 8, 8)),  # rows, but strided across them
    (nn.Conv2d(6, 10, (4, 1), dilation=(2, 1)), (1, 6, 7, 5)),  # rows 0, 2, 4, 6 of 7: not one view
    (nn.Conv2d(6, 10, (3, 1)), (1, 6, 8, 8)),  # fewer rows than the input
])
def test_conv_gemm_only_where_it_is_one_gemm(conv, shape):
    assert conv_gemm_kind(conv, shape) is None
    with pytest.raises(ValueError, match="not a single matrix product"):
        ConvGemm(conv, shape)


def test_configure_malloc_is_idempotent():
    from cpbench.kernels.forms import configure_malloc

    first = configure_malloc()
    assert configure_malloc() == first
    assert first["process_wide"] is True


def test_a_remembered_form_choice_is_replayed_without_timing_and_checked_for_exactness(tmp_path):
    # the first call times the candidates and remembers the winner; the second, on a block of the same
    # structure with other weights, builds that form without timing anything (a clock that raises)
    from cpbench.kernels.forms import optimize_cp_blocks, use_choice_store
    from cpbench.tune.store import JsonStore

    conv = nn.Conv2d(16, 24, 3, padding=1)

    def block(seed):
        g = torch.Generator().manual_seed(seed)
        return CPBlock(geometry(conv), torch.randn(1, 24, 8, generator=g), torch.randn(1, 16, 8, generator=g),
                       h=torch.randn(1, 3, 8, generator=g), w=torch.randn(1, 3, 8, generator=g),
                       bias=torch.randn(24, generator=g)).eval()

    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(9))
    use_choice_store(JsonStore(tmp_path / "choices.json"))
    try:
        _, first = optimize_cp_blocks(block(0), x, threads=1, convs=False)
        other = block(1)

        def no_clock():
            raise AssertionError("a remembered choice must not be timed again")

        model, again = optimize_cp_blocks(other, x, threads=1, convs=False, clock=no_clock)
        assert [c.form for c in again] == [c.form for c in first] and again[0].tried.get("remembered")
        with torch.inference_mode():
            assert torch.allclose(model(x), other(x), rtol=1e-4, atol=1e-4)
    finally:
        use_choice_store(None)


def test_a_new_fused_kernel_build_is_timed_again_not_replayed(tmp_path, monkeypatch):
    # a choice timed against one build of the fused kernel says nothing about another build (a new
    # source, compiler or torch): the build key is part of the remembered choice's key
    from cpbench.kernels import fused
    from cpbench.kernels.forms import optimize_cp_blocks, use_choice_store
    from cpbench.tune.store import JsonStore

    if not fused.kernel_available():
        pytest.skip(fused.kernel_status() or "")
    conv = nn.Conv2d(16, 24, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    block = CPBlock(geometry(conv), torch.randn(1, 24, 8, generator=g), torch.randn(1, 16, 8, generator=g),
                    h=torch.randn(1, 3, 8, generator=g), w=torch.randn(1, 3, 8, generator=g)).eval()
    x = torch.randn(1, 16, 12, 12)
    use_choice_store(JsonStore(tmp_path / "choices.json"))
    try:
        optimize_cp_blocks(block, x, threads=1, convs=False)
        monkeypatch.setattr(fused, "loaded_build_key", lambda march=fused.NATIVE: "another-build")
        _, again = optimize_cp_blocks(block, x, threads=1, convs=False)
        assert not again[0].tried.get("remembered")
    finally:
        use_choice_store(None)
