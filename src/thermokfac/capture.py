"""Hooks that capture Kronecker-factor contributions during forward and backward.

Inputs are read by a forward pre-hook (A is accumulated right away); output gradients by
a tensor hook that a forward hook installs on the layer's output (G is accumulated when
autograd reaches it — unlike a module backward hook, this also works when an in-place
activation follows the layer). Nothing is captured in ``eval()`` mode, under
``torch.no_grad()``, or on steps that do not update the factors. For the ``mc`` and
``type2`` Fisher types the forward hook keeps the output tensor instead, so the
preconditioner can back-propagate its own vectors through it (:mod:`thermokfac.fisher`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .enums import KFACApprox
from .factors import (
    FactorSums,
    accumulate_a,
    accumulate_a_diagonal,
    accumulate_g,
    activation_rows,
    append_rows,
    gradient_rows,
)
from .layers import LayerHelper


@dataclass
class LayerRecord:
    """One preconditioned layer: its helper and this step's captured sums."""

    name: str
    helper: LayerHelper
    sums: FactorSums = field(default_factory=FactorSums)
    outputs: list[tuple[Tensor, tuple[Tensor, int] | None]] = field(default_factory=list)


class CurvatureCapture:
    """Installs and owns the hooks; accumulates per-step sums for each layer.

    Args:
        root: The model (unwrapped from DDP); its forward counts the examples.
        records: The layers to capture.
        approx: Expand or reduce.
        factor_dtype: dtype of the sums (float32 under autocast/half models).
        keep_outputs: Keep layer outputs for a preconditioner-owned backward instead of
            capturing the user's output gradients.
        keep_rows: Keep the rows themselves instead of summing their outer products
            (resistor-array mode).
        grad_scale: Returns the current loss scale (GradScaler) to undo, or 1.
    """

    def __init__(self, root: nn.Module, records: list[LayerRecord], approx: KFACApprox,
                 factor_dtype: torch.dtype, keep_outputs: bool,
                 grad_scale: Callable[[], float], keep_rows: bool = False) -> None:
        self.records = records
        self.approx = approx
        self.factor_dtype = factor_dtype
        self.keep_outputs = keep_outputs
        self.grad_scale = grad_scale
        self.keep_rows = keep_rows
        self.groups: tuple[Tensor, int] | None = None
        self.enabled = False
        self.examples = 0
        self.elapsed_s = 0.0
        self.sync_cuda = False
        self._inv_scale = 1.0
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(self._count, with_kwargs=True)]
        for record in records:
            module = record.helper.module
            self._handles.append(module.register_forward_pre_hook(self._input_hook(record)))
            self._handles.append(module.register_forward_hook(self._output_hook(record)))

    # ----------------------------------------------------------------- control
    def active(self, module: nn.Module) -> bool:
        return self.enabled and module.training and torch.is_grad_enabled()

    def reset(self) -> None:
        """Forget this step's sums (after ``step()`` consumed them)."""
        for record in self.records:
            record.sums.reset()
            record.outputs.clear()
        self.examples = 0
        self.elapsed_s = 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    # ------------------------------------------------------------------- hooks
    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active(module):
            return
        if self.groups is not None:
            self.examples += self.groups[1]
        else:
            first = _first_tensor((args, kwargs))
            self.examples += 1 if first is None or first.ndim == 0 else first.shape[0]
        scale = float(self.grad_scale())
        self._inv_scale = 1.0 / scale if scale != 1.0 else 1.0

    def _input_hook(self, record: LayerRecord):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.active(module) or _transformed(args[0]):
                return
            start = self._clock()
            x = args[0]
            helper = record.helper
            if helper.diagonal_a:
                counts, tokens = helper.token_counts(x, self.factor_dtype)
                accumulate_a_diagonal(record.sums, counts, tokens)
            else:
                rows = activation_rows(helper.shared_inputs(x.detach()), self.approx,
                                       self.groups)
                if self.keep_rows:
                    record.sums.a_rows += append_rows(record.sums.a_parts, rows, helper.has_bias,
                                                    self.factor_dtype)
                else:
                    accumulate_a(record.sums, rows, helper.has_bias, self.factor_dtype)
            self.elapsed_s += self._clock() - start
        return hook

    def _output_hook(self, record: LayerRecord):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.active(module) or not isinstance(output, Tensor) \
                    or not output.requires_grad or _transformed(output):
                return
            if self.keep_outputs:
                record.outputs.append((output, self.groups))
                return
            inv_scale, groups = self._inv_scale, self.groups

            def grad_hook(grad: Tensor) -> None:
                self.add_gradient(record, grad, inv_scale, groups)
            output.register_hook(grad_hook)
        return hook

    def add_gradient(self, record: LayerRecord, grad: Tensor, row_scale: float = 1.0,
                     groups: tuple[Tensor, int] | None = None) -> None:
        """Accumulate the rows of G from a gradient w.r.t. one call's output.

        ``row_scale`` multiplies the gradient (so G by its square): 1/S undoes a loss
        scale S, √w weights a sampled or Hessian-root backward.
        """
        start = self._clock()
        helper = record.helper
        approx = KFACApprox.EXPAND if helper.diagonal_a else self.approx
        rows = gradient_rows(helper.shared_grad_outputs(grad.detach()), approx, groups)
        rows = rows.to(self.factor_dtype)
        if row_scale != 1.0:
            rows = rows * row_scale
        if self.keep_rows:
            record.sums.g_rows += append_rows(record.sums.g_parts, rows, False, self.factor_dtype)
        else:
            accumulate_g(record.sums, rows, self.factor_dtype)
        self.elapsed_s += self._clock() - start

    def backward_through(self, outputs: Tensor, vectors: Iterable[tuple[Tensor, float]]
                         ) -> None:
        """Back-propagate each ``(v, w)`` from ``outputs`` to the kept layer outputs and
        accumulate w·Σ ggᵀ into G (the ``mc``/``type2`` Fisher types); ``.grad`` is not
        touched and the graph is kept for the user's own backward."""
        pairs = [(r, out, groups) for r in self.records for out, groups in r.outputs]
        if not pairs:
            return
        for v, weight in vectors:
            start = self._clock()
            grads = _grad_or_explain(outputs, [o for _, o, _ in pairs], v)
            self.elapsed_s += self._clock() - start  # add_gradient times its own part
            for (record, _, groups), grad in zip(pairs, grads):
                if grad is not None:
                    self.add_gradient(record, grad, math.sqrt(weight), groups)
        for record, _, _ in pairs:
            record.outputs.clear()

    def _clock(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


_functorch = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)
_interpreter = getattr(_functorch, "peek_interpreter_stack", lambda: None)


def _transformed(t) -> bool:
    """Whether a ``torch.func`` transform is tracing (nothing is captured then)."""
    return _interpreter() is not None or (isinstance(t, Tensor) and bool(_is_wrapped(t)))


def _grad_or_explain(outputs: Tensor, inputs: list[Tensor], v: Tensor) -> tuple:
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


def _first_tensor(obj) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None
