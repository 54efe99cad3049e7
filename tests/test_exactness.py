"""K-FAC equals the exact curvature wherever the Kronecker structure is exact (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from thermokfac import KFACPreconditioner

from .cases import classification_batch, grad_matrix, mlp, rel_err, vec


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_single_example_empirical_fisher_block(reduction, bias):
    """N = 1: A ⊗ G = vec(DΘ) vec(DΘ)ᵀ, the layer's empirical Fisher block (Eqs. 6–12)."""
    model = mlp((6, 5, 4), bias=bias)
    x, y = classification_batch(n=1)
    pre = KFACPreconditioner(model, kl_clip=None, loss_reduction=reduction)
    loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
    loss.backward()
    grads = {name: grad_matrix(model.get_submodule(name)) for name in pre.layer_names}
    pre.step()
    for name, (a, g) in pre.factors().items():
        v = vec(grads[name])
        assert rel_err(torch.kron(a, g), torch.outer(v, v)) < 1e-10, name


def _layer_ggn(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, loss_fn
               ) -> torch.Tensor:
    """Exact GGN block JᵀHJ of one layer's θ = vec([W | b]) (column-stacking)."""
    layer = model.get_submodule(name)
    d_out, d_in = layer.weight.shape
    params = dict(model.named_parameters())

    def unvec(theta):
        m = theta.reshape(d_in + 1, d_out).mT
        return {f"{name}.weight": m[:, :d_in], f"{name}.bias": m[:, d_in]}

    def f(theta):
        return functional_call(model, {**params, **unvec(theta)}, (x,))

    theta0 = vec(torch.cat([layer.weight, layer.bias[:, None]], 1).detach())
    out = f(theta0).detach()
    jac = jacrev(f)(theta0).reshape(out.numel(), -1)
    hess = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return jac.mT @ hess @ jac


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_equals_exact_ggn_of_deep_linear_network(reduction):
    """For a deep linear network with MSE, K-FAC (type2) is the exact per-layer GGN."""
    model = mlp((4, 5, 3, 2), act=None)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)

    def loss_fn(out, target):
        return nn.functional.mse_loss(out, target, reduction=reduction)

    pre = KFACPreconditioner(model, fisher_type="type2", loss_type="mse",
                             loss_reduction=reduction, kl_clip=None)
    out = model(x)
    loss_fn(out, y).backward(retain_graph=True)
    pre.step(outputs=out)
    for name, (a, gg) in pre.factors().items():
        exact = _layer_ggn(model, name, x, y, loss_fn)
        assert rel_err(torch.kron(a, gg), exact) < 1e-10, name


def test_type2_cross_entropy_single_example_matches_ggn():
    """N = 1 with softmax cross-entropy: A ⊗ G equals the exact GGN block."""
    model = mlp((5, 4, 3), act=None)
    x, y = classification_batch(n=1, d=5, classes=3)
    pre = KFACPreconditioner(model, fisher_type="type2", kl_clip=None)
    out = model(x)
    pre.curvature_backward(out)
    nn.functional.cross_entropy(out, y).backward()
    pre.step()
    for name, (a, gg) in pre.factors().items():
        exact = _layer_ggn(model, name, x, y, nn.functional.cross_entropy)
        assert rel_err(torch.kron(a, gg), exact) < 1e-10, name
