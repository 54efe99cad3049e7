"""Hooks that capture Kronecker-factor contributions during forward and backward.

A forward pre-hook keeps each layer call's input (autograd keeps it anyway for the
weight gradient); a forward hook then installs a tensor hook on the call's output. When
the output gradient arrives, the call's rows enter A and its gradient rows enter G —
so a call whose output is never back-propagated (a detached branch, an unused head)
adds nothing, and a call back-propagated twice (``torch.autograd.grad`` before
``backward``) enters once and is reported. The tensor hook belongs to the node that
produced the output, so it sees the gradient of the layer's own output even when an
in-place op (``ReLU(inplace=True)``) overwrites the tensor later. For the ``mc`` and
``type2`` Fisher types the forward hook keeps the output's *gradient edge* instead, and
the preconditioner back-propagates its own vectors to it (:mod:`.curvature_backward`). Nothing is
captured in ``eval()`` mode, under ``torch.no_grad()``, inside ``paused()``, or on steps
that do not update the factors.

Every hook runs eagerly under ``torch.compile`` (``torch.compiler.disable``: a graph
break at each hook), so compiled models are captured exactly as eager ones. Passes under
a ``torch.func`` transform (e.g. a per-example ``vmap(grad(...))``) are not captured and
not counted as examples; they are counted in the step record's ``transformed_passes``.

**Examples of a step** are counted by the root module's hooks (:mod:`.examples`). A
layer input whose shape shows no batch (embedding indices that are not a whole number
of the call's N, a 1-D input to a Linear, an unbatched image) is not captured and is
reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from .._invariants import required
from ..enums import FisherType, KFACApprox
from .examples import ExampleCounter
from .factors import (
    accumulate_a,
    accumulate_a_diagonal,
    accumulate_g,
    activation_rows,
    append_rows,
    gradient_rows,
    group_mismatch,
)
from .records import LayerCall, LayerRecord, SharedCalls, StepRecord
from .tracing import eager, transformed


class CurvatureCapture:
    """Installs and owns the hooks; accumulates per-step sums for each layer.

    Args:
        root: The model (unwrapped from DDP); its forward counts the examples.
        records: The layers to capture.
        approx: Expand or reduce.
        factor_dtype: Returns the dtype of the sums (float32 under autocast/half models);
            read at the first forward of each step, so a model cast after building is
            followed.
        keep_outputs: Keep layer outputs for a preconditioner-owned backward instead of
            capturing the user's output gradients.
        keep_rows: Keep the rows themselves instead of summing their outer products
            (resistor-array mode).
        grad_scale: Returns the current loss scale (GradScaler) to undo, or 1.
        share_calls: Under reduce, a layer's calls within one forward of the model with
            the same leading dimension (the batch) form one shared dimension.
    """

    def __init__(self, root: nn.Module, records: list[LayerRecord], approx: KFACApprox,
                 factor_dtype: Callable[[], torch.dtype], keep_outputs: bool,
                 grad_scale: Callable[[], float], keep_rows: bool = False,
                 share_calls: bool = True) -> None:
        self.root = root
        self.records = records
        self.approx = approx
        self._dtype_source = factor_dtype
        self.factor_dtype = factor_dtype()
        self.keep_outputs = keep_outputs
        self.grad_scale = grad_scale
        self.keep_rows = keep_rows
        self.share_calls = share_calls
        self.groups: tuple[Tensor, int] | None = None
        self.enabled = False
        #: What the hooks observed since the last step (:class:`~.records.StepRecord`).
        self.step_record = StepRecord()
        self.paused = False
        self.sync_cuda = False
        self._inv_scale = 1.0
        self._scale_read = False
        self.counter = ExampleCounter()
        #: Called at the first output gradient of each root call's backward, before it
        #: is captured: the owner drops a skipped step's curvature there.
        self.before_backward: Callable[[], None] | None = None
        self.forward_id = 0  # root calls so far; each layer call carries its root call's
        self._checked_forward = 0  # the last root call whose backward was checked
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(eager(self._count), with_kwargs=True),
            root.register_forward_hook(eager(self._root_done))]
        self._layer_handles: dict[int, list[RemovableHandle]] = {}
        # Per preconditioned parameter: a hook before its gradient accumulates (is
        # .grad still U?) and one after (which blocks a backward reached).
        self._param_handles: dict[int, tuple[RemovableHandle, RemovableHandle]] = {}
        # .grad tensors U was written into, with their version counters then. A backward
        # about to accumulate into the same tensor at the same version, still non-zero,
        # adds onto U: zero_grad() replaces the tensor, .zero_() bumps the version, and
        # .data.zero_() (no bump) leaves zeros.
        self._written: dict[int, tuple[Tensor, int]] = {}
        self._onto_update: dict[int, bool] = {}
        self.removed = False
        self.set_records(records)

    def set_records(self, records: list[LayerRecord]) -> None:
        """Capture exactly these layers (hooks removed from layers no longer listed,
        added to new ones; the others keep this step's sums)."""
        keep = {id(r) for r in records}
        for record in self.records:
            if id(record) not in keep:
                for handle in self._layer_handles.pop(id(record), []):
                    handle.remove()
        for record in records:
            if id(record) not in self._layer_handles:
                self._layer_handles[id(record)] = record.helper.attach(
                    eager(self._input_hook(record)), eager(self._output_hook(record)))
        self.records = records
        for handles in self._param_handles.values():
            for handle in handles:
                handle.remove()
        self._param_handles.clear()
        self.watch()

    def watch(self) -> bool:
        """Hook every trainable parameter of the layers (hooks are added as parameters
        become trainable or are replaced). Returns whether a newly watched parameter
        already holds a gradient (it was replaced since: ``load_state_dict(assign=True)``)."""
        unseen = False
        names: dict[int, list[str]] = {}  # blocks of one module share a packed weight
        for record in self.records:
            for param in record.helper.parameters:
                names.setdefault(id(param), []).append(record.name)
        for record in self.records:
            for param in record.helper.parameters:
                if param.requires_grad and param.is_leaf and id(param) not in self._param_handles:
                    sharing = tuple(names[id(param)])
                    self._param_handles[id(param)] = (
                        param.register_hook(
                            lambda grad, param=param, sharing=sharing:
                            self._before_accumulation(sharing, param)),
                        param.register_post_accumulate_grad_hook(
                            lambda param, sharing=sharing: self._reached(sharing, param)))
                    unseen = unseen or param.grad is not None
        return unseen

    def _before_accumulation(self, names: tuple[str, ...], param: Tensor) -> None:
        """A gradient of ``param`` was computed: is ``param.grad`` still U? Confirmed by
        the accumulation that follows (``torch.autograd.grad`` computes without one)."""
        written = self._written.get(id(param))
        self._onto_update[id(param)] = written is not None and param.grad is written[0] \
            and param.grad._version == written[1] and bool(param.grad.any())

    def _reached(self, names: tuple[str, ...], param: Tensor) -> None:
        onto = self._onto_update.pop(id(param), None)
        if onto is None and _is_dtensor(param):  # FSDP2: no hook ran before accumulating
            # its gradient is added into the same .grad object; the object's own version
            # moves only when the user changes it (zero_, clipping), not when FSDP2 or the
            # step writes its rows — so the same object at the same version still held U
            written = self._written.get(id(param))
            onto = written is not None and param.grad is written[0] \
                and param.grad._version == written[1]
        if onto:
            self.step_record.added_onto_update = names[0]
        self.step_record.reached.update(names)
        self.step_record.param_gradients += 1

    def remember_updates(self, records: list[LayerRecord]) -> None:
        """Note the ``.grad`` tensors the step just wrote U into."""
        self._written = {id(p): (p.grad, p.grad._version) for record in records
                         for p in record.helper.parameters if p.grad is not None}

    def gradients_reset(self) -> bool:
        """Whether no watched parameter holds a gradient (None or all zeros); stops at
        the first that does (one tensor read in the usual accumulation case)."""
        return all(p.grad is None or not bool(p.grad.any())
                   for record in self.records for p in record.helper.parameters
                   if p.requires_grad)

    # ----------------------------------------------------------------- control
    def active(self, module: nn.Module) -> bool:
        """Whether a pass of ``module`` is captured now (the hooks also skip a copy of
        the model: ``copy.deepcopy`` copies module hooks)."""
        return self.enabled and not self.paused and module.training and torch.is_grad_enabled()

    def reset(self) -> None:
        """Forget this step's sums (after ``step()`` consumed them)."""
        for record in self.records:
            record.sums.reset()
            record.outputs.clear()
            record.pending.clear()
            record.shared.clear()
            record.layout = None
        self.counter.reset()
        self.step_record = StepRecord()
        self._scale_read = False

    @contextmanager
    def pausing(self) -> Iterator[None]:
        """Nothing inside the block is captured (forwards, and gradients of backwards)."""
        previous = self.paused
        self.paused = True
        try:
            yield
        finally:
            self.paused = previous

    @contextmanager
    def grouping(self, membership: Tensor, num_groups: int | None = None) -> Iterator[None]:
        """Rows of 2-D layer inputs inside the block belong to groups (see
        :meth:`~thermokfac.KFACPreconditioner.grouped_rows`)."""
        count = int(membership.max()) + 1 if num_groups is None else int(num_groups)
        previous = self.groups
        self.groups = (membership, count)
        try:
            yield
        finally:
            self.groups = previous

    def require_curvature(self, fisher_type: FisherType) -> None:
        """Raise if ``mc``/``type2`` kept layer outputs but no outputs were given."""
        if fisher_type is not FisherType.EMPIRICAL and not self.step_record.curvature_done and any(
                r.outputs for r in self.records):
            raise RuntimeError(
                f"fisher_type={fisher_type.value!r} needs the model outputs: call "
                "pre.step(outputs=logits) after loss.backward(retain_graph=True), or "
                "pre.curvature_backward(logits) for each micro-batch")

    def hooks_ran(self) -> bool:
        """Whether a layer's forward hook ran this step (active or not: eval mode and
        ``no_grad`` passes count), or anything was captured (the model's own hook does
        not count: it may run around a compiled graph whose layers' hooks do not)."""
        return self.step_record.hook_calls > 0 or any(
            r.sums.a_rows or r.sums.g_rows or r.outputs for r in self.records)

    def remove(self) -> None:
        """Remove every hook; a later step is refused."""
        for handle in [*self._handles, *(h for hs in self._layer_handles.values() for h in hs),
                       *(h for hs in self._param_handles.values() for h in hs)]:
            handle.remove()
        self._handles.clear()
        self._layer_handles.clear()
        self._param_handles.clear()
        self.removed = True
        self.reset()

    # ------------------------------------------------------------------- hooks
    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not self.root:
            return  # a copy of the model
        if not self.active(module) or not any(r.helper.trainable for r in self.records):
            self.counter.skip()
            return
        if transformed((args, kwargs)):
            self.step_record.transformed_passes += 1
            self.counter.skip()
            return
        if self.step_record.root_calls == 0:  # the first forward of the step: the model's dtype now
            self.factor_dtype = self._dtype_source()
        self.step_record.root_calls += 1
        self.forward_id += 1
        self.step_record.forward_mark = self.step_record.param_gradients
        self.step_record.fp16_autocast = self.step_record.fp16_autocast or _fp16_autocast()
        self._read_scale()
        self.counter.start(args, kwargs, self.groups, self.step_record.param_gradients)

    def _root_done(self, module: nn.Module, args: tuple, output) -> None:
        if module is not self.root:
            return
        self.counter.finish(output, lambda: self.paused)

    def discard_earlier_backwards(self) -> None:
        """Forget the sums of the backwards since the last step, keeping the forwards
        still waiting for their backward (a skipped step's curvature)."""
        for record in self.records:
            record.sums.reset()
            record.shared = {k: s for k, s in record.shared.items() if not s.reached}
        self.counter.drop_counted()
        step = self.step_record
        step.param_gradients = step.forward_mark = step.repeated_gradients = 0
        step.reached.clear()
        step.refused_at = None

    def example_count(self) -> tuple[int, str | None]:
        """(N, None) for this step, or (0, why N is ambiguous): see :mod:`.examples`."""
        return self.counter.count()

    def _read_scale(self) -> None:
        scale = float(self.grad_scale())
        self._inv_scale = 1.0 / scale if scale != 1.0 else 1.0
        self._scale_read = True

    def _input_hook(self, record: LayerRecord):
        def hook(module: nn.Module, x: Any) -> None:
            if module is not record.helper.hook_module:
                return  # a copy of the model
            self.step_record.hook_calls += 1
            if not self.active(module) or not record.helper.trainable:
                return
            try:
                call = self._begin_call(record, x)
            except Exception as err:  # never break the user's pass: refused at step()
                self.step_record.problems.setdefault(record.name, _describe(err))
                call = None
            record.pending.append(call)
        return hook

    def _begin_call(self, record: LayerRecord, x: Any) -> LayerCall | None:
        """One call's A contribution (or None when the call is not captured)."""
        unreadable = _unreadable(x)
        if unreadable is not None:
            self.step_record.problems.setdefault(record.name, unreadable)
            return None
        if isinstance(x, Tensor) and x.layout is not torch.strided:
            x = x.to_dense()  # a sparse input: its rows are those of the dense one
        if x is None or transformed(x) or x.numel() == 0 or not self._batched(record, x):
            return None
        helper = record.helper
        if record.layout is None:
            record.layout = helper.layout
        elif record.layout != helper.layout:
            self.step_record.problems.setdefault(record.name, (
                "its requires_grad changed between two forward passes of one step (change "
                "it between steps)"))
            return None
        self._check_batch(record, x)
        start = self.clock()
        call = LayerCall(self.groups, forward_id=self.forward_id)
        self._add_activations(record, x.detach(), call)
        self.step_record.elapsed_s += self.clock() - start
        return call

    def _check_batch(self, record: LayerRecord, x: Tensor) -> None:
        """A layer that knows its batch (attention) and sees another one than the model's
        call counted: a sequence-first model, whose count is then ambiguous (and whose
        Linear layers, under reduce, would be reduced over the batch)."""
        n, counted = record.helper.batch_size(x), self.counter.current
        if n is None or counted is None or n == counted or self.groups is not None:
            return
        why = (f"layer {record.name!r} sees {n} sequences while the model's call counted "
               f"{counted} examples from its inputs' leading dimension (a sequence-first "
               "model, [T, N, ...] inputs, or an unbatched sequence?)")
        self.counter.contradict(why)
        if self.approx is KFACApprox.REDUCE:
            self.step_record.layout_mismatches.setdefault(record.name, why)

    def _batched(self, record: LayerRecord, x: Tensor) -> bool:
        """Whether the input carries the root call's batch (else reported, not captured:
        see :meth:`~.examples.ExampleCounter.batchless`)."""
        why = self.counter.batchless(record.helper, x, grouped=self.groups is not None)
        if why is not None:
            self.step_record.unbatched_calls.setdefault(record.name, why)
        return why is None

    def _output_hook(self, record: LayerRecord):
        def hook(module: nn.Module, x: Any, output: Any) -> None:
            if module is not record.helper.hook_module or not self.active(module) \
                    or not record.helper.trainable:
                return
            call = record.pending.pop() if record.pending else None
            if call is None or not isinstance(output, Tensor) or not output.requires_grad \
                    or transformed(output):
                return
            try:
                self._follow_output(record, call, output)
            except Exception as err:  # never break the user's pass: refused at step()
                self.step_record.problems.setdefault(record.name, _describe(err))
        return hook

    def _follow_output(self, record: LayerRecord, call: LayerCall, output: Tensor) -> None:
        """Keep the output's gradient edge (``mc``/``type2``), or hook its gradient."""
        if self.keep_outputs:
            call.edge = get_gradient_edge(output)
            record.outputs.append(call)
            return
        if not self._scale_read:
            self._read_scale()
        inv_scale = self._inv_scale

        def grad_hook(grad: Tensor) -> None:
            if self.paused:  # a backward inside paused(): not the step's loss
                return
            if call.hits:
                call.hits += 1
                self.step_record.repeated_gradients += 1
                return
            call.hits = 1
            if call.forward_id != self._checked_forward and self.before_backward:
                # the first gradient of this forward's backward, before any is added
                self._checked_forward = call.forward_id
                self.before_backward()
            try:
                self.add_gradient(record, grad, inv_scale, call.groups, call)
            except Exception as err:  # never break the user's pass: refused at step()
                self.step_record.problems.setdefault(record.name, _describe(err))
        output.register_hook(grad_hook)

    def _add_activations(self, record: LayerRecord, x: Tensor, call: LayerCall) -> None:
        """A of one call into ``call.sums``: Σ āāᵀ of its rows (only the row count when
        the weight is frozen, the token counts of an embedding)."""
        helper, sums = record.helper, required(call.sums, "the call's sums")
        if helper.diagonal_a:
            counts, tokens = helper.token_counts(x, self.factor_dtype)
            accumulate_a_diagonal(sums, counts, tokens)
            return
        shared = helper.shared_inputs(x)
        if self.approx is KFACApprox.REDUCE:
            mismatch = group_mismatch(shared, call.groups)
            if mismatch is not None:
                self.step_record.group_mismatches.setdefault(record.name, mismatch)
            if self._sharing(call, shared):
                self._share(record, call, shared)
                return
        self._add_activation_rows(record, activation_rows(shared, self.approx, call.groups),
                                  sums)

    def _sharing(self, call: LayerCall, shared: Tensor) -> bool:
        """Whether a reduce call joins a shared dimension: calls of a layer within one
        forward of the model with the same leading dimension (its batch) do
        (:class:`~.records.SharedCalls`)."""
        return self.share_calls and call.groups is None

    def _share(self, record: LayerRecord, call: LayerCall, shared: Tensor) -> None:
        """Keep a call's activations for its forward's shared dimension; they join it
        when the call's output gradient arrives (a call never back-propagated adds
        nothing)."""
        key = (call.forward_id, shared.shape[0])
        group = record.shared.get(key)
        if group is None:
            group = record.shared[key] = SharedCalls()
        # summed in the factor dtype: a long sequence of half-precision inputs overflows
        call.shared_a = (shared.sum(dim=1, dtype=self.factor_dtype), shared.shape[1])
        call.shared, call.sums = group, None

    def flush_shared(self) -> None:
        """Each forward's shared calls into the step's sums: ā = the activations' mean
        over all their positions, ĝ = the output gradients' sum (per backward vector),
        one row per example (Eqs. 20–21 on the stacked calls)."""
        for record in self.records:
            for group in record.shared.values():
                if not group.reached:
                    continue
                a_sum = required(group.a_sum, "the shared calls' activations")
                self._add_activation_rows(record, a_sum / group.positions, record.sums)
                for rows in group.g_sum.values():
                    self._add_gradient_rows(record, rows)
            record.shared.clear()

    def _add_activation_rows(self, record: LayerRecord, rows: Tensor, sums) -> None:
        """Σ āāᵀ of activation rows ``[k, d_in]`` into ``sums`` (with the bias column;
        only the row count when the weight is frozen)."""
        helper = record.helper
        if not helper.weight_trainable:  # bias only: ā = [1]
            rows = rows[:, :0]
        if self.keep_rows:
            sums.a_rows += append_rows(sums.a_parts, rows, helper.has_bias, self.factor_dtype)
        elif helper.weight_trainable:
            accumulate_a(sums, rows, helper.has_bias, self.factor_dtype)
        else:
            accumulate_a(sums, None, True, self.factor_dtype, count=rows.shape[0],
                         device=rows.device)

    @staticmethod
    def _commit(record: LayerRecord, call: LayerCall) -> None:
        """The call's A joins the step's A (its output gradient has arrived)."""
        into, own = record.sums, call.sums
        if own is None:
            return
        if own.a is not None:
            if into.a is None:
                into.a = own.a
            else:
                into.a.add_(own.a)
        into.a_rows += own.a_rows
        into.a_parts.extend(own.a_parts)
        call.sums = None

    def add_gradient(self, record: LayerRecord, grad: Tensor, row_scale: float = 1.0,
                     groups: tuple[Tensor, int] | None = None,
                     call: LayerCall | None = None, key: Any = 0) -> None:
        """Accumulate the rows of G from a gradient w.r.t. one call's output (and the
        call's A, the first time its gradient arrives).

        ``row_scale`` multiplies the gradient (so G by its square): 1/S undoes a loss
        scale S, √w weights a sampled or Hessian-root backward. ``key`` names the
        backward vector (calls sharing a dimension sum their gradients per vector).
        """
        start = self.clock()
        if call is not None:
            self._commit(record, call)
        helper = record.helper
        approx = KFACApprox.EXPAND if helper.diagonal_a else self.approx
        rows = gradient_rows(helper.shared_grad_outputs(grad.detach()), approx, groups)
        rows = rows.to(self.factor_dtype)
        if row_scale != 1.0:
            rows = rows * row_scale
        if call is not None and call.shared is not None:
            # summed over the forward's calls; G formed at the step
            group = call.shared
            if call.shared_a is not None:  # the call's activations join at its gradient
                total, positions = call.shared_a
                group.a_sum = total if group.a_sum is None else group.a_sum + total
                group.positions += positions
                call.shared_a = None
            group.reached = True
            group.g_sum[key] = rows if key not in group.g_sum else group.g_sum[key] + rows
        else:
            self._add_gradient_rows(record, rows)
        self.step_record.elapsed_s += self.clock() - start

    def _add_gradient_rows(self, record: LayerRecord, rows: Tensor) -> None:
        if self.keep_rows:
            record.sums.g_rows += append_rows(record.sums.g_parts, rows, False, self.factor_dtype)
        else:
            accumulate_g(record.sums, rows, self.factor_dtype)

    def clock(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _unreadable(x: Any) -> str | None:
    """Why a layer input cannot be captured (None if it can, or if it is not a tensor:
    such a call is not captured and its layer's gradient is reported as missing)."""
    if not isinstance(x, Tensor):
        return None
    if x.is_nested:
        return f"a nested (jagged) tensor input ({x.dtype})"
    if x.is_complex():
        return f"a complex input ({x.dtype})"
    return None


def _describe(err: Exception) -> str:
    """A one-line description of an error raised inside a hook."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"its input could not be read ({type(err).__name__}: {first[:200]})"


def _fp16_autocast() -> bool:
    """Whether float16 autocast is on for the CPU or CUDA now."""
    return any(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) is torch.float16
               for d in ("cpu", "cuda"))


def _is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter)."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")
