"""Hooks that capture Kronecker-factor contributions during forward and backward.

Inputs are read by a forward pre-hook (A is accumulated right away); output gradients by
a tensor hook that a forward hook installs on the layer's output (G is accumulated when
autograd reaches it — unlike a module backward hook, this also works when an in-place
activation follows the layer: the hook belongs to the node that produced the output, so
it sees the gradient of the layer's own output). Nothing is captured in ``eval()`` mode,
under ``torch.no_grad()``, or on steps that do not update the factors. For the ``mc``
and ``type2`` Fisher types the forward hook keeps the output's *gradient edge* (the
autograd node that produced it) instead of the tensor, so the preconditioner can
back-propagate its own vectors to it (:mod:`thermokfac.fisher`) even when an in-place op
later overwrites the tensor.

Every hook runs eagerly under ``torch.compile`` (``torch.compiler.disable``: a graph
break at each hook), so compiled models are captured exactly as eager ones. Passes under
a ``torch.func`` transform (e.g. a per-example ``vmap(grad(...))``) are not captured and
not counted as examples; they are counted in :attr:`CurvatureCapture.transformed_passes`.

**Examples of a step** (``loss_reduction="mean"`` scales G by them): each call of the
root module adds the leading dimension of its tensor arguments (searched through tuples,
lists, mappings and dataclasses; 0-d tensors are ignored). When those leading dimensions
disagree, when there is no such tensor, or when the root module was not called while
layers were, the count is *ambiguous* (:attr:`CurvatureCapture.example_problem`) and the
preconditioner asks for ``step(num_examples=N)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from ..enums import KFACApprox
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
    """One preconditioned layer: its helper and this step's captured sums.

    Attributes:
        layout: (weight, bias) preconditioned when this step's factors were captured
            (``helper.layout`` at the first call of the step).
        outputs: Gradient edges of this step's outputs (``mc``/``type2``), with the
            row groups active at the call.
    """

    name: str
    helper: LayerHelper
    sums: FactorSums = field(default_factory=FactorSums)
    outputs: list[tuple[GradientEdge, tuple[Tensor, int] | None]] = field(default_factory=list)
    layout: tuple[bool, bool] | None = None


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
        self.root_calls = 0
        self.example_problem: str | None = None
        self.transformed_passes = 0
        self.hook_calls = 0
        self.elapsed_s = 0.0
        self.sync_cuda = False
        self._inv_scale = 1.0
        self._scale_read = False
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(_eager(self._count), with_kwargs=True)]
        for record in records:
            module = record.helper.module
            self._handles.append(module.register_forward_pre_hook(
                _eager(self._input_hook(record))))
            self._handles.append(module.register_forward_hook(_eager(self._output_hook(record))))

    # ----------------------------------------------------------------- control
    def active(self, module: nn.Module) -> bool:
        return self.enabled and module.training and torch.is_grad_enabled()

    def reset(self) -> None:
        """Forget this step's sums (after ``step()`` consumed them)."""
        for record in self.records:
            record.sums.reset()
            record.outputs.clear()
            record.layout = None
        self.examples = self.root_calls = self.hook_calls = 0
        self.example_problem = None
        self.elapsed_s = 0.0
        self._scale_read = False

    def hooks_ran(self) -> bool:
        """Whether a layer's forward hook ran this step (active or not: eval mode and
        ``no_grad`` passes count), or anything was captured."""
        return self.hook_calls > 0 or self.root_calls > 0 or any(
            r.sums.a_rows or r.sums.g_rows or r.outputs for r in self.records)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    # ------------------------------------------------------------------- hooks
    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active(module):
            return
        if _transformed((args, kwargs)):
            self.transformed_passes += 1
            return
        self.root_calls += 1
        self._read_scale()
        if self.groups is not None:
            self.examples += self.groups[1]
            return
        dims = set(leading_dims((args, kwargs)))
        if len(dims) == 1:
            self.examples += dims.pop()
        elif self.example_problem is None:
            self.example_problem = (
                f"the model's tensor inputs have different leading dimensions {sorted(dims)}"
                if dims else "the model's inputs hold no tensor with a batch dimension")

    def _read_scale(self) -> None:
        scale = float(self.grad_scale())
        self._inv_scale = 1.0 / scale if scale != 1.0 else 1.0
        self._scale_read = True

    def _input_hook(self, record: LayerRecord):
        def hook(module: nn.Module, args: tuple) -> None:
            self.hook_calls += 1
            if not self.active(module):
                return
            helper = record.helper
            if not helper.trainable or _transformed(args[0]):
                return
            if record.layout is None:
                record.layout = helper.layout
            elif record.layout != helper.layout:
                raise RuntimeError(
                    f"requires_grad of layer {record.name!r} changed between two forward "
                    "passes of one step; change it between steps")
            start = self._clock()
            x = args[0]
            if helper.diagonal_a:
                counts, tokens = helper.token_counts(x, self.factor_dtype)
                accumulate_a_diagonal(record.sums, counts, tokens)
            else:
                rows = activation_rows(helper.shared_inputs(x.detach()), self.approx,
                                       self.groups)
                if not helper.weight_trainable:  # bias only: ā = [1]
                    rows = rows[:, :0]
                if self.keep_rows:
                    record.sums.a_rows += append_rows(record.sums.a_parts, rows, helper.has_bias,
                                                      self.factor_dtype)
                elif helper.weight_trainable:
                    accumulate_a(record.sums, rows, helper.has_bias, self.factor_dtype)
                else:
                    accumulate_a(record.sums, None, True, self.factor_dtype,
                                 count=rows.shape[0], device=rows.device)
            self.elapsed_s += self._clock() - start
        return hook

    def _output_hook(self, record: LayerRecord):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.active(module) or not record.helper.trainable \
                    or not isinstance(output, Tensor) or not output.requires_grad \
                    or _transformed(output):
                return
            if self.keep_outputs:
                record.outputs.append((get_gradient_edge(output), self.groups))
                return
            if not self._scale_read:
                self._read_scale()
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
        pairs = [(r, edge, groups) for r in self.records for edge, groups in r.outputs]
        if not pairs:
            return
        for v, weight in vectors:
            start = self._clock()
            grads = _grad_or_explain(outputs, [e for _, e, _ in pairs], v)
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


def _eager(hook):
    return torch.compiler.disable(hook)


_functorch = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)
_interpreter = getattr(_functorch, "peek_interpreter_stack", lambda: None)


def _eager(hook):
    """Run ``hook`` eagerly under ``torch.compile`` (a graph break), as in eager mode."""
    return torch.compiler.disable(hook)


def _transformed(obj) -> bool:
    """Whether a ``torch.func`` transform is tracing, or ``obj`` holds a tensor of one
    (nothing is captured then)."""
    if _interpreter() is not None:
        return True
    return any(bool(_is_wrapped(t)) for t in _tensors(obj))


def _grad_or_explain(outputs: Tensor, inputs: list[GradientEdge], v: Tensor) -> tuple:
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


def _tensors(obj, depth: int = 0) -> Iterable[Tensor]:
    """Every tensor in ``obj``: through tuples, lists, mappings and dataclasses."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth > 8:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name, None), depth + 1)


def leading_dims(obj) -> list[int]:
    """Leading dimensions of the tensors of ``obj`` with at least one dimension.

    >>> leading_dims(({"x": torch.zeros(4, 3)}, torch.tensor(1.0), [torch.zeros(4)]))
    [4, 4]
    """
    return [t.shape[0] for t in _tensors(obj) if t.ndim > 0]
