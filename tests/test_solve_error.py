"""The measured solve error (``measure_solve_error_every``): each block's two solves of
Eq. 15 against an unbatched float64 ``torch.linalg.solve`` of the same damped factor and
right-hand side — a solver off by a known factor is measured at exactly that error, the
steps it skips are not measured, and a training run writes the errors to its files —
and the thermodynamic solver's prediction of that error from the OU moments, which
must meet the measured error over a grid of device schedules."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.experiments.config import TrainConfig
from thermokfac.experiments.train import Run
from thermokfac.kfac.caches import InverseCache
from thermokfac.solvers import CholeskySolver, ThermodynamicSolver

OFF = 0.01  # the known relative error of the solver below


class OffByOnePercent(CholeskySolver):
    """Cholesky, its answers scaled by 1 + OFF: a solver with a known relative error."""

    name = "cholesky-off"

    def _solve(self, prepared, b, generator, overwrite_b=False):
        x, modeled, stats = super()._solve(prepared, b, generator, overwrite_b)
        return x * (1 + OFF), modeled, stats

    def _inverse(self, prepared, generator):
        x, modeled, stats = super()._inverse(prepared, generator)
        return x * (1 + OFF), modeled, stats


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _steps(pre: KFACPreconditioner, model: nn.Module, n: int) -> list:
    gen = torch.Generator().manual_seed(1)
    reports = []
    for _ in range(n):
        model.zero_grad()
        x = torch.randn(32, 6, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        reports.append(pre.step())
    return reports


def test_the_error_is_a_float64_solve_of_the_same_damped_factor():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    factor = r.mT @ r / 40
    rhs = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(factor + 0.1 * torch.eye(7, dtype=torch.float64), rhs)
    cache = InverseCache(torch.eye(7), damping=0.1)
    cache.reference = factor
    wrong = exact + 1e-3 * torch.randn(7, 5, generator=gen, dtype=torch.float64)
    expected = float(torch.linalg.norm(wrong - exact) / torch.linalg.norm(exact))
    assert cache.solve_error(rhs, wrong, "left") == pytest.approx(expected, rel=1e-9)
    # from the right: X = B (F + λI)⁻¹ for B [k, n]
    assert cache.solve_error(rhs.mT, wrong.mT, "right") == pytest.approx(expected, rel=1e-9)
    assert cache.solve_error(rhs, exact, "left") < 1e-12
    with pytest.raises(ValueError, match="side='up'"):
        cache.solve_error(rhs, exact, "up")
    with pytest.raises(ValueError, match="size 7"):
        cache.solve_error(rhs[:6], exact[:6], "left")
    cache.reference = None  # not measured: no reference kept
    assert cache.solve_error(rhs, exact, "left") is None


@pytest.mark.parametrize("method", ["inverse", "solve"])
def test_a_solver_off_by_one_percent_is_measured_at_one_percent(method):
    model = _mlp()
    pre = KFACPreconditioner(model, solver=OffByOnePercent(), method=method, damping=0.1,
                             kl_clip=None, lr=0.1, factor_dtype=torch.float64,
                             measure_solve_error_every=2)
    reports = _steps(pre, model, 4)
    for report in reports[::2]:  # steps 0 and 2
        assert set(report.solve_errors) == {"0", "2"}
        for errors in report.solve_errors.values():
            assert set(errors) == {"a", "g"}
            for error in errors.values():
                assert error == pytest.approx(OFF, rel=1e-6)
        assert report.max_solve_error == pytest.approx(OFF, rel=1e-6)
        assert report.measure_s > 0 and report.timings.update_s >= 0
    for report in reports[1::2]:  # not measured, and nothing spent measuring
        assert report.solve_errors == {} and report.max_solve_error is None
        assert report.measure_s == 0.0


def test_an_exact_float32_solver_is_measured_near_round_off():
    model = _mlp()
    pre = KFACPreconditioner(model, solver="cholesky", method="solve", damping=0.1,
                             kl_clip=None, lr=0.1, measure_solve_error_every=1)
    for report in _steps(pre, model, 2):
        assert 0 < report.max_solve_error < 1e-4


def test_the_thermodynamic_device_is_measured_at_its_own_error():
    # a device run for 10% error lands far above float32 round-off, and near its target
    model = _mlp()
    solver = ThermodynamicSolver(target_error=0.1)
    pre = KFACPreconditioner(model, solver=solver, method="solve", damping=0.1,
                             kl_clip=None, lr=0.1, measure_solve_error_every=1, seed=0)
    errors = [e for r in _steps(pre, model, 3) for b in r.solve_errors.values()
              for e in b.values()]
    assert len(errors) == 12
    assert 1e-3 < sorted(errors)[len(errors) // 2] < 0.5


def test_measuring_is_off_by_default_and_keeps_no_reference():
    model = _mlp()
    pre = KFACPreconditioner(model, damping=0.1, kl_clip=None, lr=0.1)
    report = _steps(pre, model, 1)[0]
    assert report.solve_errors == {}
    assert all(c.reference is None for b in pre.blocks.values() for c in b.caches.values())
    with pytest.raises(ValueError, match="measure_solve_error_every"):
        KFACPreconditioner(_mlp(), measure_solve_error_every=-1)


def test_a_training_run_writes_the_measured_errors(tmp_path):
    cfg = TrainConfig(model="mlp", data="digits", width=16, steps=4, eval_every=4,
                      batch_size=32, kfac=True, solver="thermodynamic", method="solve",
                      target_error=0.1, measure_solve_error_every=2, threads=1)
    Run(cfg, tmp_path).train()
    with open(tmp_path / "steps.csv") as fh:
        steps = list(csv.DictReader(fh))
    values = [float(r["solve_rel_error"]) for r in steps]
    assert all(math.isfinite(v) and v > 1e-3 for v in values[::2])
    assert all(math.isnan(v) for v in values[1::2])
    with open(tmp_path / "solve_errors.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {int(r["step"]) for r in rows} == {0, 2}
    for r in rows:  # the device's own prediction beside each measured error
        if float(r["rel_error"]) > 1e-5:
            assert 0.5 <= float(r["rel_error"]) / float(r["predicted"]) <= 2.0
    assert {r["factor"] for r in rows} == {"a", "g"}
    per_step = {s: max(float(r["rel_error"]) for r in rows if int(r["step"]) == s)
                for s in (0, 2)}
    assert per_step == pytest.approx({0: values[0], 2: values[2]})
    summary = json.loads((tmp_path / "results.json").read_text())["solve_rel_error"]
    assert summary["measured_steps"] == 2
    assert summary["max"] == pytest.approx(max(values[0], values[2]))


# ---------------------------------------------------------------- the OU prediction
# Schedules around the device's knobs: burn-in bias dominated (explicit short t₀),
# window variance dominated (target_error), warm start, the trajectory backend and the
# samples read-out, input quantization with and without mitigation, the ADC.
SCHEDULES = [
    {"target_error": 0.3}, {"target_error": 0.1},
    {"t0_rc": 2.0, "window_rc": 1e-3}, {"t0_rc": 20.0, "window_rc": 1e-5},
    {"target_error": 0.1, "warm_start": True},
    {"t0_rc": 2.0, "window_rc": 1e-4, "warm_start": True},
    {"target_error": 0.1, "backend": "trajectory"},
    {"t0_rc": 3.0, "readout": "samples", "num_samples": 50, "sample_spacing_rc": 1.0},
    {"target_error": 0.1, "input_bits": 8},
    {"target_error": 0.1, "input_bits": 6, "quantizer": "nearest"},
    {"target_error": 0.1, "input_bits": 8, "quantizer": "stochastic",
     "mitigation_samples": 4},
    {"target_error": 0.1, "output_bits": 8},
    {"target_error": 0.1, "output_bits": 8, "adc_range": "bound"},
    {"target_error": 0.1, "output_bits": 8, "backend": "trajectory"},
]


def _system(n: int = 20):
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(60, n, generator=gen, dtype=torch.float64)
    factor = r.mT @ r / 60
    return factor, factor + 0.05 * torch.eye(n, dtype=torch.float64)


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def _round_off(factor: torch.Tensor, damped: torch.Tensor) -> float:
    """The float32 Cholesky solve's error on the same system: float32 round-off."""
    chol = CholeskySolver()
    prepared = chol.prepare(factor.float(), 0.05)
    gen = torch.Generator().manual_seed(2)
    errors = []
    for _ in range(10):
        b = torch.randn(20, 6, generator=gen)
        exact = torch.linalg.solve(damped, b.double())
        got = chol.solve(prepared, b).x.double()
        errors.append(float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)))
    return _rms(errors)


