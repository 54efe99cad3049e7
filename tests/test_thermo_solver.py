"""The thermodynamic solver end to end: accuracy, seeds, quantization, modes, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from thermokfac.solvers import ThermodynamicSolver, get_solver
from thermokfac.solvers.thermo import ThermoConfig

from .test_solvers import spd


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(m, b, damping):
    return torch.linalg.solve(m + damping * torch.eye(m.shape[0], dtype=m.dtype), b)


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("kappa", [1e1, 1e3, 1e5])
@pytest.mark.parametrize("backend", ["closed-form", "trajectory"])
def test_meets_target_error(kappa, backend):
    """Automatic t₀ and T from ε: relative error ≤ ε (bias + noise bounds, Sec. 4.2)."""
    m = spd(32, kappa)
    b = torch.randn(32, 4, generator=_gen(1), dtype=torch.float64)
    solver = get_solver("thermodynamic", backend=backend, target_error=1e-3,
                        alpha_min_source="spectrum", num_samples=4)
    result = solver.solve(solver.prepare(m, 0.0), b, generator=_gen(2))
    assert _rel(result.x, _reference(m, b, 0.0)) <= 1e-3


def test_finite_burn_in_leaves_the_predicted_bias():
    m = spd(16, 1e2)
    b = torch.randn(16, 1, generator=_gen(3), dtype=torch.float64)
    solver = get_solver("thermodynamic", t0_rc=30.0, window_rc=1e-6, beta=1e30)
    prepared = solver.prepare(m, 0.0)
    x = solver.solve(prepared, b, generator=_gen(4)).x
    scale = prepared.tensors["scale"]
    device = m / scale
    expected = (torch.eye(16, dtype=torch.float64) - torch.linalg.matrix_exp(-device * 30.0)) \
        @ _reference(m, b, 0.0)
    assert torch.allclose(x, expected, rtol=1e-5, atol=1e-8)


def test_same_seed_same_output_different_seed_differs():
    m = spd(12, 10.0)
    b = torch.randn(12, 2, generator=_gen(5), dtype=torch.float64)
    solver = get_solver("thermodynamic", beta=1e3, t0_rc=50.0, window_rc=5.0)
    prepared = solver.prepare(m, 1e-2)
    a = solver.solve(prepared, b, generator=_gen(7)).x
    assert torch.equal(a, solver.solve(prepared, b, generator=_gen(7)).x)
    assert not torch.allclose(a, solver.solve(prepared, b, generator=_gen(8)).x)


def test_inverse_from_covariance_error_matches_theory():
    """E‖Σ̂ − Σ‖²_F/‖Σ‖²_F = (tr²Σ/‖Σ‖²_F + 1)/N for N independent samples (spaced far
    beyond 1/α_min)."""
    m = spd(8, 20.0)
    samples, repeats = 2000, 60
    solver = get_solver("thermodynamic", inverse_mode="covariance", covariance_samples=samples,
                        covariance_spacing_rc=1e6)
    prepared = solver.prepare(m, 0.0)
    exact = torch.linalg.inv(m)
    errs = [_rel(solver.inverse(prepared, generator=_gen(10 + r)).x, exact) ** 2
            for r in range(repeats)]
    sigma = exact
    predicted = (sigma.trace() ** 2 / sigma.pow(2).sum() + 1) / samples
    mean = sum(errs) / repeats
    assert mean == pytest.approx(float(predicted), rel=0.15)
    assert math.sqrt(mean) <= math.sqrt((8 + 1) / samples)


def test_inverse_by_solves_is_symmetric_and_accurate():
    m = spd(10, 1e2)
    solver = get_solver("thermodynamic", alpha_min_source="spectrum")
    result = solver.inverse(solver.prepare(m, 1e-3), generator=_gen(3))
    assert torch.equal(result.x, result.x.mT)
    assert _rel(result.x, torch.linalg.inv(m + 1e-3 * torch.eye(10, dtype=m.dtype))) < 1e-3
    assert result.modeled_time_s > 0


def test_input_quantization_reports_added_damping():
    m = spd(64, 1e3)
    conservative = get_solver("thermodynamic", input_bits=8).prepare(m, 1e-3)
    assert conservative.stats["effective_added_damping"] > 0
    assert conservative.stats["quantizer_fallbacks"] == 0


def test_nearest_not_pd_falls_back_and_counts():
    x = torch.randn(10, 120, generator=_gen(4), dtype=torch.float64)
    m = x.mT @ x / 10  # rank 10 of 120: nearest rounding breaks definiteness
    prepared = get_solver("thermodynamic", input_bits=6, quantizer="nearest").prepare(m, 1e-4)
    assert prepared.stats["quantizer_fallbacks"] == 1


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_output_quantization_error_is_at_most_half_an_lsb(bits):
    """Calibrated ADC: |error| ≤ LSB/2 per entry, LSB = headroom·max|x_col|/(2^{b−1}−1)."""
    m = spd(16, 10.0)
    b = torch.randn(16, 3, generator=_gen(5), dtype=torch.float64)
    ref = _reference(m, b, 0.0)
    solver = get_solver("thermodynamic", output_bits=bits, target_error=1e-9,
                        alpha_min_source="spectrum")
    prepared = solver.prepare(m, 0.0)
    res = solver.solve(prepared, b, generator=_gen(6))
    lsb = 2.0 * ref.abs().amax(dim=0) / (2 ** (bits - 1) - 1)  # headroom 2 (default)
    assert ((res.x - ref).abs() <= lsb / 2 * 1.001 + 1e-8 * ref.abs().max()).all()
    assert res.stats["clipped"] == 0


def test_error_mitigation_averages_stochastic_roundings():
    """K independent stochastic roundings: error ≈ ε/√K (down to a floor)."""
    m = spd(48, 30.0)
    b = torch.randn(48, 8, generator=_gen(7), dtype=torch.float64)
    ref = _reference(m, b, 1e-2)

    def error(k, seed):
        solver = get_solver("thermodynamic", input_bits=6, quantizer="stochastic",
                            mitigation_samples=k, alpha_min_source="spectrum")
        prepared = solver.prepare(m, 1e-2, generator=_gen(seed))
        return _rel(solver.solve(prepared, b, generator=_gen(seed)).x, ref)

    e1 = sum(error(1, s) for s in range(6)) / 6
    e4 = sum(error(4, s) for s in range(6)) / 6
    assert 0.3 < e4 / e1 < 0.75  # 1/√4 = 0.5
    conservative = [_rel(get_solver("thermodynamic", input_bits=6, alpha_min_source="spectrum")
                         .solve(get_solver("thermodynamic", input_bits=6,
                                           alpha_min_source="spectrum").prepare(m, 1e-2), b,
                                generator=_gen(s)).x, ref) for s in range(2)]
    assert conservative[0] == pytest.approx(conservative[1], rel=1e-6)  # a bias, not noise


@pytest.mark.parametrize("warm", [False, True])
def test_trajectory_warm_start_continues_from_the_last_state(warm):
    """Noise-free (β → ∞) path: the second solve starts where the first one ended."""
    m = spd(12, 10.0)
    b = torch.randn(12, 2, generator=_gen(8), dtype=torch.float64)
    t0, spacing = 2.0, 1.0
    solver = get_solver("thermodynamic", backend="trajectory", warm_start=warm, t0_rc=t0,
                        num_samples=2, sample_spacing_rc=spacing, beta=1e30)
    prepared = solver.prepare(m, 0.0)
    solver.solve(prepared, b, generator=_gen(9))
    second = solver.solve(prepared, b, generator=_gen(10)).x
    assert ("x_state" in prepared.tensors) == warm
    scale, dac = float(prepared.tensors["scale"]), float(b.abs().max())
    device, rhs = m / scale, b / dac
    x_star = torch.linalg.solve(device, rhs)

    def decay(t):
        return torch.linalg.matrix_exp(-device * t)

    start = x_star - decay(t0 + spacing) @ x_star if warm else torch.zeros_like(x_star)
    mean = x_star + (decay(t0) + decay(t0 + spacing)) @ (start - x_star) / 2
    assert torch.allclose(second, mean * dac / scale, rtol=1e-8, atol=1e-10)


def test_closed_form_warm_start_continues_from_the_last_state():
    """Noise-free (β → ∞) closed form: the second solve's window mean starts from the
    state the first one ended in, against matrix exponentials of the device matrix."""
    m = spd(12, 10.0)
    b = torch.randn(12, 2, generator=_gen(8), dtype=torch.float64)
    t0, window = 2.0, 3.0
    solver = get_solver("thermodynamic", backend="closed-form", warm_start=True, t0_rc=t0,
                        window_rc=window, beta=1e30)
    prepared = solver.prepare(m, 0.0)
    solver.solve(prepared, b, generator=_gen(9))
    second = solver.solve(prepared, b, generator=_gen(10)).x
    scale, dac = float(prepared.tensors["scale"]), float(b.abs().max())
    device, rhs = m / scale, b / dac
    x_star = torch.linalg.solve(device, rhs)

    def decay(t):
        return torch.linalg.matrix_exp(-device * t)

    start = x_star - decay(t0 + window) @ x_star  # where the first solve (from 0) ended
    # (1/T)∫ e^{−Mt} dt over [t₀, t₀+T] = M⁻¹(e^{−Mt₀} − e^{−M(t₀+T)})/T
    average = torch.linalg.solve(device, decay(t0) - decay(t0 + window)) / window
    mean = x_star + average @ (start - x_star)
    assert torch.allclose(second, mean * dac / scale, rtol=1e-8, atol=1e-10)


def _two_warm_reads(backend: str, **extra) -> tuple[torch.Tensor, torch.Tensor]:
    """Two successive solves of a warm-started 3 x 3 device, 4 000 right-hand-side
    columns (independent draws of the same b); returns both reads [3, 4000]."""
    m = torch.tensor([[2.0, 0.4, 0.0], [0.4, 1.0, 0.3], [0.0, 0.3, 0.5]],
                     dtype=torch.float64)
    b = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)[:, None].expand(3, 4000)
    settings = {"t0_rc": 0.5, "window_rc": 2.0, "beta": 200.0, **extra}
    solver = get_solver("thermodynamic", backend=backend, warm_start=True, **settings)
    prepared = solver.prepare(m, 0.0)
    first = solver.solve(prepared, b.contiguous(), generator=_gen(20)).x
    second = solver.solve(prepared, b.contiguous(), generator=_gen(21)).x
    return first, second


def test_closed_form_warm_start_draws_the_trajectorys_joint_law():
    """The closed form's (window mean, end state) law against the exact sampled path
    (4 096 samples in the window): the second read's mean and covariance, and its
    covariance with the first read — which exists only through the end state the two
    share, so it checks the mean–end cross-covariance."""
    closed = _two_warm_reads("closed-form")
    path = _two_warm_reads("trajectory", num_samples=4096)

    def moments(first, second):
        centred = [r - r.mean(1, keepdim=True) for r in (first, second)]
        cov = centred[1] @ centred[1].mT / first.shape[1]
        cross = centred[0] @ centred[1].mT / first.shape[1]
        return second.mean(1), cov, cross

    (mean_c, cov_c, cross_c), (mean_p, cov_p, cross_p) = moments(*closed), moments(*path)
    spread = cov_p.diagonal().sqrt()
    assert torch.allclose(mean_c, mean_p, atol=float(4 * spread.max() / 4000**0.5) * 2)
    scale = float(cov_p.diagonal().max())
    assert torch.allclose(cov_c, cov_p, atol=0.1 * scale)
    assert float(cross_p.abs().max()) > 0.1 * scale  # the shared state matters here
    assert torch.allclose(cross_c, cross_p, atol=0.1 * scale)
    reset = moments(*_two_warm_reads("closed-form", t0_rc=60.0))[2]  # forgets the state
    assert float(reset.abs().max()) < 0.05 * scale


def test_euler_maruyama_with_mismatch_solves_the_realised_matrix():
    m = spd(6, 5.0)
    b = torch.randn(6, 1, generator=_gen(11), dtype=torch.float64)
    solver = get_solver("thermodynamic", backend="euler-maruyama", mismatch_sigma=0.05,
                        t0_rc=60.0, num_samples=200, sample_spacing_rc=0.5, beta=1e14,
                        em_dt_rc=0.1)
    prepared = solver.prepare(m, 0.0)
    realised = prepared.tensors["realised_0"]
    assert not torch.allclose(realised, realised.mT)
    x = solver.solve(prepared, b, generator=_gen(12)).x
    device_b = b / b.abs().max()
    expected = torch.linalg.solve(realised, device_b) * b.abs().max() / prepared.tensors["scale"]
    assert _rel(x, expected) < 1e-3
    assert _rel(x, _reference(m, b, 0.0)) > 1e-3  # mismatch moves the answer


def test_resistor_array_mode_matches_dense_programming():
    rows = torch.randn(5, 40, generator=_gen(13), dtype=torch.float64)
    solver = get_solver("thermodynamic", alpha_min_source="spectrum", target_error=1e-5)
    b = torch.randn(40, 2, generator=_gen(14), dtype=torch.float64)
    low = solver.prepare_rows(rows, 0.2, 0.05)
    dense_m = 0.2 * rows.mT @ rows
    dense = solver.prepare(dense_m, 0.05)
    x_low = solver.solve(low, b, generator=_gen(15)).x
    x_dense = solver.solve(dense, b, generator=_gen(15)).x
    ref = _reference(dense_m, b, 0.05)
    assert _rel(x_low, ref) < 1e-4 and _rel(x_dense, ref) < 1e-4
    assert low.tensors["evecs_0"].shape == (40, 5)  # never n×n
    assert low.modeled_time_s < dense.modeled_time_s  # 2bn resistor values vs n²


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_error": 0.0}, "target_error"),
    ({"target_error": -1.0}, "target_error"),
    ({"input_bits": 1}, r"input_bits=1 must be an integer in \[2, 32\]"),
    ({"output_bits": 40}, "output_bits"),
    ({"backend": "analog"}, "backend='analog' is not valid"),
    ({"warm_start": True, "readout": "samples"}, "models the average read-out"),
    ({"mismatch_sigma": 0.1}, "needs backend='euler-maruyama'"),
    ({"mitigation_samples": 3}, "mitigation_samples > 1"),
    ({"beta": -2.0}, "beta"),
    ({"nonsense": 1}, "unknown thermodynamic solver options"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThermodynamicSolver(**kwargs)


def test_bad_input_matrix_and_unstable_euler_step():
    solver = ThermodynamicSolver()
    with pytest.raises(ValueError, match="not symmetric"):
        solver.prepare(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        solver.prepare(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 0.1)
    em = ThermodynamicSolver(backend="euler-maruyama", em_dt_rc=2.5, t0_rc=5.0,
                             sample_spacing_rc=1.0, num_samples=2)
    prepared = em.prepare(torch.eye(3), 0.0)
    with pytest.raises(ValueError, match=r"unstable: dt·α_max"):
        em.solve(prepared, torch.ones(3))


def test_config_object_and_overrides():
    cfg = ThermoConfig(input_bits=12, output_bits=12)
    solver = ThermodynamicSolver(cfg, target_error=1e-2)
    assert solver.config.input_bits == 12 and solver.config.target_error == 1e-2
    assert solver.config.beta_value == pytest.approx(1e-9 / (1.380649e-23 * 300), rel=1e-12)


def test_block_gauss_seidel_for_factors_larger_than_an_spu():
    """max_dim < n: SPU-sized diagonal blocks, digital coupling, sweeps counted in time."""
    from thermokfac.solvers import HardwareModel

    m = spd(50, 20.0)
    b = torch.randn(50, 3, generator=_gen(16), dtype=torch.float64)
    ref = _reference(m, b, 1e-2)
    blocked = ThermodynamicSolver(hardware=HardwareModel(max_dim=16), target_error=1e-6,
                                  alpha_min_source="spectrum")
    prepared = blocked.prepare(m, 1e-2)
    assert int(prepared.tensors["blocks"]) == 4
    result = blocked.solve(prepared, b, generator=_gen(17))
    assert _rel(result.x, ref) < 1e-5
    sweeps = result.stats["block_sweeps"]
    assert 2 <= sweeps < 50
    whole = ThermodynamicSolver(target_error=1e-6, alpha_min_source="spectrum")
    one = whole.solve(whole.prepare(m, 1e-2), b, generator=_gen(17)).modeled_time_s
    # every sweep solves 4 blocks of ~n/4 one after the other (settling dominates here)
    assert result.modeled_time_s > sweeps * 4 * 0.9 * one / 2
    with pytest.raises(ValueError, match="whole factor on one SPU"):
        ThermodynamicSolver(hardware=HardwareModel(max_dim=16), inverse_mode="covariance"
                            ).inverse(prepared)
