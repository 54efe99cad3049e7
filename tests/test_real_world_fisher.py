"""Never silently wrong, part 2: type-2/MC Fisher over micro-batches and output layouts,
the BCE likelihood, a plain preconditioner on DDP, and numerics at the edges.

References: the same computation on the whole batch, curvlinops 3.0.1 (type-2 Fisher),
unbatched float64 solves of the stored factors, and analytic KL-clip identities.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.distributed import run_workers
from thermokfac.solvers import ThermodynamicSolver

from .cases import grad_matrix, rel_err

ROOT = str(Path(__file__).resolve().parents[1])


def model_and_data(classes=3, n=12, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, classes)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, x, y


# ------------------------------------------------- type-2 and MC over micro-batches
def _split_factors(split, fisher, loss_type, mc_samples=1):
    model, x, _ = model_and_data()
    pre = KFACPreconditioner(model, fisher_type=fisher, loss_type=loss_type, kl_clip=None,
                             mc_samples=mc_samples)
    start = 0
    for size in split:
        out = model(x[start:start + size])
        pre.curvature_backward(out)
        (out.square().sum() * size / 12).backward()
        start += size
    pre.step()
    return pre.factors()


@pytest.mark.parametrize(("fisher", "loss_type"), [
    ("type2", "cross_entropy"), ("type2", "mse"), ("type2", "bce"),
    ("mc", "cross_entropy"), ("mc", "bce")])
@pytest.mark.parametrize("sizes", [(3, 3, 3, 3), (1, 5, 2, 4)], ids=["equal", "unequal"])
def test_curvature_does_not_depend_on_the_micro_batch_split(fisher, loss_type, sizes):
    """G of a step is the same whether its batch is back-propagated in one call or in
    four (the categorical and Bernoulli MC draws are uniforms from one generator
    stream, the same in both cases)."""
    results = [_split_factors(split, fisher, loss_type) for split in ((12,), sizes)]
    for name, (a, g) in results[0].items():
        assert rel_err(results[1][name][0], a) < 1e-12, name
        assert rel_err(results[1][name][1], g) < 1e-12, name


def test_mse_mc_over_unequal_micro_batches_approaches_type2():
    """Gaussian MC draws differ with the split, so the check is statistical: 4000
    samples over an unequal split are within 5% of the exact type-2 G (4× off before)."""
    exact = _split_factors((12,), "type2", "mse")
    sampled = _split_factors((1, 5, 2, 4), "mc", "mse", mc_samples=4000)
    for name, (_, g) in exact.items():
        assert rel_err(sampled[name][1], g) < 0.05, name


# ----------------------------------------------------------- output layouts
class SequenceModel(nn.Module):
    """Per-token classifier over [N, T, d]; returns logits as [N, C, T] or [N, T, C]."""

    def __init__(self, channels_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 6)
        self.out = nn.Linear(6, 4)
        self.channels_first = channels_first

    def forward(self, x):
        logits = self.out(torch.tanh(self.inp(x)))
        return logits.transpose(1, 2) if self.channels_first else logits


def _sequence_factors(channels_first, class_dim, fisher="type2", loss_type="cross_entropy"):
    model = SequenceModel(channels_first).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pre = KFACPreconditioner(model, fisher_type=fisher, loss_type=loss_type, kl_clip=None,
                             class_dim=class_dim)
    out = model(x)
    pre.curvature_backward(out)
    out.sum().backward()
    pre.step()
    return pre.factors()


def test_outputs_with_more_than_two_dims_need_class_dim():
    with pytest.raises(ValueError, match=r"class_dim=1 for \[N, C, T\].*class_dim=-1 for"):
        _sequence_factors(True, None)
    with pytest.raises(ValueError, match="class_dim=5 is out of range"):
        _sequence_factors(True, 5)
    with pytest.raises(ValueError, match="class_dim="):
        KFACPreconditioner(nn.Linear(2, 2), class_dim="1", kl_clip=None)


@pytest.mark.parametrize("fisher", ["type2", "mc"])
@pytest.mark.parametrize("loss_type", ["cross_entropy", "mse", "bce"])
def test_class_dim_one_equals_the_classes_last_layout(fisher, loss_type):
    first = _sequence_factors(True, 1, fisher, loss_type)
    last = _sequence_factors(False, -1, fisher, loss_type)
    for name, (a, g) in last.items():
        assert rel_err(first[name][0], a) < 1e-12
        assert rel_err(first[name][1], g) < 1e-12


def test_class_dim_one_matches_curvlinops_type2():
    curvlinops = pytest.importorskip("curvlinops")
    model = SequenceModel(True).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 4, (3, 7), generator=torch.Generator().manual_seed(3))
    ours = _sequence_factors(True, 1)
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
        fisher_type=curvlinops.FisherType.TYPE2, check_deterministic=False, num_data=3,
        separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    for name, (a, g) in ours.items():
        assert rel_err(a, op._input_covariances[name]) < 1e-10, name
        assert rel_err(g, op._gradient_covariances[name]) < 1e-10, name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_type2_matches_curvlinops(reduction):
    curvlinops = pytest.importorskip("curvlinops")
    model, x, _ = model_and_data(classes=4)
    y = (torch.rand(12, 4, generator=torch.Generator().manual_seed(5)) > 0.5).double()
    pre = KFACPreconditioner(model, fisher_type="type2", loss_type="bce",
                             loss_reduction=reduction, kl_clip=None)
    out = model(x)
    nn.functional.binary_cross_entropy_with_logits(out, y, reduction=reduction).backward(
        retain_graph=True)
    pre.step(outputs=out)
    op = curvlinops.KFACLinearOperator(
        model, nn.BCEWithLogitsLoss(reduction=reduction), list(model.parameters()), [(x, y)],
        fisher_type=curvlinops.FisherType.TYPE2, check_deterministic=False, num_data=12,
        separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    for name, (a, g) in pre.factors().items():
        assert rel_err(a, op._input_covariances[name]) < 1e-10, name
        assert rel_err(g, op._gradient_covariances[name]) < 1e-10, name


def test_bce_mc_converges_to_type2():
    """E[vvᵀ] = diag(p(1 − p)) for the sampled BCE gradients: many samples approach the
    exact type-2 G."""
    factors = {}
    for fisher, samples in (("type2", 1), ("mc", 4000)):
        model, x, _ = model_and_data(classes=4)
        pre = KFACPreconditioner(model, fisher_type=fisher, loss_type="bce", kl_clip=None,
                                 mc_samples=samples)
        out = model(x)
        pre.curvature_backward(out)
        out.sum().backward()
        pre.step()
        factors[fisher] = pre.factors()
    for name, (_, g) in factors["type2"].items():
        assert rel_err(factors["mc"][name][1], g) < 0.05, name


# --------------------------------------------------------------------- DDP
@pytest.mark.distributed
def test_plain_preconditioner_on_ddp_with_two_ranks_raises(tmp_path):
    run_workers("tests.dist_workers:plain_on_ddp", 2, [str(tmp_path)], timeout=120,
                extra_path=ROOT)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "DistributedKFACPreconditioner" in message, message
        count, text = (tmp_path / f"late{rank}.txt").read_text().split("|", 1)
        assert float(count) == 1 and "DistributedKFACPreconditioner" in text, text


# ----------------------------------------------------------------- numerics
@pytest.mark.parametrize("method", ["solve", "inverse"])
def test_ill_conditioned_float32_factor_is_solved_in_float64(method):
    """Batch 1, damping 1e-8: the float32 Cholesky of G + λI 'succeeds' with a condition
    near 1e7; the update must still equal an unbatched float64 solve of the stored
    factors (with the damping the solver used), and the fallback is counted and warned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))
    x, y = torch.randn(1, 20), torch.randint(0, 10, (1,))
    pre = KFACPreconditioner(model, damping=1e-8, kl_clip=None, method=method)
    nn.functional.cross_entropy(model(x), y).backward()
    raw = {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}
    with pytest.warns(UserWarning, match=r"factor_dtype=torch.float64"):
        pre.step()
    assert pre.stats["ill_conditioned_solves"] >= 1
    for name in pre.layer_names:
        a, g = (t.double() for t in pre.factors()[name])
        lam_a, lam_g = pre.layer_state(name).damping
        q = torch.linalg.solve(g + lam_g * torch.eye(g.shape[0], dtype=g.dtype),
                               raw[name].double())
        ref = torch.linalg.solve(a + lam_a * torch.eye(a.shape[0], dtype=a.dtype), q.mT).mT
        assert rel_err(grad_matrix(model.get_submodule(name)), ref) < 1e-4, name


