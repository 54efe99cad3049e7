"""K-FAC in the setups real training code has: compiled models, frozen and parametrized
layers, in-place activations, models called in unusual ways, misuse of the call order.

Every supported setup is checked against an independent reference (the same model run
eagerly or written plainly, a dense float64 damped solve, curvlinops); every other one
must raise, or warn once and count — never pass silently.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import types

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import prune

from thermokfac import KFACPreconditioner

from .cases import dense_kfac_direction, grad_matrix, kfac_step, rel_err

LAMBDA = 1e-3


def tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(n: int = 8, d: int = 4, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def train(model, pre, forward, steps: int = 3, fisher: str = "empirical"):
    """``steps`` K-FAC steps on fixed data; returns the factors and last gradients."""
    x, y = data()
    for _ in range(steps):
        model.zero_grad()
        kfac_step(pre, forward(x), y, fisher)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return pre.factors(), grads


def eager_reference():
    """Factors and gradients of three plain eager steps of ``tiny()``."""
    eager = tiny()
    return train(eager, KFACPreconditioner(eager, kl_clip=None), eager)


def eager_factors(x, y) -> dict:
    """Factors of one plain step of ``tiny()`` on (x, y): the reference."""
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    return pre.factors()


def assert_factors_equal(got: dict, ref: dict, tol: float = 1e-12) -> None:
    assert set(got) == set(ref)
    for name, (a, g) in ref.items():
        assert rel_err(got[name][0], a) < tol, name
        assert rel_err(got[name][1], g) < tol, name


def trainable_grad_matrix(module: nn.Module) -> torch.Tensor:
    """DΘ of the trainable parameters: [∇W | ∇b], without the bias when it is frozen."""
    if module.bias is not None and module.bias.requires_grad:
        return grad_matrix(module)
    return module.weight.grad.reshape(module.weight.shape[0], -1).clone()


def assert_same(run, ref, tol=1e-10):
    (f1, g1), (f0, g0) = run, ref
    assert set(f1) == set(f0)
    for name in f0:
        for got, want in zip(f1[name], f0[name]):
            assert rel_err(got, want) < tol, name
    for name in g0:
        assert rel_err(g1[name], g0[name]) < tol, name


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("fisher", ["empirical", "type2"])
@pytest.mark.parametrize("built_on", ["model", "compiled"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_equals_eager(backend, built_on, fisher):
    torch._dynamo.reset()
    eager = tiny()
    ref = train(eager, KFACPreconditioner(eager, kl_clip=None, fisher_type=fisher), eager,
                fisher=fisher)
    model = tiny()
    compiled = torch.compile(model, backend=backend)
    pre = KFACPreconditioner(model if built_on == "model" else compiled, kl_clip=None,
                             fisher_type=fisher)
    assert pre.layer_names == ["0", "2"]  # names of the bare model, not "_orig_mod.0"
    assert_same(train(model, pre, compiled, fisher=fisher), ref)
    assert pre.stats["passthrough_layers"] == 0 and pre.stats["missing_factor_skips"] == 0


def test_other_compile_entry_points_equal_eager():
    """``nn.Module.compile()`` in place, and a compiled function that calls the model."""
    torch._dynamo.reset()
    ref = eager_reference()
    model = tiny()
    model.compile(backend="aot_eager")
    assert_same(train(model, KFACPreconditioner(model, kl_clip=None), model), ref)
    model = tiny()
    forward = torch.compile(lambda x: model(x).log_softmax(-1), backend="eager")
    eager = tiny()
    ref = train(eager, KFACPreconditioner(eager, kl_clip=None),
                lambda x: eager(x).log_softmax(-1))
    assert_same(train(model, KFACPreconditioner(model, kl_clip=None), forward), ref)


@pytest.mark.slow
def test_inductor_equals_eager():
    torch._dynamo.reset()
    ref = eager_reference()
    model = tiny()
    compiled = torch.compile(model, backend="inductor")
    assert_same(train(model, KFACPreconditioner(compiled, kl_clip=None), compiled), ref,
                tol=1e-8)


def test_a_forward_that_bypasses_hooks_raises_at_the_first_step():
    """A traced module runs the layers' maths without their hooks: gradients arrive but
    nothing was captured. That must not pass as plain SGD."""
    model = tiny()
    x, y = data()
    with pytest.warns(Warning):  # torch.jit.trace is deprecated
        traced = torch.jit.trace(model, x)
    pre = KFACPreconditioner(model, kl_clip=None)
    nn.functional.cross_entropy(traced(x), y).backward()
    with pytest.raises(RuntimeError, match="module hooks did not run"):
        pre.step()


# ----------------------------------------------------------- frozen parameters
def _single_layer_update(layer: nn.Linear, x, y, **kw):
    pre = KFACPreconditioner(layer, kl_clip=None, factor_decay=0.0, inv_update_steps=1, **kw)
    layer.zero_grad()
    nn.functional.cross_entropy(layer(x), y).backward()
    raw = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    pre.step()
    return pre, raw


def test_frozen_bias_is_left_out_of_a():
    torch.manual_seed(0)
    layer = nn.Linear(4, 5).double()
    layer.bias.requires_grad_(False)
    x, y = data(n=32, classes=5)
    x = x + 2  # a mean far from zero: the bias column would matter
    pre, raw = _single_layer_update(layer, x, y)
    a, g = pre.factors()[""]
    assert a.shape == (4, 4)
    torch.testing.assert_close(a, x.T @ x / 32)
    ref = dense_kfac_direction(a, g, raw["weight"], LAMBDA, LAMBDA)
    assert rel_err(layer.weight.grad, ref) < 1e-10
    # the same as a bias-free layer with the same weight
    plain = nn.Linear(4, 5, bias=False).double()
    plain.weight.data.copy_(layer.weight.data)
    plain_pre = KFACPreconditioner(plain, kl_clip=None, factor_decay=0.0)
    nn.functional.cross_entropy(plain(x) + layer.bias, y).backward()
    plain_pre.step()
    assert rel_err(layer.weight.grad, plain.weight.grad) < 1e-10


def test_frozen_weight_preconditions_the_bias_alone():
    torch.manual_seed(0)
    layer = nn.Linear(4, 5).double()
    layer.weight.requires_grad_(False)
    x, y = data(n=16, classes=5)
    pre, raw = _single_layer_update(layer, x, y)
    a, g = pre.factors()[""]
    torch.testing.assert_close(a, torch.ones(1, 1, dtype=torch.float64))
    ref = dense_kfac_direction(a, g, raw["bias"][:, None], LAMBDA, LAMBDA)[:, 0]
    assert rel_err(layer.bias.grad, ref) < 1e-10
    assert layer.weight.grad is None


def test_frozen_bias_matches_curvlinops_with_the_weight_only():
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].bias.requires_grad_(False)
    x, y = data(n=16)
    x = x + 1
    pre = KFACPreconditioner(model, kl_clip=None)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(x, y)],
        fisher_type=curvlinops.FisherType.EMPIRICAL, check_deterministic=False,
        num_data=16, separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    for name, (a, g) in pre.factors().items():
        assert rel_err(a, op._input_covariances[name]) < 1e-10, name
        assert rel_err(g, op._gradient_covariances[name]) < 1e-10, name


def test_requires_grad_is_followed_as_it_changes(caplog):
    """A layer frozen at construction is preconditioned once unfrozen; freezing its bias
    later restarts its factors without the bias column (counted)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    pre = KFACPreconditioner(model, kl_clip=None, factor_decay=0.0, inv_update_steps=1)
    x, y = data(n=16)

    def step():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {n: trainable_grad_matrix(model.get_submodule(n)) for n in ("0", "2")
               if model.get_submodule(n).weight.grad is not None}
        pre.step()
        return raw

    step()
    assert set(pre.factors()) == {"2"}
    for p in model[0].parameters():
        p.requires_grad_(True)
    raw = step()
    a, g = pre.factors()["0"]
    assert rel_err(grad_matrix(model[0]), dense_kfac_direction(a, g, raw["0"], LAMBDA,
                                                               LAMBDA)) < 1e-10
    assert rel_err(grad_matrix(model[2]), dense_kfac_direction(
        *pre.factors()["2"], raw["2"], LAMBDA, LAMBDA)) < 1e-10
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None
    with caplog.at_level(logging.INFO, logger="thermokfac"):
        raw = step()
    assert pre.stats["trainable_changes"] == 1
    assert "trainable parameters changed" in caplog.text
    a, g = pre.factors()["0"]
    assert a.shape == (4, 4)
    assert rel_err(model[0].weight.grad, dense_kfac_direction(a, g, raw["0"], LAMBDA,
                                                              LAMBDA)) < 1e-10


