"""The simulator-vs-thermox benchmark picks its sample counts honestly and records them.

The sample count N of every setting comes from the exact OU moments; here that choice is
checked against the empirical error of many seeded solves (an independent reference),
and the recorded settings against what the solver was actually given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import thermox_compare as bench

from thermokfac.solvers import ThermodynamicSolver


def test_predicted_error_matches_seeded_solves():
    """RMS error of 40 trajectory solves at the N the benchmark picks ≈ the prediction."""
    a, b, x_star, q, lam = bench.problem(16)
    scale = float(np.abs(a).sum(axis=1).max())
    full_scale = float(np.abs(b).max())
    coeffs = q.T @ x_star * scale / full_scale
    t0, spacing = np.log(1e4) / bench.ALPHA_MIN * scale, 3.0 * scale
    count = bench.fewest_samples(lam / scale, coeffs, t0, spacing, beta=2.0)
    predicted = bench.predicted_error(lam / scale, coeffs, t0, spacing, count, beta=2.0)
    assert predicted <= 0.9 * bench.TARGET
    assert bench.predicted_error(lam / scale, coeffs, t0, spacing, count - 1, 2.0) > \
        0.9 * bench.TARGET  # the fewest
    solver = ThermodynamicSolver(backend="trajectory", beta=2.0, readout="samples",
                                 t0_rc=t0, num_samples=count, sample_spacing_rc=spacing)
    at, bt = torch.tensor(a), torch.tensor(b)
    prepared = solver.prepare(at, 0.0)
    errors = [float(np.linalg.norm(solver.solve(prepared, bt, generator=torch.Generator()
                                                .manual_seed(s)).x.numpy() - x_star)
                    / np.linalg.norm(x_star)) for s in range(40)]
    rms = float(np.sqrt(np.mean(np.square(errors))))
    assert rms == pytest.approx(predicted, rel=0.2)


def test_our_side_records_the_settings_it_ran(monkeypatch):
    monkeypatch.setattr(bench, "SPACINGS", (1.0, 10.0))
    monkeypatch.setattr(bench, "timed", lambda fn: {"median_s": 1.0, "q1_s": 1.0,
                                                    "q3_s": 1.0, "calls": 1})
    given = []
    real = ThermodynamicSolver.__init__

    def spy(self, config=None, **overrides):
        given.append(overrides)
        real(self, config, **overrides)
    monkeypatch.setattr(ThermodynamicSolver, "__init__", spy)
    a, b, x_star, q, lam = bench.problem(12)
    result = bench.our_side(a, b, x_star, q, lam)
    searched = result["trajectory"]["searched"]
    assert [s["spacing"] for s in searched] == [1.0, 10.0]
    for setting in searched:
        assert setting["error"] <= bench.TARGET
        assert setting["samples"] >= setting["predicted_samples"]
        assert setting["spacing_rc"] == pytest.approx(setting["spacing"] * result["row_sum_scale"])
        ran = [g for g in given if g["backend"] == "trajectory"
               and g["num_samples"] == setting["samples"]
               and g["sample_spacing_rc"] == pytest.approx(setting["spacing_rc"])]
        assert ran, setting
    closed = result["closed-form"]
    assert closed["error"] <= 1.5 * bench.TARGET
    assert any(g["backend"] == "closed-form" and g["num_samples"] == closed["samples"]
               for g in given)
    # Wider spacing needs fewer samples for the same error: the reason Δ is searched.
    assert searched[1]["samples"] < searched[0]["samples"]
