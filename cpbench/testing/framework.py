"""The check framework: a check bound to one object, its result, the tolerances and shared helpers.

The checks themselves are in :mod:`cpbench.testing.decomposers` and :mod:`cpbench.testing.backends`;
the entry points (``check_decomposer``, ``decomposer_checks``, ...) in :mod:`cpbench.testing`.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..decomposition.factorization import Factorization
from ..errors import UsageError

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


def _decompose(dec, weight, rank, options, *, groups=1, seed=0) -> Factorization:
    opts = dict(options or {})
    if groups > 1:
        if not getattr(dec, "supports_groups", True):  # a declared capability, never read from an error
            raise CheckSkipped("the decomposer declares supports_groups = False")
        opts.setdefault("groups", groups)
    return dec.decompose(weight, rank, seed=seed, **opts)


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


def _pair(v: Any) -> tuple[int, int]:
    """A Conv2d's per-axis attribute (typed as a tuple of any length) as the pair it is."""
    return int(v[0]), int(v[1])


def _probe_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``conv`` with the same kernel/groups but stride 1, no padding, no dilation, no bias."""
    probe = nn.Conv2d(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), groups=conv.groups, bias=False,
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
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), stride=_pair(conv.stride),
                    padding=padding, dilation=_pair(conv.dilation), padding_mode=conv.padding_mode,
                    bias=conv.bias is not None, dtype=torch.float64)
    ref.weight.data.copy_(kernel.double())
    if conv.bias is not None and ref.bias is not None:
        ref.bias.data.copy_(conv.bias.detach().double())
    with torch.no_grad():
        return ref(x.double())


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


def _report(kind: str, target: str, results: list[CheckResult], raise_on_failure: bool) -> list[CheckResult]:
    failed = [r for r in results if r.failed]
    if failed and raise_on_failure:
        lines = "; ".join(f"[{r.name}] {r.message}" for r in failed)
        raise AssertionError(f"{kind} {target!r} failed {len(failed)} of {len(results)} conformance checks "
                             f"({', '.join(r.name for r in failed)}): {lines}")
    return results
