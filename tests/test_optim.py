"""``KFACOptimizer`` is a torch.optim.Optimizer whose every step equals the plain loop
(``KFACPreconditioner`` + the base optimizer) bit for bit: with schedulers, closures,
resumes and added parameter groups."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from thermokfac import KFACOptimizer, KFACPreconditioner

BATCHES = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i)),
            torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(50 + i)))
           for i in range(8)]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _plain(batches, base, scheduler=None, **options):
    model = _model()
    opt = base(model.parameters())
    sched = scheduler(opt) if scheduler else None
    pre = KFACPreconditioner(model, optimizer=opt, **options)
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        pre.step()
        opt.step()
        if sched:
            sched.step()
    return model


def _wrapped(batches, base, scheduler=None, model=None, opt=None, **options):
    model = model or _model()
    opt = opt or KFACOptimizer(model, base(model.parameters()), **options)
    sched = scheduler(opt) if scheduler else None
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        if sched:
            sched.step()
    return model, opt


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


BASES = {"sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
         "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)}


@pytest.mark.parametrize("base", list(BASES))
def test_equals_the_plain_loop(base):
    plain = _plain(BATCHES, BASES[base], inv_update_steps=3)
    wrapped, opt = _wrapped(BATCHES, BASES[base], inv_update_steps=3)
    assert _same(plain, wrapped)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert "SGD" in repr(opt) or "AdamW" in repr(opt)


def test_schedulers_drive_the_base_rate_and_the_kl_clip():
    """StepLR halves the rate through the wrapper; the KL clip (which reads the rate)
    and the base step see it exactly as in the plain loop."""
    def step_lr(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    plain = _plain(BATCHES, BASES["sgd-momentum"], step_lr, kl_clip=1e-4)
    wrapped, opt = _wrapped(BATCHES, BASES["sgd-momentum"], step_lr, kl_clip=1e-4)
    assert _same(plain, wrapped)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)
    assert opt.preconditioner.stats["kl_clip_scale"] < 1  # the clip was active
    model = _model()
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    plateau.step(1.0)
    plateau.step(2.0)
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def _scheduled_step(factor: float, momentum: float = 0.0) -> tuple[list[torch.Tensor], float]:
    """One K-FAC step with the KL clip active, under a LambdaLR at ``factor`` of the base
    rate: (the parameter change, the clip's ν)."""
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=momentum)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factor)  # records initial_lr = 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * factor)
    pre = KFACPreconditioner(model, optimizer=opt, kl_clip=1e-6, factor_dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = BATCHES[0]
    nn.functional.cross_entropy(model(x.double()), y).backward()
    pre.step()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], \
        pre.stats["kl_clip_scale"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_clipped_step_follows_the_schedule(momentum):
    """The clip bounds the step at the scheduler's base rate (initial_lr), so the
    schedule scales the clipped step: at a quarter of the rate (a warm-up's early step)
    it is a quarter of the step. Computing ν from the current rate alone would give the
    same step at every rate while clipped (η ν U does not depend on η), and under
    momentum would leave a warm-up's early gradients unclipped in the buffer."""
    full, nu_full = _scheduled_step(1.0, momentum)
    quarter, nu_quarter = _scheduled_step(0.25, momentum)
    assert nu_full < 0.1  # the clip is active
    assert nu_quarter == pytest.approx(nu_full, rel=1e-12)  # the same ν: the base rate's
    for a, b in zip(quarter, full):
        assert torch.allclose(a, 0.25 * b, rtol=1e-10, atol=1e-15)


def test_closure_is_evaluated_before_the_preconditioning():
    model = _model()
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05))
    plain = _plain(BATCHES[:1], lambda p: torch.optim.SGD(p, lr=0.05))

    def closure():
        opt.zero_grad()
        loss = _loss(model, BATCHES[0])
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(float(_loss(_model(), BATCHES[0]).detach()))
    assert _same(plain, model)


