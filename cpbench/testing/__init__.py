"""Conformance checks for plugin authors, in the manner of scikit-learn's ``check_estimator``.

Run every check on your object::

    from cpbench.testing import check_decomposer, check_backend
    check_decomposer(MyDecomposer())             # AssertionError naming each failed check
    check_backend(MyBackend())
    results = check_decomposer(MyDecomposer(), raise_on_failure=False)   # list[CheckResult]

or one pytest test per check (each check gets its own test id, skips are pytest skips)::

    import pytest
    from cpbench.testing import decomposer_checks, backend_checks

    @pytest.mark.parametrize("check", decomposer_checks(MyDecomposer(), options={"max_iter": 20}))
    def test_my_decomposer(check):
        check()

``options`` are passed to every ``decompose`` call (use them to keep iterative solvers fast).
Each check runs on a forked torch RNG and restores any thread pools it sets, so running the suite
leaves the caller's random stream and thread settings as they were.

Decomposer checks (:data:`DECOMPOSER_CHECKS`)
---------------------------------------------
``contract``
    ``name`` is a non-empty str; ``decompose``/``build`` are callable; ``version`` (if any) is a str;
    ``max_rank`` (if any) accepts the call :mod:`cpbench.ranks` makes (today
    ``(weight_shape, groups, group_mode)`` positionally) and returns a positive int or a tuple of them.
``factorization``
    ``decompose`` returns a :class:`cpbench.Factorization`: ``factors`` a non-empty
    ``dict[str, Tensor]`` of finite tensors, ``rel_error`` a finite float ≥ 0, ``info`` a dict that
    ``json.dumps`` accepts as is. The input weight is left unchanged.
``rel-error``
    ``rel_error`` is the error of the module that ``build`` makes. Method: the factorization is built
    on a bias-free, stride-1, unpadded, undilated copy of the conv and probed with the
    ``S·kh·kw`` unit impulses of shape ``(S, kh, kw)``; each gives one output pixel, so the responses
    are exactly the kernel ``Ŵ`` the module computes (for any linear, shift-invariant module). The
    check asserts ``|‖W − Ŵ‖/‖W‖ − rel_error| ≤ 1e-4 + 1e-3·rel_error``. Together with the geometry
    checks below (module output = conv with ``Ŵ`` and the original geometry), the module's output error
    against the original conv on any input is exactly that of a conv with kernel ``W − Ŵ``.
``geometry-*`` (``strided``, ``padded-int``, ``padded-tuple``, ``padded-same``, ``padding-mode``,
``dilated``, ``non-square``, ``bias-free``, ``grouped``, ``depthwise``)
    For a conv with that geometry, the built module's output has the original conv's shape and dtype
    and equals a conv with the module's own kernel ``Ŵ`` (probed as above) and the original geometry
    and bias, to ``1e-4`` relative (max abs difference / max abs reference). Grouped convs are
    decomposed with ``groups=`` as the harness does; a decomposer that raises
    :class:`cpbench.errors.UsageError` whose message mentions "group" declares it does not support
    groups, and the grouped checks are *skipped* (not failed).
``exact-at-full-rank``
    Only if the decomposer sets ``exact_at_full_rank = True`` (skipped otherwise; it then needs
    ``max_rank``): at ``rank = max_rank(shape, 1, **the options max_rank names)``, ``rel_error ≤ 1e-5``
    and the module reproduces
    the original conv's output (padded, strided, with bias) to ``1e-4`` relative.
``deterministic``
    Two ``decompose`` calls with the same seed give the same factor names and bit-identical tensors.
``rank-error``
    Rank 0 and -1 (and ``max_rank + 1`` where ``max_rank`` exists) raise
    :class:`cpbench.errors.RankError` with a non-empty one-line message.
``weight-error``
    A kernel with a NaN, and one with an inf, raise :class:`cpbench.errors.WeightError` with a
    one-line message.
``cache-roundtrip``
    The factorization is stored and read back through :class:`cpbench.cache.Cache` exactly as the
    runner does (factors as safetensors, ``rel_error`` and ``info`` as JSON through
    :func:`cpbench.results.jsonable`); the module built from the copy gives bit-identical outputs,
    also for a grouped conv when groups are supported.
``trainable``
    The built module deep-copies (the runner copies models) and back-propagates: it has parameters,
    all that require grad get finite gradients (fine-tuning trains them).

Backend checks (:data:`BACKEND_CHECKS`)
---------------------------------------
The model is a small conv net (three convs, one of them a :class:`cpbench.layers.CPBlock`) on a
``(2, 3, 16, 16)`` input, prepared with ``threads=1``.

``contract``
    ``name`` is a non-empty str; ``prepare`` returns a callable with an ``info`` dict that
    ``json.dumps`` accepts, a ``convert_input`` and a ``close``.
``equivalence``
    The prepared model's output (on ``convert_input(x)``) matches the ``torch-cpu`` reference (eager
    ``inference_mode``) to ``1e-4`` relative, twice in a row; neither the model's parameters nor the
    input are modified.
``threads-restored``
    ``torch.get_num_threads()``, ``torch.get_num_interop_threads()``,
    ``torch.backends.mkldnn.enabled`` and the thread count of every native pool threadpoolctl saw
    before are the same after prepare/run/close. The check first sets every pool to the current count
    plus one (through :func:`cpbench.threads.thread_limits`, restored afterwards) and prepares with
    ``threads=1``, so a backend that sets its count and forgets to restore it is caught. Pools first
    loaded by the backend are not compared.
``times-a-model``
    :func:`cpbench.timing.time_pair` on a prepared baseline and compressed model (the runner's
    sequence: prepare both, ``convert_input`` once, time, close) gives finite positive medians and a
    finite positive speedup.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CpbenchError, RankError, UsageError, WeightError
from ..decomposition.factorization import Factorization

__all__ = [
    "CheckResult",
    "CheckSkipped",
    "Check",
    "DECOMPOSER_CHECKS",
    "BACKEND_CHECKS",
    "check_decomposer",
    "check_backend",
    "iter_decomposer_checks",
    "iter_backend_checks",
    "decomposer_checks",
    "backend_checks",
    "parametrize_decomposer_checks",
    "parametrize_backend_checks",
    "effective_kernel",
]

OUTPUT_RTOL = 1e-4      # module / backend outputs against their reference, max-abs relative
EXACT_TOL = 1e-5        # rel_error at full rank for a decomposer claiming exactness
REL_ERROR_ATOL = 1e-4   # |recomputed - reported rel_error| <= REL_ERROR_ATOL + REL_ERROR_RTOL * reported
REL_ERROR_RTOL = 1e-3

KERNEL = (6, 4, 3, 3)   # (T, S, kh, kw) of the checks' default conv
INPUT_HW = (9, 11)      # non-square on purpose: catches swapped axes


class CheckSkipped(Exception):
    """Raised by a check that does not apply to the object (e.g. groups on a decomposer without them)."""


@dataclass
class CheckResult:
    """The outcome of one check: ``status`` is "passed", "failed" or "skipped"."""

    name: str
    status: str
    message: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class Check:
    """One check bound to one object. ``check()`` runs it (raises AssertionError; skips via pytest);
    ``check.run()`` returns a :class:`CheckResult` and never raises."""

    name: str
    target: str
    fn: Callable[[], None]

    @property
    def id(self) -> str:
        return f"{self.target}:{self.name}"

    def __repr__(self) -> str:
        return f"Check({self.id})"

    def _fn(self) -> None:
        # Modules built in the checks draw their (overwritten) initial weights from torch's global
        # RNG: fork it so that running the suite leaves the caller's random stream unchanged.
        with torch.random.fork_rng(devices=[]):
            self.fn()

    def __call__(self) -> None:
        try:
            self._fn()
        except CheckSkipped as exc:
            import pytest

            pytest.skip(f"{self.id}: {exc}")
        except AssertionError as exc:
            raise AssertionError(f"conformance check {self.id!r} failed: {exc}") from None
        except Exception as exc:
            raise AssertionError(
                f"conformance check {self.id!r} failed: raised {type(exc).__name__}: {exc}") from exc

    def run(self) -> CheckResult:
        start = time.perf_counter()
        try:
            self._fn()
        except CheckSkipped as exc:
            return CheckResult(self.name, "skipped", str(exc), time.perf_counter() - start)
        except AssertionError as exc:
            return CheckResult(self.name, "failed", str(exc) or "assertion failed", time.perf_counter() - start)
        except Exception as exc:
            return CheckResult(self.name, "failed", f"raised {type(exc).__name__}: {exc}",
                               time.perf_counter() - start)
        return CheckResult(self.name, "passed", "", time.perf_counter() - start)


# -- helpers ----------------------------------------------------------------------------------------
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in float64 (0 when both are zero)."""
    out = torch.as_tensor(out).detach().double()
    ref = torch.as_tensor(ref).detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def _assert_one_line(exc: BaseException, what: str) -> None:
    msg = str(exc)
    assert msg.strip(), f"{what}: {type(exc).__name__} has an empty message"
    assert "\n" not in msg.strip(), f"{what}: message is not one line: {msg!r}"


