"""K-FAC for ``nn.MultiheadAttention`` and the transformer layers built on it.

Two independent references:

* PyTorch's own ``nn.MultiheadAttention`` (an untouched copy): the tapped training
  forward must give bitwise the same outputs, attention weights and gradients;
* the same attention written with four ``nn.Linear`` modules holding the same weights:
  K-FAC's factors and preconditioned gradients for the Q, K, V and output projections
  must equal those of the four Linear layers to round-off (float64).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.kfac.layers.attention import TappedMultiheadAttention

from .cases import kfac_step, rel_err

E, H, L, S, N = 8, 2, 5, 6, 3
BLOCKS = ("q_proj", "k_proj", "v_proj", "out_proj")


def masks(kind: str, batch_first: bool, src: int = S, batched: bool = True):
    """Keyword arguments with the masks of one case (seeded)."""
    g = torch.Generator().manual_seed(7)
    pad = torch.zeros(N, src, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, -1] = True
    if not batched:
        pad = pad[0]
    causal = torch.triu(torch.ones(L, src, dtype=torch.bool), diagonal=1)
    return {
        "none": {},
        "key_padding": {"key_padding_mask": pad},
        "float_key_padding": {"key_padding_mask": torch.zeros(pad.shape, dtype=torch.float64)
                              .masked_fill(pad, -1e4)},
        "attn_2d": {"attn_mask": causal},
        "attn_3d_float": {"attn_mask": torch.randn((N if batched else 1) * H, L, src,
                                                   generator=g, dtype=torch.float64)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "both": {"attn_mask": causal, "key_padding_mask": pad},
    }[kind]


def inputs(batch_first: bool, kdim: int = E, vdim: int = E, batched: bool = True, seed=3):
    g = torch.Generator().manual_seed(seed)

    def make(n, d):
        if not batched:
            return torch.randn(n, d, generator=g, dtype=torch.float64)
        shape = (N, n, d) if batch_first else (n, N, d)
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return make(L, E), make(S, kdim), make(S, vdim)


def call_args(attention: str, q, k, v):
    """(query, key, value) with the identities that select PyTorch's packed products."""
    if attention == "self":
        return (q, q, q)
    if attention == "cross_kv":  # encoder-decoder: key is value
        return (q, k, k)
    return (q, k, v)


CONFIGS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "dropout": {"dropout": 0.25},
    "kdim_vdim": {"kdim": 4, "vdim": 3},
}


