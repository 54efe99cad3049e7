"""The preconditioned gradient equals the dense Kronecker solve, for every solver and method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner, get_solver

from .cases import (
    classification_batch,
    cnn,
    dense_kfac_direction,
    grad_matrix,
    image_batch,
    mlp,
    rel_err,
)

SOLVERS = [("cholesky", {}), ("eigh", {}), ("cg", {"tol": 1e-13, "max_iter": 500})]


def _run_and_compare(model, x, y, solver, kwargs, method, split="equal", approx="expand",
                     damping=1e-2):
    pre = KFACPreconditioner(model, solver=get_solver(solver, **kwargs), method=method,
                             damping=damping, kl_clip=None, damping_split=split,
                             inv_update_steps=1,
                             kfac_approx=approx)
    # Two steps so that the moving average and the prepared state are both exercised.
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {name: grad_matrix(model.get_submodule(name)) for name in pre.layer_names}
        pre.step()
        x = x.flip(0)
    for name, (a, g) in pre.factors().items():
        lam_a, lam_g = pre.layer_state(name).damping
        if split == "equal":
            assert lam_a == lam_g == damping
        else:
            pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
            assert lam_a == pytest.approx(math.sqrt(damping) * pi, rel=1e-12)
            assert lam_g == pytest.approx(math.sqrt(damping) / pi, rel=1e-12)
        expected = dense_kfac_direction(a, g, raw[name], lam_a, lam_g)
        got = grad_matrix(model.get_submodule(name))
        assert rel_err(got, expected) < 1e-9, (name, solver, method)


@pytest.mark.parametrize("method", ["inverse", "solve"])
@pytest.mark.parametrize(("solver", "kwargs"), SOLVERS)
def test_mlp_matches_dense_solve(solver, kwargs, method):
    x, y = classification_batch(n=8, d=6, classes=4)
    _run_and_compare(mlp((6, 5, 4)), x, y, solver, kwargs, method)


@pytest.mark.parametrize("method", ["inverse", "solve"])
@pytest.mark.parametrize(("solver", "kwargs"), SOLVERS)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_cnn_matches_dense_solve(solver, kwargs, method, approx):
    x, y = image_batch()
    _run_and_compare(cnn(), x, y, solver, kwargs, method, approx=approx)


def test_pi_split_damping_matches_dense_solve():
    x, y = classification_batch(n=8, d=6, classes=4)
    _run_and_compare(mlp((6, 5, 4)), x, y, "cholesky", {}, "solve", split="pi")


def test_embedding_diagonal_factor_matches_dense_solve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    tokens = torch.randint(0, 7, (10, 3))
    y = torch.randint(0, 3, (10,))
    pre = KFACPreconditioner(model, kl_clip=None, damping=1e-2)
    nn.functional.cross_entropy(model(tokens), y).backward()
    raw = model[0].weight.grad.mT.clone()
    pre.step()
    a, g = pre.factors()["0"]
    counts = torch.bincount(tokens.flatten(), minlength=7).double() / tokens.numel()
    assert torch.allclose(a, counts, rtol=0, atol=1e-15)
    expected = dense_kfac_direction(torch.diag(a), g, raw, 1e-2, 1e-2)
    assert rel_err(model[0].weight.grad.mT, expected) < 1e-10
