"""The lower-triangle helpers read only the lower triangle and agree with dense float64
references (``torch.linalg.solve``/``inv`` on the symmetrised matrix)."""

from __future__ import annotations

import pytest
import torch

from thermokfac._linalg import (
    add_gram_,
    cholesky_inverse_lower,
    cholesky_lower,
    cholesky_solve_cols,
    cholesky_solve_rows,
    symmetrize_lower,
)


def _lower_with_garbage(n: int, dtype: torch.dtype, seed: int = 0):
    """A random SPD matrix (float64 reference) and its lower triangle with 1e6 above."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    m = x.mT @ x / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)
    lower = m.tril() + torch.triu(torch.full_like(m, 1e6), 1)
    return m, lower.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_factor_inverse_and_solves_read_the_lower_triangle(dtype, tol, n):
    m, lower = _lower_with_garbage(n, dtype)
    chol = cholesky_lower(lower)
    assert chol is not None and torch.equal(chol, chol.tril())
    chol_garbage = chol + torch.triu(torch.full_like(chol, 3.0), 1)
    exact_inv = torch.linalg.inv(m)

    def rel(x, ref):
        return float((x.double() - ref).norm() / ref.norm())
    assert rel(chol.double() @ chol.double().mT, m) < tol
    assert rel(symmetrize_lower(cholesky_inverse_lower(chol_garbage)), exact_inv) < 10 * tol
    g = torch.Generator().manual_seed(1)
    b = torch.randn(n, 5, generator=g, dtype=torch.float64)
    rows = torch.randn(4, n, generator=g, dtype=torch.float64)
    assert rel(cholesky_solve_cols(chol_garbage, b.to(dtype)), torch.linalg.solve(m, b)) \
        < 10 * tol
    assert rel(cholesky_solve_rows(chol_garbage, rows.to(dtype)),
               torch.linalg.solve(m, rows.mT).mT) < 10 * tol


def test_not_positive_definite_or_not_finite_is_none():
    _, lower = _lower_with_garbage(6, torch.float64)
    indefinite = lower.clone()
    indefinite[2, 2] = -1.0
    assert cholesky_lower(indefinite) is None
    nan = lower.clone()
    nan[4, 1] = float("nan")
    assert cholesky_lower(nan) is None
    # Garbage above the diagonal (here NaN) never matters.
    above = lower.clone()
    above[1, 4] = float("nan")
    assert cholesky_lower(above) is not None


def test_gram_into_a_leading_block():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    out = torch.zeros(6, 6, dtype=torch.float64)
    add_gram_(out[:5, :5], x)
    add_gram_(out[:5, :5], x[:0])  # no rows: no change
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[:5, :5] = x.mT @ x
    assert torch.allclose(out, expected, atol=1e-12)