def tapped_and_plain(config: dict, batch_first: bool):
    """An attention module watched by a preconditioner and an untouched copy of it."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(E, H, batch_first=batch_first, **config).double()
    tapped = copy.deepcopy(plain)
    holder = nn.ModuleDict({"attn": tapped})
    pre = KFACPreconditioner(holder, kl_clip=None)
    assert type(tapped) is TappedMultiheadAttention
    return tapped, plain, pre


# kdim/vdim other than embed_dim need distinct key and value tensors
CALLS = [(config, attention) for config in sorted(CONFIGS)
         for attention in ("self", "cross_kv", "cross")
         if config != "kdim_vdim" or attention == "cross"]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "key_padding", "float_key_padding", "attn_2d",
                                  "attn_3d_float", "causal", "both"])
@pytest.mark.parametrize(("config", "attention"), CALLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_training_forward_is_bitwise_pytorchs(batch_first, config, attention, mask,
                                               need_weights):
    kw = CONFIGS[config]
    tapped, plain, _ = tapped_and_plain(kw, batch_first)
    q, k, v = inputs(batch_first, kw.get("kdim", E), kw.get("vdim", E))
    args = call_args(attention, q, k, v)
    extra = masks(mask, batch_first, src=L if attention == "self" else S)
    outs = []
    for module in (tapped, plain):
        torch.manual_seed(11)  # the same dropout masks
        out, weights = module(*args, need_weights=need_weights, **extra)
        (out.square().sum() + (0 if weights is None else weights.sum())).backward()
        outs.append((out, weights, {n: p.grad for n, p in module.named_parameters()}))
    (o1, w1, g1), (o2, w2, g2) = outs
    assert torch.equal(o1, o2)
    assert (w1 is None and w2 is None) or torch.equal(w1, w2)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_unbatched_forward_is_bitwise_pytorchs():
    tapped, plain, _ = tapped_and_plain({}, batch_first=True)
    q, k, v = inputs(True, batched=False)
    pad = masks("key_padding", True, batched=False)["key_padding_mask"]
    results = []
    for module in (tapped, plain):
        out, weights = module(q, k, v, key_padding_mask=pad)
        out.sum().backward()
        results.append((out, weights, module.in_proj_weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eval_mode_runs_pytorchs_forward_and_captures_nothing():
    tapped, plain, pre = tapped_and_plain({}, batch_first=True)
    tapped.eval()
    plain.eval()
    q, _, _ = inputs(True)
    with torch.no_grad():
        assert torch.equal(tapped(q, q, q)[0], plain(q, q, q)[0])
    pending = pre.pending_step()
    assert pending.hook_calls == 0 and all(not a for a, _ in pending.rows.values())


# ------------------------------------------------- reference: four nn.Linear layers
class LinearAttention(nn.Module):
    """The attention of ``nn.MultiheadAttention`` written with four ``nn.Linear``s,
    batch-first, with the same masks, ``add_bias_kv`` and ``add_zero_attn``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(E, E, bias=bias)
        self.k_proj = nn.Linear(mha.kdim, E, bias=bias)
        self.v_proj = nn.Linear(mha.vdim, E, bias=bias)
        self.out_proj = nn.Linear(E, E, bias=mha.out_proj.bias is not None)
        self.bias_k = None if mha.bias_k is None else nn.Parameter(mha.bias_k.detach().clone())
        self.bias_v = None if mha.bias_v is None else nn.Parameter(mha.bias_v.detach().clone())
        self.add_zero_attn = mha.add_zero_attn
        with torch.no_grad():
            for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                weight = (mha.in_proj_weight[i * E:(i + 1) * E] if mha._qkv_same_embed_dim
                          else getattr(mha, f"{BLOCKS[i]}_weight"))
                lin.weight.copy_(weight)
                if bias:
                    lin.bias.copy_(mha.in_proj_bias[i * E:(i + 1) * E])
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        n, tgt = query.shape[:2]
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        extra = torch.zeros(n, tgt, 0, dtype=q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, E)], 1)
            v = torch.cat([v, self.bias_v.expand(n, 1, E)], 1)
            extra = torch.cat([extra, torch.zeros(n, tgt, 1, dtype=q.dtype)], 2)

        def heads(t):
            return t.view(n, t.shape[1], H, E // H).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, torch.zeros_like(k[:, :, :1])], 2)
            v = torch.cat([v, torch.zeros_like(v[:, :, :1])], 2)
            extra = torch.cat([extra, torch.zeros(n, tgt, 1, dtype=q.dtype)], 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // H)
        bias = torch.zeros(n, 1, tgt, k.shape[2] - extra.shape[2], dtype=q.dtype)
        if attn_mask is not None:
            bias = bias + torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(
                attn_mask, float("-inf"))
        if key_padding_mask is not None:
            bias = bias + torch.zeros(key_padding_mask.shape, dtype=q.dtype).masked_fill(
                key_padding_mask, float("-inf"))[:, None, None, :]
        scores = scores + torch.cat([bias, extra[:, None].expand(n, 1, tgt, -1)], -1)
        mixed = scores.softmax(-1) @ v
        return self.out_proj(mixed.transpose(1, 2).reshape(n, tgt, E))


class Net(nn.Module):
    """Attention (either kind) between an input Linear and a classifier head."""

    def __init__(self, attention: nn.Module, kdim: int = E, vdim: int = E) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.attn = attention
        self.memory_k = nn.Linear(3, kdim)
        self.memory_v = nn.Linear(3, vdim)
        self.head = nn.Linear(E, 4)
        self.masks: dict = {}  # masks as attributes: they are not batched inputs

    def forward(self, x, memory, attention="self"):
        masks = self.masks
        k, v = self.memory_k(memory), self.memory_v(memory)
        args = (x, x, x) if attention == "self" else (x, k, k) if attention == "cross_kv" \
            else (x, k, v)
        if isinstance(self.attn, nn.MultiheadAttention):
            out = self.attn(*args, need_weights=False, **masks)[0]
        else:
            out = self.attn(*args, **masks)
        return self.head(out.mean(1))


def reference_pair(config: dict):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **config).double()
    kdim, vdim = mha.kdim, mha.vdim
    net = Net(mha, kdim, vdim).double()
    ref = Net(LinearAttention(mha), kdim, vdim).double()
    ref.load_state_dict(net.state_dict(), strict=False)
    return net, ref


@pytest.mark.parametrize("fisher", ["empirical", "type2", "mc"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", [
    ("default", "self", "none"), ("no_bias", "self", "key_padding"),
    ("default", "cross_kv", "both"), ("kdim_vdim", "cross", "key_padding"),
    ("bias_kv", "self", "attn_2d"), ("zero_attn", "cross", "none")])
def test_factors_and_updates_equal_four_linear_layers(case, approx, fisher):
    config, attention, mask = case
    net, ref = reference_pair(CONFIGS[config])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    memory = torch.randn(N, S, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=g)
    extra = masks(mask, True, src=L if attention == "self" else S)
    results = []
    for model in (net, ref):
        model.masks = extra
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx, fisher_type=fisher,
                                 factor_dtype=torch.float64, seed=3)
        for _ in range(2):
            model.zero_grad()
            kfac_step(pre, model(x, memory, attention), y, fisher)
        results.append((pre, model))
    (pre, net), (pre_ref, ref) = results
    assert [n for n in pre.layer_names if n.startswith("attn.")] == [f"attn.{b}" for b in BLOCKS]
    factors, ref_factors = pre.factors(), pre_ref.factors()
    assert factors.keys() == ref_factors.keys()
    for name, (a, gg) in factors.items():
        a_ref, g_ref = ref_factors[name]
        # G of the key projection under reduce is zero up to round-off (the key gradients
        # of each query sum to zero over positions): compare on the expand scale.
        scale = max(float(g_ref.abs().max()), 1e-8)
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12)
        assert float((gg - g_ref).abs().max()) <= 1e-10 * scale + 1e-14, name
    mha = net.attn
    for i, block in enumerate(BLOCKS[:3]):
        lin = getattr(ref.attn, block)
        weight = (mha.in_proj_weight if mha._qkv_same_embed_dim
                  else getattr(mha, f"{block}_weight"))
        rows = slice(i * E, (i + 1) * E) if mha._qkv_same_embed_dim else slice(None)
        assert rel_err(weight.grad[rows], lin.weight.grad) < 1e-9, block
        if lin.bias is not None:
            assert rel_err(mha.in_proj_bias.grad[i * E:(i + 1) * E], lin.bias.grad) < 1e-9
    assert rel_err(mha.out_proj.weight.grad, ref.attn.out_proj.weight.grad) < 1e-9


