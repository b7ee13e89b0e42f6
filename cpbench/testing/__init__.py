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
    ``max_rank`` (if any) accepts the call :mod:`cpbench.decomposition.ranks` makes (today
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
    The factorization is stored and read back through :class:`cpbench.run.cache.Cache` exactly as the
    runner does (factors as safetensors, ``rel_error`` and ``info`` as JSON through
    :func:`cpbench.run.results.jsonable`); the module built from the copy gives bit-identical outputs,
    also for a grouped conv when groups are supported.
``trainable``
    The built module deep-copies (the runner copies models) and back-propagates: it has parameters,
    all that require grad get finite gradients (fine-tuning trains them).

Backend checks (:data:`BACKEND_CHECKS`)
---------------------------------------
The model is a small conv net (three convs, one of them a :class:`cpbench.nn.CPBlock`) on a
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
    plus one (through :func:`cpbench.measure.thread_limits`, restored afterwards) and prepares with
    ``threads=1``, so a backend that sets its count and forgets to restore it is caught. Pools first
    loaded by the backend are not compared.
``times-a-model``
    :func:`cpbench.measure.time_pair` on a prepared baseline and compressed model (the runner's
    sequence: prepare both, ``convert_input`` once, time, close) gives finite positive medians and a
    finite positive speedup.
"""
from __future__ import annotations

from .backends import (
                          BACKEND_CHECKS,
                          backend_checks,
                          check_backend,
                          iter_backend_checks,
                          parametrize_backend_checks,
)
from .decomposers import (
                          DECOMPOSER_CHECKS,
                          check_decomposer,
                          decomposer_checks,
                          iter_decomposer_checks,
                          parametrize_decomposer_checks,
)
from .framework import Check, CheckResult, CheckSkipped, effective_kernel

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
