"""Bad input fails loudly or is contained; nothing non-finite ever reaches the model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.solvers import CholeskySolver

from .cases import classification_batch, grad_matrix, mlp


def _step(model, pre, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()


def test_nonfinite_activations_skip_factor_update_and_warn_once():
    model = mlp((6, 5, 4), dtype=torch.float32)
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_steps=1)
    x, y = classification_batch(dtype=torch.float32)
    _step(model, pre, x, y)
    before = {k: (a.clone(), g.clone()) for k, (a, g) in pre.factors().items()}
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite activations or gradients") as record:
        _step(model, pre, bad, y)
        _step(model, pre, bad, y)
    assert len(record) == 1
    assert pre.stats["nonfinite_factor_skips"] == 4  # two layers, two steps
    for name, (a, g) in pre.factors().items():
        assert torch.equal(a, before[name][0]) and torch.equal(g, before[name][1])
    # The NaN gradients themselves are left as they are (not preconditioned).
    assert torch.isnan(model[0].weight.grad).any()
    assert pre.stats["nonfinite_grad_skips"] >= 2


def test_nonfinite_grad_left_alone_finite_grads_stay_finite():
    model = mlp((6, 5, 4), dtype=torch.float32)
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = classification_batch(dtype=torch.float32)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("inf")
    poisoned = model[2].weight.grad.clone()
    pre.step()
    assert torch.equal(model[2].weight.grad, poisoned)
    assert torch.isfinite(model[0].weight.grad).all()
    assert pre.stats["nonfinite_grad_skips"] == 1


class AlwaysFails(CholeskySolver):
    name = "cholesky"

    def _prepare(self, m, damping):
        return None


def test_failed_factorisation_passes_gradient_through():
    model = mlp((6, 5, 4), dtype=torch.float32)
    pre = KFACPreconditioner(model, solver=AlwaysFails(max_damping_increases=2), kl_clip=None)
    x, y = classification_batch(dtype=torch.float32)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}
    pre.step()
    for name in pre.layer_names:
        assert torch.equal(grad_matrix(model.get_submodule(name)), raw[name])
    assert pre.stats["prepare_failures"] == 4  # A and G of two layers
    assert pre.stats["float64_retries"] == 4  # A and G of two layers
    assert pre.stats["damping_increases"] == 8
    assert pre.stats["passthrough_layers"] == 2


def test_singular_factor_with_zero_damping_is_rescued():
    """A batch of one gives rank-one factors: Cholesky fails until damping is raised."""
    model = mlp((6, 5, 4), dtype=torch.float32)
    pre = KFACPreconditioner(model, damping=0.0, kl_clip=None)
    x, y = classification_batch(n=1, dtype=torch.float32)
    _step(model, pre, x, y)
    assert pre.stats["damping_increases"] > 0
    assert pre.stats["prepare_failures"] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(pre.layer_state(n).damping[0] > 0 for n in pre.layer_names)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"damping": -1e-3}, r"damping=-0.001 is out of range; valid: \[0, inf\)"),
    ({"factor_decay": 1.0}, r"factor_decay=1.0 is out of range; valid: \[0, 1\)"),
    ({"factor_decay": -0.1}, r"factor_decay=-0.1 is out of range"),
    ({"factor_update_steps": 0}, r"factor_update_steps=0 is out of range; valid: an integer"),
    ({"inv_update_steps": -3}, r"inv_update_steps=-3 is out of range"),
    ({"inv_update_steps": 2.5}, r"inv_update_steps=2.5 is out of range"),
    ({"solver": "lu"}, r"solver='lu' is not registered; choose one of 'cg', 'cholesky'"),
    ({"method": "invert"}, r"method='invert' is not valid; choose one of 'inverse', 'solve'"),
    ({"fisher_type": "exact"}, r"fisher_type='exact' is not valid; choose one of 'empirical'"),
    ({"kfac_approx": "mean"}, r"kfac_approx='mean' is not valid"),
    ({"loss_reduction": "avg"}, r"loss_reduction='avg' is not valid"),
    ({"damping_split": "half"}, r"damping_split='half' is not valid"),
    ({"kl_clip": 0.0}, r"kl_clip=0.0 is out of range; valid: \(0, inf\)"),
    ({"lr": -1.0}, r"lr=-1.0 is out of range"),
    ({"mc_samples": 0}, r"mc_samples=0 is out of range"),
    ({"factor_dtype": torch.float16}, r"factor_dtype=torch.float16 is not valid"),
    ({"skip_layers": ["nope"]}, r"skip_layers entries \['nope'\] match no module"),
    ({"damping": "big"}, r"damping='big' must be a number"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(mlp(), kl_clip=kwargs.pop("kl_clip", None), **kwargs)


def test_schedule_out_of_range_fails_at_its_step():
    model = mlp(dtype=torch.float32)
    pre = KFACPreconditioner(model, damping=lambda step: 1e-3 if step < 1 else -1.0,
                             kl_clip=None)
    x, y = classification_batch(dtype=torch.float32)
    _step(model, pre, x, y)
    with pytest.raises(ValueError, match=r"damping=-1.0 is out of range"):
        _step(model, pre, x, y)


def test_model_without_supported_layer():
    with pytest.raises(ValueError, match="no layer K-FAC can precondition"):
        KFACPreconditioner(nn.Sequential(nn.LayerNorm(4)), kl_clip=None)


def test_kl_clip_without_learning_rate_warns():
    with pytest.warns(UserWarning, match="kl_clip is inactive"):
        KFACPreconditioner(mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFACPreconditioner(mlp(), lr=0.1, momentum=0.0)


def test_fisher_type_misuse_is_explained():
    x, y = classification_batch()
    model = mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", kl_clip=None)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"needs the model outputs: call pre.step\(outputs="):
        pre.step()

    model = mlp()
    pre = KFACPreconditioner(model, fisher_type="type2", kl_clip=None)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    with pytest.raises(RuntimeError, match="graph of `outputs` was already freed"):
        pre.step(outputs=out)

    model = mlp()
    pre = KFACPreconditioner(model, kl_clip=None)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward(retain_graph=True)
    with pytest.raises(ValueError, match="only used with fisher_type 'mc' or 'type2'"):
        pre.step(outputs=out)


def test_no_capture_in_eval_or_no_grad():
    model = mlp(dtype=torch.float32)
    pre = KFACPreconditioner(model, kl_clip=None)
    x, _ = classification_batch(dtype=torch.float32)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x).sum().backward()
    model.train()
    assert all(rows == (0, 0) for rows in pre.pending_step().rows.values())
    pre.step()
    assert pre.factors() == {}
    assert pre.stats["missing_factor_skips"] == 2
