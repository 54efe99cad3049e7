"""K-FAC in front of each kind of base optimizer: the recipe in effect, grafting and
relative damping against dense references, and a seeded small case where K-FAC over
AdamW at AdamW's own rate must train at least about as well as AdamW alone (the
default once blew up there)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACOptimizer, KFACPreconditioner
from thermokfac.enums import DampingSplit, Grafting

from .cases import classification_batch, dense_kfac_direction, grad_matrix, mlp, rel_err


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     (Grafting.NONE, 0, 1e-3, DampingSplit.EQUAL)),
    (lambda p: torch.optim.AdamW(p, lr=1e-3), (Grafting.GRADIENT, 0, 3.0, DampingSplit.RELATIVE)),
    (lambda p: torch.optim.NAdam(p, lr=1e-3), (Grafting.GRADIENT, 0, 3.0, DampingSplit.RELATIVE)),
    (None, (Grafting.NONE, 0, 1e-3, DampingSplit.EQUAL)),
])
def test_the_recipe_follows_the_base_optimizer(make, expected):
    model = mlp()
    opt = None if make is None else make(model.parameters())
    pre = KFACPreconditioner(model, optimizer=opt, lr=None if opt else 0.1, kl_clip=None)
    r = pre.recipe
    assert (r.grafting, r.start_preconditioning_step, r.damping, r.damping_split) == expected


def test_given_settings_win_over_the_recipe():
    model = mlp()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    r = KFACPreconditioner(model, optimizer=adam, damping=1e-2, grafting="none",
                           start_preconditioning_step=5).recipe
    assert (r.grafting, r.start_preconditioning_step, r.damping, r.damping_split) == (
        Grafting.NONE, 5, 1e-2, DampingSplit.EQUAL)  # a damping given alone is absolute
    r = KFACPreconditioner(model, optimizer=adam, damping_split="pi").recipe
    assert (r.damping, r.damping_split) == (1e-3, DampingSplit.PI)
    with pytest.raises(ValueError, match="grafting='norm' is not valid"):
        KFACPreconditioner(model, grafting="norm")
    with pytest.raises(ValueError, match="start_preconditioning_step=-1"):
        KFACPreconditioner(model, start_preconditioning_step=-1)


def test_grafted_relative_update_is_the_dense_direction_at_the_gradients_norm():
    """Each block: U ∝ ((A + 3·tr A/n I) ⊗ (G + 3·tr G/n I))⁻¹ vec(DΘ) (dense float64
    solve) with ‖U‖ = ‖DΘ‖."""
    torch.manual_seed(0)
    model = mlp((6, 5, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pre = KFACPreconditioner(model, optimizer=opt, kl_clip=None, factor_decay=0.0)
    x, y = classification_batch(n=16)
    nn.functional.cross_entropy(model(x), y).backward()
    raw = {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}
    pre.step()
    for name, (a, g) in pre.factors().items():
        lam_a, lam_g = 3 * float(a.diagonal().mean()), 3 * float(g.diagonal().mean())
        assert pre.block(name).damping == pytest.approx((lam_a, lam_g), rel=1e-12)
        direction = dense_kfac_direction(a, g, raw[name], lam_a, lam_g)
        got = grad_matrix(model.get_submodule(name))
        assert float(got.norm()) == pytest.approx(float(raw[name].norm()), rel=1e-12)
        assert rel_err(got, direction * (raw[name].norm() / direction.norm())) < 1e-10


def test_a_warm_up_passes_gradients_through_while_the_factors_accumulate():
    torch.manual_seed(0)
    model = mlp((6, 5, 4))
    pre = KFACPreconditioner(model, kl_clip=None, start_preconditioning_step=2)
    x, y = classification_batch(n=16)
    for step in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = grad_matrix(model[0])
        report = pre.step()
        assert torch.equal(grad_matrix(model[0]), raw) == (step < 2), step
        assert report.factors_updated and report.prepared == (() if step < 2 else ("0", "2"))


class SmallCNN(nn.Module):
    """A small CNN with BatchNorm, the case where K-FAC over AdamW once blew up."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _train_digits(kfac: bool, steps: int = 80) -> float:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = SmallCNN()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = KFACOptimizer(model, base) if kfac else base
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return sum(losses[-10:]) / 10


def test_kfac_over_adamw_at_adamws_rate_trains_about_as_well_as_adamw():
    """Seeded: the default recipe (relative damping, grafting) keeps K-FAC + AdamW at
    least about level with AdamW alone per step; the old default (absolute 1e-3
    damping, no grafting) was far behind on this case."""
    alone, with_kfac = _train_digits(False), _train_digits(True)
    assert with_kfac <= 1.05 * alone, (with_kfac, alone)
