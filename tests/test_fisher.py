"""Monte-Carlo Fisher: unbiased for the type-2 (exact GGN) factor G."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner

from .cases import classification_batch, mlp


def _g_factors(fisher_type, steps, loss_type="cross_entropy", mc_samples=1, seed=0):
    model = mlp((6, 5, 4))
    x, y = classification_batch(n=8)
    target = torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    pre = KFACPreconditioner(model, fisher_type=fisher_type, loss_type=loss_type,
                             factor_decay=0.0, kl_clip=None, mc_samples=mc_samples, seed=seed)
    out_g = []
    for _ in range(steps):
        model.zero_grad()
        out = model(x)
        pre.curvature_backward(out)
        if loss_type == "mse":
            nn.functional.mse_loss(out, target).backward()
        else:
            nn.functional.cross_entropy(out, y).backward()
        pre.step()
        out_g.append({n: g for n, (_, g) in pre.factors().items()})
    return out_g


@pytest.mark.parametrize("loss_type", ["cross_entropy", "mse"])
def test_mc_fisher_mean_matches_type2_within_standard_error(loss_type):
    """‖mean_S(G_mc) − G_type2‖_F ≤ 5 standard errors, the SE estimated from the samples."""
    exact = _g_factors("type2", 1, loss_type)[0]
    samples = _g_factors("mc", 300, loss_type)
    for name, g_exact in exact.items():
        stack = torch.stack([s[name] for s in samples])
        mean = stack.mean(0)
        se = ((stack - mean).pow(2).sum() / (len(samples) * (len(samples) - 1))).sqrt()
        assert float((mean - g_exact).norm()) <= 5 * float(se), name
        # and the test can fail: a 50% scale error is many standard errors away
        assert float((1.5 * mean - g_exact).norm()) > 5 * float(se), name


def test_mc_samples_average_not_sum():
    """With k samples per prediction G keeps its scale (averaged, never k times larger)."""
    exact = _g_factors("type2", 1)[0]
    single = _g_factors("mc", 200)
    many = _g_factors("mc", 1, mc_samples=200, seed=3)[0]
    for name, g_exact in exact.items():
        stack = torch.stack([s[name] for s in single])
        se = ((stack - stack.mean(0)).pow(2).sum() / (len(single) * (len(single) - 1))).sqrt()
        assert float((many[name] - g_exact).norm()) <= 5 * float(se), name
