"""Running the capture's hooks under ``torch.compile`` and ``torch.func``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .examples import tensors_in

_functorch = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)
_interpreter = getattr(_functorch, "peek_interpreter_stack", lambda: None)


def eager(hook):
    """Run ``hook`` eagerly under ``torch.compile`` (a graph break), as in eager mode."""
    return torch.compiler.disable(hook)


def transformed(obj) -> bool:
    """Whether a ``torch.func`` transform is tracing, or ``obj`` holds a tensor of one
    (nothing is captured then)."""
    if _interpreter() is not None:
        return True
    return any(bool(_is_wrapped(t)) for t in tensors_in(obj))


def grad_or_explain(outputs: Tensor, inputs: list[GradientEdge], v: Tensor) -> tuple:
    """``torch.autograd.grad`` of ``outputs`` to gradient edges, keeping the graph; a
    freed graph becomes a ``RuntimeError`` that says what to do."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs=v, retain_graph=True,
                                   allow_unused=True)
    except RuntimeError as err:
        if "second time" in str(err) or "freed" in str(err):
            raise RuntimeError(
                "the graph of `outputs` was already freed: call loss.backward(retain_graph="
                "True) before pre.step(outputs=...), or call pre.curvature_backward(outputs) "
                "before loss.backward()") from err
        raise
