"""The method a preconditioner picks when none is given, and that it changes nothing
but speed: Method 1 and Method 2 give the same update as a dense float64 solve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.enums import Method


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("solver,expected", [("cholesky", Method.INVERSE),
                                             ("eigh", Method.INVERSE),
                                             ("cg", Method.SOLVE),
                                             ("thermodynamic", Method.SOLVE)])
def test_default_method_per_solver(solver, expected):
    pre = KFACPreconditioner(_model(), solver=solver, kl_clip=None)
    assert pre.config.method is expected
    pre.remove()


def test_rows_storage_and_explicit_choice_win():
    rows = KFACPreconditioner(_model(), factor_storage="rows", factor_decay=0.0, kl_clip=None)
    assert rows.config.method is Method.SOLVE
    rows.remove()
    explicit = KFACPreconditioner(_model(), method="solve", kl_clip=None)
    assert explicit.config.method is Method.SOLVE
    explicit.remove()


def test_default_update_is_the_dense_solve():
    """U = (G+λI)⁻¹ DΘ (A+λI)⁻¹ from the factors the preconditioner holds, solved densely
    in float64, equals the default (Method 1) update and the Method 2 update."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    updates = {}
    for method in (None, "solve"):
        model = _model()
        pre = KFACPreconditioner(model, method=method, damping=0.1, kl_clip=None,
                                 inv_update_steps=1)
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        pre.step()
        updates[method] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if method is None:
            a, g = pre.factors()["0"]
            d = torch.cat([grads["0.weight"], grads["0.bias"][:, None]], dim=1)
            eye = torch.eye
            dense = torch.linalg.solve(g + 0.1 * eye(5, dtype=g.dtype), d) @ torch.linalg.inv(
                a + 0.1 * eye(7, dtype=a.dtype))
            assert torch.allclose(updates[None]["0.weight"], dense[:, :6], atol=1e-10)
            assert torch.allclose(updates[None]["0.bias"], dense[:, 6], atol=1e-10)
        pre.remove()
    for name in updates[None]:
        assert torch.allclose(updates[None][name], updates["solve"][name], atol=1e-10)
