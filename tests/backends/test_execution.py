"""optimize_cp_blocks: every form is exact, the choice keeps the model's function."""
from __future__ import annotations

import pytest
import torch

from cpbench.execution import (FORMS, CPGemmBlock, apply_forms, build_form, chunk_size, optimize_cp_blocks,
                               rel_error)
from cpbench.layers import CPBlock
from cpbench.timing import TimingBudget

TINY = TimingBudget(warmup=1, min_rounds=3, max_rounds=6, budget_s=0.05, min_round_s=0.0005)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_optimize_keeps_outputs(layout, groups, example, make_net):
    net = make_net(groups=groups)
    with torch.inference_mode():
        ref = net(example)
    opt, choices = optimize_cp_blocks(net, example, layout=layout, threads=1, budget=TINY)
    assert len(choices) == 1
    assert choices[0].form in FORMS
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
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    opt, choices = optimize_cp_blocks(net, torch.randn(1, 3, 5, 5), budget=TINY)
    assert choices == [] and opt is not net


def test_configure_malloc_is_idempotent():
    from cpbench.execution import configure_malloc

    first = configure_malloc()
    assert configure_malloc() == first
    assert first["process_wide"] is True
