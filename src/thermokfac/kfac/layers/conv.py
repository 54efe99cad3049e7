"""Convolutions via patch extraction: output positions are the shared dimension.

A convolution with weight ``[c_out, c_in/g, k_1, …, k_n]`` applies, in each group of
channels, the matrix ``[c_out/g, (c_in/g)·k_1⋯k_n]`` to the input patches of every output
position (the padded input unfolded along each spatial dimension), so it is a Linear
layer shared over the output positions (Eqs. 18–21). This covers ``nn.Conv1d``,
``nn.Conv2d`` and ``nn.Conv3d`` with any stride, dilation, numeric or ``'same'``/
``'valid'`` padding and every ``padding_mode`` (the padding is applied to the patches as
PyTorch applies it to the input).

A transposed convolution is the convolution of the stride-dilated input, padded by
``d·(k−1) − p`` (plus ``output_padding`` after), with stride 1 and the kernel flipped
and its channel axes swapped: :class:`ConvTransposeHelper` uses those patches and that
matrix.

**Groups.** A grouped (or depthwise) convolution gets one Kronecker block per group,
named ``<layer>.group<j>``: the curvature is approximated as block-diagonal over the
groups, each block the K-FAC of that group's own Linear map. (curvlinops instead
averages the patches of all groups into one A shared by the groups; the two coincide
for ``groups=1``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .base import LayerHelper

if TYPE_CHECKING:
    from torch.nn.modules.conv import _ConvNd

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
              "circular": "circular"}


def patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
            dilation: tuple[int, ...]) -> Tensor:
    """Patches ``[N, positions, C·k_1⋯k_n]`` of an already padded ``x`` ``[N, C, *spatial]``,
    channel-major within a patch (the order of a flattened convolution weight)."""
    n_spatial = len(kernel)
    for i in range(n_spatial):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            x = x[..., ::dilation[i]]
    # [N, C, o_1..o_n, k_1..k_n] → [N, o_1..o_n, C, k_1..k_n]
    order = (0, *range(2, 2 + n_spatial), 1, *range(2 + n_spatial, 2 + 2 * n_spatial))
    x = x.permute(*order)
    n = x.shape[0]
    positions = math.prod(x.shape[1:1 + n_spatial])
    return x.reshape(n, positions, -1)


class ConvHelper(LayerHelper):
    """``nn.Conv1d/2d/3d`` (group ``group`` of ``groups``).

    Shapes: input ``[N, c_in, *spatial]`` (or unbatched ``[c_in, *spatial]``) ↦
    ``[N, positions, (c_in/g)·K]``; output gradient ↦ ``[N, positions, c_out/g]``.
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    module: _ConvNd

    def __init__(self, module: _ConvNd, group: int = 0) -> None:
        super().__init__(module)
        if not 0 <= group < module.groups:
            raise ValueError(f"group must be in [0, {module.groups}), got {group}")
        self.group = group

    @classmethod
    def blocks(cls, module: nn.Module) -> list[tuple[str, LayerHelper]]:
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                   nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise TypeError(f"{cls.__name__} handles convolutions, got {type(module).__name__}")
        if module.groups == 1:
            return [("", cls(module))]
        return [(f".group{j}", cls(module, j)) for j in range(module.groups)]

    @property
    def n_spatial(self) -> int:
        return len(self.module.kernel_size)

    @property
    def in_group(self) -> int:
        """Input channels per group."""
        return self.module.in_channels // self.module.groups

    @property
    def out_group(self) -> int:
        """Output channels per group."""
        return self.module.out_channels // self.module.groups

    @property
    def d_in(self) -> int:
        return self.in_group * math.prod(self.module.kernel_size)

    @property
    def d_out(self) -> int:
        return self.out_group

    def _slice(self, t: Tensor, size: int) -> Tensor:
        if self.module.groups == 1:
            return t
        return t[self.group * size:(self.group + 1) * size]

    def weight_view(self, t: Tensor) -> Tensor:
        return self._slice(t, self.out_group)

    def bias_view(self, t: Tensor) -> Tensor:
        return self._slice(t, self.out_group)

    def unbatched_input(self, x: Tensor) -> bool:
        return x.ndim == self.n_spatial + 1

    def _batched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.ndim == self.n_spatial + 1 else t

    def _channels(self, t: Tensor, size: int) -> Tensor:
        if self.module.groups == 1:
            return t
        return t[:, self.group * size:(self.group + 1) * size]

    def _pads(self) -> list[int]:
        """``F.pad`` amounts (last spatial dimension first) of the module's padding."""
        m = self.module
        if m.padding == "valid":
            return [0] * (2 * self.n_spatial)
        pads: list[int] = []
        for i in reversed(range(self.n_spatial)):
            if isinstance(m.padding, str):  # "same": PyTorch accepts no other string here
                total = m.dilation[i] * (m.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [m.padding[i], m.padding[i]]
        return pads

    def shared_inputs(self, x: Tensor) -> Tensor:
        m = self.module
        x = self._channels(self._batched(x), self.in_group)
        pads = self._pads()
        if any(pads):
            x = F.pad(x, pads, mode=_PAD_MODES[m.padding_mode])
        return patches(x, m.kernel_size, m.stride, m.dilation)

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        g = self._channels(self._batched(g), self.out_group)
        return g.flatten(2).transpose(1, 2)  # [N, positions, c_out/g]

    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1)

    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.weight_view(self.module.weight).shape)


