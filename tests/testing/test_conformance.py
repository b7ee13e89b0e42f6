"""The conformance suite (cpbench.testing) over every registered decomposer and backend, and the
suite's own checks: each broken object below must fail exactly the check that guards its contract."""
import os
import shutil

import pytest
import torch
from torch import nn

from cpbench import Factorization, get_plugins
from cpbench.decomposition import ranks
from cpbench.plugin.contracts import Prepared
from cpbench.errors import UsageError
from cpbench.testing import (
    BACKEND_CHECKS,
    DECOMPOSER_CHECKS,
    backend_checks,
    check_backend,
    check_decomposer,
    decomposer_checks,
    parametrize_backend_checks,
    parametrize_decomposer_checks,
)
from cpbench_builtins.backends.torch_cpu import TorchCPU
from cpbench_builtins.decomposers.spatial_svd import SpatialSVD

# Small iteration budgets for the iterative solvers (the checks use 6×4×3×3 kernels, low ranks).
FAST_OPTIONS = {
    "cp-als": {"n_iter_max": 20},
    "cp-nls": {"max_iter": 20},
    "cp-epc": {"fit_options": {"max_iter": 20}, "epc_max_iter": 20},
    "tucker2": {"n_iter_max": 20},
}
# Option sets that switch a built-in to another code path, checked as well.
VARIANTS = [
    ("cp-als", "cp3", {"n_iter_max": 20, "form": "cp3"}),
    ("cp-als", "block-diagonal", {"n_iter_max": 20, "group_mode": "block-diagonal"}),
    ("tucker2", "block-diagonal", {"n_iter_max": 20, "group_mode": "block-diagonal"}),
    ("tt", "tt4", {"form": "tt4"}),  # when plugins/cpbench-tntorch is installed
]


def _all_decomposer_checks():
    plugins = get_plugins()
    params = []
    for name in plugins.decomposers.names():
        params += decomposer_checks(plugins.decomposers.get(name), options=FAST_OPTIONS.get(name))
    for name, label, options in VARIANTS:
        if name in plugins.decomposers:
            params += decomposer_checks(plugins.decomposers.get(name), options=options, label=f"{name}[{label}]")
    return params


def _all_backend_checks():
    plugins = get_plugins()
    return backend_checks(*(plugins.backends.get(n) for n in plugins.backends.names()))


def _has_cxx():
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


@pytest.mark.parametrize("check", _all_decomposer_checks())
def test_registered_decomposer_conforms(check):
    check()


@pytest.mark.parametrize("check", _all_backend_checks())
def test_registered_backend_conforms(check):
    if check.target == "torch-compile" and not _has_cxx():
        pytest.skip("torch.compile's inductor needs a C++ compiler; none on this machine")
    check()


def test_every_registered_object_is_covered():
    plugins = get_plugins()
    dec_targets = {p.values[0].target for p in _all_decomposer_checks()}
    be_targets = {p.values[0].target for p in _all_backend_checks()}
    assert set(plugins.decomposers.names()) <= dec_targets
    assert set(plugins.backends.names()) == be_targets
    assert {"cp-nls", "cp-als", "tucker2", "spatial-svd"} <= dec_targets
    ids = [p.id for p in _all_decomposer_checks()]
    assert len(ids) == len(set(ids)) and "cp-nls:geometry-grouped" in ids and "cp-als[cp3]:rel-error" in ids


def test_checks_leave_the_callers_rng_and_threads_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    check_decomposer(SpatialSVD())
    check_backend(TorchCPU())
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


# -- the suite catches what it claims to catch -------------------------------------------------------
class _Broken(SpatialSVD):
    name = "broken"


class WrongRelError(_Broken):
    def decompose(self, *a, **k):
        f = super().decompose(*a, **k)
        return Factorization(f.factors, f.rel_error * 0.5, f.info)


class IgnoresStride(_Broken):
    def build(self, orig, fact):
        conv = nn.Conv2d(orig.in_channels, orig.out_channels, orig.kernel_size, padding=orig.padding,
                         dilation=orig.dilation, groups=orig.groups, bias=orig.bias is not None,
                         padding_mode=orig.padding_mode)
        if conv.bias is not None:
            conv.bias.data.copy_(orig.bias.detach())
        return super().build(conv, fact)


