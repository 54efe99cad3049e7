"""``nn.Linear``: inputs ``[batch, ..., d_in]``; every middle dimension is shared."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LayerHelper


class LinearHelper(LayerHelper):
    """Linear layer; a 2-D input has a shared dimension of size 1.

    >>> h = LinearHelper(nn.Linear(3, 2))
    >>> import torch
    >>> h.shared_inputs(torch.zeros(4, 5, 3)).shape
    torch.Size([4, 5, 3])
    """

    module_types = (nn.Linear,)
    module: nn.Linear

    @property
    def d_in(self) -> int:
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features

    def shared_inputs(self, x: Tensor) -> Tensor:
        return _to_shared(x)

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return _to_shared(g)

    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        return grad

    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix


def _to_shared(t: Tensor) -> Tensor:
    if t.ndim == 1:
        return t.reshape(1, 1, -1)
    if t.ndim == 2:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], -1, t.shape[-1])
