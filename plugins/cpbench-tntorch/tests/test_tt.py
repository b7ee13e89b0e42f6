"""cpbench-tntorch: the cpbench conformance suite on ``tt`` (every form and group mode), plus the
tensor-train specifics: TT-SVD error bounds, rank caps, the cost model, registration, compress()."""
import math

import pytest
import torch
from torch import nn

import cpbench
from cpbench.errors import RankError, UsageError
from cpbench.nn.flops import count_flops
from cpbench.nn.layers import geometry
from cpbench.testing import check_decomposer, decomposer_checks
from cpbench_tntorch import TTBlock, TTDecomposer

torch.set_num_threads(1)  # tests share the machine's cores
TT = TTDecomposer()


@pytest.mark.parametrize("check", decomposer_checks(TT)
                         + decomposer_checks(TT, options={"form": "tt4"}, label="tt[tt4]")
                         + decomposer_checks(TT, options={"group_mode": "block-diagonal"}, label="tt[block-diagonal]"))
def test_conformance(check):
    check()


def test_check_decomposer_passes_without_skips_but_the_unclaimed():
    results = check_decomposer(TT, options={"form": "tt4"})
    assert all(r.passed for r in results), [(r.name, r.message) for r in results if not r.passed]


def _unfolding_tail(w_tt: torch.Tensor, k: int, r: int) -> float:
    """Best error² of rank r for the k-th unfolding (prod of the first k modes × the rest)."""
    m = w_tt.reshape(math.prod(w_tt.shape[:k]), -1)
    s = torch.linalg.svdvals(m)
    return float((s[r:] ** 2).sum())


@pytest.mark.parametrize("form, order", [("tt3", lambda w: w.permute(1, 2, 3, 0).reshape(w.shape[1], -1, w.shape[0])),
                                         ("tt4", lambda w: w.permute(1, 2, 3, 0))])
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_tt_svd_error_is_within_its_bounds(form, order, rank):
    """max_k ε_k ≤ ‖W − Ŵ‖ ≤ sqrt(Σ_k ε_k²), ε_k the best error of unfolding k at rank r_k (Oseledets 2011)."""
    torch.manual_seed(0)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    fact = TT.decompose(w, rank, form=form)
    x = order(w)
    ranks = fact.info["tt_ranks"]
    tails = [_unfolding_tail(x, k + 1, r) for k, r in enumerate(ranks)]
    norm2 = float(w.pow(2).sum())
    err = fact.rel_error
    assert max(tails) / norm2 - 1e-12 <= err ** 2 <= sum(tails) / norm2 + 1e-12
    assert 0 < err < 1


def test_ranks_are_capped_by_each_cut_and_max_rank_is_exact():
    w = torch.randn(16, 4, 3, 3)
    # tt3 over (S=4, 9, T=16): cuts min(4, 144)=4 and min(36, 16)=16
    assert TT.max_rank(tuple(w.shape)) == 16
    f = TT.decompose(w, 10)
    assert f.info["tt_ranks"] == [4, 10]
    assert [tuple(v.shape) for v in f.factors.values()] == [(1, 1, 4, 4), (1, 4, 9, 10), (1, 10, 16, 1)]
    # tt4 over (4, 3, 3, 16): cuts 4, min(12, 48)=12, min(36, 16)=16
    assert TT.max_rank(tuple(w.shape), form="tt4") == 16
    assert TT.decompose(w, 10, form="tt4").info["tt_ranks"] == [4, 10, 10]
    assert TT.decompose(w, 16, form="tt4").rel_error < 1e-6
    with pytest.raises(RankError, match="tt rank 17 is out of range; allowed: 1..16"):
        TT.decompose(w, 17)
    with pytest.raises(RankError, match="one integer"):
        TT.decompose(w, [4, 4])


def test_rank_deficient_groups_are_zero_padded_to_one_structure():
    w = torch.zeros(8, 2, 3, 3)
    w[:4, 0, 1, 1] = torch.arange(1.0, 5.0)          # group 0: rank 1; group 1: random, full
    w[4:] = torch.randn(4, 2, 3, 3)
    f = TT.decompose(w, 3, groups=2)
    assert f.factors["core1"].shape == (2, 2, 9, 3) and f.info["tt_ranks"] == [2, 3]
    conv = nn.Conv2d(4, 8, 3, groups=2, padding=1)
    conv.weight.data.copy_(w)
    block = TT.build(conv, f).eval()
    assert [m.groups for m in block] == [2, 2, 2]
    x = torch.randn(1, 4, 7, 7)
    ref = nn.functional.conv2d(x, w, conv.bias, padding=1, groups=2)
    got = block(x)
    # group 0 is exact (rank 1 ≤ 3); group 1 carries the truncation error
    assert torch.allclose(got[:, :4], ref[:, :4], atol=1e-5)


@pytest.mark.parametrize("form", ["tt3", "tt4"])
@pytest.mark.parametrize("groups", [1, 2])
def test_cost_model_matches_the_built_block(form, groups):
    conv = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), groups=groups)
    geo = geometry(conv)
    f = TT.decompose(conv.weight.detach(), 3, groups=groups, form=form)
    block = TT.build(conv, f)
    assert isinstance(block, TTBlock) and block.form == form
    assert TT.params(geo, 3, form=form) == sum(p.numel() for p in block.parameters())
    x = torch.randn(1, 8, 11, 13)
    assert 2 * TT.macs(geo, 3, (11, 13), form=form) == count_flops(block, x)


def test_options_are_checked_with_one_line_messages():
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(UsageError, match=r"tt got unknown options \['n_iter_max'\]; allowed: form, groups, group_mode"):
        TT.decompose(w, 2, n_iter_max=5)
    with pytest.raises(UsageError, match="tt form 'tt5' is not allowed; allowed: tt3, tt4"):
        TT.decompose(w, 2, form="tt5")
    with pytest.raises(UsageError, match="groups 4 must be a positive integer dividing out_channels 6"):
        TT.decompose(w, 2, groups=4)


def test_registered_through_the_entry_point_and_used_by_compress():
    plugins = cpbench.get_plugins()
    assert plugins.decomposers.plugin_of("tt") == "tntorch"
    info = plugins.info["tntorch"]
    assert info.distribution == "cpbench-tntorch" and info.error is None
    assert "cpbench-tntorch 0.1.0" in plugins.versions()["tntorch"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
    x = torch.randn(2, 3, 10, 10)
    small = cpbench.compress(model, {"2": {"method": "tt", "rank": "params:0.3", "form": "tt4"}}, example_input=x)
    rec = small._cpbench_plan["2"]
    geo = geometry(model[2])
    assert TT.params(geo, rec["rank"], form="tt4") <= 0.3 * (model[2].weight.numel() + 32)
    assert TT.params(geo, rec["rank"] + 1, form="tt4") > 0.3 * (model[2].weight.numel() + 32)
    assert isinstance(small[2], TTBlock) and small[2].form == "tt4"
    with torch.no_grad():
        full = cpbench.compress(model, {"2": ("tt", TT.max_rank(tuple(model[2].weight.shape)))})
        assert torch.allclose(full(x), model(x), atol=1e-4)