@pytest.mark.parametrize("settings", SCHEDULES, ids=lambda s: ",".join(
    f"{k}={v}" for k, v in s.items()))
def test_the_ou_moments_predict_the_measured_solve_error(settings):
    factor, damped = _system()
    solver = ThermodynamicSolver(**settings)
    prepared = solver.prepare(factor.float(), 0.05, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    measured, predicted = [], []
    for _ in range(40):  # warm starts carry over from solve to solve
        b = torch.randn(20, 6, generator=gen)
        predicted.append(solver.predict_error(prepared, damped, b))
        got = solver.solve(prepared, b, generator=gen).x.double()
        exact = torch.linalg.solve(damped, b.double())  # unbatched float64 reference
        measured.append(float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact)))
    assert _rms(measured) > 10 * _round_off(factor, damped)  # above float32 round-off
    # the issue asks for 2×; the moments are exact, so the RMS over 40 draws is closer
    assert _rms(measured) / _rms(predicted) == pytest.approx(1.0, abs=0.2)


def test_a_digital_solver_predicts_nothing_and_bad_shapes_are_refused():
    factor, damped = _system()
    chol = CholeskySolver()
    assert chol.predict_error(chol.prepare(factor.float(), 0.05), damped,
                              torch.ones(20, 2)) is None
    solver = ThermodynamicSolver(target_error=0.1)
    prepared = solver.prepare(factor.float(), 0.05)
    with pytest.raises(ValueError, match="size 20"):
        solver.predict_error(prepared, damped[:5, :5], torch.ones(20, 2))
    assert solver.predict_error(prepared, damped, torch.zeros(20, 2)) == 0.0
    # the Euler–Maruyama integrator's own step error is not modelled: no prediction
    em = ThermodynamicSolver(target_error=0.1, backend="euler-maruyama")
    assert em.predict_error(em.prepare(factor.float(), 0.05), damped, torch.ones(20, 2)) \
        is None


