"""The character GPT built from PyTorch's own ``nn.TransformerEncoderLayer``.

The same model as :class:`~thermokfac.models.GPT` (token and position embeddings,
pre-norm blocks with a GELU MLP of 4× width, a final LayerNorm, a tied head), except
that its blocks are ``nn.TransformerEncoderLayer`` s, whose attention is
``nn.MultiheadAttention``: K-FAC gives its Q, K, V and output projections one Kronecker
block each (``blocks.layers.<i>.self_attn.q_proj`` …), where :class:`GPT` has one fused
q/k/v ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TorchGPT(nn.Module):
    """``n_layer`` causal ``nn.TransformerEncoderLayer`` blocks of width ``n_embd``.

    Shapes: token indices ``[N, T]`` (T ≤ ``context``) ↦ logits ``[N, T, vocab]``.

    Raises:
        ValueError: If T exceeds the context.

    >>> model = TorchGPT(vocab=11, context=8, n_layer=1, n_embd=16, n_head=2)
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 11])
    """

    def __init__(self, vocab: int, context: int, n_layer: int = 2, n_embd: int = 128,
                 n_head: int = 4, tie: bool = True) -> None:
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight
        self.apply(_init)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        pos = torch.arange(t, device=idx.device).expand(idx.shape[0], t)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device,
                                                              dtype=self.wte.weight.dtype)
        x = self.blocks(self.wte(idx) + self.wpe(pos), mask=mask, is_causal=True)
        return self.lm_head(self.ln_f(x))


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation, N(0, 0.02) weights and zero biases, for the attention's
    packed projection too."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, nn.MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
