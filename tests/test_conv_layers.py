"""K-FAC for convolutions: Conv1d/2d/3d, grouped and depthwise, transposed, every
padding mode.

References, independent of the helpers' patch extraction:

* the same layer written as patch extraction by an identity-kernel convolution (PyTorch's
  own padding modes, strides and dilations) followed by one ``nn.Linear`` per group on
  the patches: the forward must match the layer's, and K-FAC's factors and preconditioned
  gradients for each group must equal those of that group's Linear;
* where K-FAC is exact (one example, one output position, type-2 Fisher), the exact GGN
  block from autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermokfac import KFACPreconditioner

from .cases import dense_kfac_direction, kfac_step, rel_err

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


def identity_patches(channels: int, kernel: tuple[int, ...], **conv_args) -> nn.Module:
    """A depthwise convolution whose output channel c·K + j is input channel c at
    kernel offset j: the patches, channel-major, as a flattened weight orders them."""
    n = len(kernel)
    k = math.prod(kernel)
    patch = CONV[n](channels, channels * k, kernel, groups=channels, bias=False,
                    **conv_args).double()
    with torch.no_grad():
        patch.weight.zero_()
        flat = patch.weight.view(channels, k, k)
        flat[:, torch.arange(k), torch.arange(k)] = 1.0
    patch.weight.requires_grad_(False)
    return patch


class PatchLinear(nn.Module):
    """A (transposed) convolution as patches → one Linear per group."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.transposed = isinstance(conv, tuple(TRANSPOSED.values()))
        self.n = len(conv.kernel_size)
        self.groups = conv.groups
        self.c_in, self.c_out = conv.in_channels, conv.out_channels
        cg, og = self.c_in // self.groups, self.c_out // self.groups
        k = math.prod(conv.kernel_size)
        self.spec = [conv]  # its hyper-parameters (not a submodule; not called)
        self.output_padding = None  # of a call with output_size
        if self.transposed:
            self.patch = identity_patches(self.c_in, conv.kernel_size,
                                          dilation=conv.dilation)
        else:
            self.patch = identity_patches(self.c_in, conv.kernel_size, stride=conv.stride,
                                          padding=conv.padding, dilation=conv.dilation,
                                          padding_mode=conv.padding_mode)
        self.lins = nn.ModuleList(nn.Linear(cg * k, og, bias=conv.bias is not None)
                                  for _ in range(self.groups)).double()
        with torch.no_grad():
            for j, lin in enumerate(self.lins):
                if self.transposed:  # [c_in, c_out/g, k] → flipped [c_out/g, c_in/g, k]
                    w = conv.weight[j * cg:(j + 1) * cg].flip(list(range(2, 2 + self.n)))
                    lin.weight.copy_(w.transpose(0, 1).reshape(og, -1))
                else:
                    lin.weight.copy_(conv.weight[j * og:(j + 1) * og].reshape(og, -1))
                if conv.bias is not None:
                    lin.bias.copy_(conv.bias[j * og:(j + 1) * og])

    def _dilate_and_pad(self, x, output_padding):
        conv = self.spec[0]
        c = x.shape[1]
        up = nn.functional.conv_transpose1d if self.n == 1 else (
            nn.functional.conv_transpose2d if self.n == 2 else nn.functional.conv_transpose3d)
        ones = torch.ones(c, 1, *([1] * self.n), dtype=x.dtype)
        x = up(x, ones, stride=conv.stride, groups=c)  # zeros between the elements
        pads = []
        for i in reversed(range(self.n)):
            edge = conv.dilation[i] * (conv.kernel_size[i] - 1) - conv.padding[i]
            pads += [edge, edge + output_padding[i]]
        return F.pad(x, pads)

    def forward(self, x):
        if self.transposed:
            x = self._dilate_and_pad(x, self.output_padding or self.spec[0].output_padding)
        p = self.patch(x)  # [N, c_in·K, *out]
        k = p.shape[1] // self.c_in
        cg = self.c_in // self.groups
        outs = [lin(p[:, j * cg * k:(j + 1) * cg * k].movedim(1, -1))
                for j, lin in enumerate(self.lins)]
        return torch.cat(outs, -1).movedim(-1, 1)


