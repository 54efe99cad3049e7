"""``nn.Embedding``: a Linear layer on one-hot inputs, so A is diagonal.

The embedding table E ``[V, d]`` maps the one-hot vector e_v to Eᵀe_v, i.e. it is a
Linear layer with weight Eᵀ ``[d, V]``. The activations' second moment is then the
diagonal matrix of token frequencies, A = diag(count_v / #tokens), stored as a vector
of length V; G is the ``[d, d]`` covariance of the output gradients. Embeddings always
use the K-FAC-expand form: with reduce, A would become a dense V×V matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LayerHelper


class EmbeddingHelper(LayerHelper):
    """Dense-gradient ``nn.Embedding`` (``sparse=False``)."""

    module_types = (nn.Embedding,)
    module: nn.Embedding
    diagonal_a = True

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.sparse:
            return "sparse=True (sparse gradients are not supported)"
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True (its gradient is not the loss gradient, so the "
                    "factors would not be its curvature)")
        return None

    @property
    def has_bias(self) -> bool:
        return False

    @property
    def d_in(self) -> int:
        return self.module.num_embeddings

    @property
    def d_out(self) -> int:
        return self.module.embedding_dim

    def token_counts(self, indices: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Per-token counts ``[V]`` and the number of tokens, for the diagonal of A."""
        flat = indices.reshape(-1)
        counts = torch.bincount(flat, minlength=self.d_in).to(dtype)
        return counts, flat.numel()

    def shared_inputs(self, x: Tensor) -> Tensor:  # pragma: no cover - A is diagonal
        raise TypeError("Embedding inputs are indices; use token_counts")

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return g.reshape(-1, 1, g.shape[-1])  # always expand: every token is a row

    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        return grad.mT  # [d, V]

    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.mT