def test_state_dict_resume_continues_bit_exactly():
    whole, _ = _wrapped(BATCHES, BASES["sgd-momentum"], inv_update_steps=3)
    first, opt = _wrapped(BATCHES[:5], BASES["sgd-momentum"], inv_update_steps=3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model = _model()
    resumed_opt = KFACOptimizer(model, BASES["sgd-momentum"](model.parameters()),
                                inv_update_steps=3)
    model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups is resumed_opt.base_optimizer.param_groups
    resumed, _ = _wrapped(BATCHES[5:], None, model=model, opt=resumed_opt)
    assert _same(whole, resumed)
    with pytest.raises(ValueError, match="not a KFACOptimizer state"):
        resumed_opt.load_state_dict(resumed_opt.base_optimizer.state_dict())


def test_added_group_is_stepped_and_bad_arguments_are_refused():
    model = _model()
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05))
    extra = nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.base_optimizer.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    (_loss(model, BATCHES[0]) + extra.sum()).backward()
    opt.step()
    assert torch.allclose(extra, torch.full((3,), 0.5))
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        KFACOptimizer(model, "sgd")
    with pytest.raises(ValueError, match="optimizer= is set by KFACOptimizer"):
        KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_kl_clip_weights_each_layer_by_its_groups_rate():
    """ν = min(1, √(κ / Σₗ η²_{g(l)} ⟨Uₗ, DΘₗ⟩)), η = lr/(1 − μ) of the group holding the
    layer's weight (the first layer's bias sits in a third group and does not count),
    checked against U and DΘ read from an unclipped twin."""
    x, y = BATCHES[0]
    grads, unclipped = {}, {}
    for clip in (None, 1e-6):
        model = _model()
        first, second = model[0], model[2]
        opt = torch.optim.SGD([{"params": [first.weight], "lr": 0.2, "momentum": 0.5},
                               {"params": [second.weight, second.bias], "lr": 0.01},
                               {"params": [first.bias], "lr": 5.0}], lr=0.1)
        pre = KFACPreconditioner(model, optimizer=opt, kl_clip=clip)
        _loss(model, (x, y)).backward()
        if clip is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        pre.step()
        if clip is None:
            unclipped = {n: p.grad.clone() for n, p in model.named_parameters()}
        else:
            applied, nu = {n: p.grad.clone() for n, p in model.named_parameters()}, \
                pre.stats["kl_clip_scale"]
    dots = {layer: sum(float((unclipped[f"{layer}.{part}"] * grads[f"{layer}.{part}"]).sum())
                       for part in ("weight", "bias")) for layer in ("0", "2")}
    vg = (0.2 / 0.5) ** 2 * dots["0"] + 0.01**2 * dots["2"]
    expected = min(1.0, (1e-6 / vg) ** 0.5)
    assert expected < 1 and nu == pytest.approx(expected, rel=1e-6)
    for name in applied:
        assert torch.allclose(applied[name], expected * unclipped[name], rtol=1e-5, atol=1e-8)


def test_lr_only_kl_clip_warns_about_momentum():
    """kfac-pytorch-style construction (lr= only) cannot know the base optimizer's
    momentum; the KL clip then sizes for lr, not lr/(1 − μ): a warning says so."""
    with pytest.warns(UserWarning, match="assuming no momentum"):
        pre = KFACPreconditioner(_model(), lr=0.1)
    pre.remove()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFACPreconditioner(_model(), lr=0.1, momentum=0.9).remove()
        model = _model()
        KFACPreconditioner(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                             momentum=0.9)).remove()


@pytest.mark.parametrize("zero", ["optimizer", "model", "model-keep", "none"])
def test_a_skipped_step_curvature_is_dropped_whoever_zeroes_the_gradients(zero):
    """A backward whose step is skipped, then the next forward, then the gradients reset
    (by the optimizer as Lightning does, by ``model.zero_grad()`` as the Hugging Face
    Trainer does, or to zeros instead of None) before that forward's backward: the
    skipped backward's curvature is dropped there and the step equals one that never
    saw its batch. Without a reset (accumulation) the two backwards' curvature joins."""
    def run(batches, skipped):
        model = _model()
        opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05),
                            kl_clip=None, factor_decay=0.5)
        if skipped is not None:
            _loss(model, skipped).backward()  # its step is skipped
        out = _loss(model, batches[0])       # the next forward comes first
        if zero == "optimizer":
            opt.zero_grad()
        elif zero in ("model", "model-keep"):
            model.zero_grad(set_to_none=zero == "model")
        out.backward()
        opt.step()
        for batch in batches[1:]:
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
        return model, opt.preconditioner
    skipped_run, pre = run(BATCHES[1:3], BATCHES[0])
    never, _ = run(BATCHES[1:3], None)
    same = all(torch.allclose(p, q, rtol=1e-6, atol=1e-8)
               for p, q in zip(skipped_run.parameters(), never.parameters()))
    if zero == "none":  # gradient accumulation: both backwards are the step's
        assert not same and pre.stats["discarded_curvature"] == 0
    else:
        assert same and pre.stats["discarded_curvature"] == 1
    assert pre.steps == 2


def test_a_bare_preconditioner_drops_a_skipped_backward_too():
    """The same without ``KFACOptimizer``: ``model.zero_grad()`` between the skipped
    backward and the next one is enough."""
    def run(skip: bool):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pre = KFACPreconditioner(model, optimizer=opt, kl_clip=None)
        if skip:
            _loss(model, BATCHES[0]).backward()
            model.zero_grad()
        _loss(model, BATCHES[1]).backward()
        pre.step()
        opt.step()
        return model, pre
    skipped, pre = run(True)
    never, _ = run(False)
    assert pre.stats["discarded_curvature"] == 1
    assert all(torch.equal(p, q) for p, q in zip(skipped.parameters(), never.parameters()))


