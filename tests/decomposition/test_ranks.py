import pytest
import torch
from torch import nn

import cpbench
from cpbench.errors import RankError
from cpbench.nn.flops import conv_macs, count_flops, cp_block_macs
from cpbench.nn.layers import geometry
from cpbench.decomposition.ranks import parse_rank, resolve_rank, vbmf_rank
from cpbench.nn.surgery import decompose_layer


@pytest.mark.parametrize("spec", [0, -3, "speedup:1", "speedup:x", "params:1.5", "error:0", "bogus", 2.5, True, [1, 0]])
def test_bad_rank_specs_say_what_is_allowed(spec):
    with pytest.raises(RankError, match="allowed"):
        parse_rank(spec)


def test_good_specs_parse():
    assert parse_rank(8).value == 8
    assert parse_rank([4, 2]).value == (4, 2)
    assert parse_rank("speedup:4").kind == "speedup"
    assert str(parse_rank("params:0.25")) == "params:0.25"


@pytest.mark.parametrize("conv,hw", [
    (nn.Conv2d(16, 32, 3, padding=1), (12, 12)),
    (nn.Conv2d(8, 12, (5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2)), (15, 13)),
    (nn.Conv2d(8, 12, 3, padding="same", groups=4), (9, 9)),
])
@pytest.mark.parametrize("form", ["cp4", "cp3"])
def test_closed_form_cp_cost_equals_torch_flop_counter(conv, hw, form):
    dec = cpbench.get_decomposer("cp-als")
    fact = dec.decompose(conv.weight, 3, groups=conv.groups, form=form, n_iter_max=2)
    block = dec.build(conv, fact)
    x = torch.randn(1, conv.in_channels, *hw)
    assert count_flops(block, x) == 2 * cp_block_macs(geometry(conv), 3, hw, form=form)
    assert count_flops(conv, x) == 2 * conv_macs(geometry(conv), hw)


@pytest.mark.parametrize("method", ["cp-als", "tucker2", "spatial-svd"])
def test_speedup_spec_picks_the_largest_rank_meeting_it(method):
    conv = nn.Conv2d(32, 64, 3, padding=1)
    dec = cpbench.get_decomposer(method)
    x = torch.randn(1, 32, 16, 16)
    fact, r = decompose_layer(conv, dec, "speedup:3", in_hw=(16, 16), options={"n_iter_max": 3} if method == "cp-als" else {})
    theo = count_flops(conv, x) / count_flops(dec.build(conv, fact), x)
    assert theo >= 3
    # one step up in rank would miss the target
    bigger = [r[0] + 1, r[1] + 1] if isinstance(r, tuple) else r + 1
    f2 = dec.decompose(conv.weight, bigger, **({"n_iter_max": 1} if method == "cp-als" else {}))
    assert count_flops(conv, x) / count_flops(dec.build(conv, f2), x) < 3 * 1.05


def test_params_spec_respects_fraction():
    conv = nn.Conv2d(32, 64, 3, padding=1)
    dec = cpbench.get_decomposer("spatial-svd")
    fact, r = decompose_layer(conv, dec, "params:0.25")
    block = dec.build(conv, fact)
    n = sum(p.numel() for p in block.parameters())
    assert n <= 0.25 * sum(p.numel() for p in conv.parameters())
    assert r == max(k for k in range(1, 97) if dec.params(geometry(conv), k) <= 0.25 * (32 * 64 * 9 + 64))


def test_error_spec_finds_smallest_rank_meeting_budget():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    dec = cpbench.get_decomposer("spatial-svd")
    fact, r = decompose_layer(conv, dec, "error:0.3")
    assert fact.rel_error <= 0.3
    assert dec.decompose(conv.weight, r - 1).rel_error > 0.3


def test_vbmf_finds_planted_ranks():
    torch.manual_seed(0)
    t, s = 64, 48
    core = torch.randn(6, 5, 3, 3)
    u, v = torch.linalg.qr(torch.randn(t, 6))[0], torch.linalg.qr(torch.randn(s, 5))[0]
    w = torch.einsum("oiyx,to,si->tsyx", core, u, v) * 10 + 0.01 * torch.randn(t, s, 3, 3)
    assert vbmf_rank(w) == (6, 5)


def test_vbmf_is_for_decomposers_whose_rank_is_a_pair():
    conv = nn.Conv2d(8, 8, 3)
    with pytest.raises(RankError, match='rank_kind = "pair"'):
        resolve_rank("vbmf", cpbench.get_decomposer("cp-als"), conv.weight, geometry(conv), None)

    class PairRanks:  # any decomposer declaring the capability, whatever its name
        name = "my-tucker"
        rank_kind = "pair"

    rank, fact = resolve_rank("vbmf", PairRanks(), conv.weight, geometry(conv), None)
    assert isinstance(rank, tuple) and len(rank) == 2 and fact is None