class IgnoresPaddingMode(_Broken):
    def build(self, conv, fact):
        block = super().build(conv, fact)
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.padding_mode = "zeros"
        return block


class DropsBias(_Broken):
    def build(self, conv, fact):
        block = super().build(conv, fact)
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.data.zero_()
        return block


class Unseeded(_Broken):
    """Same kernel every time, different factors: v·c and h/c with an unseeded random c."""

    def decompose(self, *a, **k):
        f = super().decompose(*a, **k)
        c = 1.0 + torch.rand(()).item()
        f.factors["v"], f.factors["h"] = f.factors["v"] * c, f.factors["h"] / c
        return f


class ClampsRank(_Broken):
    def decompose(self, weight, rank, **k):
        return super().decompose(weight, max(rank, 1), **k)


class PassesNaN(_Broken):
    def decompose(self, weight, rank, **k):
        if not torch.isfinite(weight).all():
            raise ValueError("bad weights\nsee the docs")  # not a WeightError, and two lines
        return super().decompose(weight, rank, **k)


class TensorInInfo(_Broken):
    def decompose(self, *a, **k):
        f = super().decompose(*a, **k)
        f.info["singular_values"] = torch.ones(3)
        return f


class SharedFactors(_Broken):
    """Two factors sharing storage: safetensors refuses to save them, so the runner's cache put fails."""

    def decompose(self, *a, **k):
        f = super().decompose(*a, **k)
        f.factors["alias"] = f.factors["v"]
        return f


class FalseExactClaim(_Broken):
    def max_rank(self, weight_shape, groups=1, group_mode="per-group"):
        return super().max_rank(weight_shape, groups, group_mode) - 1


class Frozen(_Broken):
    def build(self, conv, fact):
        return super().build(conv, fact).requires_grad_(False)


class NarrowMaxRank(_Broken):
    """max_rank without group_mode: cpbench.decomposition.ranks calls max_rank(shape, groups, group_mode)."""

    def max_rank(self, weight_shape, groups=1):
        return SpatialSVD().max_rank(weight_shape, groups)

    def decompose(self, weight, rank, **k):
        return SpatialSVD().decompose(weight, rank, **k)


class RefusesGroups(_Broken):
    supports_groups = False  # declared: the grouped checks are skipped

    def decompose(self, weight, rank, *, groups=1, **k):
        if groups != 1:
            raise UsageError("refuses-groups handles groups=1 convs only")
        return super().decompose(weight, rank, **k)


class RefusesGroupsSilently(RefusesGroups):
    supports_groups = True  # claims groups, then refuses them: whatever the message says, that fails


@pytest.mark.parametrize("broken, failing", [
    (WrongRelError(), {"rel-error"}),
    (IgnoresStride(), {"geometry-strided", "geometry-non-square", "exact-at-full-rank"}),
    (IgnoresPaddingMode(), {"geometry-padding-mode"}),
    (DropsBias(), {g for g in DECOMPOSER_CHECKS if g.startswith("geometry-")} - {"geometry-bias-free"}
     | {"exact-at-full-rank"}),
    (Unseeded(), {"deterministic"}),
    (ClampsRank(), {"rank-error"}),
    (PassesNaN(), {"weight-error"}),
    (TensorInInfo(), {"factorization"}),
    (SharedFactors(), {"cache-roundtrip"}),
    (FalseExactClaim(), {"exact-at-full-rank"}),
    (Frozen(), {"trainable"}),
    # cpbench.decomposition.ranks calls max_rank(shape, groups, group_mode) positionally (unless it has max_rank_for)
    (NarrowMaxRank(), set() if hasattr(ranks, "max_rank_for") else {"contract"}),
], ids=lambda v: type(v).__name__ if not isinstance(v, set) else "")
def test_suite_fails_exactly_the_broken_contract(broken, failing):
    results = check_decomposer(broken, raise_on_failure=False)
    assert [r.name for r in results] == list(DECOMPOSER_CHECKS)
    got = {r.name for r in results if r.failed}
    assert got == failing, {r.name: r.message for r in results if r.failed}
    if not failing:
        assert all(r.status != "failed" for r in check_decomposer(broken))
        return
    with pytest.raises(AssertionError) as e:
        check_decomposer(broken)
    for name in failing:
        assert f"[{name}]" in str(e.value)


