"""How a step reads DΘ from, and writes U into, the parameters' gradients.

A :class:`GradientAccess` turns a block's gradients into the matrix DΘ = [∇W | ∇b]
``[d_out, a_dim]`` (Eq. 4) and writes U back. :class:`WholeGradients` reads whole
``.grad`` tensors — one process, or data-parallel ranks whose gradients were averaged
(``DistributedDataParallel``). A sharded engine supplies another access (each rank
holding a shard of DΘ's rows) behind the same methods.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from .layers import LayerHelper


class GradientAccess(Protocol):
    """Reads DΘ and writes U for a block, given its layer helper."""

    def has_grad(self, helper: LayerHelper) -> bool:
        """Whether a trainable parameter of the block holds a gradient.

        Args:
            helper: The block's layer helper (its parameters and layout).
        """

    def read(self, helper: LayerHelper) -> Tensor | None:
        """DΘ ``[d_out, a_dim]`` as a new contiguous tensor (the step's own buffer).

        Args:
            helper: The block's layer helper (its parameters and layout).

        Returns:
            DΘ, or None when no parameter of the block holds a gradient.
        """

    def inner(self, helper: LayerHelper, u: Tensor) -> float:
        """⟨U, DΘ⟩ against the gradient still held (before :meth:`write`).

        Args:
            helper: The block's layer helper (its parameters and layout).
            u: U, ``[d_out, a_dim]``.
        """

    def write(self, helper: LayerHelper, u: Tensor) -> None:
        """Replace the gradient by U ``[d_out, a_dim]``.

        Args:
            helper: The block's layer helper (its parameters and layout).
            u: U, ``[d_out, a_dim]``.
        """

    def scale(self, helper: LayerHelper, factor: float) -> None:
        """Multiply the (written) gradient by ``factor``.

        Args:
            helper: The block's layer helper (its parameters and layout).
            factor: The multiplier (the KL clip's ν).
        """

    def parameters(self, helper: LayerHelper) -> list[nn.Parameter]:
        """The parameters whose gradients the block reads and writes.

        Args:
            helper: The block's layer helper (its parameters and layout).
        """


class WholeGradients:
    """:class:`GradientAccess` through whole ``.grad`` tensors (the layer helpers')."""

    def has_grad(self, helper: LayerHelper) -> bool:
        return helper.has_grad()

    def read(self, helper: LayerHelper) -> Tensor | None:
        return helper.grad_matrix()

    def inner(self, helper: LayerHelper, u: Tensor) -> float:
        return helper.inner_with_grad(u)

    def write(self, helper: LayerHelper, u: Tensor) -> None:
        helper.set_grad_matrix(u)

    def scale(self, helper: LayerHelper, factor: float) -> None:
        helper.scale_grad(factor)

    def parameters(self, helper: LayerHelper) -> list[nn.Parameter]:
        return helper.parameters
