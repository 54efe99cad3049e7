"""Every mode of the thermodynamic solver on each device: the draws, the quantizers, the
paths, the covariance inverse and K-FAC keep their tensors on the factor's device and
solve the system (the CUDA cases are skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.solvers import HardwareModel, ThermodynamicSolver

from .cases import classification_batch, mlp

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]

# (options, tolerance on the relative error of a solve): the device is asked for the
# target error (1e-3 by default); 8-bit programming moves the matrix itself by about
# 2^-8 relative (times the conditioning); block Gauss–Seidel stops when a sweep changes
# x by less than the target; mismatch σ = 1e-3 perturbs the realised matrix.
CASES = {
    "closed-form": ({}, 1e-3),
    "samples": ({"readout": "samples", "num_samples": 256}, 1e-3),
    "input 8 bits, stochastic, mitigated": (
        {"input_bits": 8, "quantizer": "stochastic", "mitigation_samples": 3}, 0.05),
    "input 8 bits, nearest": ({"input_bits": 8, "quantizer": "nearest"}, 0.05),
    "output 12 bits": ({"output_bits": 12}, 2e-3),
    "trajectory, warm start": ({"backend": "trajectory", "warm_start": True,
                                "target_error": 1e-2, "num_samples": 32}, 1e-2),
    "euler-maruyama, mismatch": ({"backend": "euler-maruyama", "mismatch_sigma": 1e-3,
                                  "target_error": 1e-2, "num_samples": 8,
                                  "em_dt_rc": 0.5}, 1e-2),
    "blocks": ({"hardware": HardwareModel(max_dim=8)}, 1e-2),
}


def _system(device: str, n: int = 20):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    m = a @ a.mT / (2 * n)
    b = torch.randn(n, 3, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(m + 0.1 * torch.eye(n, dtype=torch.float64), b)
    return m.float().to(device), b.float().to(device), exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_solve_stays_on_device(device, case):
    options, tol = CASES[case]
    solver = ThermodynamicSolver(beta=1e8, **options)
    m, b, exact = _system(device)
    gen = torch.Generator(device=device).manual_seed(1)
    prepared = solver.prepare(m, 0.1, generator=gen)
    assert prepared.device.type == device
    for _ in range(2):  # the second solve starts warm where that is asked for
        result = solver.solve(prepared, b, generator=gen)
        assert result.x.device.type == device and result.x.dtype == torch.float32
        err = float((result.x.double().cpu() - exact).norm() / exact.norm())
        assert err < tol, (case, err)
        assert result.modeled_time_s > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["closed-form", "trajectory"])
def test_covariance_inverse_stays_on_device(device, backend):
    # samples 50 RC apart: about independent (the slowest mode relaxes in ~20 RC here)
    solver = ThermodynamicSolver(beta=1e8, inverse_mode="covariance", backend=backend,
                                 covariance_samples=4000 if backend == "trajectory" else 10**6,
                                 sample_spacing_rc=50.0, target_error=1e-2)
    m, _, _ = _system(device, n=6)
    gen = torch.Generator(device=device).manual_seed(2)
    inverse = solver.inverse(solver.prepare(m, 0.1, generator=gen), generator=gen).x
    exact = torch.linalg.inv(m.double().cpu() + 0.1 * torch.eye(6, dtype=torch.float64))
    assert inverse.device.type == device
    # N samples: relative Frobenius error about √((n+1)/N) (test_thermo_solver checks the law)
    assert float((inverse.double().cpu() - exact).norm() / exact.norm()) < 0.2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "storage"), [("inverse", "matrix"), ("solve", "matrix"),
                                                 ("solve", "rows")])
def test_kfac_trains_on_device(device, method, storage):
    """Thermodynamic K-FAC steps on the device follow the digital ones closely."""
    updates = {}
    for solver in ("cholesky", ThermodynamicSolver(target_error=1e-4)):
        model = mlp((6, 5, 4), seed=0).to(device)
        x, y = (t.to(device) for t in classification_batch(n=8))
        pre = KFACPreconditioner(model, solver=solver, method=method, damping=1e-2,
                                 kl_clip=None, factor_decay=0.0, factor_storage=storage, seed=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
        updates[str(solver)] = torch.cat([p.detach().flatten().cpu()
                                          for p in model.parameters()])
        assert all(p.device.type == device for p in model.parameters())
    digital, thermo = updates.values()
    assert float((thermo - digital).norm() / digital.norm()) < 1e-2
