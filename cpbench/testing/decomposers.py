"""The decomposer checks (:data:`DECOMPOSER_CHECKS`; each one is described in :mod:`cpbench.testing`)."""
from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..decomposition.factorization import Factorization
from ..errors import CpbenchError, RankError, UsageError, WeightError
from .framework import (
    EXACT_TOL,
    KERNEL,
    OUTPUT_RTOL,
    REL_ERROR_ATOL,
    REL_ERROR_RTOL,
    Check,
    CheckResult,
    CheckSkipped,
    _assert_one_line,
    _decompose,
    _input,
    _json_ok,
    _make_conv,
    _max_rank,
    _module_kernel,
    _reference_output,
    _rel,
    _report,
    _select,
    _small_rank,
    _target_name,
)


# -- decomposer checks ------------------------------------------------------------------------------
def _dc_contract(dec, options):
    name = getattr(dec, "name", None)
    assert isinstance(name, str) and name, f"name must be a non-empty str, got {name!r}"
    assert callable(getattr(dec, "decompose", None)), "decompose is not callable"
    assert callable(getattr(dec, "build", None)), "build is not callable"
    if hasattr(dec, "version"):
        assert isinstance(dec.version, str), f"version must be a str (it is part of the cache key), got {dec.version!r}"
    if hasattr(dec, "max_rank"):
        from ..decomposition import ranks

        try:  # exactly as cpbench.decomposition.ranks calls it to enumerate candidate ranks for "params:"/"speedup:"/"error:"
            if hasattr(ranks, "max_rank_for"):
                ranks.max_rank_for(dec, KERNEL, 1, options)
            else:
                dec.max_rank(KERNEL, 1, "per-group")
        except TypeError as exc:
            raise AssertionError(
                "max_rank must accept (weight_shape, groups=1, group_mode='per-group'), as the harness "
                f"calls it for rank specs: {exc}") from None
        mr = _max_rank(dec, KERNEL, 1, options)
        ok = (isinstance(mr, int) and mr >= 1) or (
            isinstance(mr, (tuple, list)) and all(isinstance(m, int) and m >= 1 for m in mr))
        assert ok, f"max_rank({KERNEL}, 1) must be a positive int (or a tuple of them), got {mr!r}"


def _dc_factorization(dec, options):
    conv = _make_conv()
    weight = conv.weight.detach().clone()
    before = weight.clone()
    fact = _decompose(dec, weight, _small_rank(dec, weight.shape, 1, options=options), options)
    assert isinstance(fact, Factorization), f"decompose returned {type(fact).__name__}, not cpbench.Factorization"
    assert isinstance(fact.factors, dict) and fact.factors, "factors must be a non-empty dict"
    for k, v in fact.factors.items():
        assert isinstance(k, str), f"factor name {k!r} is not a str"
        assert isinstance(v, torch.Tensor), f"factor {k!r} is a {type(v).__name__}, not a torch.Tensor"
        assert bool(torch.isfinite(v).all()), f"factor {k!r} has NaN/inf values"
    assert isinstance(fact.rel_error, float), f"rel_error is a {type(fact.rel_error).__name__}, not a float"
    assert math.isfinite(fact.rel_error) and fact.rel_error >= 0, f"rel_error must be finite and >= 0, got {fact.rel_error}"
    assert isinstance(fact.info, dict), f"info is a {type(fact.info).__name__}, not a dict"
    _json_ok(fact.info, "info")
    assert torch.equal(weight, before), "decompose modified the weight tensor it was given"


def _dc_rel_error(dec, options):
    conv = _make_conv(bias=False)
    weight = conv.weight.detach()
    fact = _decompose(dec, weight, _small_rank(dec, weight.shape, 1, options=options), options)
    w_hat = _module_kernel(dec, conv, fact)
    w = weight.double()
    recomputed = float(torch.linalg.vector_norm(w - w_hat) / torch.linalg.vector_norm(w))
    tol = REL_ERROR_ATOL + REL_ERROR_RTOL * fact.rel_error
    assert abs(recomputed - fact.rel_error) <= tol, (
        f"rel_error says {fact.rel_error:.6g} but the built module's kernel (probed with unit impulses) "
        f"has relative error {recomputed:.6g} against the original kernel")


