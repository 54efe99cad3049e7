"""``nn.Conv2d`` via patch extraction: spatial output positions are the shared dimension.

The weight ``[c_out, c_in, kh, kw]`` acts as a matrix ``[c_out, c_in·kh·kw]`` on the
unfolded input patches (``F.unfold``), so a convolution is a Linear layer shared over
the H'·W' output positions.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerHelper


class Conv2dHelper(LayerHelper):
    """Conv2d with ``groups == 1`` and zero padding (numeric or ``'valid'``/``'same'``)."""

    module_types = (nn.Conv2d,)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        return None

    @property
    def d_in(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    @property
    def d_out(self) -> int:
        return self.module.out_channels

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        m = self.module
        if m.padding == "valid":
            return x, (0, 0)
        if m.padding == "same":
            pads = []
            for k, d in zip(m.kernel_size, m.dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            return F.pad(x, (left, right, top, bottom)), (0, 0)
        return x, tuple(m.padding)

    def unbatched_input(self, x: Tensor) -> bool:
        return x.ndim == 3

    def shared_inputs(self, x: Tensor) -> Tensor:
        m = self.module
        if x.ndim == 3:
            x = x.unsqueeze(0)
        x, padding = self._padded(x)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding,
                           stride=m.stride)  # [batch, c_in·kh·kw, H'·W']
        return patches.transpose(1, 2)  # [batch, H'·W', c_in·kh·kw]

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        if g.ndim == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)  # [batch, H'·W', c_out]

    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1)

    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.module.weight.shape)
