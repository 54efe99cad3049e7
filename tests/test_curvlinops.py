"""Side by side with curvlinops 3.0.1: the same Kronecker factors (empirical Fisher)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner

from .cases import classification_batch, cnn, image_batch, mlp, rel_err

curvlinops = pytest.importorskip("curvlinops")


class SequenceModel(nn.Module):
    """Per-token classifier over [batch, seq, features]; logits as [batch, classes, seq]."""

    def __init__(self, d=5, hidden=6, classes=4):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x))).transpose(1, 2)


def _curvlinops_factors(model, x, y, approx, terms):
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), [p for p in model.parameters()], [(x, y)],
        fisher_type=curvlinops.FisherType.EMPIRICAL,
        kfac_approx=getattr(curvlinops.KFACType, approx.upper()),
        check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=terms,
        separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


def _ours(model, x, y, approx, terms):
    pre = KFACPreconditioner(model, kfac_approx=approx, kl_clip=None,
                             num_per_example_loss_terms=terms)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    pre.remove()
    model.zero_grad()
    return pre.factors()


CASES = {
    "mlp": lambda: (mlp((6, 5, 4), dtype=torch.float32),
                    *classification_batch(n=16, dtype=torch.float32), 1),
    "cnn": lambda: (cnn(dtype=torch.float32), *image_batch(n=6, dtype=torch.float32), 1),
    "sequence": lambda: (SequenceModel(), torch.randn(3, 7, 5), torch.randint(0, 4, (3, 7)), 7),
}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_factors_equal_curvlinops(case, approx):
    torch.manual_seed(0)
    model, x, y, terms = CASES[case]()
    ours = _ours(model, x, y, approx, terms)
    a_ref, g_ref = _curvlinops_factors(model, x, y, approx, terms)
    assert set(ours) == set(a_ref)
    for name, (a, g) in ours.items():
        assert rel_err(a, a_ref[name]) < 1e-6, (name, "A")
        assert rel_err(g, g_ref[name]) < 1e-6, (name, "G")


# ------------------------------------------------------ separate_weight_and_bias=True
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_separate_weight_and_bias_equals_curvlinops(case, approx):
    """W gets A without the column of ones, b gets A = 1; both the layer's G — as
    curvlinops' ``separate_weight_and_bias=True``."""
    torch.manual_seed(0)
    model, x, y, terms = CASES[case]()
    pre = KFACPreconditioner(model, kfac_approx=approx, kl_clip=None,
                             num_per_example_loss_terms=terms, separate_weight_and_bias=True)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    pre.remove()
    model.zero_grad()
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
        fisher_type=curvlinops.FisherType.EMPIRICAL,
        kfac_approx=getattr(curvlinops.KFACType, approx.upper()),
        check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=terms,
        separate_weight_and_bias=True)
    op.compute_kronecker_factors()
    a_ref, g_ref = op._input_covariances, op._gradient_covariances
    ours = pre.factors()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    expected = {f"{n}.{part}" if m.bias is not None else n for n, m in layers.items()
                for part in ("weight", "bias")}  # a layer without a bias is not split
    assert set(ours) == expected
    for name, (a, g) in ours.items():
        layer, part = name.rsplit(".", 1) if name not in layers else (name, "weight")
        assert rel_err(g, g_ref[layer]) < 1e-6, name
        if part == "weight":
            assert rel_err(a, a_ref[layer]) < 1e-6, name
        else:
            torch.testing.assert_close(a, torch.ones(1, 1))
