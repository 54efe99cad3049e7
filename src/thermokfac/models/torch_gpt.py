"""The character GPT built from PyTorch's own ``nn.TransformerEncoderLayer``.

The same model as :class:`~thermokfac.models.GPT` (token and position embeddings,
pre-norm blocks with a GELU MLP of 4× width, a final LayerNorm, a tied head), except
that its blocks are ``nn.TransformerEncoderLayer`` s, whose attention is
``nn.MultiheadAttention``: K-FAC gives its Q, K, V and output projections one Kronecker
block each (``blocks.layers.<i>.self_attn.q_proj`` …), where :class:`GPT` has one fused
q/k/v ``nn.Linear``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .gpt import GPT


class TorchGPT(GPT):
    """``n_layer`` causal ``nn.TransformerEncoderLayer`` blocks of width ``n_embd``
    (arguments, shapes and errors as :class:`GPT`).

    >>> import torch
    >>> model = TorchGPT(vocab=11, context=8, n_layer=1, n_embd=16, n_head=2)
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 11])
    """

    def make_blocks(self, n_layer: int, n_embd: int, n_head: int) -> nn.Module:
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        return nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)

    def run_blocks(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device,
                                                              dtype=self.wte.weight.dtype)
        return self.blocks(x, mask=mask, is_causal=True)

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation, for the attention's packed projection too."""
        GPT.init_weights(module)
        if isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
