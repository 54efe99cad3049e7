"""The estimated device clock removes exactly the work the device takes over."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.solvers import HardwareModel, ThermodynamicSolver
from thermokfac.timing import TimedSolves

from .cases import classification_batch, mlp


class FakeClock:
    """Advances by one second at every read: a timed block lasts its number of reads."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def __call__(self) -> float:
        return float(next(self.ticks))


def test_timed_solves_add_up_the_solver_calls_only():
    class Solver:
        calls = 0

        def solve(self, *args, **kwargs):
            Solver.calls += 1
            return "x"

        name = "fake"

    timed = TimedSolves(Solver(), FakeClock())
    assert [timed.solve(1), timed.solve(2)] == ["x", "x"]
    assert timed.seconds == 2.0 and Solver.calls == 2 and timed.name == "fake"


@pytest.mark.parametrize("method", ["solve", "inverse"])
def test_solve_time_is_the_time_inside_the_solves(method):
    """Method 2: two solves per layer and step, each one clock tick under a fake clock;
    Method 1 multiplies by stored inverses: nothing to take over at update time."""
    model = mlp((6, 5, 4))
    x, y = classification_batch()
    pre = KFACPreconditioner(model, method=method, kl_clip=None, inv_update_steps=1)
    pre.timing.clock = FakeClock()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    t = pre.last_timings
    layers = len(pre.layer_names)
    assert t.solve_s == (2.0 * layers if method == "solve" else 0.0)
    assert t.solve_s < t.update_s
    summary = pre.timing_summary()
    assert summary["mean_solve_s"] == t.solve_s


# ---------------------------------------------------------------- settle models
def test_time_breakdown_under_each_settle_model():
    from thermokfac.solvers.hardware import SettleModel, TimeBreakdown, from_stats, time_stats

    hw = HardwareModel(n_spus=1, shared_link=False)
    solve = hw.time_solve_all(8, 3, alpha_min=0.01, t0_rc=40.0, window_rc=900.0)
    plain = hw.time_solve(8, 3, alpha_min=0.01, t0_rc=40.0, window_rc=900.0)
    assert solve.total_s == plain.total_s  # its own model's numbers (rc by default)
    transfer = solve.transfer_s
    expected = {"rc": hw.rc_s, "rc_over_alpha_min": hw.rc_s / 0.01,
                "target_error": hw.rc_s * (40.0 + 900.0)}
    for model, compute in expected.items():
        assert solve.under(model).total_s == pytest.approx(transfer + compute, rel=1e-12)
    program = hw.time_program(8)  # no settling: the same under every model
    both = (program + solve).scaled(0.5)
    for model, compute in expected.items():
        assert both.under(model).total_s == pytest.approx(
            0.5 * (program.total_s + transfer + compute), rel=1e-12)
    assert from_stats(solve.total_s, time_stats(solve)).under(SettleModel.TARGET_ERROR) \
        .total_s == pytest.approx(solve.under("target_error").total_s, rel=1e-12)
    assert TimeBreakdown(settle_s=2.0).under("rc_over_alpha_min").total_s == 2.0


def test_step_clock_under_each_settle_model_uses_the_simulations_alpha_and_schedule():
    """One Linear layer, thermodynamic Method 2 on one SPU with its own link: the step's
    device time under rc/α_min and t₀+T equals the rc time plus, for each solve bank,
    the extra settling computed by hand from the α_min, t₀ and window the simulation
    used (read from the prepared factors)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    hw = HardwareModel(n_spus=1, shared_link=False)
    solver = ThermodynamicSolver(hardware=hw, target_error=1e-2)
    pre = KFACPreconditioner(model, solver=solver, kl_clip=None, inv_update_steps=1,
                             factor_dtype=torch.float64)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    t = pre.last_timings
    assert t.modeled_hardware_s == pytest.approx(t.modeled_rc_s, rel=1e-12)
    state = pre.layer_state("0")
    extra_alpha = extra_target = 0.0
    for prep in (state.g_prep, state.a_prep):  # one bank on each factor
        alpha = float(prep.tensors["alpha_min"])
        sched = solver.schedule(prep)
        extra_alpha += hw.rc_s / alpha - hw.rc_s
        extra_target += hw.rc_s * (sched.t0 + sched.duration) - hw.rc_s
    assert t.modeled_rc_over_alpha_min_s == pytest.approx(t.modeled_rc_s + extra_alpha,
                                                          rel=1e-9)
    assert t.modeled_target_error_s == pytest.approx(t.modeled_rc_s + extra_target, rel=1e-9)
    assert t.modeled_target_error_s > t.modeled_rc_over_alpha_min_s > t.modeled_rc_s


def test_recorded_spectrum_is_the_damped_factors_scaled():
    """α_min and α_max per prepare and factor: the extreme eigenvalues of the damped
    factor (float64 eigvalsh) divided by the solver's scale; κ their ratio."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    solver = ThermodynamicSolver(target_error=1e-2, alpha_min_source="spectrum")
    pre = KFACPreconditioner(model, solver=solver, kl_clip=None, inv_update_steps=1,
                             factor_dtype=torch.float64, damping=1e-2)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    rows = list(pre.spectra.history)
    assert {(r["layer"], r["factor"]) for r in rows} == {("0", "a"), ("0", "g")}
    factors, state = pre.factors()["0"], pre.layer_state("0")
    for row in rows:
        i = "ag".index(row["factor"])
        damped = factors[i] + state.damping[i] * torch.eye(factors[i].shape[0],
                                                           dtype=torch.float64)
        evals = torch.linalg.eigvalsh(damped) / row["scale"]
        assert row["alpha_min"] == pytest.approx(float(evals.min()), rel=1e-9)
        assert row["alpha_max"] == pytest.approx(float(evals.max()), rel=1e-9)
        assert row["kappa"] == pytest.approx(float(evals.max() / evals.min()), rel=1e-9)