def test_layers_the_base_optimizer_does_not_step_are_left_alone():
    """K-FAC on the head only (the body stepped by another optimizer): the body's
    gradient is untouched and the head's update equals a preconditioner that skips the
    body (whose KL clip sees only the head)."""
    model = _model()
    with pytest.warns(UserWarning, match=r"layers \['0'\] are left out of K-FAC"):
        opt = KFACOptimizer(model, torch.optim.SGD(model[2].parameters(), lr=0.1),
                            kl_clip=1e-4)
    assert opt.preconditioner.layer_names == ["2"]
    _loss(model, BATCHES[0]).backward()
    body = model[0].weight.grad.clone()
    opt.step()
    assert torch.equal(model[0].weight.grad, body)
    reference = _model()
    ref_opt = torch.optim.SGD(reference[2].parameters(), lr=0.1)
    pre = KFACPreconditioner(reference, optimizer=ref_opt, kl_clip=1e-4, skip_layers=["0"])
    _loss(reference, BATCHES[0]).backward()
    pre.step()
    ref_opt.step()
    assert _same(model, reference)


def test_unsupported_bases_copies_and_refused_loads():
    model = _model()
    with pytest.raises(ValueError, match="LBFGS re-evaluates its closure"):
        KFACOptimizer(model, torch.optim.LBFGS(model.parameters()))
    inner = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="preconditioned twice"):
        KFACOptimizer(model, inner)
    import copy
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(inner)
    # A state the preconditioner refuses leaves the base optimizer as it was.
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    other_opt = KFACOptimizer(other, torch.optim.SGD(other.parameters(), lr=0.7))
    _loss(other, BATCHES[0]).backward()
    other_opt.step()
    foreign = other_opt.state_dict()
    with pytest.raises(ValueError, match="different model"):
        inner.load_state_dict(foreign)
    assert inner.param_groups[0]["lr"] == 0.1


def test_kl_clip_counts_sgd_dampening():
    """SGD with momentum μ and dampening d steps lr(1 − d)/(1 − μ) per unit gradient at
    steady state; the KL clip uses that rate."""
    nus = {}
    for dampening in (0.0, 0.9):
        model = _model()
        opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                                   dampening=dampening), kl_clip=1e-6)
        _loss(model, BATCHES[0]).backward()
        opt.step()
        nus[dampening] = opt.preconditioner.stats["kl_clip_scale"]
    assert nus[0.9] == pytest.approx(10 * nus[0.0], rel=1e-6)  # η is 10× smaller


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_a_bad_rate_of_the_base_optimizer_is_refused_before_anything_changes(bad):
    """A NaN, infinite or negative rate in a parameter group (set by hand or by a
    scheduler) is a ValueError naming the group and the value; the parameters and their
    gradients are left as they were (without the check, NaN rates switched the KL clip
    off and trained NaN parameters without a word)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = bad
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    factors = {name: tuple(f.clone() for f in ag)
               for name, ag in opt.preconditioner.factors().items()}
    steps = opt.preconditioner.steps
    with pytest.raises(ValueError, match=f"parameter group 0 is {bad!r}"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert opt.preconditioner.steps == steps  # nor the preconditioner's state
    for name, (a, g) in opt.preconditioner.factors().items():
        assert torch.equal(a, factors[name][0]) and torch.equal(g, factors[name][1])


def _kfac_sgd(sizes, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])
    opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = torch.randn(8, sizes[0]), torch.randint(0, sizes[-1], (8,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _snapshot(opt):
    base = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in opt.base_optimizer.state_dict()["state"].items()}
    factors = {n: tuple(f.clone() for f in ag) for n, ag in opt.preconditioner.factors().items()}
    return opt.preconditioner.steps, base, factors


def _assert_same(opt, snapshot):
    steps, base, factors = snapshot
    assert opt.preconditioner.steps == steps
    now = opt.base_optimizer.state_dict()["state"]
    assert set(now) == set(base)
    for k, s in base.items():
        for n, v in s.items():
            assert torch.equal(now[k][n], v) if torch.is_tensor(v) else now[k][n] == v
    for n, (a, g) in opt.preconditioner.factors().items():
        assert torch.equal(a, factors[n][0]) and torch.equal(g, factors[n][1])


def test_a_refused_load_leaves_both_parts_as_they_were():
    """One part refuses its state (the base: other parameter groups; the preconditioner:
    another model): neither the base optimizer nor the preconditioner has changed."""
    _, opt = _kfac_sgd([4, 6, 3])
    snapshot = _snapshot(opt)
    _, other = _kfac_sgd([4, 6, 3], seed=1)       # the same model, other factors
    _, three_layers = _kfac_sgd([4, 6, 6, 3])     # the base refuses: more parameters
    with pytest.raises(ValueError):
        opt.load_state_dict({"base": three_layers.state_dict()["base"],
                             "preconditioner": other.state_dict()["preconditioner"]})
    _assert_same(opt, snapshot)
    _, wider = _kfac_sgd([4, 7, 3])               # the base accepts, K-FAC refuses
    with pytest.raises(ValueError, match="different model"):
        opt.load_state_dict({"base": other.state_dict()["base"],
                             "preconditioner": wider.state_dict()["preconditioner"]})
    _assert_same(opt, snapshot)
