"""Small shared cases for the tests: models, data and dense references in float64."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def mlp(sizes=(6, 5, 4), bias=True, act=nn.Tanh, dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if act is not None and i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def cnn(dtype=torch.float64, seed=0, classes=3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, classes),
    ).to(dtype)


def classification_batch(n=8, d=6, classes=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def image_batch(n=5, classes=3, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 7, 7, generator=g, dtype=dtype),
            torch.randint(0, classes, (n,), generator=g))


def grad_matrix(module: nn.Module) -> torch.Tensor:
    """DΘ = [∇W | ∇b] as a matrix [d_out, d_in(+1)] (conv weights flattened)."""
    w = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return w.clone()
    return torch.cat([w, module.bias.grad[:, None]], dim=1)


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec(·), the paper's convention (Eq. 5)."""
    return m.mT.reshape(-1)


def dense_kfac_direction(a: torch.Tensor, g: torch.Tensor, d: torch.Tensor, lam_a: float,
                         lam_g: float) -> torch.Tensor:
    """((A+λ_A I) ⊗ (G+λ_G I))⁻¹ vec(DΘ), unbatched float64 dense solve, as a matrix."""
    a, g, d = a.double(), g.double(), d.double()
    kron = torch.kron(a + lam_a * torch.eye(a.shape[0], dtype=a.dtype),
                      g + lam_g * torch.eye(g.shape[0], dtype=g.dtype))
    x = torch.linalg.solve(kron, vec(d))
    return x.reshape(d.shape[1], d.shape[0]).mT


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).detach().norm() / ref.detach().norm())


def kfac_step(pre, out: torch.Tensor, y: torch.Tensor, fisher: str = "empirical") -> None:
    """Cross-entropy backward of ``out`` and one preconditioner step (the outputs go to
    ``step`` for the ``mc``/``type2`` Fisher types)."""
    loss = nn.functional.cross_entropy(out, y)
    if fisher == "empirical":
        loss.backward()
        pre.step()
    else:
        loss.backward(retain_graph=True)
        pre.step(outputs=out)