class Net(nn.Module):
    def __init__(self, layer: nn.Module, classes: int = 3) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.LazyLinear(classes)
        self.output_size = None

    def forward(self, x):
        if self.output_size is not None:
            out = self.layer(x, output_size=self.output_size)
        else:
            out = self.layer(x)
        return self.head(torch.tanh(out).flatten(1))


CASES = {
    "conv1d": (1, {"stride": 2, "padding": 1}),
    "conv1d_dilated_reflect": (1, {"dilation": 2, "padding": 2, "padding_mode": "reflect"}),
    "conv2d_same_circular": (2, {"padding": "same", "padding_mode": "circular"}),
    "conv2d_valid_nobias": (2, {"padding": "valid", "bias": False, "stride": (2, 1)}),
    "conv2d_replicate": (2, {"padding": (1, 2), "padding_mode": "replicate"}),
    "conv2d_groups2": (2, {"groups": 2, "padding": 1}),
    "conv2d_depthwise": (2, {"groups": 4, "padding": 1, "stride": 2}),
    "conv3d": (3, {"padding": 1, "stride": (1, 2, 1)}),
    "conv3d_groups2_zeros": (3, {"groups": 2, "dilation": (1, 1, 2)}),
    "transpose1d": (1, {"stride": 2, "padding": 1, "output_padding": 1, "transposed": True}),
    "transpose2d": (2, {"stride": 2, "padding": 1, "transposed": True}),
    "transpose2d_groups_dilated": (2, {"stride": (2, 1), "dilation": 2, "groups": 2,
                                       "transposed": True}),
    "transpose2d_output_size": (2, {"stride": 2, "padding": 1, "transposed": True,
                                    "output_size": True}),
    "transpose3d_nobias": (3, {"stride": 2, "bias": False, "transposed": True}),
}


def build(case: str):
    n, kw = CASES[case]
    kw = dict(kw)
    transposed = kw.pop("transposed", False)
    output_size = kw.pop("output_size", False)
    torch.manual_seed(0)
    channels_out = 4 if kw.get("groups", 1) != 4 else 8
    layer = (TRANSPOSED if transposed else CONV)[n](4, channels_out, 3, **kw).double()
    ref_layer = PatchLinear(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, *SPATIAL[n], generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    net = Net(layer).double()
    if output_size:  # one more position than the default in each spatial dimension
        net.output_size = [s + 1 for s in layer(x).shape[2:]]
        ref_layer.output_padding = [1] * n
    with torch.no_grad():
        out = layer(x, output_size=net.output_size) if output_size else layer(x)
        torch.testing.assert_close(ref_layer(x), out, rtol=1e-12, atol=1e-12)
        net(x)  # materialise the lazy head
    ref = Net(ref_layer).double()
    ref.head = nn.Linear(net.head.in_features, 3).double()
    ref.head.load_state_dict(net.head.state_dict())
    return net, ref, x, y


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_factors_and_updates_equal_linear_on_patches(case, approx, fisher):
    net, ref, x, y = build(case)
    groups = net.layer.groups
    names = ["layer"] if groups == 1 else [f"layer.group{j}" for j in range(groups)]
    ref_names = [f"layer.lins.{j}" for j in range(groups)]
    results = []
    for model in (net, ref):
        skip = ["layer.patch"] if model is ref else []
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx, fisher_type=fisher,
                                 factor_dtype=torch.float64, skip_layers=skip)
        for _ in range(2):
            model.zero_grad()
            kfac_step(pre, model(x), y, fisher)
        results.append(pre)
    pre, pre_ref = results
    assert [n for n in pre.layer_names if n.startswith("layer")] == names
    factors, ref_factors = pre.factors(), pre_ref.factors()
    for name, ref_name in zip(names, ref_names):
        for ours, theirs in zip(factors[name], ref_factors[ref_name]):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    for j, lin in enumerate(ref.layer.lins):
        grad = net.layer.weight.grad
        if ref.layer.transposed:
            cg = net.layer.in_channels // groups
            block = grad[j * cg:(j + 1) * cg].flip(list(range(2, grad.ndim))).transpose(0, 1)
        else:
            og = net.layer.out_channels // groups
            block = grad[j * og:(j + 1) * og]
        assert rel_err(block.reshape(lin.weight.shape), lin.weight.grad) < 1e-9
        if lin.bias is not None:
            og = net.layer.out_channels // groups
            assert rel_err(net.layer.bias.grad[j * og:(j + 1) * og], lin.bias.grad) < 1e-9


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d", "conv2d_groups2"])
def test_one_example_one_position_equals_the_exact_ggn_block(kind):
    """With one example and one output position K-FAC (type-2) is exact: A ⊗ G is the
    GGN block of [W | b] (each group's diagonal block for a grouped convolution)."""
    n = int(kind[4])
    groups = 2 if "groups" in kind else 1
    torch.manual_seed(0)
    layer = CONV[n](4, 4, 3, groups=groups).double()  # 3^n input → one output position
    head = nn.Linear(4, 3).double()
    x = torch.randn(1, 4, *([3] * n), dtype=torch.float64)
    y = torch.tensor([1])
    model = nn.Sequential(layer, nn.Flatten(), nn.Tanh(), head)
    pre = KFACPreconditioner(model, kl_clip=None, fisher_type="type2",
                             factor_dtype=torch.float64)
    kfac_step(pre, model(x), y, "type2")

    def logits(weight, bias):
        out = F.tanh(layer._conv_forward(x, weight, bias).flatten(1))
        return head(out)[0]

    jw, jb = torch.autograd.functional.jacobian(logits, (layer.weight, layer.bias))
    p = logits(layer.weight, layer.bias).softmax(-1)
    hess = torch.diag(p) - torch.outer(p, p)  # cross-entropy Hessian in the logits
    og = 4 // groups
    for j in range(groups):
        rows = slice(j * og, (j + 1) * og)
        jac = torch.cat([jw[:, rows].reshape(3, og, -1), jb[:, rows, None]], 2)  # [C, o, i]
        flat = jac.reshape(3, -1)  # row-major vec of [W_j | b_j]
        exact = flat.T @ hess @ flat
        a, g = pre.factors()["0" if groups == 1 else f"0.group{j}"]
        torch.testing.assert_close(torch.kron(g, a), exact, rtol=1e-10, atol=1e-14)