def test_every_layer_frozen_warns_once():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.warns(UserWarning, match="every preconditioned layer is frozen"):
        KFACPreconditioner(model, kl_clip=None)


# --------------------------------------------- parametrized and non-leaf weights
class LoRALinear(nn.Linear):
    """A LoRA-style adapter: its own forward adds a low-rank path."""

    def __init__(self, d_in, d_out, rank=2):
        super().__init__(d_in, d_out)
        self.down = nn.Parameter(torch.randn(rank, d_in) * 0.1)
        self.up = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


class RenamedLinear(nn.Linear):
    """A subclass that keeps Linear's forward: K-FAC treats it as a Linear."""


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "old_weight_norm", "lora"])
def test_layers_k_fac_cannot_precondition_are_left_out_loudly(wrap, caplog):
    torch.manual_seed(0)
    if wrap == "lora":
        first: nn.Module = LoRALinear(4, 5)
    else:
        first = nn.Linear(4, 5)
        if wrap == "weight_norm":
            first = nn.utils.parametrizations.weight_norm(first)
        elif wrap == "spectral_norm":
            first = nn.utils.parametrizations.spectral_norm(first)
        else:
            with pytest.warns(FutureWarning):
                first = nn.utils.weight_norm(first)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3)).double()
    with caplog.at_level(logging.WARNING, logger="thermokfac"):
        pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == ["2"]
    assert "0" in pre.unsupported_layers
    assert "K-FAC leaves these modules to the base optimizer" in caplog.text
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.stats["passthrough_layers"] == 0


