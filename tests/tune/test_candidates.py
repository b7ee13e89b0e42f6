"""Candidates from the cost models."""
import pytest
from torch import nn

import cpbench
from cpbench.nn.layers import geometry
from cpbench.tune.candidates import at_least_as_compressed, dominates, layer_candidates, rank_grid, speedup_grid


def test_speedup_grid_is_geometric_and_inclusive_with_the_operating_points():
    from cpbench.tune.candidates import OPERATING_POINTS

    g = speedup_grid(1.5, 96.0, 7)
    assert g[0] == pytest.approx(1.5) and g[-1] == pytest.approx(96.0) and g == sorted(g)
    geometric = [1.5 * 2.0 ** i for i in range(7)]  # 1.5 .. 96, a ratio of 2
    assert all(any(x == pytest.approx(y) for x in g) for y in geometric) and len(g) == 9  # + 2 and 4
    assert set(OPERATING_POINTS) <= set(g)  # what a uniform speedup:2 .. speedup:6 plan uses
    assert speedup_grid(1.5, 3.5, 2) == [1.5, 2.0, 3.0, 3.5]  # only the points inside the span
    near = speedup_grid(2.0, 8.0, 3)  # 2, 4, 8 already: no near-duplicates added, 3 and 6 are
    assert near == [2.0, 3.0, 4.0, 6.0, 8.0]


def test_rank_grid_is_the_speedup_rank_spec():
    # each grid rank is what "speedup:X" resolves to: the largest rank reaching X
    conv = nn.Conv2d(48, 128, 9)
    dec = cpbench.get_decomposer("cp-als")
    geo = geometry(conv)
    grid = rank_grid(dec, tuple(conv.weight.shape), geo, (16, 16), [2.0, 8.0, 32.0])
    base = 48 * 128 * 81 * 64
    for (rank, s), target in zip(grid, [2.0, 8.0, 32.0]):
        assert s >= target and base / dec.macs(geo, rank + 1, (16, 16)) < target
    assert [s for _, s in grid] == sorted(s for _, s in grid)


def test_layer_candidates_start_with_keep_and_cover_each_decomposer():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    decs = [cpbench.get_decomposer(n) for n in ("cp-nls", "tucker2", "spatial-svd")]
    cands = layer_candidates("c", decs, tuple(conv.weight.shape), geometry(conv), (8, 8), speedup_grid(1.5, 8, 4))
    assert cands[0].is_keep
    assert {c.method for c in cands[1:]} == {"cp-nls", "tucker2", "spatial-svd"}
    assert all(c.theoretical_speedup >= 1.5 for c in cands[1:])
    assert len({c.label for c in cands}) == len(cands)


def test_bad_grid():
    with pytest.raises(cpbench.UsageError):
        speedup_grid(0.5, 4)


def test_between_is_the_rank_at_the_geometric_mean_of_two_choices_when_it_lies_strictly_between():
    from cpbench.tune.candidates import Candidate, between, keep

    conv = nn.Conv2d(8, 16, 3, padding=1)
    dec = cpbench.get_plugins().decomposers.get("spatial-svd")
    args = ({"spatial-svd": dec}, tuple(conv.weight.shape), geometry(conv), (8, 8))
    grid = dict((r, s) for r, s in rank_grid(dec, *args[1:], speedup_grid(1.5, 16.0, 4)))
    assert 5 in grid and 2 in grid and 3 not in grid  # the grid steps over rank 3
    held, lost = (Candidate("conv", "spatial-svd", r, grid[r]) for r in (5, 2))
    (mid,) = between(held, lost, *args)
    assert mid.rank == 3 and grid[5] < mid.theoretical_speedup < grid[2]
    assert between(lost, held, *args) == [mid]  # the order of the two does not matter
    near = Candidate("conv", "spatial-svd", 4, grid[4])
    assert between(held, near, *args) == []  # 3.2x and 4x: nothing strictly between worth a candidate
    (from_keep,) = between(keep("conv"), lost, *args)  # a layer kept whole in the plan that held
    assert from_keep.method == "spatial-svd" and 1.0 < from_keep.theoretical_speedup < grid[2]


def test_a_plan_dominates_another_when_every_layer_is_at_least_as_compressed():
    assert at_least_as_compressed("cp-nls:16", "cp-nls:42") and at_least_as_compressed("cp-nls:42", "cp-nls:42")
    assert not at_least_as_compressed("cp-nls:43", "cp-nls:42")
    assert at_least_as_compressed("tucker2:10x3", "tucker2:12x3") and not at_least_as_compressed("tucker2:10x4", "tucker2:12x3")
    assert at_least_as_compressed("spatial-svd:64", "keep") and not at_least_as_compressed("keep", "spatial-svd:1")
    assert not at_least_as_compressed("cp-nls:8", "tucker2:30x4")  # two methods: not ordered
    lost = {"conv1": "cp-nls:42", "conv2": "cp-nls:27", "conv3": "cp-nls:74"}
    assert dominates({"conv1": "cp-nls:16", "conv2": "cp-nls:11", "conv3": "cp-nls:20"}, lost)
    assert not dominates({"conv1": "cp-nls:32", "conv2": "cp-nls:66", "conv3": "cp-nls:112"}, lost)
    assert not dominates(lost, lost) and not dominates({**lost, "conv0": "keep"}, lost)  # the same plan
    assert dominates({**lost, "conv0": "cp-nls:4"}, lost)  # a layer the other keeps, replaced
    assert not dominates({"conv1": "cp-nls:16", "conv2": "tucker2:8x3", "conv3": "cp-nls:20"}, lost)