def test_grouped_blocks_and_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 5, 5))
    pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == [f"0.group{j}" for j in range(4)] + ["2"]
    assert not pre.unsupported_layers


def test_separate_weight_and_bias_updates_are_the_dense_solves():
    """Each block's update is ((A+λI) ⊗ (G+λI))⁻¹ vec(D) of its own D: ∇W with A of the
    patches alone, ∇b with A = 1 (unbatched float64 dense solves)."""
    net, _, x, y = build("conv2d_groups2")
    raw = {}
    pre = KFACPreconditioner(net, kl_clip=None, separate_weight_and_bias=True,
                             factor_dtype=torch.float64, damping=1e-3)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    raw = {n: p.grad.clone() for n, p in net.named_parameters()}
    pre.step()
    factors = pre.factors()
    og = net.layer.out_channels // 2
    for j in range(2):
        rows = slice(j * og, (j + 1) * og)
        a, g = factors[f"layer.group{j}.weight"]
        d = raw["layer.weight"][rows].reshape(og, -1)
        ref = dense_kfac_direction(a, g, d, 1e-3, 1e-3)
        assert rel_err(net.layer.weight.grad[rows].reshape(og, -1), ref) < 1e-10
        a, g = factors[f"layer.group{j}.bias"]
        torch.testing.assert_close(a, torch.ones(1, 1, dtype=torch.float64))
        ref = dense_kfac_direction(a, g, raw["layer.bias"][rows, None], 1e-3, 1e-3)[:, 0]
        assert rel_err(net.layer.bias.grad[rows], ref) < 1e-10


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2),
                                   nn.ConvTranspose2d(3, 4, 3), nn.Linear(6, 4)])
def test_an_empty_batch_runs_as_in_pytorch(layer):
    model = nn.Sequential(layer)
    KFACPreconditioner(model, loss_reduction="sum", kl_clip=None)
    shape = (0, 6) if isinstance(layer, nn.Linear) else (0, layer.in_channels, 6, 6)
    assert model(torch.randn(shape)).shape[0] == 0


def test_a_transposed_convolution_with_string_padding_is_left_out_and_named():
    """PyTorch builds ``ConvTranspose2d(padding="same")`` but rejects it at forward; the
    preconditioner leaves it to the base optimizer, naming the padding, and keeps the
    convolution beside it."""
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3, padding="same"), nn.Conv2d(2, 2, 3))
    pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == ["1"]
    assert "padding=('s', 'a', 'm', 'e') (numbers only" in pre.unsupported_layers["0"]