def test_subclass_keeping_the_forward_is_preconditioned():
    torch.manual_seed(0)
    model = nn.Sequential(RenamedLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref_model = tiny()
    model.load_state_dict(ref_model.state_dict())
    pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == ["0", "2"]
    assert_same(train(model, pre, model),
                train(ref_model, KFACPreconditioner(ref_model, kl_clip=None), ref_model))


# ------------------------------------------------------------ in-place ops
class Scale2(nn.Module):
    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.mul_(2.0) if self.inplace else x * 2.0


IN_PLACE = {"relu": lambda: nn.ReLU(inplace=True),
            "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
            "hardtanh": lambda: nn.Hardtanh(-0.2, 0.2, inplace=True),
            "mul_": Scale2}
OUT_OF_PLACE = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1),
                "hardtanh": lambda: nn.Hardtanh(-0.2, 0.2),
                "mul_": lambda: Scale2(inplace=False)}


@pytest.mark.parametrize("fisher", ["empirical", "type2", "mc"])
@pytest.mark.parametrize("op", sorted(IN_PLACE))
def test_in_place_op_after_a_layer_keeps_its_curvature(op, fisher):
    """G of the first layer must be that of the network *with* the in-place op: the
    same as the network written with the out-of-place op."""

    def build(act):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 3), act(), nn.Linear(3, 2)).double()

    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(4))
    results = []
    for act in (IN_PLACE[op], OUT_OF_PLACE[op]):
        model = build(act)
        pre = KFACPreconditioner(model, kl_clip=None, fisher_type=fisher)
        out = model(x)
        nn.functional.cross_entropy(out, y).backward(retain_graph=fisher != "empirical")
        pre.step(outputs=None if fisher == "empirical" else out)
        results.append(pre.factors())
    for name in results[1]:
        for got, want in zip(results[0][name], results[1][name]):
            assert rel_err(got, want) < 1e-12, name


