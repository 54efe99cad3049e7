"""Every way a module is called, changed or zeroed is captured right or refused loudly.

Each kind against an independent reference: the same model written another way
(positional calls, the stacked form), a dense float64 damped Kronecker solve, curvlinops
3.0.1, or the exact error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner

from .cases import dense_kfac_direction, grad_matrix, rel_err

# --------------------------------------------------------------- call forms


class Calls(nn.Module):
    """Embedding → Conv1d → ConvTranspose1d → Linear, each called positionally or by
    keyword (``input=``, and ``output_size=`` for the transposed convolution)."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 5, 3, padding=1)
        self.up = nn.ConvTranspose1d(5, 3, 2, stride=2)
        self.fc = nn.Linear(3 * 13, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.keyword:
            h = self.emb(input=tokens).transpose(1, 2)
            h = torch.tanh(self.conv(input=h))
            h = self.up(input=h, output_size=[13])
            return self.fc(input=torch.tanh(h).flatten(1))
        h = torch.tanh(self.conv(self.emb(tokens).transpose(1, 2)))
        return self.fc(torch.tanh(self.up(h, [13])).flatten(1))


def _tokens(n: int = 6):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 7, (n, 6), generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_keyword_called_layers_equal_positional_calls(approx):
    runs = {}
    for keyword in (False, True):
        torch.manual_seed(0)
        model = Calls(keyword).double()
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx, damping=1e-2)
        x, y = _tokens()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        runs[keyword] = (pre.factors(), {n: p.grad for n, p in model.named_parameters()},
                         pre.stats)
    (f0, u0, s0), (f1, u1, s1) = runs[False], runs[True]
    assert s0["missing_factor_skips"] == 0
    assert list(f0) == list(f1) == ["emb", "conv", "up", "fc"]
    for name in f0:
        for a, b in zip(f0[name], f1[name]):
            assert torch.equal(a, b), name
    for name in u0:
        assert torch.equal(u0[name], u1[name]), name
    assert s1["missing_factor_skips"] == 0


def test_an_input_capture_cannot_read_is_refused_in_one_line_after_the_forward():
    model = nn.Sequential(nn.Linear(4, 3))
    pre = KFACPreconditioner(model, kl_clip=None)
    jagged = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)],
                                        layout=torch.jagged)
    out = model(jagged)  # the forward runs as PyTorch's
    out.values().sum().backward()
    with pytest.raises(ValueError, match=r"cannot capture layers \['0'\] at step 0: 0: a "
                                         r"nested \(jagged\) tensor input.*skip_layers"):
        pre.step()


def test_a_sparse_input_is_captured_as_its_dense_values():
    torch.manual_seed(0)
    dense = torch.randn(8, 5).relu()
    y = torch.randint(0, 3, (8,))
    factors = []
    for x in (dense, dense.to_sparse()):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 3))
        pre = KFACPreconditioner(model, kl_clip=None)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        factors.append(pre.factors()["0"])
    for a, b in zip(*factors):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- zeroing

ZEROING = {
    "zero_grad": lambda model: model.zero_grad(),
    "set_to_none": lambda model: [setattr(p, "grad", None) for p in model.parameters()],
    "zero_": lambda model: [p.grad.zero_() for p in model.parameters()],
    "data.zero_": lambda model: [p.grad.data.zero_() for p in model.parameters()],
    "mul_(0)": lambda model: [p.grad.mul_(0) for p in model.parameters()],
}


def _zeroed_run(zero):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_steps=2)
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        if step:
            zero(model)
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=g)).backward()
        pre.step()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_every_way_of_zeroing_gradients_is_accepted_and_trains_alike():
    reference = _zeroed_run(ZEROING["zero_grad"])
    for name, zero in ZEROING.items():
        for got, want in zip(_zeroed_run(zero), reference):
            assert torch.equal(got, want), name


def test_a_backward_onto_the_preconditioned_gradient_is_still_refused():
    with pytest.raises(RuntimeError, match="added to the preconditioned gradient"):
        _zeroed_run(lambda model: None)


# ------------------------------------------------------- cast and moved model

