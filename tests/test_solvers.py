"""Digital solvers against unbatched float64 ``torch.linalg.solve`` over condition numbers."""

from __future__ import annotations

import pytest
import torch

from thermokfac.solvers import (
    CGSolver,
    Prepared,
    SolverError,
    get_solver,
)


def spd(n: int, kappa: float, dtype=torch.float64, seed=0) -> torch.Tensor:
    """Symmetric positive definite matrix with eigenvalues log-spaced in [1/κ, 1]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), n, dtype=torch.float64)
    m = (q * evals) @ q.mT
    return ((m + m.mT) / 2).to(dtype)


KAPPAS = [1e1, 1e2, 1e3, 1e4, 1e5, 1e6]
DIRECT = ["cholesky", "eigh"]


def _reference(m: torch.Tensor, b: torch.Tensor, damping: float) -> torch.Tensor:
    m64 = m.double() + damping * torch.eye(m.shape[0], dtype=torch.float64)
    return torch.stack([torch.linalg.solve(m64, col) for col in b.double().mT], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("name", DIRECT)
def test_direct_solvers_within_condition_bound(name, kappa, dtype):
    """Backward-stable solvers: ‖x − x*‖/‖x*‖ ≤ c·κ·u with c = 4n^½ (n = 64)."""
    n = 64
    m = spd(n, kappa, dtype)
    b = torch.randn(n, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    solver = get_solver(name)
    prepared = solver.prepare(m, 0.0)
    result = solver.solve(prepared, b)
    assert result.x.dtype == dtype and result.x.shape == b.shape
    ref = _reference(m, b, 0.0)
    err = float((result.x.double() - ref).norm() / ref.norm())
    unit = torch.finfo(dtype).eps / 2
    assert err <= 4 * n**0.5 * kappa * unit, err
    inv = solver.inverse(prepared).x.double()
    inv_err = float((inv @ m.double() - torch.eye(n, dtype=torch.float64)).norm() / n**0.5)
    assert inv_err <= 4 * n**0.5 * kappa * unit, inv_err


@pytest.mark.parametrize("kappa", KAPPAS)
def test_cg_error_bounded_by_kappa_times_residual(kappa):
    """CG stops at ‖r‖ ≤ tol‖b‖, hence ‖x − x*‖/‖x*‖ ≤ κ·tol (float64)."""
    n, tol = 48, 1e-10
    m = spd(n, kappa)
    b = torch.randn(n, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = CGSolver(tol=tol, max_iter=20 * n)
    result = solver.solve(solver.prepare(m, 0.0), b)
    ref = _reference(m, b, 0.0)
    assert result.stats["converged"] == 1.0
    for j in range(b.shape[1]):
        err = float((result.x[:, j] - ref[:, j]).norm() / ref[:, j].norm())
        assert err <= kappa * tol, (j, err)


def test_cg_warm_start_uses_fewer_iterations():
    m = spd(64, 1e3)
    b = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    solver = CGSolver(tol=1e-8, max_iter=1000)
    prepared = solver.prepare(m, 1e-3)
    solver.solve(prepared, b)
    warm = solver.solve(prepared, b * 1.01).stats["iterations"]
    nowarm = CGSolver(tol=1e-8, max_iter=1000, warm_start=False)
    p2 = nowarm.prepare(m, 1e-3)
    nowarm.solve(p2, b)
    assert warm < nowarm.solve(p2, b * 1.01).stats["iterations"]


def test_damping_is_added():
    m = spd(10, 10.0)
    b = torch.randn(10, dtype=torch.float64)
    for name in ("cholesky", "eigh", "cg"):
        kwargs = {"tol": 1e-12} if name == "cg" else {}
        solver = get_solver(name, **kwargs)
        x = solver.solve(solver.prepare(m, 0.5), b).x
        assert torch.allclose(x, _reference(m, b[:, None], 0.5)[:, 0], atol=1e-9), name


@pytest.mark.parametrize("name", DIRECT)
def test_fallback_float64_then_damping_then_fail(name):
    """Non-PD input: float64 retry, then damping ×10 up to the bound, then failed."""
    solver = get_solver(name, max_damping_increases=2)
    # Indefinite: eigenvalues ±1; damping 1e-3 → 1e-1 never fixes it.
    m = torch.diag(torch.tensor([1.0, -1.0]))
    prepared = solver.prepare(m, 1e-3)
    assert prepared.failed
    assert prepared.stats == pytest.approx(
        {**prepared.stats, "float64_retries": 1.0, "damping_increases": 2.0, "failed": 1.0})
    with pytest.raises(SolverError):
        solver.solve(prepared, torch.ones(2))
    # Singular PSD with zero damping: rescued by the first damping increase.
    rescued = solver.prepare(torch.zeros(3, 3), 0.0)
    assert not rescued.failed and rescued.stats["damping_increases"] >= 1
    assert rescued.damping > 0
    x = solver.solve(rescued, torch.ones(3)).x
    assert torch.isfinite(x).all()


def test_float32_failure_rescued_by_float64():
    """A matrix PD in float64 but whose float32 Cholesky breaks down is rescued."""
    n = 40
    m = spd(n, 1e12)  # smallest eigenvalue 1e-12: below float32 resolution
    solver = get_solver("cholesky", max_damping_increases=0)
    prepared = solver.prepare(m.float(), 0.0)
    assert prepared.stats["float64_retries"] == 1.0
    if not prepared.failed:
        assert prepared.dtype == torch.float64


@pytest.mark.parametrize("name", ["cholesky", "eigh", "cg"])
def test_validation_errors(name):
    solver = get_solver(name)
    with pytest.raises(ValueError, match="square"):
        solver.prepare(torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        solver.prepare(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), 0.1)
    with pytest.raises(ValueError, match="not symmetric"):
        solver.prepare(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="damping"):
        solver.prepare(torch.eye(2), -1.0)
    prepared = solver.prepare(torch.eye(2), 0.1)
    with pytest.raises(ValueError, match="right-hand side"):
        solver.solve(prepared, torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        solver.solve(prepared, torch.tensor([1.0, float("inf")]))
    other = Prepared("other", 2, 0.1, {"x": torch.eye(2)})
    with pytest.raises(ValueError, match="prepared by"):
        solver.solve(other, torch.ones(2))


def test_registry_errors():
    with pytest.raises(ValueError, match="'cholesky'"):
        get_solver("lu")
    with pytest.raises(ValueError, match="tol"):
        CGSolver(tol=2.0)
    with pytest.raises(ValueError, match="max_damping_increases"):
        get_solver("cholesky", max_damping_increases=-1)


def test_cg_negative_curvature_raises():
    solver = CGSolver()
    prepared = Prepared("cg", 2, 0.0, {"matrix": torch.diag(torch.tensor([1.0, -1.0]))})
    with pytest.raises(SolverError, match="curvature"):
        solver.solve(prepared, torch.tensor([1.0, 1.0]))