@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_inactive_relu_gives_zero_g(fisher):
    """The issue's minimal case: every ReLU unit inactive, so the first layer's output
    gradient, and G, are exactly zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(inplace=True), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    pre = KFACPreconditioner(model, kl_clip=None, fisher_type=fisher)
    x = torch.randn(5, 6, dtype=torch.float64)
    out = model(x)
    pre.curvature_backward(out)
    out.sum().backward()
    pre.step()
    assert float(pre.factors()["0"][1].abs().max()) == 0.0


# --------------------------------------------------------- the example count
class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


@dataclasses.dataclass
class Batch:
    step: int
    features: torch.Tensor


class Flexible(nn.Module):
    """Takes its features in several containers; other arguments carry no batch."""

    def __init__(self):
        super().__init__()
        self.net = tiny()

    def forward(self, *args, **kwargs):
        found = [a for a in (*args, *kwargs.values()) if not isinstance(a, (float, int))]
        inp = found[-1]
        if isinstance(inp, Batch):
            inp = inp.features
        elif isinstance(inp, collections.abc.Mapping):
            inp = inp["x"]
        elif isinstance(inp, list):
            inp = inp[0]
        return self.net(inp)


def _g_after_one_step(model, call, **step_kw):
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    nn.functional.cross_entropy(call(model, x), y).backward()
    pre.step(**step_kw)
    return pre.factors()


def test_submodules_called_directly_need_num_examples():
    torch.manual_seed(0)
    model = TwoPart().double()
    ref = _g_after_one_step(model, lambda m, x: m(x))
    model.zero_grad()
    with pytest.raises(ValueError, match="num_examples"):
        _g_after_one_step(model, lambda m, x: m.head(m.body(x)))
    model.zero_grad()
    got = _g_after_one_step(model, lambda m, x: m.head(m.body(x)), num_examples=8)
    for name in ref:
        assert rel_err(got[name][1], ref[name][1]) < 1e-12


@pytest.mark.parametrize("call", [
    lambda m, x: m(torch.tensor(0.5, dtype=x.dtype), x),      # scalar tensor first
    lambda m, x: m(0.5, x),                                    # a Python number first
    lambda m, x: m(collections.OrderedDict(x=x)),              # a Mapping that is not dict
    lambda m, x: m(types.MappingProxyType({"x": x})),
    lambda m, x: m(Batch(step=3, features=x)),                 # a dataclass
    lambda m, x: m(inputs=[x]),                                # a keyword argument
], ids=["scalar-tensor", "number", "ordered-dict", "mapping-proxy", "dataclass", "kwarg"])
def test_example_count_through_containers(call):
    model = Flexible()
    ref = _g_after_one_step(model, lambda m, x: m(x))
    model.zero_grad()
    got = _g_after_one_step(model, call)
    for name in ref:
        assert rel_err(got[name][1], ref[name][1]) < 1e-12


@pytest.mark.parametrize("call", [
    lambda m, x: m(x[:1], x),           # leading dimensions disagree
    lambda m, x: m(object()),           # no tensor visible
], ids=["disagree", "opaque"])
def test_ambiguous_example_count_raises(call):
    class Any2(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny()
            self.x = None

        def forward(self, *args):
            return self.net(self.x)

    model = Any2()
    x, y = data()
    model.x = x
    pre = KFACPreconditioner(model, kl_clip=None)
    nn.functional.cross_entropy(call(model, x), y).backward()
    with pytest.raises(ValueError, match=r"num_examples=N"):
        pre.step()
    pre.step(num_examples=8)  # an explicit count is always accepted
    with pytest.raises(ValueError, match="num_examples"):
        model.zero_grad()
        nn.functional.cross_entropy(call(model, x), y).backward()
        pre.step(num_examples=0)


def test_tokens_flattened_before_the_head_count_examples_not_rows():
    """A head applied to [N·T, d] rows sees N·T rows; the example count stays N."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):  # x: [N, T, 4]
            return self.head(torch.tanh(self.inp(x)).flatten(0, 1))

    torch.manual_seed(0)
    model = Seq().double()
    x = torch.randn(6, 7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (42,))
    pre = KFACPreconditioner(model, kl_clip=None, num_per_example_loss_terms=7)
    nn.functional.cross_entropy(model(x), y).backward()
    raw = model.head.weight.grad.clone()
    pre.step()
    assert pre.pending_step().examples == 0  # reset after the step
    # G of the head = N·T · Σ ĝĝᵀ with ĝ the rows of the mean-loss gradient (42 rows)
    out_grad = torch.autograd.functional.jacobian(
        lambda o: nn.functional.cross_entropy(o, y), model(x).detach())
    expected = 42 * out_grad.T @ out_grad
    assert rel_err(pre.factors()["head"][1], expected) < 1e-10
    assert raw.shape == (3, 5)