def _json_ok(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{what} is not JSON-serialisable: {exc}") from None


def _make_conv(in_ch=KERNEL[1], out_ch=KERNEL[0], k=KERNEL[2:], *, seed=0, **kw) -> nn.Conv2d:
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG state
        torch.manual_seed(seed)
        conv = nn.Conv2d(in_ch, out_ch, k, **kw)
    return conv.eval()


def _input(conv: nn.Conv2d, *, seed=1, batch=2, hw=INPUT_HW, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, conv.in_channels, *hw, generator=g, dtype=dtype)


def _max_rank_kwargs(dec, options) -> dict:
    """The decompose options that ``max_rank`` also names (e.g. group_mode, form)."""
    import inspect

    try:
        params = inspect.signature(dec.max_rank).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in (options or {}).items() if k in params and k not in ("weight_shape", "groups")}


def _max_rank(dec, shape, groups=1, options=None):
    if not hasattr(dec, "max_rank"):
        return None
    return dec.max_rank(tuple(shape), groups, **_max_rank_kwargs(dec, options))


def _small_rank(dec, shape, groups=1, want=2, options=None):
    """A low rank the decomposer accepts for ``shape``: ``want`` capped by max_rank (per mode)."""
    mr = _max_rank(dec, shape, groups, options)
    if mr is None:
        return want
    if isinstance(mr, (tuple, list)):
        return min(want, *mr)
    return min(want, int(mr))


