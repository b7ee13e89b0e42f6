"""Tests of cpbench.decomposition.solvers.cp_als (fast TensorLy-equivalent ALS)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from cpbench.decomposition.solvers import SolverInputError, cp_als, reconstruct, rel_error
from cpbench.decomposition.solvers._cp_common import svd_init

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _kernel(shape, seed):
    """Random kernel with some low-rank structure (so that ALS has something to find)."""
    g = _gen(seed)
    fs = [torch.randn((s, 3), generator=g, dtype=torch.float64) for s in shape]
    t = reconstruct(fs)
    return t + 0.5 * t.std() * torch.randn(shape, generator=g, dtype=torch.float64)


def _tensorly_parafac(t, rank, init, n_iter, tol):
    import tensorly as tl
    from tensorly.decomposition import parafac

    if not isinstance(init, str):
        init = tl.cp_tensor.CPTensor((None, [f.numpy() for f in init]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp, errs = parafac(t.numpy(), rank, init=init, n_iter_max=n_iter, tol=tol, return_errors=True)
    rec = tl.cp_to_tensor(cp)
    return float(np.linalg.norm(t.numpy() - rec) / np.linalg.norm(t.numpy())), errs


@pytest.mark.parametrize("shape,rank", [((12, 10, 3, 3), 3), ((9, 8, 7), 5), ((16, 6, 3, 3), 2)])
def test_matches_tensorly_parafac_svd_init(shape, rank):
    # rank <= every dim: TensorLy's SVD init has no random columns, both sides start identically
    t = _kernel(shape, 1)
    ours = cp_als(t, rank, init="svd", max_iter=300, tol=1e-10)
    e_tl, errs = _tensorly_parafac(t, rank, "svd", 300, 1e-10)
    assert ours.info["rel_error"] == pytest.approx(e_tl, rel=1e-6, abs=1e-9)
    # same stopping rule -> same number of sweeps (TensorLy records one error per sweep)
    assert ours.info["iterations"] == len(errs)
    np.testing.assert_allclose(ours.info["rel_error_history"], errs, rtol=1e-6, atol=1e-9)


def test_matches_tensorly_with_shared_init_rank_above_dims():
    # conv kernel 24x16x3x3 at rank 12 > 3: give both the same start (our SVD init with padding)
    t = _kernel((24, 16, 3, 3), 2)
    init = svd_init(t, 12, _gen(0))
    ours = cp_als(t, 12, init=init, max_iter=200, tol=1e-10)
    e_tl, errs = _tensorly_parafac(t, 12, init, 200, 1e-10)
    assert ours.info["rel_error"] == pytest.approx(e_tl, rel=1e-6)
    assert ours.info["iterations"] == len(errs)


def test_recovers_exact_low_rank():
    g = _gen(3)
    fs = []
    for s in (8, 7, 3, 3):
        q, _ = torch.linalg.qr(torch.randn((s, 3), generator=g, dtype=torch.float64))
        fs.append(q * math.sqrt(s))
    t = reconstruct(fs)
    res = cp_als(t, 3, max_iter=200, tol=1e-15)
    assert res.info["rel_error"] < 1e-8
    assert res.info["grad_norm"] < 1e-6 * float(t.norm()) ** 2


def test_reported_values_are_consistent():
    t = _kernel((10, 9, 3, 3), 4)
    res = cp_als(t, 6, max_iter=50, tol=0.0)
    i = res.info
    assert i["iterations"] == 50 and i["stop_reason"] == "max_iter" and not i["converged"]
    assert i["rel_error"] == pytest.approx(rel_error(t, res.factors), rel=1e-12)
    # the Gram-based error of the last sweep equals the explicit one
    assert i["rel_error_history"][-1] == pytest.approx(i["rel_error"], rel=1e-8)
    assert i["objective"] == pytest.approx(0.5 * i["rel_error"] ** 2 * float((t * t).sum()), rel=1e-10)
    # ALS error is monotone non-increasing
    h = np.array(i["rel_error_history"])
    assert np.all(np.diff(h) <= 1e-12)
    # degeneracy formula
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in res.factors]).prod(0)
    assert i["degeneracy"] == pytest.approx(float((norms**2).sum() / (t * t).sum()), rel=1e-10)


def test_tol_stops_early_and_converged_flag():
    t = _kernel((8, 6, 5), 5)
    res = cp_als(t, 3, max_iter=5000, tol=1e-6)
    assert res.info["converged"] and res.info["stop_reason"] == "tol"
    h = res.info["rel_error_history"]
    assert abs(h[-2] - h[-1]) < 1e-6
    assert all(abs(a - b) >= 1e-6 for a, b in zip(h[:-2], h[1:-1]))


def test_determinism_dtype_seed():
    t = _kernel((10, 6, 3, 3), 6).float()
    a = cp_als(t, 8, seed=1, max_iter=30)
    b = cp_als(t, 8, seed=1, max_iter=30)
    c = cp_als(t, 8, seed=2, max_iter=30)  # rank 8 > 3: random padding columns depend on seed
    assert all(f.dtype == torch.float32 for f in a.factors)
    assert [tuple(f.shape) for f in a.factors] == [(s, 8) for s in t.shape]
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    assert not all(torch.equal(x, y) for x, y in zip(a.factors, c.factors))
    r = cp_als(t, 8, init="random", seed=1, max_iter=30)
    assert r.info["rel_error"] < 1.0


def test_time_budget():
    g = _gen(7)
    t = torch.randn((48, 32, 5, 5), generator=g, dtype=torch.float64)
    res = cp_als(t, 100, max_iter=10**6, tol=0.0, time_budget_s=0.3)
    assert res.info["stop_reason"] == "time_budget"
    assert 1 <= res.info["iterations"] < 10**6
    assert res.info["seconds"] < 2.3  # budget + one sweep + final diagnostics, loaded machine


def test_bad_inputs():
    t = _kernel((5, 4, 3), 0)
    with pytest.raises(SolverInputError, match="got 0"):
        cp_als(t, 0)
    t2 = t.clone()
    t2[0, 0, 0] = float("nan")
    with pytest.raises(SolverInputError, match="1 NaN"):
        cp_als(t2, 2)
    with pytest.raises(SolverInputError, match=r"rank 100000 needs .*memory_budget_bytes=1000"):
        cp_als(t, 100000, memory_budget_bytes=1000)
