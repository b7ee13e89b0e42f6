"""Tests of cpbench.decomposition.solvers.cp_epc (the error-preserving correction) and the cp-epc decomposer."""
from __future__ import annotations

import pytest
import torch

import cpbench
from cpbench.errors import UsageError
from cpbench.decomposition.solvers import SolverInputError, cp_als, cp_epc, cp_nls, degeneracy, rel_error

torch.set_num_threads(1)


def _border_rank_tensor(n=6, seed=0):
    """a o a o b + a o b o a + b o a o a plus a little noise: a rank-2 fit degenerates."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    o = lambda x, y, z: torch.einsum("i,j,k->ijk", x, y, z)  # noqa: E731
    return o(a, a, b) + o(a, b, a) + o(b, a, a) + 1e-2 * torch.randn((n, n, n), generator=g, dtype=torch.float64)


def _kernel(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _with_cancelling_pair(factors, scale, seed):
    """The same model with two more rank-1 terms, +c u o v o w and -c u o v o w: a fit whose error is
    unchanged and whose degeneracy is inflated (what ALS's cancelling terms look like)."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randn((f.shape[0], 1), generator=g, dtype=f.dtype) for f in factors]
    cols[0] = cols[0] * scale
    return [torch.cat([f, c, -c if k == 0 else c], dim=1) for k, (f, c) in enumerate(zip(factors, cols))]


def test_epc_keeps_the_error_and_removes_the_degeneracy_of_a_degenerate_fit():
    t = _kernel((8, 6, 3, 3), 7)
    base = cp_nls(t, 4, max_iter=30)
    factors = _with_cancelling_pair(base.factors, 10.0, 1)
    norm_sq = float((t * t).sum())
    e, d = rel_error(t, factors), degeneracy(factors, norm_sq)
    assert e == pytest.approx(base.info["rel_error"], rel=1e-9) and d > 10 * base.info["degeneracy"]
    res = cp_epc(t, factors)
    assert res.info["rel_error"] <= e * (1 + 1e-6)
    assert res.info["rel_error"] == pytest.approx(rel_error(t, res.factors), rel=1e-12)
    assert res.info["degeneracy"] < d / 5, res.info
    assert res.info["degeneracy"] == pytest.approx(degeneracy(res.factors, norm_sq), rel=1e-9)
    assert res.info["fit_rel_error"] == pytest.approx(e, rel=1e-9) and res.info["fit_degeneracy"] == pytest.approx(d)


def test_epc_cannot_beat_the_trade_off_of_a_border_rank_problem():
    # ALS's rank-2 fit of a border-rank tensor is degenerate because its error falls as the terms
    # grow: no model of that error has smaller terms, and EPC keeps the fit (within its search)
    t = _border_rank_tensor()
    fit = cp_als(t, 2, init="random", seed=1, max_iter=300)
    res = cp_epc(t, fit.factors)
    assert res.info["rel_error"] <= fit.info["rel_error"] * (1 + 1e-6)
    assert fit.info["degeneracy"] * 0.95 <= res.info["degeneracy"] <= fit.info["degeneracy"] * (1 + 1e-9)
    assert any(not tr[3] for tr in res.info["trials"])  # larger weights cost error


@pytest.mark.parametrize("seed", [0, 1])
def test_epc_on_a_well_conditioned_fit_never_raises_error_or_degeneracy(seed):
    t = _kernel((8, 6, 3, 3), seed)
    fit = cp_nls(t, 6, max_iter=40)
    res = cp_epc(t, fit.factors, max_iter=60)
    assert res.info["rel_error"] <= fit.info["rel_error"] * (1 + 1e-6)
    assert res.info["degeneracy"] <= fit.info["degeneracy"] * (1 + 1e-12)
    assert all(tr[3] == (tr[1] <= fit.info["rel_error"] * (1 + 1e-6)) for tr in res.info["trials"])


def test_epc_with_a_looser_bound_trades_error_for_degeneracy():
    t = _kernel((8, 6, 3, 3), 3)
    fit = cp_nls(t, 6, max_iter=40)
    loose = cp_epc(t, fit.factors, error=1.05 * fit.info["rel_error"], max_iter=80)
    assert fit.info["rel_error"] < loose.info["rel_error"] <= 1.05 * fit.info["rel_error"] * (1 + 1e-6)
    assert loose.info["degeneracy"] < 0.95 * fit.info["degeneracy"]


def test_epc_is_deterministic_and_leaves_its_input_alone():
    t = _kernel((8, 6, 3, 3), 2)
    fit = cp_als(t, 4, max_iter=50)
    before = [f.clone() for f in fit.factors]
    a = cp_epc(t, fit.factors, max_iter=60)
    b = cp_epc(t.clone(), fit.factors, max_iter=60)
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    assert all(torch.equal(x, y) for x, y in zip(fit.factors, before))
    assert a.info["rel_error"] == b.info["rel_error"]


@pytest.mark.parametrize("kwargs, text", [
    (dict(error=-1.0), "error must be a finite number >= 0"),
    (dict(error=float("nan")), "error must be a finite number >= 0"),
    (dict(mu_start=0.0), "0 < mu_start"),
    (dict(inner_iter=0), "inner_iter >= 1"),
    (dict(cg_precision="half"), "cg_precision"),
    (dict(error=1e-9), "above the bound"),
])
def test_epc_bad_options_are_one_line_errors(kwargs, text):
    t = _kernel((5, 4, 3), 0)
    fit = cp_als(t, 2, max_iter=20)
    with pytest.raises(SolverInputError, match=text) as exc:
        cp_epc(t, fit.factors, **kwargs)
    assert "\n" not in str(exc.value)


def test_epc_bad_factors_are_one_line_errors():
    t = _kernel((5, 4, 3), 0)
    with pytest.raises(SolverInputError, match="init factor 1 has shape"):
        cp_epc(t, [torch.zeros(5, 2), torch.zeros(3, 2), torch.zeros(3, 2)])
    with pytest.raises(SolverInputError, match="non-empty list"):
        cp_epc(t, [])
    with pytest.raises(SolverInputError, match="finite"):
        cp_epc(t * float("nan"), [torch.zeros(5, 2), torch.zeros(4, 2), torch.zeros(3, 2)])


def test_cp_epc_decomposer_corrects_the_fit_it_names():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, 3, 3, generator=g)
    dec = cpbench.get_decomposer("cp-epc")
    fact = dec.decompose(w, 5, fit="cp-als", fit_options={"n_iter_max": 50}, epc_max_iter=40)
    fit = cpbench.get_decomposer("cp-als").decompose(w, 5, n_iter_max=50)
    assert fact.info["fit"]["method"] == "cp-als"
    assert fact.rel_error <= fit.rel_error * (1 + 1e-5)
    assert fact.info["degeneracy"] <= fit.info["degeneracy"] * (1 + 1e-6)
    assert "cp-nls." in dec.version and "cp-als." in dec.version  # the fits' versions key the cache
    with pytest.raises(UsageError, match="fit 'tucker2' is not allowed; allowed: cp-nls, cp-als"):
        dec.decompose(w, 5, fit="tucker2")
    with pytest.raises(UsageError, match=r"unknown options \['max_iter'\]"):
        dec.decompose(w, 5, max_iter=3)