def _is_group_refusal(exc: BaseException) -> bool:
    return isinstance(exc, UsageError) and "group" in str(exc).lower()


def _decompose(dec, weight, rank, options, *, groups=1, seed=0) -> Factorization:
    opts = dict(options or {})
    if groups > 1:
        opts.setdefault("groups", groups)
    try:
        return dec.decompose(weight, rank, seed=seed, **opts)
    except UsageError as exc:
        if groups > 1 and _is_group_refusal(exc):
            raise CheckSkipped(f"decomposer does not support groups ({exc})") from None
        raise


def effective_kernel(module: nn.Module, in_channels: int, kh: int, kw: int, *,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (T, S, kh, kw) kernel a linear, shift-invariant module computes, probed by unit impulses.

    ``module`` must be built for a stride-1, unpadded, undilated, bias-free conv: the input of shape
    ``(S, kh, kw)`` gives one output pixel, and the response to impulse ``(s, i, j)`` is
    ``Ŵ[:, s, i, j]``. The response to a zero input is subtracted (it is zero for a bias-free module).
    """
    n = in_channels * kh * kw
    eye = torch.eye(n, dtype=dtype).reshape(n, in_channels, kh, kw)
    with torch.no_grad():
        y = module(torch.cat([eye, torch.zeros(1, in_channels, kh, kw, dtype=dtype)]))
    y = torch.as_tensor(y)
    assert y.dim() == 4 and y.shape[2:] == (1, 1), (
        f"probing with (N, {in_channels}, {kh}, {kw}) inputs on a stride-1 unpadded conv should give a "
        f"1x1 output, got shape {tuple(y.shape)}")
    y = y[:, :, 0, 0].double()
    y = y[:-1] - y[-1:]
    return y.T.reshape(-1, in_channels, kh, kw)  # (T, S, kh, kw)


def _probe_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``conv`` with the same kernel/groups but stride 1, no padding, no dilation, no bias."""
    probe = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups, bias=False,
                      dtype=conv.weight.dtype)
    probe.weight.data.copy_(conv.weight.detach())
    return probe.eval()