def test_reference_decomposer_passes_everything_and_messages_are_specific():
    results = check_decomposer(SpatialSVD())
    assert all(r.passed for r in results), [(r.name, r.message) for r in results if not r.passed]
    rel = {r.name: r for r in check_decomposer(WrongRelError(), raise_on_failure=False)}["rel-error"]
    assert "rel_error says" in rel.message and "probed" in rel.message
    stride = {r.name: r for r in check_decomposer(IgnoresStride(), raise_on_failure=False)}["geometry-strided"]
    assert "output shape" in stride.message and "stride=(2, 2)" in stride.message


def test_refusing_groups_is_a_skip_not_a_failure_when_declared():
    results = {r.name: r for r in check_decomposer(RefusesGroups(), raise_on_failure=False)}
    assert results["geometry-grouped"].status == "skipped" and "supports_groups" in results["geometry-grouped"].message
    assert results["geometry-depthwise"].status == "skipped"
    assert all(r.status != "failed" for r in results.values())
    check = next(p.values[0] for p in decomposer_checks(RefusesGroups()) if p.id == "broken:geometry-grouped")
    with pytest.raises(pytest.skip.Exception):
        check()


def test_an_undeclared_refusal_of_groups_fails_whatever_its_message():
    results = {r.name: r for r in check_decomposer(RefusesGroupsSilently(), raise_on_failure=False)}
    assert results["geometry-grouped"].failed and results["geometry-depthwise"].failed
    assert "groups=1 convs only" in results["geometry-grouped"].message


def test_check_objects_raise_naming_the_check_and_select_by_name():
    params = decomposer_checks(WrongRelError(), only=["rel-error", "contract"])
    assert [p.id for p in params] == ["broken:contract", "broken:rel-error"]
    params[0].values[0]()  # contract passes
    with pytest.raises(AssertionError, match="conformance check 'broken:rel-error' failed: rel_error says"):
        params[1].values[0]()
    with pytest.raises(UsageError, match="unknown conformance check"):
        check_decomposer(SpatialSVD(), only=["no-such-check"])


def test_parametrize_helpers_give_one_param_per_check():
    mark = parametrize_decomposer_checks(SpatialSVD(), options={})
    assert mark.args[0] == "check"
    assert [p.id for p in mark.args[1]] == [f"spatial-svd:{n}" for n in DECOMPOSER_CHECKS]
    mark = parametrize_backend_checks(TorchCPU(), argname="backend_check")
    assert mark.args[0] == "backend_check"
    assert [p.id for p in mark.args[1]] == [f"torch-cpu:{n}" for n in BACKEND_CHECKS]
    with pytest.raises(UsageError, match="label= needs exactly one decomposer"):
        decomposer_checks(SpatialSVD(), SpatialSVD(), label="x")


class LeaksThreads(TorchCPU):
    name = "leaks-threads"

    def prepare(self, model, x, *, threads):
        torch.set_num_threads(threads)
        return super().prepare(model, x, threads=threads)


class Off(TorchCPU):
    name = "off"

    def prepare(self, model, x, *, threads):
        p = super().prepare(model, x, threads=threads)
        return Prepared(run=lambda t: p.run(t) * 1.001, info=p.info)


class BadInfo(TorchCPU):
    name = "bad-info"

    def prepare(self, model, x, *, threads):
        p = super().prepare(model, x, threads=threads)
        p.info["model"] = model
        return p


class FoldsInPlace(TorchCPU):
    name = "folds-in-place"

    def prepare(self, model, x, *, threads):
        with torch.no_grad():
            model.conv3.weight.mul_(1.0 + 1e-6)
        return super().prepare(model, x, threads=threads)


@pytest.mark.parametrize("backend, failing", [
    (LeaksThreads(), {"threads-restored"}),
    (Off(), {"equivalence"}),
    (BadInfo(), {"contract"}),
    (FoldsInPlace(), {"equivalence"}),
], ids=lambda v: type(v).__name__ if not isinstance(v, set) else "")
def test_backend_suite_fails_exactly_the_broken_contract(backend, failing):
    before = torch.get_num_threads()
    try:
        results = check_backend(backend, raise_on_failure=False)
    finally:
        torch.set_num_threads(before)
    assert [r.name for r in results] == list(BACKEND_CHECKS)
    assert {r.name for r in results if r.failed} == failing, [(r.name, r.message) for r in results]