def test_per_example_vmap_pass_is_ignored_and_counted():
    """A per-example gradient pass under vmap(grad(...)) before the real backward is
    neither captured nor counted as examples; it is reported once."""
    model = tiny()
    x, y = data()
    eager = tiny()
    ref_pre = KFACPreconditioner(eager, kl_clip=None)
    nn.functional.cross_entropy(eager(x), y).backward()
    ref_pre.step()

    pre = KFACPreconditioner(model, kl_clip=None)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert per_example["0.weight"].shape == (8, 5, 4)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="torch.func transform"):
        pre.step()
    assert pre.stats["transformed_passes"] >= 1
    for name, (a, g) in ref_pre.factors().items():
        got_a, got_g = pre.factors()[name]
        assert rel_err(got_a, a) < 1e-12 and rel_err(got_g, g) < 1e-12


# ------------------------------------------------------------- call order
def test_step_before_backward_raises():
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    with pytest.raises(RuntimeError, match=r"before pre\.step"):
        pre.step()


def test_step_twice_after_one_backward_raises():
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    with pytest.raises(RuntimeError, match="twice"):
        pre.step()


def test_gradient_accumulation_is_one_step():
    """Two micro-batch backwards then one step is the supported accumulation pattern."""
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    for part in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
    pre.step()
    ref_model = tiny()
    ref = KFACPreconditioner(ref_model, kl_clip=None)
    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref.step()
    for name, (a, g) in ref.factors().items():
        assert rel_err(pre.factors()[name][0], a) < 1e-12
        # G: each micro-batch's rows carry 1/2 of the mean-loss gradient of its half
        assert rel_err(pre.factors()[name][1], g) < 1e-12


# ---------------------------------------------- passes that are not the step's loss
def test_autograd_grad_before_backward_is_reported_and_not_doubled():
    """torch.autograd.grad(loss, params) before loss.backward() (gradient-norm logging)
    back-propagates each layer output twice: only one gradient enters G."""
    model = tiny()
    x, y = data()
    pre = KFACPreconditioner(model, kl_clip=None)
    loss = nn.functional.cross_entropy(model(x), y)
    torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    loss.backward()
    with pytest.warns(UserWarning, match="back-propagated more than once"):
        pre.step()
    assert pre.stats["repeated_gradients"] == 2
    assert_factors_equal(pre.factors(), eager_factors(x, y))