def _module_kernel(dec, conv: nn.Conv2d, fact: Factorization) -> torch.Tensor:
    """The dense (T, S, kh, kw) kernel of the module ``dec.build`` makes from ``fact`` (probed)."""
    probe = _probe_conv(conv)
    block = dec.build(probe, fact)
    assert isinstance(block, nn.Module), f"build returned {type(block).__name__}, not a torch.nn.Module"
    block.eval()
    kh, kw = probe.kernel_size
    return effective_kernel(block, probe.in_channels, kh, kw, dtype=conv.weight.dtype)


def _reference_output(conv: nn.Conv2d, kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s geometry and bias with a dense (groups=1) ``kernel``, in float64."""
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode,
                    bias=conv.bias is not None, dtype=torch.float64)
    ref.weight.data.copy_(kernel.double())
    if conv.bias is not None:
        ref.bias.data.copy_(conv.bias.detach().double())
    with torch.no_grad():
        return ref(x.double())


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

        try:  # exactly as cpbench.ranks calls it to enumerate candidate ranks for "params:"/"speedup:"/"error:"
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


# -- backend checks ---------------------------------------------------------------------------------
class _SmallNet(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = middle
        self.conv3 = nn.Conv2d(12, 10, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.conv3(x)


def _nets() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(baseline, compressed, input): the compressed net's middle conv is a rank-3 CPBlock."""
    from ..nn.layers import CPBlock, geometry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = _SmallNet(nn.Conv2d(8, 12, 3, stride=2, padding=1)).eval()
    g = torch.Generator().manual_seed(0)
    r = 3
    block = CPBlock(geometry(base.conv2), torch.randn(1, 12, r, generator=g), torch.randn(1, 8, r, generator=g),
                    h=torch.randn(1, 3, r, generator=g), w=torch.randn(1, 3, r, generator=g), bias=base.conv2.bias)
    compressed = copy.deepcopy(base)
    compressed.conv2 = block
    compressed.eval()
    x = torch.randn(2, 3, 16, 16, generator=g)
    return base, compressed, x


def _prepare(backend, model, x, threads=1):
    prepared = backend.prepare(model, x, threads=threads)
    assert callable(prepared), f"prepare returned a {type(prepared).__name__}, which is not callable"
    return prepared


def _run(prepared, x):
    conv_in = getattr(prepared, "convert_input", None)
    xin = conv_in(x) if conv_in is not None else x
    return torch.as_tensor(prepared(xin))


def _close(prepared):
    close = getattr(prepared, "close", None)
    if close is not None:
        close()


def _bc_contract(backend):
    name = getattr(backend, "name", None)
    assert isinstance(name, str) and name, f"name must be a non-empty str, got {name!r}"
    assert callable(getattr(backend, "prepare", None)), "prepare is not callable"
    _, compressed, x = _nets()
    prepared = _prepare(backend, compressed, x)
    try:
        info = getattr(prepared, "info", None)
        assert isinstance(info, dict), f"Prepared.info must be a dict, got {type(info).__name__}"
        _json_ok(info, "Prepared.info")
        assert callable(getattr(prepared, "convert_input", None)), "Prepared has no callable convert_input"
        assert callable(getattr(prepared, "close", None)), "Prepared has no callable close"
    finally:
        _close(prepared)


def _bc_equivalence(backend):
    _, compressed, x = _nets()
    with torch.inference_mode():
        ref = compressed(x.clone())
    params_before = {k: v.detach().clone() for k, v in compressed.state_dict().items()}
    x_before = x.clone()
    prepared = _prepare(backend, compressed, x)
    try:
        for attempt in ("first", "second"):
            out = _run(prepared, x)
            assert tuple(out.shape) == tuple(ref.shape), f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
            err = _rel(out, ref)
            assert err <= OUTPUT_RTOL, f"{attempt} call: output differs from torch-cpu by {err:.3g} relative (> {OUTPUT_RTOL:g})"
    finally:
        _close(prepared)
    assert torch.equal(x, x_before), "the backend modified its input tensor"
    for k, v in compressed.state_dict().items():
        assert torch.equal(v, params_before[k]), f"the backend modified the model's {k!r}"


def _thread_snapshot() -> dict:
    from threadpoolctl import threadpool_info

    return {
        "torch.get_num_threads": torch.get_num_threads(),
        "torch.get_num_interop_threads": torch.get_num_interop_threads(),
        "torch.backends.mkldnn.enabled": bool(torch.backends.mkldnn.enabled),
        "pools": {p.get("filepath"): p.get("num_threads") for p in threadpool_info()},
    }


def _bc_threads_restored(backend):
    from ..measure.threads import thread_limits

    _, compressed, x = _nets()
    # Put every pool at a count the backend is not asked for, so a backend that sets threads=1 and
    # forgets to restore is seen; prepared models then run on one thread (fast, no oversubscription).
    with thread_limits(torch.get_num_threads() + 1):
        before = _thread_snapshot()
        prepared = _prepare(backend, compressed, x, 1)
        try:
            _run(prepared, x)
            _run(prepared, x)
        finally:
            _close(prepared)
        after = _thread_snapshot()
    for key in ("torch.get_num_threads", "torch.get_num_interop_threads", "torch.backends.mkldnn.enabled"):
        assert after[key] == before[key], f"{key} was {before[key]} before and {after[key]} after prepare/run/close"
    for lib, n in before["pools"].items():
        if lib in after["pools"]:
            assert after["pools"][lib] == n, f"thread pool {lib} had {n} threads before and {after['pools'][lib]} after"


def _bc_times_a_model(backend):
    from ..measure.timing import TimingBudget, time_pair

    base, compressed, x = _nets()
    budget = TimingBudget(warmup=1, min_rounds=3, max_rounds=6, budget_s=0.2, min_round_s=0.0005)
    pa = _prepare(backend, base, x)
    try:
        pb = _prepare(backend, compressed, x)
        try:
            xa = pa.convert_input(x) if hasattr(pa, "convert_input") else x
            xb = pb.convert_input(x) if hasattr(pb, "convert_input") else x
            timing = time_pair(lambda: pa(xa), lambda: pb(xb), budget)
        finally:
            _close(pb)
    finally:
        _close(pa)
    for arm, stats in (("baseline", timing.baseline), ("compressed", timing.compressed)):
        assert math.isfinite(stats.median_ms) and stats.median_ms > 0, f"{arm} median {stats.median_ms} ms is not finite and positive"
    assert math.isfinite(timing.speedup) and timing.speedup > 0, f"speedup {timing.speedup} is not finite and positive"


_BACKEND_FNS: dict[str, Callable] = {
    "contract": _bc_contract,
    "equivalence": _bc_equivalence,
    "threads-restored": _bc_threads_restored,
    "times-a-model": _bc_times_a_model,
}
BACKEND_CHECKS: tuple[str, ...] = tuple(_BACKEND_FNS)


# -- public API -------------------------------------------------------------------------------------
def _select(all_names: Iterable[str], only: Iterable[str] | None) -> list[str]:
    names = list(all_names)
    if only is None:
        return names
    only = list(only)
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UsageError(f"unknown conformance check(s) {unknown}; allowed: {', '.join(names)}")
    return [n for n in names if n in only]


def _target_name(obj) -> str:
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) and name else type(obj).__name__