def test_reduce_key_projection_curvature_vanishes():
    """Softmax is shift-invariant, so each query's key gradients sum to zero over the
    positions: K-FAC-reduce's G of the key projection is zero up to round-off, while
    expand's is not (documented in the attention helper)."""
    net, _ = reference_pair({})
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    memory = torch.randn(N, S, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=g)
    sizes = {}
    for approx in ("expand", "reduce"):
        model = copy.deepcopy(net)
        pre = KFACPreconditioner(model, kl_clip=None, kfac_approx=approx)
        kfac_step(pre, model(x, memory), y)
        sizes[approx] = float(pre.factors()["attn.k_proj"][1].abs().max())
    assert sizes["reduce"] < 1e-12 * sizes["expand"]


# --------------------------------------------------------------- discovery & life
def test_blocks_are_listed_and_bias_kv_left_to_the_base_optimizer():
    net, _ = reference_pair({"add_bias_kv": True})
    pre = KFACPreconditioner(net, kl_clip=None)
    assert [n for n in pre.layer_names if n.startswith("attn")] == [f"attn.{b}" for b in BLOCKS]
    assert "bias_k" in pre.unsupported_layers["attn"]
    assert "attn.out_proj" not in pre.unsupported_layers


def test_skip_one_block_or_the_whole_attention():
    net, _ = reference_pair({})
    pre = KFACPreconditioner(net, skip_layers=["attn.k_proj"], kl_clip=None)
    assert "attn.k_proj" not in pre.layer_names and "attn.q_proj" in pre.layer_names
    pre.remove()
    pre = KFACPreconditioner(net, skip_layers=["attn"], kl_clip=None)
    assert not [n for n in pre.layer_names if n.startswith("attn")]
    assert type(net.attn) is nn.MultiheadAttention