def test_detached_branch_adds_no_rows_and_no_examples():
    """A forward whose output is detached (a BYOL-style target) never receives a
    gradient: it adds nothing to A, G or the example count."""
    model = tiny()
    x, y = data()
    pre = KFACPreconditioner(model, kl_clip=None)
    target = model(x + 1).detach()
    (nn.functional.cross_entropy(model(x), y) + 0 * target.sum()).backward()
    pre.step()
    assert_factors_equal(pre.factors(), eager_factors(x, y))


def test_forward_after_the_backward_adds_nothing():
    """A train-mode forward after the backward (or an activation-checkpoint
    recomputation) is never back-propagated: not counted."""
    model = tiny()
    x, y = data()
    pre = KFACPreconditioner(model, kl_clip=None)
    nn.functional.cross_entropy(model(x), y).backward()
    model(x + 1)
    pre.step()
    assert_factors_equal(pre.factors(), eager_factors(x, y))


def test_checkpointed_model_counts_its_examples_once():
    model = tiny()
    x, y = data()
    pre = KFACPreconditioner(model, kl_clip=None)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    nn.functional.cross_entropy(out, y).backward()
    pre.step()
    assert_factors_equal(pre.factors(), eager_factors(x, y))


def test_in_place_change_of_a_layer_input_after_the_layer():
    """Under bf16 autocast autograd keeps the layer's own copy of its input, so an
    in-place change of the input afterwards raises nothing: A must be the input the
    layer saw."""

    class Residual(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.fc, self.inplace = nn.Linear(4, 5), nn.Linear(5, 5), inplace

        def forward(self, x):
            h = torch.tanh(self.inp(x)).float()
            if self.inplace:
                h += self.fc(h)
                return h
            return h + self.fc(h)

    results = []
    for inplace in (True, False):
        model = Residual(inplace)
        pre = KFACPreconditioner(model, kl_clip=None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))
        out.float().square().mean().backward()
        pre.step()
        results.append(pre.factors())
    assert_factors_equal(results[0], results[1], tol=1e-6)


def test_paused_passes_are_not_captured():
    """FGSM-style adversarial training: the pass that crafts the example runs inside
    pre.paused(); the step's factors are those of the adversarial pass alone."""
    x, y = data()
    results = []
    for use_pause in (True, False):
        model = tiny()
        pre = KFACPreconditioner(model, kl_clip=None)
        x_adv = x.clone().requires_grad_(True)
        with pre.paused() if use_pause else contextlib.nullcontext():
            probe = nn.functional.cross_entropy(model(x_adv), y)
            (direction,) = torch.autograd.grad(probe, x_adv)
        x_adv = (x + 0.1 * direction.sign()).detach()
        nn.functional.cross_entropy(model(x_adv), y).backward()
        if use_pause:
            pre.step()
            results.append((pre.factors(), x_adv))
        else:  # without the pause the extra pass makes the count ambiguous: loud
            with pytest.raises(ValueError, match="paused"):
                pre.step()
    factors, x_adv = results[0]
    assert_factors_equal(factors, eager_factors(x_adv, y))


def test_siamese_calls_before_one_backward_ask_for_the_count():
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    anchor, positive = model(x), model(x + 0.1)
    (nn.functional.cross_entropy(anchor, y) + (anchor - positive).pow(2).mean()).backward()
    with pytest.raises(ValueError, match="several calls were made before one backward"):
        pre.step()


def test_unbatched_layer_input_is_reported_not_captured():
    """A position embedding of arange(T) broadcast over the batch only receives
    batch-summed gradients: its calls are not captured, and that is reported."""

    class PosModel(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok = nn.Embedding(7, 4)
            self.pos = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, idx):  # idx: [N, T] with T = 5 and N = 4
            return self.head(self.tok(idx) + self.pos(torch.arange(5))).mean(1)

    model = PosModel().double()
    pre = KFACPreconditioner(model, kl_clip=None)
    idx = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model(idx), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.warns(UserWarning, match="not the model call's batch"):
        pre.step()
    assert pre.stats["unbatched_layer_calls"] == 1
    assert "pos" not in pre.factors() and {"tok", "head"} <= set(pre.factors())


