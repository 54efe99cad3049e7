"""The covariance inverse (Eq. 23) with samples Δ apart: one device, simulated and timed alike.

References: brute-force double sums for the AR(1) lag sum, the Wishart moment for
independent samples, and the trajectory backend's exact AR(1) transitions for the
closed form's correlated-sample law.
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import pytest
import torch

from thermokfac.solvers import get_solver
from thermokfac.solvers.thermo import moments


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(n: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return (q * torch.linspace(low, high, n, dtype=torch.float64)) @ q.mT


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("count", [1, 2, 7, 300])
@pytest.mark.parametrize("rate", [1e-9, 1e-5, 3e-3, 0.2, 1.0, 40.0])
def test_lag_sum_ratio_matches_the_double_sum(rate, count):
    i = np.arange(count)
    brute = float((np.exp(-rate) ** np.abs(i[:, None] - i[None, :])).sum() / count)
    got = moments.lag_sum_ratio(np.array([rate]), count)[0]
    assert got == pytest.approx(brute, rel=1e-9)
    assert float(moments.lag_sum_ratio(torch.tensor([rate], dtype=torch.float64), count)) \
        == pytest.approx(brute, rel=1e-9)


def test_predicted_error_is_wisharts_for_independent_samples():
    lam = np.linspace(0.05, 1.0, 20)
    sigma = 1 / (3.0 * lam)
    count = 5000
    wishart = math.sqrt((sigma.sum() ** 2 + (sigma**2).sum()) / count / (sigma**2).sum())
    assert moments.covariance_inverse_error(lam, 1e9, count, 3.0) == pytest.approx(wishart,
                                                                                   rel=1e-12)
    # Closer samples are worth less: the error grows monotonically as Δ shrinks.
    errors = [moments.covariance_inverse_error(lam, d, count, 3.0) for d in (10, 1, 0.1, 0.01)]
    assert errors == sorted(errors) and errors[-1] > 5 * wishart


@pytest.mark.parametrize("spacing", [0.01, None, 8.0])
def test_trajectory_and_closed_form_are_one_device(spacing):
    """Same device, same samples, same charged time: the closed form's inverse and the
    exact path's have errors of the same size, both at the predicted value."""
    m = _spd(24, 0.1, 1.0)
    exact = torch.linalg.inv(m)
    count, repeats = 6000, 6
    runs = {}
    for backend in ("closed-form", "trajectory"):
        solver = get_solver("thermodynamic", backend=backend, inverse_mode="covariance",
                            covariance_samples=count, covariance_spacing_rc=spacing,
                            beta=1.0, alpha_min_source="spectrum")
        prepared = solver.prepare(m, 0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [solver.inverse(prepared, generator=_gen(100 + r)) for r in range(repeats)]
        # Loud exactly when the estimate is poor (predicted error > 0.5).
        assert bool(caught) == (spacing == 0.01), [str(w.message) for w in caught]
        runs[backend] = (prepared, results, [_rel(r.x, exact) for r in results])
    (p_cf, res_cf, err_cf), (_, res_tr, err_tr) = runs["closed-form"], runs["trajectory"]
    alpha = float(p_cf.tensors["alpha_min"])
    delta = spacing if spacing is not None else 1 / alpha
    assert float(p_cf.tensors["covariance_spacing"]) == pytest.approx(delta)
    # One charged time, under every settle model, and target_error's is the simulated one.
    assert res_cf[0].stats == pytest.approx(
        {k: v for k, v in res_tr[0].stats.items() if k in res_cf[0].stats})
    rc = 1e-6
    simulated = (float(p_cf.tensors["t0"]) + count * delta) * rc
    assert res_cf[0].stats["modeled_compute_s/target_error"] == pytest.approx(simulated)
    assert res_cf[0].stats["modeled_compute_s/rc"] == pytest.approx((count + 1) * rc)  # settle + N
    predicted = res_cf[0].stats["covariance_predicted_error"]
    eigenvalues = torch.linalg.eigvalsh(m) / float(p_cf.tensors["scale"])
    assert predicted == pytest.approx(moments.covariance_inverse_error(
        eigenvalues, delta, count, 1.0), rel=1e-9)
    for errors in (err_cf, err_tr):
        spread = statistics.stdev(errors) / math.sqrt(repeats)
        assert abs(statistics.mean(errors) - predicted) < 4 * spread + 0.04 * predicted
    both = math.hypot(statistics.stdev(err_cf), statistics.stdev(err_tr)) / math.sqrt(repeats)
    assert abs(statistics.mean(err_cf) - statistics.mean(err_tr)) < 4 * both + 0.05 * predicted


def test_resistor_array_covariance_inverse_is_the_full_matrix():
    """The low-rank form (rows R, M = s·RᵀR + λI) is completed before sampling: the
    estimate is of the whole inverse, not only its row space."""
    rows = torch.randn(5, 16, generator=_gen(3), dtype=torch.float64)
    scale, damping = 0.25, 0.5
    exact = torch.linalg.inv(scale * rows.mT @ rows + damping * torch.eye(16,
                                                                        dtype=torch.float64))
    solver = get_solver("thermodynamic", inverse_mode="covariance", covariance_samples=200_000,
                        covariance_spacing_rc=50.0, beta=1.0, alpha_min_source="spectrum")
    result = solver.inverse(solver.prepare_rows(rows, scale, damping), generator=_gen(4))
    assert _rel(result.x, exact) < 3 * result.stats["covariance_predicted_error"] < 0.05


def test_spacing_must_be_positive():
    with pytest.raises(ValueError, match="covariance_spacing_rc"):
        get_solver("thermodynamic", covariance_spacing_rc=0.0)