def test_huge_finite_gradient_is_still_clipped():
    """Inputs ×1e20: ⟨U, DΘ⟩ overflows float32. The KL clip must still see it (summed in
    float64) and scale U down, not count it non-finite and pass the raw gradient on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    lr, kappa = 0.1, 1e-3
    pre = KFACPreconditioner(model, lr=lr, kl_clip=kappa)
    for scale in (1.0, 1.0, 1e20):
        model.zero_grad()
        nn.functional.cross_entropy(model(x * scale), y).backward()
        raw = {n: grad_matrix(model.get_submodule(n)).double() for n in pre.layer_names}
        with pytest.warns(UserWarning) if scale > 1 else contextlib.nullcontext():
            pre.step()
    assert pre.stats["nonfinite_update_skips"] == 0
    assert pre.stats["nonfinite_factor_skips"] == 2  # both layers: ×1e20 factors overflow
    assert pre.stats["kl_clip_scale"] < 1e-10
    applied = sum(float((grad_matrix(model.get_submodule(n)).double() * raw[n]).sum())
                  for n in pre.layer_names)
    # the clip's defining identity: ν²η²⟨U, DΘ⟩ = κ, with νU the applied gradient
    assert applied * pre.stats["kl_clip_scale"] * lr**2 == pytest.approx(kappa, rel=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"beta": 1e300}, r"beta=1e\+300 is out of range"),
    ({"target_error": 1e-300}, r"target_error=1e-300 is out of range"),
    ({"beta": 1e-300}, "not representable"),
])
def test_extreme_thermodynamic_settings_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solver = ThermodynamicSolver(**kwargs)
        solver.solve(solver.prepare(2 * torch.eye(4), 1e-3), torch.ones(4))


def test_sgd_momentum_one_is_refused_by_the_kl_clip():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"momentum=1.0 is out of range"):
        KFACPreconditioner(model, optimizer=opt)
    pre = KFACPreconditioner(model, optimizer=opt, momentum=0.9)  # an explicit μ is used
    nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    pre.step()
    assert math.isfinite(pre.stats["kl_clip_scale"])


def test_type2_micro_batches_forwarded_first_then_back_propagated():
    """All micro-batch forwards first, then one curvature_backward per output: every
    call is still covered (nothing is dropped after the first backward)."""
    ref = _split_factors((12,), "type2", "cross_entropy")
    model, x, _ = model_and_data()
    pre = KFACPreconditioner(model, fisher_type="type2", kl_clip=None)
    outs = [model(x[:5]), model(x[5:])]
    for out in outs:
        pre.curvature_backward(out)
    for out, size in zip(outs, (5, 7)):
        (out.square().sum() * size / 12).backward()
    pre.step(num_examples=12)
    for name, (a, g) in ref.items():
        assert rel_err(pre.factors()[name][0], a) < 1e-12
        assert rel_err(pre.factors()[name][1], g) < 1e-12


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.h1, self.h2 = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        z = torch.tanh(self.body(x))
        return self.h1(z), self.h2(z)


def test_two_heads_of_one_forward_sum_their_curvatures():
    """loss = CE(head 1) + CE(head 2), summed: the body's type-2 G is the sum over both
    heads of Σ_c (Jᵀs_c)(Jᵀs_c)ᵀ, computed here directly with autograd."""
    model = TwoHeads().double()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pre = KFACPreconditioner(model, fisher_type="type2", loss_reduction="sum", kl_clip=None)
    o1, o2 = model(x)
    pre.curvature_backward(o1)
    pre.curvature_backward(o2)
    (o1.sum() + o2.sum()).backward()
    pre.step()
    s = model.body(x).detach().requires_grad_(True)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for head in (model.h1, model.h2):
        out = head(torch.tanh(s))
        p = out.softmax(-1).detach()
        for c in range(3):
            v = -p * p[:, c:c + 1].sqrt()
            v[:, c] += p[:, c].sqrt()
            (g,) = torch.autograd.grad(out, s, v, retain_graph=True)
            expected += g.T @ g
    assert rel_err(pre.factors()["body"][1], expected) < 1e-12
    mean_model = TwoHeads().double()
    mean_pre = KFACPreconditioner(mean_model, fisher_type="type2", kl_clip=None)
    o1, o2 = mean_model(x)
    mean_pre.curvature_backward(o1)
    with pytest.raises(ValueError, match="already covered"):
        mean_pre.curvature_backward(o2)


def test_singular_factor_raises_damping_loudly():
    """damping=0 with fewer examples than inputs: even float64 cannot factorise the
    factor to a meaningful accuracy; the damping is raised, counted and warned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10)).double()
    pre = KFACPreconditioner(model, damping=0.0, kl_clip=None)
    nn.functional.cross_entropy(model(torch.randn(3, 20, dtype=torch.float64)),
                                torch.tensor([0, 1, 2])).backward()
    with pytest.warns(UserWarning, match="use more damping"):
        pre.step()
    assert pre.stats["damping_increases"] > 0
    assert all(pre.layer_state(n).damping[0] > 0 for n in pre.layer_names)


def test_the_same_outputs_given_twice_raise():
    model, x, _ = model_and_data()
    pre = KFACPreconditioner(model, fisher_type="type2", loss_reduction="sum", kl_clip=None)
    out = model(x)
    pre.curvature_backward(out)
    out.sum().backward(retain_graph=True)
    with pytest.raises(ValueError, match="already given to curvature_backward"):
        pre.step(outputs=out)