def test_a_model_cast_to_float64_after_building_gets_float64_factors_and_solves():
    """Built on float32, cast before training: the update is the float64 dense damped
    Kronecker solve (a float32 factorisation would be ~1e-4 off at damping 1e-2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = KFACPreconditioner(model, kl_clip=None, damping=1e-2, factor_decay=0.0)
    model.double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (32,), generator=g)).backward()
    raw = {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}
    pre.step()
    assert pre.factor_dtype == torch.float64
    for name, (a, g_) in pre.factors().items():
        assert a.dtype == g_.dtype == torch.float64
        expected = dense_kfac_direction(a, g_, raw[name], 1e-2, 1e-2)
        assert rel_err(grad_matrix(model.get_submodule(name)), expected) < 1e-10, name


def test_a_cast_mid_training_moves_the_factors_and_prepares_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = KFACPreconditioner(model, kl_clip=None, damping=1e-2, inv_update_steps=10)
    g = torch.Generator().manual_seed(6)
    for step in range(3):
        if step == 2:
            model.double()
        dtype = torch.float64 if step == 2 else torch.float32
        x = torch.randn(16, 6, generator=g).to(dtype)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=g)).backward()
        report = pre.step()
    assert report.prepared == ("0", "2")  # not due (every 10), prepared after the cast
    for name in pre.layer_names:
        block = pre.block(name)
        assert block.a.value.dtype == block.g.value.dtype == block.g_inv.dtype == torch.float64


def test_an_explicit_factor_dtype_is_kept_when_the_model_is_cast():
    model = nn.Sequential(nn.Linear(4, 3))
    pre = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float32)
    model.double()
    x = torch.randn(8, 4, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
    pre.step()
    assert pre.factor_dtype == torch.float32
    assert pre.factors()["0"][0].dtype == torch.float32


# ------------------------------------------------ a layer applied k times per forward

curvlinops = pytest.importorskip("curvlinops")


class Cell(nn.Module):
    """One Linear over T time steps: unrolled (T calls on ``[N, d]``, an RNN cell written
    by hand) or stacked (one call on ``[N, T, d]``) — the same function."""

    def __init__(self, unrolled: bool) -> None:
        super().__init__()
        self.unrolled = unrolled
        self.cell = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unrolled:
            h = torch.stack([torch.tanh(self.cell(x[:, t])) for t in range(x.shape[1])], 1)
        else:
            h = torch.tanh(self.cell(x))
        return self.head(h.mean(1))


def _seq(n: int = 8, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _cell_factors(unrolled: bool, approx: str, fisher: str = "empirical", **kw):
    torch.manual_seed(1)
    model = Cell(unrolled).double()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx, fisher_type=fisher, **kw)
    x, y = _seq()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward(retain_graph=fisher != "empirical")
    pre.step(outputs=None if fisher == "empirical" else out)
    return pre.factors()


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_layer_called_per_time_step_equals_curvlinops_on_the_stacked_network(approx, fisher):
    """T calls on ``[N, d]`` within one forward form one shared dimension of size T
    (reduce: activations averaged, gradients summed over the calls), as one call on
    ``[N, T, d]``: curvlinops on that stacked network is the reference."""
    ours = _cell_factors(True, approx, fisher)
    torch.manual_seed(1)
    stacked = Cell(False).double()
    x, y = _seq()
    op = curvlinops.KFACLinearOperator(
        stacked, nn.CrossEntropyLoss(), list(stacked.parameters()), [(x, y)],
        fisher_type=getattr(curvlinops.FisherType, fisher.upper()),
        kfac_approx=getattr(curvlinops.KFACType, approx.upper()), check_deterministic=False,
        num_data=x.shape[0], separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    for name in ("cell", "head"):
        a, g = ours[name]
        assert rel_err(a, op._input_covariances[name]) < 1e-12, (name, "A")
        assert rel_err(g, op._gradient_covariances[name]) < 1e-12, (name, "G")


def test_the_override_treats_every_call_as_examples_of_its_own():
    """``repeated_calls="separate"``: each ``[N, d]`` call's rows are examples, which
    for 2-D inputs is expand's A and G."""
    separate = _cell_factors(True, "reduce", repeated_calls="separate")
    expand = _cell_factors(False, "expand")
    for name in ("cell", "head"):
        for got, want in zip(separate[name], expand[name]):
            assert rel_err(got, want) < 1e-12, name
    with pytest.raises(ValueError, match="repeated_calls='stacked' is not valid"):
        KFACPreconditioner(Cell(True), repeated_calls="stacked")


