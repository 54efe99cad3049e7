"""``nn.MultiheadAttention``'s training forward with its four projections in view.

PyTorch applies the Q/K/V and output projections of ``nn.MultiheadAttention`` inside
``F.multi_head_attention_forward`` with ``F.linear`` on its parameters, so no module
hook sees their inputs or outputs. :func:`tapped_forward` performs the same computation
as PyTorch's training path — the same operations in the same order on the same tensors,
so its outputs, attention weights and gradients are bitwise those of
``nn.MultiheadAttention.forward`` (checked in ``tests/test_attention.py`` over batch
layout, self/cross attention, separate ``kdim``/``vdim``, biases, ``add_bias_kv``,
``add_zero_attn``, masks, ``is_causal``, ``need_weights`` and dropout) — and calls a
:class:`AttentionTap`'s probes before and after each projection.

The forward runs in training mode only (where PyTorch never takes its fused fast path
either); in ``eval()`` mode the module's own forward runs, fast path included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
BLOCKS = (*PROJECTIONS, "out_proj")

PreProbe = Callable[[nn.Module, Tensor], None]
PostProbe = Callable[[nn.Module, Tensor, Tensor], None]


class AttentionTap:
    """The probes of one ``nn.MultiheadAttention`` and the forward that calls them.

    Attributes:
        probes: ``{block: [(pre, post), ...]}`` for the blocks in :data:`BLOCKS`.
    """

    def __init__(self) -> None:
        self.probes: dict[str, list[tuple[PreProbe, PostProbe]]] = {b: [] for b in BLOCKS}

    def pre(self, block: str, module: nn.Module, x: Tensor) -> None:
        for pre, _ in self.probes[block]:
            pre(module, x)

    def post(self, block: str, module: nn.Module, x: Tensor, out: Tensor) -> None:
        for _, post in self.probes[block]:
            post(module, x, out)

    def empty(self) -> bool:
        return not any(self.probes.values())


def _float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """A boolean mask as an additive float mask (−inf where True), as PyTorch does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                  attn_mask: Tensor | None, num_heads: int) -> bool:
    """Whether the call is batched; raises on shapes ``nn.MultiheadAttention`` rejects."""
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(
            "query, key and value must all be 2-D (unbatched) or 3-D (batched), got "
            f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
    batched = query.dim() == 3
    if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
        raise AssertionError(
            f"key_padding_mask must be {2 if batched else 1}-D for "
            f"{'batched' if batched else 'unbatched'} inputs, got {key_padding_mask.dim()}-D")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if not batched and attn_mask.dim() == 3 and attn_mask.shape[0] != num_heads:
            raise AssertionError(
                f"an unbatched 3-D attn_mask needs {num_heads} heads in dim 0, got "
                f"{attn_mask.shape[0]}")
    return batched


def _in_projection(m: nn.MultiheadAttention, tap: AttentionTap, query: Tensor, key: Tensor,
                   value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K and V projections ``[L or S, N, E]``, probed around each application."""
    e = m.embed_dim
    b = m.in_proj_bias
    if not m._qkv_same_embed_dim:
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        inputs = (query, key, value)
        outs = []
        for block, x, w, bias in zip(PROJECTIONS, inputs, weights, (b_q, b_k, b_v)):
            tap.pre(block, m, x)
            outs.append(F.linear(x, w, bias))
        q, k, v = outs
    elif key is value and query is key:  # self-attention: one packed product
        for block in PROJECTIONS:
            tap.pre(block, m, query)
        proj = F.linear(query, m.in_proj_weight, b)
        proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        proj = proj.contiguous()
        q, k, v = proj[0], proj[1], proj[2]
    elif key is value:  # encoder-decoder: K and V packed
        w_q, w_kv = m.in_proj_weight.split([e, 2 * e])
        b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
        tap.pre("q_proj", m, query)
        tap.pre("k_proj", m, key)
        tap.pre("v_proj", m, key)
        q = F.linear(query, w_q, b_q)
        kv = F.linear(key, w_kv, b_kv)
        kv = kv.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        k, v = kv[0], kv[1]
    else:
        ws = m.in_proj_weight.chunk(3)
        bs = (None, None, None) if b is None else b.chunk(3)
        outs = []
        for block, x, weight, bias in zip(PROJECTIONS, (query, key, value), ws, bs):
            tap.pre(block, m, x)
            outs.append(F.linear(x, weight, bias))
        q, k, v = outs
    for block, x, out in zip(PROJECTIONS, (query, key, value), (q, k, v)):
        tap.post(block, m, x, out)
    return q, k, v


def tapped_forward(m: nn.MultiheadAttention, tap: AttentionTap, query: Tensor, key: Tensor,
                   value: Tensor, key_padding_mask: Tensor | None = None,
                   need_weights: bool = True, attn_mask: Tensor | None = None,
                   average_attn_weights: bool = True,
                   is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` in training mode, probing the projections.

    Arguments and returns are those of ``nn.MultiheadAttention.forward``.
    """
    if any(t.is_nested for t in (query, key, value)):
        raise AssertionError("nn.MultiheadAttention supports nested tensors only in eval "
                             "mode (its fast path)")
    key_padding_mask = _float_mask(key_padding_mask, query.dtype, "key_padding_mask")
    attn_mask = _float_mask(attn_mask, query.dtype, "attn_mask")
    batched = _check_shapes(query, key, value, key_padding_mask, attn_mask, m.num_heads)
    if m.batch_first and batched:  # keep the identities that select the packed products
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    if key.shape[:2] != value.shape[:2]:
        raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not "
                             f"match value's {tuple(value.shape[:2])}")
    if embed_dim != m.embed_dim:
        raise AssertionError(
            f"was expecting embedding dimension of {m.embed_dim}, but got {embed_dim}")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (see "
                           "nn.Transformer.generate_square_subsequent_mask)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False
    heads = m.num_heads
    head_dim = embed_dim // heads

    q, k, v = _in_projection(m, tap, query, key, value)
    src_len = key.shape[0]
    if attn_mask is not None:
        expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * heads, tgt_len, src_len)
        if tuple(attn_mask.shape) != expected:
            raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                               f"{attn_mask.shape}, but should be {expected}.")
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if m.add_zero_attn:
        zeros = (bsz * heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, "
                                 f"but got {tuple(key_padding_mask.shape)}")
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                            .expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = m.dropout if m.training else 0.0

    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        mixed = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        mixed = F.scaled_dot_product_attention(
            q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
            v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
        mixed = mixed.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)

    tap.pre("out_proj", m, mixed.view(tgt_len, bsz, embed_dim))
    out = F.linear(mixed, m.out_proj.weight, m.out_proj.bias)
    out = out.view(tgt_len, bsz, out.size(1))
    tap.post("out_proj", m, mixed, out)
    if not batched:
        out = out.squeeze(1)
        if weights is not None:
            weights = weights.squeeze(0)
    elif m.batch_first:
        out = out.transpose(1, 0)
    return out, weights