def test_attention_subclass_with_its_own_forward_is_listed_not_preconditioned():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = nn.ModuleDict({"attn": Custom(8, 2), "head": nn.Linear(8, 3)})
    pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == ["head"]
    assert "attn" in pre.unsupported_layers and "attn.out_proj" in pre.unsupported_layers


def test_remove_restores_the_class_and_a_tapped_model_pickles_and_copies():
    net, _ = reference_pair({})
    pre = KFACPreconditioner(net, kl_clip=None)
    buffer = io.BytesIO()
    torch.save(net.attn, buffer)  # the module itself, its class included
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, nn.MultiheadAttention)
    q = torch.randn(N, L, E, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(q, q, q)[0], net.attn(q, q, q)[0])
    x = torch.randn(N, L, E, dtype=torch.float64)
    clone = copy.deepcopy(net)  # a copy (hooks copied too) is not captured
    clone(x, torch.randn(N, S, 3, dtype=torch.float64)).sum().backward()
    assert all(not a for a, _ in pre.pending_step().rows.values())
    pre.remove()
    assert type(net.attn) is nn.MultiheadAttention


# ------------------------------------------------------------- transformer layers
def test_transformer_layers_precondition_every_projection():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                         batch_first=True).double()
    decoder = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                         batch_first=True).double()

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder, self.head = encoder, decoder, nn.Linear(E, 4)

        def forward(self, src, tgt):
            memory = self.encoder(src)
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1],
                                                                  dtype=torch.float64)
            return self.head(self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True))

    model = Seq2Seq().double()
    plain = copy.deepcopy(model)
    pre = KFACPreconditioner(model, kl_clip=None)
    attention = [f"{a}.{b}" for a in ("encoder.self_attn", "decoder.self_attn",
                                      "decoder.multihead_attn") for b in BLOCKS]
    assert set(attention) <= set(pre.layer_names)
    assert all("LayerNorm" in why for why in pre.unsupported_layers.values())
    g = torch.Generator().manual_seed(2)
    src = torch.randn(N, S, E, generator=g, dtype=torch.float64)
    tgt = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N, L), generator=g)
    out = model(src, tgt)
    assert torch.equal(out, plain(src, tgt))
    F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
    pre.step()
    factors = pre.factors()
    for name in attention:
        a, g_factor = factors[name]
        assert torch.isfinite(a).all() and float(g_factor.abs().max()) > 0, name
    model.eval()
    plain.eval()
    with torch.no_grad():  # eval: PyTorch's fast paths, unchanged results
        torch.testing.assert_close(model(src, tgt), plain(src, tgt), rtol=0, atol=1e-12)