def test_shared_calls_of_micro_batches_equal_the_whole_batch():
    """Two forwards (micro-batches), each calling the cell T times, back-propagated one
    by one: each forward is its own shared dimension."""
    torch.manual_seed(1)
    model = Cell(True).double()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx="reduce")
    x, y = _seq()
    for part in (slice(0, 4), slice(4, 8)):
        (nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum") / 8).backward()
    pre.step()
    whole = _cell_factors(False, "reduce")
    for name in ("cell", "head"):
        for got, want in zip(pre.factors()[name], whole[name]):
            assert rel_err(got, want) < 1e-12, name


class Siamese(nn.Module):
    """One encoder applied to both halves of a pair (the k = 2 case), or once on the
    pair stacked ``[N, 2, d]``."""

    def __init__(self, stacked: bool) -> None:
        super().__init__()
        self.stacked = stacked
        self.enc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            z = torch.tanh(self.enc(pair))
            return self.head(z[:, 0] - z[:, 1])
        return self.head(torch.tanh(self.enc(pair[:, 0])) - torch.tanh(self.enc(pair[:, 1])))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_siamese_encoder_equals_its_stacked_form(approx):
    g = torch.Generator().manual_seed(9)
    pair = torch.randn(6, 2, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    found = []
    for stacked in (False, True):
        torch.manual_seed(2)
        model = Siamese(stacked).double()
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx)
        nn.functional.cross_entropy(model(pair), y).backward()
        pre.step()
        found.append(pre.factors())
    for name in ("enc", "head"):
        for got, want in zip(found[0][name], found[1][name]):
            assert rel_err(got, want) < 1e-12, name


# ------------------------------------------------------ modules changed after building

def test_a_layer_replaced_after_building_is_found_again():
    """Model surgery (``model[2] = nn.Linear(...)``): warned once and counted; the new
    layer passes its gradient through at that step, is preconditioned from the next (its
    update the dense float64 damped solve of its own factors), and the old module is
    no longer listed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    pre = KFACPreconditioner(model, kl_clip=None, damping=1e-2, inv_update_steps=1)
    g = torch.Generator().manual_seed(8)
    old = model[2]
    for step in range(3):
        if step == 1:
            model[2] = nn.Linear(6, 3).double()
        model.zero_grad()
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=g)).backward()
        raw = grad_matrix(model[2])
        if step == 1:
            with pytest.warns(UserWarning, match=r"layers changed after the preconditioner "
                                                 r"was built \(added or replaced: \['2'\]"):
                report = pre.step()
            assert report.skipped == {"2": "passthrough_layers"}
            assert torch.equal(grad_matrix(model[2]), raw)
        else:
            pre.step()
    assert pre.layer_names == ["0", "2"] and pre.block("2").helper.module is model[2]
    assert pre.block("2").helper.module is not old and pre.stats["changed_layers"] == 1
    a, g_ = pre.factors()["2"]
    expected = dense_kfac_direction(a, g_, raw, 1e-2, 1e-2)
    assert rel_err(grad_matrix(model[2]), expected) < 1e-10


def test_a_layer_added_or_removed_after_building_is_followed():
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    pre = KFACPreconditioner(model, kl_clip=None)
    x = torch.randn(8, 4)
    for step, change in enumerate([None, "add", None, "remove", None]):
        if change == "add":
            model.append(nn.Linear(4, 4))
        elif change == "remove":
            del model[2]
        model.zero_grad()
        model(x).pow(2).mean().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre.step()
        assert [str(w.message)[:26] for w in caught] == (
            ["the model's layers changed"] if change else []), step
        assert pre.layer_names == (["0", "2"] if 1 <= step < 3 else ["0"]), step
    assert pre.stats["changed_layers"] == 2


def test_a_model_on_the_meta_device_is_refused_naming_its_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"parameters 0.weight, 0.bias, 2.weight, 2.bias are "
                                         r"on the meta device.*to_empty"):
        KFACPreconditioner(model, kl_clip=None)
    model.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    pre = KFACPreconditioner(model, kl_clip=None)  # materialised: it builds and steps
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    assert pre.step().prepared == ("0", "2")


# ------------------------------------------------------- activation checkpointing

class Checkpointed(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "plain":
            h = self.block(x)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, x,
                                                  use_reentrant=self.mode == "reentrant")
        return self.head(h.mean(1))


def _checkpointed(mode: str, fisher: str, approx: str):
    torch.manual_seed(1)
    model = Checkpointed(mode).double()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx, fisher_type=fisher)
    x, y = _seq()
    out = model(x.requires_grad_(mode == "reentrant"))
    nn.functional.cross_entropy(out, y).backward(retain_graph=fisher != "empirical")
    pre.step(outputs=None if fisher == "empirical" else out)
    return pre


@pytest.mark.parametrize(("mode", "fisher"), [("reentrant", "empirical"),
                                              ("non-reentrant", "empirical"),
                                              ("non-reentrant", "type2")])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_activation_checkpointing_captures_as_without_it(mode, fisher, approx):
    """The recomputation's calls are the ones back-propagated: captured once, equal to
    the model without checkpointing."""
    plain = _checkpointed("plain", fisher, approx).factors()
    got = _checkpointed(mode, fisher, approx).factors()
    assert list(got) == ["a", "b", "head"]
    for name in got:
        for x, y in zip(got[name], plain[name]):
            assert rel_err(x, y) < 1e-12, name


def test_a_reentrant_checkpoint_under_the_preconditioners_backward_is_reported():
    with pytest.warns(UserWarning, match="reentrant activation checkpoint"):
        pre = _checkpointed("reentrant", "type2", "expand")
    assert pre.stats["missing_factor_skips"] == 2 and list(pre.factors()) == ["head"]


# ------------------------------------------------ cases found by trying to break it

class Target(nn.Module):
    """A SimSiam-style model: the encoder's second call is a target, detached or run
    without gradients — the same function, the same gradients."""

    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.detach = detach
        self.enc = nn.Linear(4, 5)
        self.pred = nn.Linear(5, 5)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        p1 = self.pred(torch.tanh(self.enc(x1)))
        if self.detach:
            z2 = torch.tanh(self.enc(x2)).detach()
        else:
            with torch.no_grad():
                z2 = torch.tanh(self.enc(x2))
        return (p1 - z2).pow(2).sum(1)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_call_whose_output_gets_no_gradient_adds_nothing_when_calls_share(approx):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x2 = 3 + torch.randn(8, 4, generator=g, dtype=torch.float64)
    found = []
    for detach in (True, False):
        torch.manual_seed(0)
        model = Target(detach).double()
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx)
        model(x1, x2).mean().backward()
        pre.step()
        found.append(pre.factors()["enc"])
    for got, want in zip(*found):
        assert rel_err(got, want) < 1e-12


class WeightedCell(Cell):
    """The cell with a second model input of another shape (a per-step weighting)."""

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.unrolled:
            h = torch.stack([torch.tanh(self.cell(x[:, t])) for t in range(x.shape[1])], 1)
        else:
            h = torch.tanh(self.cell(x))
        return self.head((h * w[None, :, None]).mean(1))


def test_calls_share_without_a_readable_example_count():
    """The model's inputs have two leading dimensions (8 examples, a [4] weighting): the
    count needs num_examples, and the cell's calls still share, as in the stacked form."""
    x, y = _seq()
    w = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    found = []
    for unrolled in (True, False):
        torch.manual_seed(1)
        model = WeightedCell(unrolled).double()
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx="reduce")
        nn.functional.cross_entropy(model(x, w), y).backward()
        with pytest.raises(ValueError, match="num_examples"):
            pre.step()
        pre.step(num_examples=8)
        found.append(pre.factors()["cell"])
    for got, want in zip(*found):
        assert rel_err(got, want) < 1e-12


