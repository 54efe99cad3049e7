"""K-FAC on the simulated thermodynamic solver: methods agree, time is modelled, the
resistor-array mode matches, and training on real images matches digital K-FAC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner, data
from thermokfac.solvers import HardwareModel, ThermodynamicSolver

from .cases import classification_batch, grad_matrix, mlp


def _one_step(solver, method, seed, model_seed=0, **kwargs):
    model = mlp((6, 5, 4), seed=model_seed)
    x, y = classification_batch(n=8)
    pre = KFACPreconditioner(model, solver=solver, method=method, damping=1e-2, kl_clip=None,
                             seed=seed, **kwargs)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    return pre, {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}


def test_method_1_and_method_2_agree_within_stochastic_error():
    """E[U] is the same for both methods (independent noise, same burn-in bias)."""
    solver = ThermodynamicSolver(beta=3e3, t0_rc=30.0, window_rc=20.0)
    repeats = 40
    runs = {m: [_one_step(solver, m, seed)[1] for seed in range(repeats)]
            for m in ("inverse", "solve")}
    for name in runs["solve"][0]:
        stacks = {m: torch.stack([r[name] for r in runs[m]]) for m in runs}
        means = {m: s.mean(0) for m, s in stacks.items()}
        se2 = sum((s - s.mean(0)).pow(2).sum() / (repeats * (repeats - 1))
                  for s in stacks.values())
        assert float((means["inverse"] - means["solve"]).norm()) <= 5 * float(se2.sqrt())
        assert float(stacks["solve"].std(0).norm()) > 0  # the noise is really there


def test_modeled_time_is_the_busiest_spu():
    times = {}
    for spus in (1, 4):
        solver = ThermodynamicSolver(hardware=HardwareModel(n_spus=spus, shared_link=False))
        pre, _ = _one_step(solver, "solve", 0)
        times[spus] = pre.last_timings.modeled_hardware_s
    assert times[1] > times[4] > 0
    assert pre.timing_summary()["mean_modeled_hardware_s"] == pytest.approx(times[4])


def test_resistor_array_mode_matches_factor_mode():
    """factor_storage='rows' realises aaᵀ/b + λI from rows: same U as forming factors."""
    precise = ThermodynamicSolver(target_error=1e-7, alpha_min_source="spectrum")
    rows_pre, rows_u = _one_step(precise, "solve", 0, factor_decay=0.0, factor_storage="rows")
    _, dense_u = _one_step("cholesky", "solve", 0, factor_decay=0.0)
    for name in dense_u:
        rel = float((rows_u[name] - dense_u[name]).norm() / dense_u[name].norm())
        assert rel < 1e-5, name
    assert rows_pre.factors() == {}  # no n×n factor was formed
    assert rows_pre.memory_bytes()["factors"] == 0  # rows are released after the prepare


def test_resistor_array_mode_holds_less_memory_when_batch_is_small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    x, y = torch.randn(16, 256), torch.randint(0, 8, (16,))
    held = {}
    for storage in ("matrix", "rows"):
        pre = KFACPreconditioner(model, solver=ThermodynamicSolver(), factor_decay=0.0,
                                 kl_clip=None, factor_storage=storage)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        held[storage] = pre.memory_bytes()["total"]
        pre.remove()
    assert held["rows"] < 0.25 * held["matrix"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"factor_storage": "rows"}, "needs factor_decay=0"),
    ({"factor_storage": "rows", "factor_decay": 0.0, "method": "inverse"}, "needs method='solve'"),
    ({"factor_storage": "disk"}, "factor_storage='disk' is not valid"),
])
def test_resistor_array_mode_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(mlp(), kl_clip=None, **kwargs)


def _train_mnist(solver, seed, steps=120, batch=256):
    x, y, x_val, y_val = data.mnist5k(seed=0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(model, solver=solver, damping=1e-2, optimizer=opt, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        pre.step()
        opt.step()
    with torch.no_grad():
        return (model(x_val).argmax(1) == y_val).float().mean().item()


def test_16_bit_thermodynamic_kfac_matches_digital_on_mnist():
    """Mean validation accuracy over 3 seeds within 1 percentage point (same steps)."""
    seeds = (0, 1, 2)
    thermo = ThermodynamicSolver(input_bits=16, output_bits=16)
    digital = sum(_train_mnist("cholesky", s) for s in seeds) / len(seeds)
    analog = sum(_train_mnist(thermo, s) for s in seeds) / len(seeds)
    assert digital > 0.85
    assert abs(analog - digital) <= 0.01, (analog, digital)