def iter_decomposer_checks(decomposer, *, options: dict | None = None, only: Iterable[str] | None = None,
                           label: str | None = None) -> list[Check]:
    """The decomposer checks bound to ``decomposer`` (``only``: a subset of :data:`DECOMPOSER_CHECKS`;
    ``label``: the name used in check ids instead of ``decomposer.name``, e.g. "cp-als[cp3]")."""
    options = dict(options or {})
    target = label or _target_name(decomposer)
    return [Check(n, target, (lambda fn: lambda: fn(decomposer, options))(_DECOMPOSER_FNS[n]))
            for n in _select(DECOMPOSER_CHECKS, only)]


def iter_backend_checks(backend, *, only: Iterable[str] | None = None) -> list[Check]:
    """The backend checks bound to ``backend`` (``only``: a subset of :data:`BACKEND_CHECKS`)."""
    target = _target_name(backend)
    return [Check(n, target, (lambda fn: lambda: fn(backend))(_BACKEND_FNS[n])) for n in _select(BACKEND_CHECKS, only)]


def _report(kind: str, target: str, results: list[CheckResult], raise_on_failure: bool) -> list[CheckResult]:
    failed = [r for r in results if r.failed]
    if failed and raise_on_failure:
        lines = "; ".join(f"[{r.name}] {r.message}" for r in failed)
        raise AssertionError(f"{kind} {target!r} failed {len(failed)} of {len(results)} conformance checks "
                             f"({', '.join(r.name for r in failed)}): {lines}")
    return results


