"""The backend checks (:data:`BACKEND_CHECKS`; each one is described in :mod:`cpbench.testing`)."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .framework import (
    OUTPUT_RTOL,
    Check,
    CheckResult,
    _json_ok,
    _rel,
    _report,
    _select,
    _target_name,
)


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
        middle = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        base = _SmallNet(middle).eval()
    g = torch.Generator().manual_seed(0)
    r = 3
    block = CPBlock(geometry(middle), torch.randn(1, 12, r, generator=g), torch.randn(1, 8, r, generator=g),
                    h=torch.randn(1, 3, r, generator=g), w=torch.randn(1, 3, r, generator=g), bias=middle.bias)
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


def iter_backend_checks(backend, *, only: Iterable[str] | None = None) -> list[Check]:
    """The backend checks bound to ``backend`` (``only``: a subset of :data:`BACKEND_CHECKS`)."""
    target = _target_name(backend)
    return [Check(n, target, (lambda fn: lambda: fn(backend))(_BACKEND_FNS[n])) for n in _select(BACKEND_CHECKS, only)]


def check_backend(backend, *, only: Iterable[str] | None = None, raise_on_failure: bool = True) -> list[CheckResult]:
    """Run every backend check. Raises AssertionError naming each failed check, or (with
    ``raise_on_failure=False``) returns one :class:`CheckResult` per check."""
    checks = iter_backend_checks(backend, only=only)
    return _report("backend", _target_name(backend), [c.run() for c in checks], raise_on_failure)


def backend_checks(*backends, only: Iterable[str] | None = None) -> list:
    """``pytest.param(check, id="name:check")`` for each check of each backend."""
    import pytest

    return [pytest.param(c, id=c.id) for b in backends for c in iter_backend_checks(b, only=only)]


def parametrize_backend_checks(*backends, argname: str = "check"):
    """``@parametrize_backend_checks(MyBackend())`` = ``@pytest.mark.parametrize("check", backend_checks(...))``."""
    import pytest

    return pytest.mark.parametrize(argname, backend_checks(*backends))