def test_compiled_attention_equals_eager():
    net, _ = reference_pair({})
    eager = copy.deepcopy(net)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    memory = torch.randn(N, S, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=g)
    factors = []
    for model, forward in ((eager, eager), (net, torch.compile(net, backend="eager"))):
        pre = KFACPreconditioner(model, kl_clip=None)
        for _ in range(2):
            model.zero_grad()
            kfac_step(pre, forward(x, memory), y)
        factors.append(pre.factors())
    torch._dynamo.reset()
    for name, (a, g_factor) in factors[0].items():
        torch.testing.assert_close(factors[1][name][0], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(factors[1][name][1], g_factor, rtol=1e-12, atol=1e-14)


def test_separate_weight_and_bias_blocks_equal_four_linear_layers():
    net, ref = reference_pair({})
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    memory = torch.randn(N, S, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N,), generator=g)
    pres = []
    for model in (net, ref):
        pre = KFACPreconditioner(model, kl_clip=None, separate_weight_and_bias=True,
                                 factor_dtype=torch.float64)
        kfac_step(pre, model(x, memory), y)
        pres.append(pre)
    ours, theirs = pres[0].factors(), pres[1].factors()
    assert [n for n in ours if n.startswith("attn")] == [
        f"attn.{b}.{part}" for b in BLOCKS for part in ("weight", "bias")]
    assert ours.keys() == theirs.keys()
    for name in ours:
        for mine, reference in zip(ours[name], theirs[name]):
            torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-13)
    assert rel_err(net.attn.in_proj_bias.grad[:E], ref.attn.q_proj.bias.grad) < 1e-9
    assert rel_err(net.attn.in_proj_weight.grad[E:2 * E], ref.attn.k_proj.weight.grad) < 1e-9


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_are_named_in_the_notice_and_not_preconditioned(kind, caplog):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = kind(4, 6, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    with caplog.at_level("WARNING", logger="thermokfac"):
        pre = KFACPreconditioner(Model(), kl_clip=None)
    assert pre.layer_names == ["head"]
    assert pre.unsupported_layers == {"rnn": f"no helper for {kind.__name__}"}
    assert caplog.text.count(f"rnn: no helper for {kind.__name__}") == 1


class FourLinearSelfAttention(LinearAttention):
    """A drop-in for the ``self_attn`` of a batch-first ``nn.TransformerEncoderLayer``:
    four ``nn.Linear`` layers, a float ``attn_mask`` added to the scores."""

    batch_first = True
    _qkv_same_embed_dim = True

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__(mha)
        self.in_proj_weight, self.in_proj_bias = None, None
        self.num_heads = H

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        n, tgt = query.shape[:2]

        def heads(t):
            return t.view(n, t.shape[1], H, E // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // H) + attn_mask
        mixed = scores.softmax(-1) @ v
        return self.out_proj(mixed.transpose(1, 2).reshape(n, tgt, E)), None


def test_torch_gpt_updates_equal_the_four_linear_reference():
    """The transformer of the README's Shakespeare run, built from
    ``nn.TransformerEncoderLayer``: every attention projection has factors, and factors
    and updates equal those of the same model with four-Linear attention."""
    from thermokfac.models import TorchGPT

    torch.manual_seed(0)
    model = TorchGPT(vocab=11, context=6, n_layer=2, n_embd=E, n_head=H).double()
    ref = copy.deepcopy(model)
    for layer in ref.blocks.layers:
        layer.self_attn = FourLinearSelfAttention(layer.self_attn)
    ref.double()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 11, (N, 6), generator=g)
    y = torch.randint(0, 11, (N, 6), generator=g)
    pres = []
    for net in (model, ref):
        pre = KFACPreconditioner(net, kl_clip=None, num_per_example_loss_terms=6,
                                 factor_dtype=torch.float64)
        for _ in range(2):
            net.zero_grad()
            out = net(idx)
            F.cross_entropy(out.reshape(-1, 11), y.reshape(-1)).backward()
            pre.step()
        pres.append(pre)
    assert pres[0].layer_names == pres[1].layer_names
    attention = [n for n in pres[0].layer_names if ".self_attn." in n]
    assert len(attention) == 8
    ours, theirs = pres[0].factors(), pres[1].factors()
    for name in pres[0].layer_names:
        for mine, reference in zip(ours[name], theirs[name]):
            torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)
    for i, layer in enumerate(model.blocks.layers):
        mha, lin = layer.self_attn, ref.blocks.layers[i].self_attn
        for j, block in enumerate(BLOCKS[:3]):
            assert rel_err(mha.in_proj_weight.grad[j * E:(j + 1) * E],
                           getattr(lin, block).weight.grad) < 1e-8
        assert rel_err(mha.out_proj.weight.grad, lin.out_proj.weight.grad) < 1e-8