def check_decomposer(decomposer, *, options: dict | None = None, only: Iterable[str] | None = None,
                     raise_on_failure: bool = True) -> list[CheckResult]:
    """Run every decomposer check. Raises AssertionError naming each failed check, or (with
    ``raise_on_failure=False``) returns one :class:`CheckResult` per check."""
    checks = iter_decomposer_checks(decomposer, options=options, only=only)
    return _report("decomposer", _target_name(decomposer), [c.run() for c in checks], raise_on_failure)


def check_backend(backend, *, only: Iterable[str] | None = None, raise_on_failure: bool = True) -> list[CheckResult]:
    """Run every backend check. Raises AssertionError naming each failed check, or (with
    ``raise_on_failure=False``) returns one :class:`CheckResult` per check."""
    checks = iter_backend_checks(backend, only=only)
    return _report("backend", _target_name(backend), [c.run() for c in checks], raise_on_failure)


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


def backend_checks(*backends, only: Iterable[str] | None = None) -> list:
    """``pytest.param(check, id="name:check")`` for each check of each backend."""
    import pytest

    return [pytest.param(c, id=c.id) for b in backends for c in iter_backend_checks(b, only=only)]


def parametrize_decomposer_checks(*decomposers, options: dict | None = None, argname: str = "check"):
    """``@parametrize_decomposer_checks(MyDec())`` = ``@pytest.mark.parametrize("check", decomposer_checks(...))``."""
    import pytest

    return pytest.mark.parametrize(argname, decomposer_checks(*decomposers, options=options))


def parametrize_backend_checks(*backends, argname: str = "check"):
    """``@parametrize_backend_checks(MyBackend())`` = ``@pytest.mark.parametrize("check", backend_checks(...))``."""
    import pytest

    return pytest.mark.parametrize(argname, backend_checks(*backends))