GEOMETRIES: dict[str, dict] = {
    "strided": dict(stride=2),
    "padded-int": dict(padding=1),
    "padded-tuple": dict(k=(3, 5), padding=(1, 2)),
    "padded-same": dict(padding="same"),
    "padding-mode": dict(padding=(1, 2), padding_mode="reflect"),
    "dilated": dict(dilation=2, padding=2),
    "non-square": dict(k=(1, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    "bias-free": dict(bias=False, padding=1),
    "grouped": dict(groups=2, padding=1),
    "depthwise": dict(in_ch=4, out_ch=8, groups=4, padding=1),
}


def _dc_geometry(dec, options, spec: dict):
    spec = dict(spec)
    in_ch, out_ch, k = spec.pop("in_ch", KERNEL[1]), spec.pop("out_ch", KERNEL[0]), spec.pop("k", KERNEL[2:])
    conv = _make_conv(in_ch, out_ch, k, **spec)
    groups = conv.groups
    weight = conv.weight.detach()
    fact = _decompose(dec, weight, _small_rank(dec, weight.shape, groups, options=options), options, groups=groups)
    block = dec.build(conv, fact)
    assert isinstance(block, nn.Module), f"build returned {type(block).__name__}, not a torch.nn.Module"
    block.eval()
    x = _input(conv)
    with torch.no_grad():
        want = conv(x)
        got = block(x)
    got = torch.as_tensor(got)
    assert tuple(got.shape) == tuple(want.shape), (
        f"output shape {tuple(got.shape)} != original conv's {tuple(want.shape)} for {_conv_repr(conv)}")
    assert got.dtype == want.dtype, f"output dtype {got.dtype} != original conv's {want.dtype}"
    w_hat = _module_kernel(dec, conv, fact)
    ref = _reference_output(conv, w_hat, x)
    err = _rel(got, ref)
    assert err <= OUTPUT_RTOL, (
        f"output differs by {err:.3g} (relative) from a conv with the module's own kernel and the original "
        f"geometry ({_conv_repr(conv)}): the geometry is not reproduced")


def _conv_repr(conv: nn.Conv2d) -> str:
    return (f"Conv2d({conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, stride={conv.stride}, "
            f"padding={conv.padding!r}, dilation={conv.dilation}, groups={conv.groups}, "
            f"bias={conv.bias is not None}, padding_mode={conv.padding_mode!r})")


def _dc_exact(dec, options):
    if not getattr(dec, "exact_at_full_rank", False):
        raise CheckSkipped("the decomposer does not claim exact_at_full_rank")
    assert hasattr(dec, "max_rank"), "exact_at_full_rank = True needs max_rank(weight_shape, groups)"
    conv = _make_conv(padding=1, stride=2)
    weight = conv.weight.detach()
    full = _max_rank(dec, weight.shape, 1, options)
    fact = _decompose(dec, weight, full, options)
    assert fact.rel_error <= EXACT_TOL, f"rel_error {fact.rel_error:.3g} at full rank {full!r} (claims exact)"
    block = dec.build(conv, fact).eval()
    x = _input(conv)
    with torch.no_grad():
        err = _rel(block(x), conv(x))
    assert err <= OUTPUT_RTOL, f"at full rank {full!r} the module's output differs from the conv's by {err:.3g}"


def _dc_deterministic(dec, options):
    conv = _make_conv()
    weight = conv.weight.detach()
    rank = _small_rank(dec, weight.shape, 1, options=options)
    a = _decompose(dec, weight, rank, options, seed=3)
    b = _decompose(dec, weight.clone(), rank, options, seed=3)
    assert sorted(a.factors) == sorted(b.factors), f"factor names differ: {sorted(a.factors)} vs {sorted(b.factors)}"
    for k in a.factors:
        assert torch.equal(a.factors[k], b.factors[k]), f"factor {k!r} differs between two runs with seed 3"
    assert a.rel_error == b.rel_error, f"rel_error differs between two runs with seed 3: {a.rel_error} vs {b.rel_error}"


def _expect(exc_type, fn, what):
    try:
        fn()
    except exc_type as exc:
        assert isinstance(exc, CpbenchError)
        _assert_one_line(exc, what)
        return
    except Exception as exc:
        raise AssertionError(f"{what}: raised {type(exc).__name__} ({exc}), expected cpbench.errors."
                             f"{exc_type.__name__}") from None
    raise AssertionError(f"{what}: no error raised, expected cpbench.errors.{exc_type.__name__}")


def _dc_rank_error(dec, options):
    weight = _make_conv().weight.detach()
    for bad in (0, -1):
        _expect(RankError, lambda: dec.decompose(weight, bad, seed=0, **options), f"rank {bad}")
    mr = _max_rank(dec, weight.shape, 1, options)
    if mr is not None:
        over = (max(mr) if isinstance(mr, (tuple, list)) else mr) + 1
        _expect(RankError, lambda: dec.decompose(weight, over, seed=0, **options), f"rank {over} (max_rank + 1)")


def _dc_weight_error(dec, options):
    weight = _make_conv().weight.detach()
    rank = _small_rank(dec, weight.shape, 1, options=options)
    for label, value in (("NaN", float("nan")), ("inf", float("inf"))):
        bad = weight.clone()
        bad[0, 0, 0, 0] = value
        _expect(WeightError, lambda: dec.decompose(bad, rank, seed=0, **options), f"a kernel with a {label}")


def _dc_cache_roundtrip(dec, options):
    from ..run.cache import Cache, key_of
    from ..run.results import jsonable

    convs = [_make_conv(padding=1)]
    convs.append(_make_conv(groups=2, padding=1, seed=2))
    done = 0
    with tempfile.TemporaryDirectory(prefix="cpbench-conformance-") as tmp:
        cache = Cache(tmp)
        for conv in convs:
            weight = conv.weight.detach()
            try:
                fact = _decompose(dec, weight, _small_rank(dec, weight.shape, conv.groups, options=options), options,
                                  groups=conv.groups)
            except CheckSkipped:
                continue
            key = key_of("fact", weight, dec.name, getattr(dec, "version", "0"), conv.groups)
            cache.put("factorizations", key, fact.factors, {"rel_error": fact.rel_error, "info": jsonable(fact.info)})
            hit = cache.get("factorizations", key)
            assert hit is not None, f"the cache did not return the entry it stored ({_conv_repr(conv)})"
            tensors, meta = hit
            again = Factorization(tensors, meta["rel_error"], meta["info"])
            assert again.rel_error == fact.rel_error, "rel_error changed through the cache"
            x = _input(conv)
            with torch.no_grad():
                y1 = torch.as_tensor(dec.build(conv, fact).eval()(x))
                y2 = torch.as_tensor(dec.build(conv, again).eval()(x))
            assert torch.equal(y1, y2), (
                f"the module built from the cached factorization gives different outputs "
                f"(max abs diff {(y1 - y2).abs().max().item():.3g}) for {_conv_repr(conv)}")
            done += 1
    assert done, "no factorization was round-tripped"


def _dc_trainable(dec, options):
    conv = _make_conv(padding=1)
    weight = conv.weight.detach()
    fact = _decompose(dec, weight, _small_rank(dec, weight.shape, 1, options=options), options)
    block = dec.build(conv, fact)
    clone = copy.deepcopy(block).eval()
    block.eval()
    x = _input(conv)
    with torch.no_grad():
        assert torch.equal(torch.as_tensor(block(x)), torch.as_tensor(clone(x))), "a deepcopy of the module computes something else"
    params = [p for p in block.parameters() if p.requires_grad]
    assert params, "the built module has no trainable parameters (fine-tuning would not change it)"
    block.train()
    block(x).square().mean().backward()
    for name, p in block.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"parameter {name!r} got no gradient"
            assert bool(torch.isfinite(p.grad).all()), f"parameter {name!r} got a non-finite gradient"


def _decomposer_check_fns() -> dict[str, Callable]:
    fns: dict[str, Callable] = {
        "contract": _dc_contract,
        "factorization": _dc_factorization,
        "rel-error": _dc_rel_error,
    }
    for g, spec in GEOMETRIES.items():
        fns[f"geometry-{g}"] = (lambda spec: lambda dec, options: _dc_geometry(dec, options, spec))(spec)
    fns.update({
        "exact-at-full-rank": _dc_exact,
        "deterministic": _dc_deterministic,
        "rank-error": _dc_rank_error,
        "weight-error": _dc_weight_error,
        "cache-roundtrip": _dc_cache_roundtrip,
        "trainable": _dc_trainable,
    })
    return fns


_DECOMPOSER_FNS = _decomposer_check_fns()
DECOMPOSER_CHECKS: tuple[str, ...] = tuple(_DECOMPOSER_FNS)


def iter_decomposer_checks(decomposer, *, options: dict | None = None, only: Iterable[str] | None = None,
                           label: str | None = None) -> list[Check]:
    """The decomposer checks bound to ``decomposer`` (``only``: a subset of :data:`DECOMPOSER_CHECKS`;
    ``label``: the name used in check ids instead of ``decomposer.name``, e.g. "cp-als[cp3]")."""
    options = dict(options or {})
    target = label or _target_name(decomposer)
    return [Check(n, target, (lambda fn: lambda: fn(decomposer, options))(_DECOMPOSER_FNS[n]))
            for n in _select(DECOMPOSER_CHECKS, only)]


def check_decomposer(decomposer, *, options: dict | None = None, only: Iterable[str] | None = None,
                     raise_on_failure: bool = True) -> list[CheckResult]:
    """Run every decomposer check. Raises AssertionError naming each failed check, or (with
    ``raise_on_failure=False``) returns one :class:`CheckResult` per check."""
    checks = iter_decomposer_checks(decomposer, options=options, only=only)
    return _report("decomposer", _target_name(decomposer), [c.run() for c in checks], raise_on_failure)


def decomposer_checks(*decomposers, options: dict | None = None, only: Iterable[str] | None = None,
                      label: str | None = None) -> list:
    """``pytest.param(check, id="name:check")`` for each check of each decomposer.

    ``@pytest.mark.parametrize("check", decomposer_checks(MyDec()))`` then ``def test(check): check()``.
    ``label`` replaces the name in the ids (one decomposer only): to check one decomposer under
    several option sets in one test.
    """
    import pytest

    if label is not None and len(decomposers) != 1:
        raise UsageError("decomposer_checks: label= needs exactly one decomposer")
    return [pytest.param(c, id=c.id) for d in decomposers
            for c in iter_decomposer_checks(d, options=options, only=only, label=label)]


def parametrize_decomposer_checks(*decomposers, options: dict | None = None, argname: str = "check"):
    """``@parametrize_decomposer_checks(MyDec())`` = ``@pytest.mark.parametrize("check", decomposer_checks(...))``."""
    import pytest

    return pytest.mark.parametrize(argname, decomposer_checks(*decomposers, options=options))