def test_a_run_summary_predicts_only_where_every_measured_solve_was_predicted():
    from thermokfac.experiments.train import solve_error_summary

    full = [{"solve_rel_error": 0.2, "solve_errors": {"x": {"a": 0.2, "g": 0.1}},
             "predicted_solve_errors": {"x": {"a": 0.19, "g": 0.1}}}]
    assert solve_error_summary(full)["predicted_median"] == pytest.approx(0.19)
    part = [{"solve_rel_error": 0.2, "solve_errors": {"x": {"a": 0.2, "g": 0.1}},
             "predicted_solve_errors": {"x": {"g": 0.1}}}]  # A's solve not predicted
    assert solve_error_summary(part)["predicted_median"] is None
    assert solve_error_summary([{"solve_rel_error": math.nan}]) == {}


@pytest.mark.parametrize("settings", [{"target_error": 0.3},
                                      {"t0_rc": 5.0, "window_rc": 1e-4},
                                      {"t0_rc": 2.0, "window_rc": 1e-4, "warm_start": True}])
def test_kfac_steps_carry_the_prediction_beside_the_measured_error(settings):
    model = _mlp()
    pre = KFACPreconditioner(model, solver=ThermodynamicSolver(**settings), method="solve",
                             damping=0.1, kl_clip=None, lr=0.1, momentum=0.0,
                             measure_solve_error_every=1, seed=0)
    checked = 0
    for report in _steps(pre, model, 4):
        assert report.predicted_solve_errors.keys() == report.solve_errors.keys()
        for block, errors in report.solve_errors.items():
            for which, error in errors.items():
                if error > 1e-5:  # 10× float32 round-off and more
                    ratio = error / report.predicted_solve_errors[block][which]
                    assert 0.5 <= ratio <= 2.0, (block, which, ratio)
                    checked += 1
    assert checked >= 8


def test_a_cache_restored_without_its_factor_is_reported_unmeasured():
    model = _mlp()
    kw = dict(damping=0.1, kl_clip=None, lr=0.1, measure_solve_error_every=1)
    pre = KFACPreconditioner(model, **kw)
    _steps(pre, model, 1)  # prepared (with the float64 factors) at step 0
    restored = KFACPreconditioner(model, **kw)
    restored.load_state_dict(pre.state_dict())
    with pytest.warns(UserWarning, match="not measured"):
        report = _steps(restored, model, 1)[0]  # step 1: no prepare due
    assert report.solve_errors == {}