# --------------------------------------------------------- found by adversarial review
class SeqFirst(nn.Module):
    """``batch_first=False`` attention on ``[L, N, E]`` inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, H)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(0))


def test_sequence_first_model_needs_num_examples_and_then_equals_batch_first():
    seq_first = SeqFirst().double()
    batch_first = copy.deepcopy(seq_first)
    batch_first.attn.batch_first = True
    g = torch.Generator().manual_seed(2)
    x = torch.randn(L, N, E, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    pre = KFACPreconditioner(seq_first, kl_clip=None)
    F.cross_entropy(seq_first(x), y).backward()
    with pytest.raises(ValueError, match="sees 3 sequences while the model's call counted 5"):
        pre.step()
    pre.step(num_examples=N)
    ref = KFACPreconditioner(batch_first, kl_clip=None)
    out = batch_first.head(batch_first.attn(*(x.transpose(0, 1),) * 3,
                                            need_weights=False)[0].mean(1))
    F.cross_entropy(out, y).backward()
    ref.step(num_examples=N)
    for name, (a, g_factor) in ref.factors().items():
        torch.testing.assert_close(pre.factors()[name][0], a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(pre.factors()[name][1], g_factor, rtol=1e-10, atol=1e-13)


def test_sequence_first_encoder_under_reduce_warns():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0).double()  # seq-first
    model = nn.Sequential(layer, nn.Linear(E, 3)).double()
    pre = KFACPreconditioner(model, kl_clip=None, kfac_approx="reduce")
    out = model(torch.randn(L, N, E, dtype=torch.float64)).mean(0)
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    with pytest.warns(UserWarning, match="sequence-first"):
        pre.step(num_examples=N)
    assert pre.stats["layout_mismatches"] == 4  # the four attention blocks


def test_skip_layers_name_blocks_split_blocks_and_the_out_projection_class():
    assert "attn.out_proj.weight" not in KFACPreconditioner(
        SeqFirst(), skip_layers=["attn.out_proj"], separate_weight_and_bias=True,
        kl_clip=None).layer_names
    names = KFACPreconditioner(SeqFirst(), skip_layers=["attn.q_proj"],
                               separate_weight_and_bias=True, kl_clip=None).layer_names
    assert "attn.q_proj.bias" not in names and "attn.k_proj.bias" in names
    names = KFACPreconditioner(SeqFirst(), skip_layers=["NonDynamicallyQuantizableLinear"],
                               kl_clip=None).layer_names
    assert "attn.out_proj" not in names and "attn.q_proj" in names


def test_a_tapped_module_is_still_skipped_by_its_class_name():
    model = SeqFirst()
    KFACPreconditioner(model, kl_clip=None)  # still attached: the class is the tapped one
    pre = KFACPreconditioner(copy.deepcopy(model), skip_layers=("MultiheadAttention",),
                             kl_clip=None)
    assert pre.layer_names == ["head"]


def test_tied_out_projection_lists_its_own_bias():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(E, E)
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.attn.out_proj.weight = self.pre.weight

        def forward(self, x):
            return self.attn(self.pre(x), x, x)[0]

    pre = KFACPreconditioner(Tied(), kl_clip=None)
    assert pre.discovery.tied == {"attn.out_proj": "pre"}
    assert "out_proj.bias" in pre.unsupported_layers["attn.out_proj"]


def test_parametrized_attention_is_left_out_and_can_drop_its_parametrization():
    from torch.nn.utils.parametrizations import weight_norm

    model = SeqFirst()
    weight_norm(model.attn, "in_proj_weight")
    pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.layer_names == ["head"] and "attn" in pre.unsupported_layers
    torch.nn.utils.parametrize.remove_parametrizations(model.attn, "in_proj_weight")
    assert type(model.attn) is nn.MultiheadAttention


def test_an_unbatched_sequence_is_one_example():
    """An unbatched call ([L, E]) is one sequence: with ``num_examples=1`` its factors
    equal those of the same sequence as a batch of one."""

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.MultiheadAttention(E, H)

        def forward(self, x):
            return self.a(x, x, x)[0]

    model, batch = Self().double(), Self().double()
    x = torch.randn(L, E, dtype=torch.float64)
    pre = KFACPreconditioner(model, kl_clip=None)
    model(x).square().mean().backward()
    with pytest.raises(ValueError, match="sees 1 sequences"):
        pre.step()
    pre.step(num_examples=1)
    ref = KFACPreconditioner(batch, kl_clip=None)
    batch(x[:, None]).square().mean().backward()
    ref.step(num_examples=1)
    assert pre.stats["unbatched_layer_calls"] == 0
    for name, (a, g) in ref.factors().items():
        torch.testing.assert_close(pre.factors()[name][0], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pre.factors()[name][1], g, rtol=1e-12, atol=1e-14)


def test_lazy_modules_must_be_materialised_first():
    with pytest.raises(ValueError, match="run one forward pass"):
        KFACPreconditioner(nn.Sequential(nn.LazyLinear(3)))