def test_skip_layers_naming_a_container_skips_its_subtree():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5)))
    model.add_module("head", nn.Linear(5, 3))
    pre = KFACPreconditioner(model.double(), kl_clip=None, skip_layers=["encoder"])
    assert pre.layer_names == ["head"]
    assert {"encoder.0", "encoder.2"} <= set(pre.discovery.skipped)


def test_step_per_micro_batch_under_accumulation_raises():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, optimizer=opt)
    x, y = data()
    nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
    pre.step()
    nn.functional.cross_entropy(model(x[4:]), y[4:]).backward()
    with pytest.raises(RuntimeError, match="added to the preconditioned gradient"):
        pre.step()
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()  # the usual loop is accepted again


@pytest.mark.parametrize("between", ["zero_grad", "zero_grad_in_place", "new_optimizer",
                                     "skipped_step"])
def test_ordinary_loops_are_not_refused(between):
    """No false alarm: a step skipped after a loss spike (zero_grad without
    optimizer.step), zero_grad(set_to_none=False), a new optimizer, a GradScaler-style
    skipped optimizer step followed by zero_grad."""
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt)
    x, y = data()
    for step in range(4):
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        if between == "zero_grad" or (between == "skipped_step" and step % 2):
            model.zero_grad()
            continue
        opt.step()
        if between == "new_optimizer":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad(set_to_none=between != "zero_grad_in_place")
    assert pre.steps == 4


def test_step_after_remove_raises():
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    pre.remove()
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()


def test_pruning_after_construction_raises_before_touching_gradients():
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = model[0].bias.grad.clone()
    with pytest.raises(RuntimeError, match="changed after the preconditioner was built"):
        pre.step()
    assert torch.equal(model[0].bias.grad, raw)


def test_model_compiled_and_run_before_building_is_refused_at_the_first_step():
    """Its compiled graph has no hooks and nothing public invalidates one model's graphs
    (the process-wide ``torch.compiler.reset()`` is the user's to call): refused in one
    line at the first step, and captured once the user resets."""
    torch._dynamo.reset()
    ref = eager_reference()
    model = tiny()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = data()
    with torch.no_grad():
        compiled(x)
    compiled(x).sum().backward()  # a compiled graph without hooks exists now
    model.zero_grad()
    pre = KFACPreconditioner(compiled, kl_clip=None)
    nn.functional.cross_entropy(compiled(x), y).backward()
    with pytest.raises(RuntimeError, match=r"captured nothing at step 0.*compiled and run "
                                           r"before the preconditioner was built"):
        pre.step()
    pre.remove()
    model.zero_grad()
    torch.compiler.reset()
    assert_same(train(model, KFACPreconditioner(compiled, kl_clip=None), compiled), ref)


def test_checkpoint_saved_with_a_frozen_bias_loads_into_the_unfrozen_model():
    model = tiny()
    model[0].bias.requires_grad_(False)
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.factors()["0"][0].shape == (4, 4)
    other = tiny()
    other_pre = KFACPreconditioner(other, kl_clip=None)
    other_pre.load_state_dict(pre.state_dict())
    nn.functional.cross_entropy(other(x), y).backward()
    other_pre.step()
    assert other_pre.stats["trainable_changes"] == 1
    assert other_pre.factors()["0"][0].shape == (5, 5)


def test_tied_module_with_its_own_bias_and_scaled_embedding_are_listed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.emb = nn.Embedding(5, 4, scale_grad_by_freq=True)

        def forward(self, x):
            return self.b(self.a(x))

    pre = KFACPreconditioner(Tied(), kl_clip=None)
    assert pre.layer_names == ["a"]
    assert "bias" in pre.unsupported_layers["b"]
    assert "scale_grad_by_freq" in pre.unsupported_layers["emb"]


