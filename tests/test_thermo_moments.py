"""The OU formulas and the closed-form sampler against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from thermokfac.solvers.thermo import Readout, Spectrum, backends, moments
from thermokfac.solvers.thermo.backends import Schedule

LAMBDAS = torch.tensor([1e-3, 0.05, 0.7, 3.0], dtype=torch.float64)


def _quadrature_window_variance(lam: float, t0: float, window: float, beta: float, n=3001):
    """(1/(βλT²)) ∫∫ [e^{−λ|t−s|} − e^{−λ(s+t)}] ds dt by a tensor trapezoid rule."""
    t = torch.linspace(t0, t0 + window, n, dtype=torch.float64)
    w = torch.full((n,), window / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = w[0] / 2
    gap, total = (t[:, None] - t[None, :]).abs(), t[:, None] + t[None, :]
    kernel = torch.exp(-lam * gap) - torch.exp(-lam * total)
    return float(w @ kernel @ w) / (beta * lam * window**2)


@pytest.mark.parametrize("lam", LAMBDAS.tolist())
@pytest.mark.parametrize(("t0", "window"), [(0.0, 2.0), (1.5, 5.0), (4.0, 0.3)])
def test_window_variance_matches_quadrature(lam, t0, window):
    beta = 3.0
    got = float(moments.window_variance(torch.tensor([lam], dtype=torch.float64), t0, window, beta))
    ref = _quadrature_window_variance(lam, t0, window, beta)
    assert got == pytest.approx(ref, rel=2e-5)


def test_window_variance_small_argument_series_is_continuous():
    u = torch.tensor([0.999e-3, 1.001e-3], dtype=torch.float64)
    values = moments._h(u)
    assert float(values[1] / values[0]) == pytest.approx(float((u[1] / u[0]) ** 3), rel=1e-5)


def test_samples_moments_match_direct_sums():
    """S₁, S₂ closed forms against explicit double sums over the N samples."""
    lam, t0, spacing, count, beta = 0.4, 0.7, 0.9, 9, 2.0
    idx = torch.arange(count, dtype=torch.float64)
    times = t0 + idx * spacing
    cov = (torch.exp(-lam * (times[:, None] - times[None, :]).abs())
           - torch.exp(-lam * (times[:, None] + times[None, :]))) / (beta * lam)
    ref_var = float(cov.sum()) / count**2
    ref_mean = float(torch.exp(-lam * times).mean())
    lam_t = torch.tensor([lam], dtype=torch.float64)
    assert float(moments.samples_variance(lam_t, t0, spacing, count, beta)) == pytest.approx(
        ref_var, rel=1e-10)
    assert float(moments.samples_mean_factor(lam_t, t0, spacing, count)) == pytest.approx(
        ref_mean, rel=1e-12)


def _spd(n: int, seed: int, low=0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.linspace(low, 1.0, n, dtype=torch.float64)
    return (q * evals) @ q.mT


def _analytic_moments(m, b, x0, t0, window, beta):
    """Mean from matrix exponentials and solves (no eigen-coordinates); covariance from
    the quadrature-checked per-mode variance."""
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    x_star = torch.linalg.solve(m, b)
    decay = torch.linalg.matrix_exp(-m * t0)
    window_avg = torch.linalg.solve(m * window, eye - torch.linalg.matrix_exp(-m * window))
    mean = x_star + decay @ window_avg @ (x0 - x_star)
    evals, evecs = torch.linalg.eigh(m)
    var = moments.window_variance(evals, t0, window, beta)
    return mean, (evecs * var) @ evecs.mT


@pytest.mark.parametrize("noise_factor", [1.0, math.sqrt(2.0)])
def test_closed_form_mahalanobis_is_chi_square(noise_factor):
    """Mahalanobis² of R draws vs χ²_n (KS); planting noise ×√2 must be rejected."""
    n, draws, beta, t0, window = 6, 400, 50.0, 3.0, 4.0
    m = _spd(n, 0)
    b = torch.randn(n, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    spec = Spectrum.of_matrix(m)
    sched = Schedule(Readout.AVERAGE, t0, window, 1, 1.0)
    gen = torch.Generator().manual_seed(3)
    mean, cov = _analytic_moments(m, b, x0, t0, window, beta)
    prec = torch.linalg.inv(cov)
    d2 = []
    for _ in range(draws):
        x = backends.closed_form(spec, b, x0, sched, beta, gen)
        dev = (x - mean) * noise_factor
        d2.append(float(dev.mT @ prec @ dev))
    p_value = stats.kstest(d2, stats.chi2(df=n).cdf).pvalue
    if noise_factor == 1.0:
        assert p_value > 1e-3
    else:
        assert p_value < 1e-6


def test_trajectory_matches_closed_form_samples_law():
    """Mean of N exact-transition samples: same law as the closed-form samples readout."""
    n, draws, beta = 4, 300, 20.0
    m = _spd(n, 5, low=0.2)
    b = torch.ones(n, 1, dtype=torch.float64)
    spec = Spectrum.of_matrix(m)
    sched = Schedule(Readout.SAMPLES, 2.0, 0.0, 5, 0.7)
    gen = torch.Generator().manual_seed(4)
    evals, evecs = torch.linalg.eigh(m)
    var = moments.samples_variance(evals, sched.t0, sched.spacing, sched.num_samples, beta)
    prec = (evecs / var) @ evecs.mT
    mean = backends.closed_form(spec, b, None, sched, 1e30, gen)  # β → ∞: the mean
    d2 = []
    for _ in range(draws):
        x, _ = backends.trajectory(spec, b, None, sched, beta, gen, lambda v: v)
        d2.append(float((x - mean).mT @ prec @ (x - mean)))
    assert stats.kstest(d2, stats.chi2(df=n).cdf).pvalue > 1e-3


def test_euler_maruyama_stationary_variance_has_known_bias():
    """EM with step h: stationary variance (1/(βλ))/(1 − λh/2) per mode, not 1/(βλ)."""
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64)
    m = torch.diag(lam)
    beta, h = 4.0, 0.4
    sched = Schedule(Readout.SAMPLES, 20.0, 0.0, 4000, 3.0)
    cols = 8
    samples = []
    backends.euler_maruyama(m, torch.zeros(2, cols, dtype=torch.float64), None, sched, h, beta,
                            torch.Generator().manual_seed(6), lambda x: samples.append(x) or x)
    observed = torch.cat(samples, dim=1).var(dim=1)
    expected = 1 / (beta * lam) / (1 - lam * h / 2)
    count = len(samples) * cols
    se = expected * math.sqrt(2 / count) * 3  # samples 3 apart: mildly correlated
    assert ((observed - expected).abs() < 4 * se).all()
    unbiased = 1 / (beta * lam)
    assert ((observed - unbiased).abs() > 4 * se).any()  # the bias is detectable


def test_error_squared_scales_as_one_over_window():
    n, draws, beta = 5, 200, 1e4
    m = _spd(n, 7, low=0.3)
    b = torch.ones(n, 1, dtype=torch.float64)
    spec = Spectrum.of_matrix(m)
    x_star = torch.linalg.solve(m, b)
    gen = torch.Generator().manual_seed(8)
    windows = [50.0, 200.0, 800.0, 3200.0]
    mse = []
    for window in windows:
        sched = Schedule(Readout.AVERAGE, 200.0, window, 1, 1.0)  # bias e^{−60}: negligible
        errs = [float((backends.closed_form(spec, b, None, sched, beta, gen) - x_star)
                      .pow(2).sum()) for _ in range(draws)]
        mse.append(sum(errs) / draws)
    slope = torch.tensor(mse).log().diff().div(torch.tensor(windows).log().diff()).mean()
    assert float(slope) == pytest.approx(-1.0, abs=0.1)


def test_bias_decays_as_exp_minus_alpha_min_t0():
    n = 4
    m = _spd(n, 9, low=0.1)
    b = torch.ones(n, 1, dtype=torch.float64)
    spec = Spectrum.of_matrix(m)
    x_star = torch.linalg.solve(m, b)
    errors = []
    for t0 in (40.0, 50.0):
        sched = Schedule(Readout.AVERAGE, t0, 1e-3, 1, 1.0)
        x = backends.closed_form(spec, b, None, sched, 1e40, torch.Generator().manual_seed(0))
        errors.append(float((x - x_star).norm()))
    alpha_min = float(torch.linalg.eigvalsh(m)[0])
    assert errors[1] / errors[0] == pytest.approx(math.exp(-alpha_min * 10.0), rel=1e-3)


def test_output_does_not_depend_on_the_eigenbasis():
    """A degenerate eigenspace rotated before use gives the same output for a seed."""
    n = 6
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
    evals = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.7, 1.0], dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2),
                                         dtype=torch.float64))
    q2 = q.clone()
    q2[:, :4] = q[:, :4] @ rot
    assert torch.allclose((q * evals) @ q.mT, (q2 * evals) @ q2.mT, atol=1e-14)
    b = torch.randn(n, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched = Schedule(Readout.AVERAGE, 2.0, 3.0, 1, 1.0)
    outs = [backends.closed_form(Spectrum(v, evals), b, None, sched, 10.0,
                                 torch.Generator().manual_seed(4)) for v in (q, q2)]
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    # sampling in eigen-coordinates instead would differ: the test can tell
    naive = [v @ torch.randn(n, 3, generator=torch.Generator().manual_seed(4),
                             dtype=torch.float64) for v in (q, q2)]
    assert not torch.allclose(naive[0], naive[1], atol=1e-3)


def test_low_rank_spectrum_equals_dense():
    rows = torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dense = 0.5 * rows.mT @ rows + 0.1 * torch.eye(7, dtype=torch.float64)
    low = Spectrum.of_rows(rows, 0.5, 0.1)
    assert low.evecs.shape == (7, 3)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = low.apply([(lambda lam: 1 / lam, x)])
    assert torch.allclose(got, torch.linalg.solve(dense, x), atol=1e-12)
    assert low.alpha_min == pytest.approx(0.1)


def test_moments_take_numpy_arrays_and_agree_with_torch():
    """Every moment formula gives the same float64 values on a NumPy array."""
    lam_np = LAMBDAS.numpy()
    calls = [
        lambda lam: moments.stationary_variance(lam, 2.0),
        lambda lam: moments.transition(lam, 0.3, 2.0)[0],
        lambda lam: moments.transition(lam, 0.3, 2.0)[1],
        lambda lam: moments.window_mean_factor(lam, 1.5, 4.0),
        lambda lam: moments.window_variance(lam, 1.5, 4.0, 2.0),
        lambda lam: moments.window_variance(lam, 0.0, 1e-4, 2.0),  # the small-u series
        lambda lam: moments.samples_mean_factor(lam, 1.5, 0.7, 9),
        lambda lam: moments.samples_variance(lam, 1.5, 0.7, 9, 2.0),
    ]
    for call in calls:
        ref, got = call(LAMBDAS), call(lam_np)
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12, atol=0)


def test_dense_matrix_function_matches_float64():
    """f(M) = V f(Λ) Vᵀ from float32 eigenvectors, weights given directly, against the
    same product in float64."""
    n = 300
    spec64 = Spectrum.of_matrix(_spd(n, 7))
    spec32 = Spectrum(spec64.evecs.float(), spec64.evals)
    weights = (1.0 / spec64.evals) * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).double()
    ref = (spec64.evecs * weights) @ spec64.evecs.mT
    got = spec32.matrix(weights, torch.float32)
    assert got.dtype == torch.float32
    err = float((got.double() - ref).norm() / ref.norm())
    assert err < 50 * torch.finfo(torch.float32).eps
    assert torch.allclose(spec32.matrix(lambda lam: 1.0 / lam, torch.float32).double(),
                          torch.linalg.inv(_spd(n, 7)), rtol=0, atol=1e-3)