class CheckpointedCell(Cell):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def body(x):
            return torch.stack([torch.tanh(self.cell(x[:, t])) for t in range(x.shape[1])], 1)
        return self.head(torch.utils.checkpoint.checkpoint(body, x, use_reentrant=True).mean(1))


def test_calls_recomputed_by_a_reentrant_checkpoint_share_as_well():
    x, y = _seq()
    torch.manual_seed(1)
    model = CheckpointedCell(True).double()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx="reduce")
    nn.functional.cross_entropy(model(x.requires_grad_()), y).backward()
    pre.step()
    stacked = _cell_factors(False, "reduce")
    for got, want in zip(pre.factors()["cell"], stacked["cell"]):
        assert rel_err(got, want) < 1e-12


def test_gradients_taken_with_autograd_grad_before_zeroing_are_not_a_misuse():
    """``torch.autograd.grad`` with respect to the parameters (a gradient-norm probe)
    computes gradients without accumulating them: not a backward onto U."""
    def run(probe: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pre = KFACPreconditioner(model, kl_clip=None)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(8, 5, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=g)
            if probe:
                with pre.paused():
                    torch.autograd.grad(model(x).pow(2).mean(), list(model.parameters()))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
        return list(model.parameters())

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


def test_shared_calls_of_a_half_precision_model_sum_in_the_factor_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).half()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx="reduce")
    x = (10 + torch.randn(2, 8192, 4)).half()  # finite; its float16 sum over 8192 is not
    model(x).float().pow(2).mean().backward()
    pre.step()
    a, g = pre.factors()["0"]
    assert pre.stats["nonfinite_factor_skips"] == 0 and bool(torch.isfinite(g).all())
    torch.testing.assert_close(a[:4, :4], (x.float().mean(1).mT @ x.float().mean(1)) / 2,
                               rtol=1e-3, atol=1e-3)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)))


def test_a_custom_model_compiled_and_run_before_building_is_refused():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    pre = KFACPreconditioner(compiled, kl_clip=None)
    nn.functional.cross_entropy(compiled(x), y).backward()
    with pytest.raises(RuntimeError, match="compiled and run before the preconditioner"):
        pre.step()
    torch._dynamo.reset()
