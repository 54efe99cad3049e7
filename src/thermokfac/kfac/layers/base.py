"""Per-layer helpers: one module kind ↦ K-FAC's ``[batch, shared, features]`` format.

Every supported layer computes s = W̄ ā over a weight-sharing dimension of size R
(R = 1 for a plain MLP layer, sequence positions for a transformer's Linear, spatial
positions for a Conv2d). A helper turns the layer's input into ``[batch, R, d_in]``
activations and its output gradient into ``[batch, R, d_out]``, and reads/writes the
parameter gradient as the matrix DΘ = [∇W | ∇b] of shape ``[d_out, d_in (+1)]`` (Eq. 4:
the bias is the last column, matched by a column of ones appended to the activations).
With this one format, K-FAC-expand and K-FAC-reduce (Eqs. 18–21) are one branch in
:mod:`thermokfac.kfac.factors`, shared by every layer kind.
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..._invariants import required

#: A parameter ↦ its gradient (``param.grad`` by default; a sharded engine's gathered
#: whole gradient under FSDP2).
GradSource = Callable[[nn.Parameter], Tensor | None]


class LayerHelper(ABC):
    """Maps one module to the shared format and to its gradient matrix DΘ.

    Attributes:
        module_types: Module classes this helper handles (used by the registry).
        diagonal_a: True when the input factor A is diagonal and stored as a vector
            (``nn.Embedding``: one-hot inputs).
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    diagonal_a: ClassVar[bool] = False
    #: Which parameters this block preconditions: ``"both"`` (W and b in one block, the
    #: bias a column of DΘ), or ``"weight"``/``"bias"`` alone
    #: (``separate_weight_and_bias=True``: the bias block has A = 1).
    part: str = "both"

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        #: The module whose forward hooks see this block's calls: the module itself, or
        #: the ``torch.compile`` wrapper around it (whose hooks run outside the compiled
        #: graph, so a wrapper compiled and run before the preconditioner still reports).
        self.hook_module: nn.Module = module

    def only(self, part: str) -> LayerHelper:
        """A copy of this block restricted to ``part`` (``"weight"`` or ``"bias"``)."""
        if part not in ("weight", "bias"):
            raise ValueError(f"part must be 'weight' or 'bias', got {part!r}")
        twin = copy.copy(self)
        twin.part = part
        return twin

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this particular module cannot be handled (None if it can)."""
        return None

    @classmethod
    def blocks(cls, module: nn.Module) -> list[tuple[str, LayerHelper]]:
        """The Kronecker blocks of ``module`` as ``(name suffix, helper)``: one block,
        named as the module, for every layer kind except those that apply several weight
        matrices (``nn.MultiheadAttention``: its Q, K, V and output projections)."""
        return [("", cls(module))]

    def attach(self, pre_hook: Callable[[nn.Module, Any], None],
               post_hook: Callable[[nn.Module, Any, Any], None]) -> list[RemovableHandle]:
        """Make ``pre_hook(module, x)`` run before each application of this block's
        weight to its input ``x`` and ``post_hook(module, x, output)`` after it; by
        default through the module's forward hooks, with ``x`` from :meth:`layer_input`
        (positional or keyword). Returns handles to remove them."""
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pre_hook(module, self.layer_input(args, kwargs))

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            post_hook(module, self.layer_input(args, kwargs), output)

        return [self.hook_module.register_forward_pre_hook(pre, with_kwargs=True),
                self.hook_module.register_forward_hook(post, with_kwargs=True)]

    def layer_input(self, args: tuple, kwargs: dict) -> Any:
        """The input this block's weight applies to, however the module was called: the
        first positional argument, or its forward's first parameter given by keyword
        (``self.fc(input=x)``); None when neither is there."""
        if args:
            return args[0]
        return kwargs.get(_first_parameter(type(self.module).forward))

    @property
    def submodule(self) -> nn.Module | None:
        """The child module this block stands for, if any (attention's ``out_proj``)."""
        return None

    @property
    def weight_param(self) -> nn.Parameter:
        """The parameter holding this block's weight (a larger parameter when the
        weight is a block of it, see :meth:`weight_view`)."""
        # A Parameter for every block in use: a computed weight (a parametrization) is
        # refused at construction (:meth:`leaf_problem`).
        return cast(nn.Parameter, self.module.weight)

    @property
    def bias_param(self) -> nn.Parameter | None:
        """The parameter holding this block's bias, or None."""
        return getattr(self.module, "bias", None)

    def weight_view(self, t: Tensor) -> Tensor:
        """This block's part of a tensor shaped like :attr:`weight_param` (a view)."""
        return t

    def bias_view(self, t: Tensor) -> Tensor:
        """This block's part of a tensor shaped like :attr:`bias_param` (a view)."""
        return t

    def leaf_problem(self) -> str | None:
        """Why the weight/bias are not the module's own leaf parameters (None if they
        are): a parametrization such as ``weight_norm`` computes them, so their gradient
        lands on the parametrization's parameters."""
        own = dict(self.module.named_parameters(recurse=False))
        for name in ("weight", "bias"):
            value = getattr(self.module, name, None)
            if value is None or (name == "bias" and self.diagonal_a):
                continue
            if own.get(name) is not value:
                return (f"a computed {name} (parametrized, e.g. weight_norm/spectral_norm: "
                        "its gradient lands on the parametrization's parameters)")
        return None

    @property
    def weight_trainable(self) -> bool:
        """Whether the weight is preconditioned now (``requires_grad``, read at every use)."""
        return self.part != "bias" and bool(self.weight_param.requires_grad)

    @property
    def has_bias(self) -> bool:
        """Whether the bias column is in A and DΘ: the layer has a bias that trains now.

        A frozen bias is left out of A (its column of ones would otherwise enter the
        weight's curvature), and so is its row of DΘ.
        """
        bias = self.bias_param
        return self.part != "weight" and bias is not None and bool(bias.requires_grad)

    @property
    def layout(self) -> tuple[bool, bool]:
        """(weight preconditioned, bias preconditioned), as ``requires_grad`` says now."""
        return self.weight_trainable, self.has_bias

    def possible_shapes(self) -> dict[tuple[bool, bool], tuple[int, int]]:
        """``{(weight, bias) trainable: (A dimension, G dimension)}`` for every layout."""
        bias = self.bias_param is not None and not self.diagonal_a
        layouts = {"both": [(True, False)] + ([(True, True), (False, True)] if bias else []),
                   "weight": [(True, False)], "bias": [(False, True)]}[self.part]
        return {(w, b): (self.d_in * int(w) + int(b), self.d_out) for w, b in layouts}

    @property
    def trainable(self) -> bool:
        """Whether anything of this layer is preconditioned now."""
        return self.weight_trainable or self.has_bias

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter this helper may precondition (a block of it, for a packed
        weight): weight, then bias if present."""
        params = [self.weight_param] if self.part != "bias" else []
        if self.bias_param is not None and not self.diagonal_a and self.part != "weight":
            params.append(self.bias_param)
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
        """Dimension of A for the trainable parameters: ``d_in`` for the weight (0 when
        it is frozen) plus 1 for a trainable bias."""
        return self.d_in * int(self.weight_trainable) + int(self.has_bias)

    def batch_size(self, x: Tensor) -> int | None:
        """The number of examples in the input ``x`` when the layer knows it (attention:
        its batch dimension, wherever ``batch_first`` puts it), else None."""
        return None

    def unbatched_input(self, x: Tensor) -> bool:
        """Whether ``x`` is one example without a batch dimension (e.g. a ``[C, H, W]``
        image for a convolution)."""
        return False

    def token_counts(self, indices: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Per-token counts and the number of tokens, for a diagonal A (one-hot inputs).

        Args:
            indices: The layer's integer input, any shape.
            dtype: The dtype of the counts.

        Returns:
            (counts ``[d_in]``, number of tokens).

        Raises:
            TypeError: This helper's A is dense (:attr:`diagonal_a` is False): its
                activations come from :meth:`shared_inputs`.
        """
        raise TypeError(f"{type(self).__name__} has a dense A: use shared_inputs")

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

    def _grads(self, source: GradSource | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(``weight.grad`` if the weight trains, ``bias.grad`` if the bias trains), this
        block's views of them; ``source(param)`` in place of ``param.grad`` when given."""
        read = source if source is not None else _own_grad
        weight = read(self.weight_param) if self.weight_trainable else None
        bias = read(required(self.bias_param, "the bias")) if self.has_bias else None
        return (None if weight is None else self.weight_view(weight),
                None if bias is None else self.bias_view(bias))

    def has_grad(self) -> bool:
        """Whether a trainable parameter of this layer holds a gradient."""
        weight, bias = self._grads()
        return weight is not None or bias is not None

    def grad_matrix(self, source: GradSource | None = None) -> Tensor | None:
        """DΘ = [∇W | ∇b] ``[d_out, a_dim]`` of the trainable parameters, as a new
        contiguous tensor (None without a gradient). A missing gradient of one trainable
        part (unused in this backward) counts as zero. ``source(param)``: the whole
        gradient of ``param`` in place of ``param.grad`` (a sharded engine's gathered
        one)."""
        weight, bias = self._grads(source)
        if weight is None and bias is None:
            return None
        if not self.has_bias:
            return self.weight_grad_matrix(required(weight, "the weight's gradient")).clone(
                memory_format=torch.contiguous_format)
        ref = weight if weight is not None else required(bias, "the bias's gradient")
        # Every column is written when both parts have a gradient: no zero fill then.
        alloc = ref.new_empty if weight is not None and bias is not None else ref.new_zeros
        out = alloc(self.d_out, self.a_dim)
        d = self.a_dim - 1
        if weight is not None:
            out[:, :d] = self.weight_grad_matrix(weight)
        if bias is not None:
            out[:, d] = bias
        return out

    def inner_with_grad(self, u: Tensor, source: GradSource | None = None) -> float:
        """⟨U, DΘ⟩ against the gradient still held in ``.grad`` (before it is replaced).

        Summed in the gradient's dtype, and again in float64 when that overflows (a huge
        but finite gradient must still reach the KL clip, not count as non-finite).
        """
        total = self._inner(u, None, source)
        if not math.isfinite(total):
            total = self._inner(u, torch.float64, source)
        return total

    def _inner(self, u: Tensor, dtype: torch.dtype | None,
               source: GradSource | None = None) -> float:
        """⟨U, DΘ⟩ in ``dtype`` (that of U and DΘ when None), read back once."""
        weight, bias = self._grads(source)
        d = self.d_in if self.weight_trainable else 0
        parts = [(u[:, :d], self.weight_grad_matrix(weight))] if weight is not None else []
        if bias is not None:
            parts.append((u[:, d], bias))
        total = sum((a.to(dtype) * b.to(dtype)).sum() if dtype is not None else (a * b).sum()
                    for a, b in parts)
        return float(total)

    def set_grad_matrix(self, u: Tensor, source: GradSource | None = None) -> None:
        """Write the preconditioned matrix U ``[d_out, a_dim]`` back into ``.grad`` (into
        ``source(param)`` when given)."""
        weight, bias = self._grads(source)
        d = self.d_in if self.weight_trainable else 0
        if weight is not None:
            weight.copy_(self.weight_grad_from_matrix(u[:, :d]))
        if bias is not None:
            bias.copy_(u[:, d])

    def scale_grad(self, factor: float) -> None:
        """Multiply the trainable parameters' gradients by ``factor`` in place."""
        for grad in self._grads():
            if grad is not None:
                grad.mul_(factor)


def _own_grad(param: nn.Parameter) -> Tensor | None:
    return param.grad


@cache
def _first_parameter(forward: Callable[..., Any]) -> str | None:
    """The name of the first parameter of a module class's ``forward`` after ``self``."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for param in params[1:]:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD,
                          param.KEYWORD_ONLY):
            return param.name
    return None
