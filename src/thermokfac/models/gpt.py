"""A nanoGPT-style character model: token + position embeddings, causal blocks, a tied head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Block


class GPT(nn.Module):
    """``n_layer`` causal blocks of width ``n_embd``; the output head shares the token
    embedding (K-FAC preconditions that weight once, through the embedding).

    >>> model = GPT(vocab=11, context=8, n_layer=1, n_embd=16, n_head=2)
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 11])
    """

    def __init__(self, vocab: int, context: int, n_layer: int = 2, n_embd: int = 128,
                 n_head: int = 4, tie: bool = True) -> None:
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.blocks = self.make_blocks(n_layer, n_embd, n_head)
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight
        self.apply(self.init_weights)  # small embeddings: the tied head starts near uniform

    def make_blocks(self, n_layer: int, n_embd: int, n_head: int) -> nn.Module:
        """The causal blocks (here pre-norm blocks of ``nn.Linear`` layers)."""
        return nn.Sequential(*[Block(n_embd, n_head, causal=True) for _ in range(n_layer)])

    def run_blocks(self, x: Tensor) -> Tensor:
        """The blocks applied to the embedded sequence ``[N, T, n_embd]``."""
        return self.blocks(x)

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        # Positions expanded to the batch (not broadcast later): the position embedding
        # then sees per-example output gradients, as K-FAC's G needs.
        pos = torch.arange(t, device=idx.device).expand(idx.shape[0], t)
        return self.lm_head(self.ln_f(self.run_blocks(self.wte(idx) + self.wpe(pos))))

