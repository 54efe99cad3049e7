"""The hardware timing model against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from thermokfac.solvers import ThermodynamicSolver
from thermokfac.solvers.hardware import HardwareModel, TimeBreakdown


def test_defaults_are_the_papers():
    hw = HardwareModel()
    assert (hw.rc_s, hw.load_bits, hw.read_bits, hw.link_gbps) == (1e-6, 16, 16, 50.0)
    assert (hw.input_bits, hw.output_bits) == (None, None)  # the solver's, when it sets them
    assert hw.settle_model.value == "rc"


@pytest.mark.parametrize(("bits", "loaded", "read"), [
    ({}, 16, 16), ({"input_bits": 8}, 8, 16), ({"output_bits": 6}, 16, 6),
    ({"input_bits": 8, "output_bits": 8}, 8, 8)])
def test_the_solver_bits_are_the_ones_the_device_time_charges(bits, loaded, read):
    """One source of truth: a solver's DAC/ADC bits reach its hardware model, and a solve's
    modelled time is the hand formula with those bits (16 where the solver is exact)."""
    solver = ThermodynamicSolver(**bits, adc_range="bound",
                                 hardware=HardwareModel(n_spus=4, link_gbps=10.0))
    assert (solver.hardware.load_bits, solver.hardware.read_bits) == (loaded, read)
    assert (solver.hardware.input_bits, solver.hardware.output_bits) == (loaded, read)
    torch.manual_seed(0)
    q = torch.randn(6, 6, dtype=torch.float64)
    prepared = solver.prepare(q @ q.T + torch.eye(6, dtype=torch.float64), 0.1)
    seconds = solver.solve(prepared, torch.ones(6, 3, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(0)).modeled_time_s
    transfers = 6 * 3 * (loaded + read) / 10e9  # n·k values each way
    assert seconds == pytest.approx(transfers + 1e-6, rel=1e-12)  # + one RC to settle


@pytest.mark.parametrize(("solver_bits", "device_bits", "match"), [
    ({"input_bits": 8}, {"input_bits": 16}, r"hardware.input_bits=16 but the solver's "
                                            r"input_bits=8"),
    ({}, {"output_bits": 8}, r"hardware.output_bits=8 but the solver's output_bits=None"),
])
def test_bits_set_twice_must_agree(solver_bits, device_bits, match):
    with pytest.raises(ValueError, match=match):
        ThermodynamicSolver(**solver_bits, hardware=HardwareModel(**device_bits))
    agreed = ThermodynamicSolver(input_bits=8, hardware=HardwareModel(input_bits=8))
    assert agreed.hardware.load_bits == 8
    # an exact solver's values travel as 16-bit numbers: saying so is consistent
    assert ThermodynamicSolver(hardware=HardwareModel(input_bits=16)).hardware.input_bits == 16


def test_solve_breakdown_by_settle_model():
    hw = HardwareModel()
    n, k = 512, 513
    transfer = n * k * 16 / 50e9  # 84.0 µs each way
    rc = hw.time_solve(n, k, alpha_min=0.01, t0_rc=700.0, window_rc=50.0)
    assert rc.load_s == pytest.approx(transfer) and rc.readout_s == pytest.approx(transfer)
    assert rc.settle_s == 1e-6 and rc.integrate_s == 0.0
    assert rc.total_s == pytest.approx(2 * transfer + 1e-6)
    models = hw.all_settle_models(n, k, alpha_min=0.01, t0_rc=700.0, window_rc=50.0)
    assert models["rc_over_alpha_min"].settle_s == pytest.approx(1e-4)
    assert models["target_error"].settle_s == pytest.approx(7e-4)
    assert models["target_error"].integrate_s == pytest.approx(5e-5)


def test_programming_time_dense_and_resistor_array():
    hw = HardwareModel(input_bits=8, link_gbps=10.0)
    assert hw.time_program(100).load_s == pytest.approx(100 * 100 * 8 / 10e9)
    assert hw.time_program(100, array_rows=4).load_s == pytest.approx(2 * 4 * 100 * 8 / 10e9)


def test_step_time_spreads_jobs_over_spus():
    jobs = [TimeBreakdown(load_s=1.0, settle_s=5.0), TimeBreakdown(load_s=1.0, settle_s=4.0),
            TimeBreakdown(load_s=1.0, settle_s=3.0), TimeBreakdown(load_s=1.0, settle_s=2.0)]
    # one SPU, shared link: everything in sequence
    assert HardwareModel(n_spus=1).step_time(jobs) == pytest.approx(18.0)
    # two SPUs, shared link: transfers serialise (4), computes LPT: {5, 2} and {4, 3} -> 7
    assert HardwareModel(n_spus=2).step_time(jobs) == pytest.approx(11.0)
    # two SPUs with their own links: LPT over totals {6, 3} and {5, 4} -> 9
    assert HardwareModel(n_spus=2, shared_link=False).step_time(jobs) == pytest.approx(9.0)
    assert HardwareModel(n_spus=8, shared_link=False).step_time(jobs) == pytest.approx(6.0)
    assert HardwareModel().step_time([]) == 0.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rc_s": 0.0}, "rc_s"), ({"link_gbps": -1.0}, "link_gbps"),
    ({"input_bits": 0}, "input_bits"), ({"n_spus": 0}, "n_spus"),
    ({"max_dim": 1}, "max_dim"), ({"settle_model": "slow"}, "settle_model='slow'"),
])
def test_invalid_hardware(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardwareModel(**kwargs)