# ------------------------------------------------------------------ break-even map
def test_device_step_is_the_hand_count():
    from thermokfac.experiments.breakeven import device_step_s

    bank = {"n": 4, "k": 3, "alpha_min": 0.5, "t0_rc": 2.0, "window_rc": 10.0}
    link = 50e9
    transfer = (16 * 16 / link) / 10 + 2 * (12 * 16 / link)  # program/10 + load + read
    for model, compute in (("rc", 1e-6), ("rc_over_alpha_min", 2e-6),
                           ("target_error", 12e-6)):
        hw = HardwareModel(n_spus=1, shared_link=False, settle_model=model)
        assert device_step_s([bank], hw, 10) == pytest.approx(transfer + compute, rel=1e-12)
    hw = HardwareModel(n_spus=1, shared_link=False)  # mitigation: 3 programs, 3 reads
    reads = 3 * (2 * (12 * 16 / link) + 1e-6)
    assert device_step_s([{**bank, "reads": 3, "programs": 3}], hw, 10) == pytest.approx(
        3 * (16 * 16 / link) / 10 + reads, rel=1e-12)
    two = HardwareModel(n_spus=2, shared_link=False)  # two banks on two SPUs: in parallel
    assert device_step_s([bank, bank], two, 10) == pytest.approx(
        device_step_s([bank], two, 10), rel=1e-12)


def test_breakeven_map_from_two_short_runs(tmp_path):
    import json

    from thermokfac.cli import main

    out = tmp_path / "be"
    assert main(["breakeven", "--data", "digits", "--width", "32", "--depth", "1",
                 "--batch-size", "64", "--steps", "6", "--inv-update-steps", "5",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "breakeven.json").read_text())
    assert 0 < result["taken_over_share"] < 1
    assert {b["factor"] for b in result["banks"]} == {"a", "g"}
    at = result["speedup_at_paper_point"]
    assert at["rc"] > at["rc_over_alpha_min"] > at["target_error"] > 0
    for panel in result["panels"]:
        grid = np.array(panel["speedup"])  # rows: links, columns: RC
        assert (np.diff(grid, axis=1) <= 1e-12).all()  # a slower RC never helps
        assert (np.diff(grid, axis=0) >= -1e-12).all()  # a faster link never hurts
    assert (out / "breakeven.png").exists()
    assert main(["breakeven", "--data", "digits", "--steps", "3", "--inv-update-steps", "5",
                 "--out", str(tmp_path / "x")]) == 2  # no prepare after the first step


def test_a_device_timed_as_rc_charges_is_far_off_where_the_full_schedule_is_not():
    """The README's 'accuracy the RC timing buys': one RC of settling and one read
    leave a damped K-FAC-like system's solve far from the float64 solve; the schedule
    of the target error does not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 20, generator=g, dtype=torch.float64)
    m = x.T @ x / 40
    b = torch.randn(20, 3, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve(m + 1e-2 * torch.eye(20, dtype=torch.float64), b)
    errors = {}
    for name, kwargs in (("rc", {"t0_rc": 1.0, "window_rc": 1e-3}), ("full", {})):
        solver = ThermodynamicSolver(**kwargs)
        result = solver.solve(solver.prepare(m, 1e-2, generator=g), b, generator=g)
        errors[name] = float((result.x - ref).norm() / ref.norm())
    assert errors["rc"] > 0.5 and errors["full"] < 1e-4


def test_a_settle_model_that_cannot_be_computed_is_loud():
    """α_min ≤ 0: RC/α_min raises when it is the hardware's own model, and is NaN (not a
    guess) among the other models a report shows; the compare table says so."""
    from thermokfac.experiments.compare import table

    own = HardwareModel(settle_model="rc_over_alpha_min")
    with pytest.raises(ValueError, match=r"alpha_min > 0, got 0\.0"):
        own.time_solve(4, 2, alpha_min=0.0, t0_rc=1.0, window_rc=1.0)
    rc = HardwareModel()
    timing = rc.time_solve_all(4, 2, alpha_min=0.0, t0_rc=1.0, window_rc=1.0)
    assert timing.total_s == rc.time_solve(4, 2, alpha_min=1.0, t0_rc=1.0,
                                           window_rc=1.0).total_s
    assert np.isnan(timing.under("rc_over_alpha_min").total_s)
    shared = HardwareModel(n_spus=2)  # a NaN job is not lost in the SPU scheduling
    fine = rc.time_solve_all(4, 2, alpha_min=0.5, t0_rc=1.0, window_rc=1.0)
    for jobs in ([fine, timing], [timing, fine]):
        assert np.isnan(shared.step_times(jobs)["rc_over_alpha_min"])
        assert not np.isnan(shared.step_times(jobs)["rc"])
    summary = {"metric_key": "val_accuracy", "share_removed": {},
               "curves": [{"label": "x", "points": [{"clock_s": float("nan"), "val_loss": 1.0,
                                                     "val_accuracy": 0.5}]}]}
    assert "n/a (settle model not computable)" in table(summary)