def test_grouped_rows_that_do_not_match_the_membership_are_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx="reduce")
    x = torch.randn(7, 4, dtype=torch.float64)
    with pre.grouped_rows(torch.tensor([0, 0, 1, 1, 1, 2])):  # 6 entries for 7 rows
        model(x).sum().backward()
    with pytest.warns(UserWarning, match="do not match the membership"):
        pre.step(num_examples=3)
    assert pre.stats["group_mismatches"] == 2


def test_unconverged_cg_is_a_counted_solver_error():
    """CG that stops short of its tolerance must not hand back its iterate silently."""
    from thermokfac.solvers import CGSolver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))
    pre = KFACPreconditioner(model, solver=CGSolver(max_iter=2), kl_clip=None)
    nn.functional.cross_entropy(model(torch.randn(64, 20)), torch.randint(0, 10, (64,))
                                ).backward()
    raw = {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}
    with pytest.warns(UserWarning, match="solver failed"):
        pre.step()
    assert pre.stats["solver_errors"] >= 1
    for name in pre.layer_names:  # passed through unchanged
        assert torch.equal(grad_matrix(model.get_submodule(name)), raw[name])


def test_weights_tied_after_building_raise():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    pre = KFACPreconditioner(model, kl_clip=None)
    model[2].weight = model[0].weight
    x = torch.randn(8, 4, dtype=torch.float64)
    model(x).square().mean().backward()
    with pytest.raises(RuntimeError, match="shared with layer '0'"):
        pre.step()


def test_fully_frozen_layer_checkpoint_loads_into_a_trainable_model():
    model = tiny()
    for p in model[0].parameters():
        p.requires_grad_(False)
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    other = tiny()
    other_pre = KFACPreconditioner(other, kl_clip=None)
    other_pre.load_state_dict(pre.state_dict())
    nn.functional.cross_entropy(other(x), y).backward()
    other_pre.step()
    assert set(other_pre.factors()) == {"0", "2"}


def test_compiled_submodule_run_before_building_is_captured():
    torch._dynamo.reset()
    ref = eager_reference()
    model = tiny()
    model[0] = torch.compile(model[0], backend="aot_eager")
    x, _ = data()
    model(x).sum().backward()
    model.zero_grad()
    pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == ["0._orig_mod", "2"]
    (factors, grads), (ref_factors, ref_grads) = train(model, pre, model), ref
    for (name, (a, g)), (a0, g0) in zip(factors.items(), ref_factors.values()):
        assert rel_err(a, a0) < 1e-10 and rel_err(g, g0) < 1e-10, name
    for got, want in zip(grads.values(), ref_grads.values()):
        assert rel_err(got, want) < 1e-10


def test_parameters_replaced_by_load_state_dict_assign_are_followed():
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        model.load_state_dict(tiny(seed=1).state_dict(), assign=True)
    with pytest.raises(RuntimeError, match="no gradient"):
        pre.step()


def test_a_refused_step_does_not_mix_into_the_next_backward():
    """A step refused for its example count, the batch skipped (gradients reset), a new
    backward: the refused curvature is dropped as that backward begins (counted), and
    the step's factors are the new backward's alone. Without the reset, the next
    ``step()`` discards the mixture (warned, counted)."""
    model = tiny()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    (nn.functional.cross_entropy(model(x), y) + model(x + 1).pow(2).mean()).backward()
    with pytest.raises(ValueError, match="num_examples"):
        pre.step()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.stats["discarded_curvature"] == 1
    assert_factors_equal(pre.factors(), eager_factors(x, y))
    other = KFACPreconditioner(tiny(), kl_clip=None)  # the same without the reset
    (nn.functional.cross_entropy(other.model(x), y)
     + other.model(x + 1).pow(2).mean()).backward()
    with pytest.raises(ValueError, match="num_examples"):
        other.step()
    nn.functional.cross_entropy(other.model(x), y).backward()
    with pytest.warns(UserWarning, match="discarded"):
        other.step()
    assert other.stats["discarded_curvature"] == 1 and other.factors() == {}
