"""Per-layer helpers: one module kind ↦ K-FAC's ``[batch, shared, features]`` format.

Every supported layer computes s = W̄ ā over a weight-sharing dimension of size R
(R = 1 for a plain MLP layer, sequence positions for a transformer's Linear, spatial
positions for a Conv2d). A helper turns the layer's input into ``[batch, R, d_in]``
activations and its output gradient into ``[batch, R, d_out]``, and reads/writes the
parameter gradient as the matrix DΘ = [∇W | ∇b] of shape ``[d_out, d_in (+1)]`` (Eq. 4:
the bias is the last column, matched by a column of ones appended to the activations).
With this one format, K-FAC-expand and K-FAC-reduce (Eqs. 18–21) are one branch in
:mod:`thermokfac.factors`, shared by every layer kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn


class LayerHelper(ABC):
    """Maps one module to the shared format and to its gradient matrix DΘ.

    Attributes:
        module_types: Module classes this helper handles (used by the registry).
        diagonal_a: True when the input factor A is diagonal and stored as a vector
            (``nn.Embedding``: one-hot inputs).
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    diagonal_a: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this particular module cannot be handled (None if it can)."""
        return None

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters this helper preconditions: weight, then bias if present."""
        params = [self.module.weight]
        if self.has_bias:
            params.append(self.module.bias)
        return params

    @property
    @abstractmethod
    def d_in(self) -> int:
        """Input features per shared position, without the bias column."""

    @property
    @abstractmethod
    def d_out(self) -> int:
        """Output features per shared position."""

    @property
    def a_dim(self) -> int:
        """Dimension of A: ``d_in + 1`` with a bias, else ``d_in``."""
        return self.d_in + int(self.has_bias)

    @abstractmethod
    def shared_inputs(self, x: Tensor) -> Tensor:
        """Layer input ↦ activations ``[batch, shared, d_in]``."""

    @abstractmethod
    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output ↦ ``[batch, shared, d_out]``."""

    @abstractmethod
    def weight_grad_matrix(self, grad: Tensor) -> Tensor:
        """``weight.grad`` ↦ ``[d_out, d_in]``."""

    @abstractmethod
    def weight_grad_from_matrix(self, matrix: Tensor) -> Tensor:
        """``[d_out, d_in]`` ↦ a tensor shaped like ``weight``."""

    def grad_matrix(self) -> Tensor | None:
        """DΘ = [∇W | ∇b] ``[d_out, a_dim]`` as a new contiguous tensor (None without a
        gradient)."""
        weight = self.module.weight
        if weight.grad is None:
            return None
        mat = self.weight_grad_matrix(weight.grad)
        if not self.has_bias:
            return mat.clone(memory_format=torch.contiguous_format)
        bias_grad = self.module.bias.grad
        out = mat.new_empty(self.d_out, self.a_dim)
        out[:, : self.d_in] = mat
        out[:, self.d_in] = bias_grad if bias_grad is not None else 0.0
        return out

    def inner_with_grad(self, u: Tensor) -> float:
        """⟨U, DΘ⟩ against the gradient still held in ``.grad`` (before it is replaced)."""
        total = (u[:, : self.d_in] * self.weight_grad_matrix(self.module.weight.grad)).sum()
        if self.has_bias and self.module.bias.grad is not None:
            total = total + (u[:, self.d_in] * self.module.bias.grad).sum()
        return float(total)

    def set_grad_matrix(self, u: Tensor) -> None:
        """Write the preconditioned matrix U ``[d_out, a_dim]`` back into ``.grad``."""
        weight = self.module.weight
        weight.grad.copy_(self.weight_grad_from_matrix(u[:, : self.d_in]))
        if self.has_bias and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(u[:, self.d_in])