class ConvTransposeHelper(ConvHelper):
    """``nn.ConvTranspose1d/2d/3d`` (group ``group`` of ``groups``), as the convolution
    of the dilated and padded input with the flipped, channel-swapped kernel.

    The ``output_size`` argument of the forward is honoured (it sets the padding after).
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = (
        nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def __init__(self, module: _ConvNd, group: int = 0) -> None:
        super().__init__(module, group)
        self._output_padding: tuple[int, ...] = tuple(module.output_padding)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise TypeError(f"{cls.__name__} handles transposed convolutions, "
                            f"got {type(module).__name__}")
        if module.padding_mode != "zeros":  # PyTorch itself rejects this at forward
            return f"padding_mode={module.padding_mode!r}"
        padding = module.padding  # a string becomes a tuple of its characters here
        if isinstance(padding, str) or not all(isinstance(p, int) for p in padding):
            return f"padding={padding!r} (numbers only: PyTorch rejects it at forward too)"
        return None

    def attach(self, pre_hook: Callable, post_hook: Callable) -> list[RemovableHandle]:
        def read_output_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = self.layer_input(args, kwargs)
            size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            self._output_padding = self._padding_after(x, size)
            pre_hook(module, x)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            post_hook(module, self.layer_input(args, kwargs), output)

        return [self.hook_module.register_forward_pre_hook(read_output_size, with_kwargs=True),
                self.hook_module.register_forward_hook(post, with_kwargs=True)]

    def _padding_after(self, x: Tensor, output_size) -> tuple[int, ...]:
        """``output_padding`` of this call (from ``output_size`` when given)."""
        m = self.module
        if output_size is None or not isinstance(x, Tensor):
            return tuple(m.output_padding)
        sizes = list(output_size)[-self.n_spatial:]
        spatial = x.shape[-self.n_spatial:]
        padding = self._padding
        return tuple(int(sizes[i]) - ((spatial[i] - 1) * m.stride[i] - 2 * padding[i]
                                      + m.dilation[i] * (m.kernel_size[i] - 1) + 1)
                     for i in range(self.n_spatial))

    @property
    def _padding(self) -> tuple[int, ...]:
        padding = self.module.padding
        if isinstance(padding, str):  # refused at construction (unsupported_reason)
            raise ValueError(f"a transposed convolution's padding must be numbers, "
                             f"got {padding!r}")
        return padding

    def weight_view(self, t: Tensor) -> Tensor:
        return self._slice(t, self.in_group)  # weight [c_in, c_out/g, k...]

    def bias_view(self, t: Tensor) -> Tensor:
        return self._slice(t, self.out_group)

    def shared_inputs(self, x: Tensor) -> Tensor:
        m = self.module
        x = self._channels(self._batched(x), self.in_group)
        n, c = x.shape[:2]
        spatial = x.shape[2:]
        dilated = x.new_zeros(n, c, *[(s - 1) * st + 1 for s, st in zip(spatial, m.stride)])
        every_stride = (slice(None), slice(None), *[slice(None, None, st) for st in m.stride])
        dilated[every_stride] = x
        pads: list[int] = []
        padding = self._padding
        for i in reversed(range(self.n_spatial)):
            edge = m.dilation[i] * (m.kernel_size[i] - 1) - padding[i]
            pads += [edge, edge + self._output_padding[i]]
        return patches(F.pad(dilated, pads), m.kernel_size, (1,) * self.n_spatial, m.dilation)

    def _spatial_dims(self) -> list[int]:
        return list(range(2, 2 + self.n_spatial))

    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        # [c_in/g, c_out/g, k...] → flipped [c_out/g, c_in/g, k...] → [c_out/g, d_in]
        flipped = grad.flip(self._spatial_dims()).transpose(0, 1)
        return flipped.reshape(flipped.shape[0], -1)

    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        shape = self.weight_view(self.module.weight).shape  # [c_in/g, c_out/g, k...]
        flipped = matrix.reshape(shape[1], shape[0], *shape[2:])
        return flipped.transpose(0, 1).flip(self._spatial_dims())
