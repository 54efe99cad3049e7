"""The checks that make a K-FAC step right or loud: pure functions of the step record.

Each check reads the :class:`~.records.StepRecord` (and what it is told) and returns
:class:`Finding` s; none changes the capture or anything else. The preconditioner hands
every finding to one place, :meth:`~.guards.Reporter.report`, which counts it in
``pre.stats``, warns once, or raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .records import LayerRecord, StepRecord


@dataclass(frozen=True)
class Finding:
    """What a check found.

    Attributes:
        message: What happened and what to do.
        counter: The ``stats`` counter it adds ``count`` to, if any.
        count: How much it adds.
        key: Warn once per key (None: no warning, only the count).
        error: Raise this instead (``ValueError`` for bad input, ``RuntimeError`` for a
            call sequence that cannot be right).
    """

    message: str
    counter: str | None = None
    count: float = 1.0
    key: str | None = None
    error: type[Exception] | None = None


def call_order(record: StepRecord, step: int, removed: bool, trainable: bool,
               unseen: bool) -> Finding | None:
    """A step that cannot be right: after ``remove()``, a backward about to add onto the
    previous step's preconditioned gradient, or no backward since the last step
    (``unseen``: parameters replaced since, whose gradients were not watched)."""
    if removed:
        return Finding("this preconditioner was removed (pre.remove()): build a new one to "
                       "precondition again", error=RuntimeError)
    if record.added_onto_update is not None:
        return Finding(
            f"step() at step {step}: the backward added to the preconditioned gradient "
            f"that the previous step left in layer {record.added_onto_update!r}'s .grad (no "
            "zero_grad() since). Under gradient accumulation call pre.step() once, after "
            "the last micro-batch's backward, then optimizer.step() and zero_grad()",
            error=RuntimeError)
    if record.reached or not trainable or unseen:
        return None
    return Finding(
        f"step() at step {step} found no gradient from a backward pass since the previous "
        "step: call loss.backward() before pre.step(), and pre.step() once per optimizer "
        "step, after all backwards of that step (a second step() would precondition the "
        "gradient twice)", error=RuntimeError)


def changed_parameters(records: Mapping[str, LayerRecord]) -> Finding | None:
    """A layer whose weight became computed (pruning, a parametrization) or shared with
    another layer (tied) after building."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for name, record in records.items():
        problem = record.helper.leaf_problem()
        module = record.helper.module
        for param in record.helper.parameters:
            owner, holder = owners.setdefault(id(param), (name, module))
            if holder is not module:  # blocks of one module share its packed weights
                problem = f"a parameter shared with layer {owner!r} (tied)"
        if problem is not None:
            return Finding(
                f"layer {name!r} now has {problem}; it changed after the preconditioner was "
                "built (pruning, a parametrization, tying weights): build the preconditioner "
                "after such changes", error=RuntimeError)
    return None


def multi_rank(averages_factors: bool, world_size: int) -> Finding | None:
    """A one-process preconditioner on several ranks: each rank keeps its own factors."""
    if averages_factors or world_size <= 1:
        return None
    return Finding(
        f"torch.distributed runs {world_size} ranks but this KFACPreconditioner uses only "
        "this rank's factors: if the model is DistributedDataParallel-wrapped the replicas "
        "drift apart; use thermokfac.distributed.DistributedKFACPreconditioner",
        counter="multi_rank_warnings", key="ranks")


def fp16_without_scaler(record: StepRecord, has_scaler: bool) -> Finding | None:
    """A float16-autocast forward without ``grad_scaler=``: G may carry a loss scale."""
    if not record.fp16_autocast or has_scaler:
        return None
    return Finding(
        "the forward ran under float16 autocast but no grad_scaler= was given: if the loss "
        "is scaled (torch.amp.GradScaler), G carries the scale squared, which shrinks the "
        "damping; pass grad_scaler=scaler (counted in stats['fp16_without_grad_scaler'])",
        counter="fp16_without_grad_scaler", key="fp16")


def refused_then_new_backward(record: StepRecord) -> Finding | None:
    """After a refused step, another backward before this ``step()``: the captured
    curvature mixes two backwards (it is discarded)."""
    if record.refused_at is None or record.param_gradients == record.refused_at:
        return None
    return Finding(
        "a step() was refused and another backward followed before the next step(): the "
        "curvature captured since then mixes both backwards and is discarded (no factor "
        "update this step), counted in stats['discarded_curvature']",
        counter="discarded_curvature", key="discarded")


def unstepped(record: StepRecord) -> bool:
    """Whether the curvature captured since the last step belongs only to gradients
    being thrown away without a step (after a forward that follows the last backward,
    the split waits for that forward's backward)."""
    return record.param_gradients > 0 and record.forward_mark < record.param_gradients


def after_capture(record: StepRecord, step: int, hooks_ran: bool) -> list[Finding]:
    """What the hooks saw that the step must report or refuse, in that order."""
    found = []
    if record.transformed_passes:
        found.append(Finding(
            "forward passes under a torch.func transform (vmap/grad/jvp...) are not "
            "captured by K-FAC and not counted as examples; counted in "
            "stats['transformed_passes']", counter="transformed_passes",
            count=record.transformed_passes, key="transformed"))
    if record.problems:
        listing = "; ".join(f"{n}: {why}" for n, why in record.problems.items())
        names = sorted(record.problems)
        found.append(Finding(
            f"K-FAC cannot capture layers {names} at step {step}: {listing}. Pass "
            f"skip_layers={names} to leave them to the base optimizer", error=ValueError))
    if record.reached and not hooks_ran:
        found.append(Finding(
            f"K-FAC captured nothing at step {step} although the backward reached "
            f"{len(record.reached)} preconditioned layers: the module hooks did not run (a "
            "tracer or exported program that bypasses nn.Module hooks, or a model compiled "
            "and run before the preconditioner was built: call torch.compiler.reset() after "
            "building it)", error=RuntimeError))
    if record.repeated_gradients:
        found.append(Finding(
            "a layer's output was back-propagated more than once in one step (e.g. "
            "torch.autograd.grad before loss.backward, or two backwards through one "
            "forward): only the first gradient enters G, which is right only when they are "
            "the same loss's; counted in stats['repeated_gradients']",
            counter="repeated_gradients", count=record.repeated_gradients, key="repeated"))
    for key, layers, text in (
            ("unbatched_layer_calls", record.unbatched_calls,
             "received an input whose leading dimension is not the model call's batch (a "
             "batch-less input broadcast afterwards, e.g. a position embedding of "
             "arange(T): only batch-summed gradients reach it — expand it to the batch with "
             "pos.expand(N, T); or a sequence-first model: use batch-first inputs); those "
             "calls are not captured"),
            ("group_mismatches", record.group_mismatches,
             "inside grouped_rows saw rows that do not match the membership; they were "
             "treated one row per example"),
            ("layout_mismatches", record.layout_mismatches,
             "saw another batch than the model's call (the example count then needs "
             "pre.step(num_examples=N); under kfac_approx='reduce' the Linear layers of a "
             "sequence-first model average over the batch, not the sequence: use "
             "batch-first inputs or kfac_approx='expand')")):
        if layers:
            listing = "; ".join(f"{n}: {why}" for n, why in layers.items())
            found.append(Finding(f"layers {text}: {listing}; counted in stats[{key!r}]",
                                 counter=key, count=len(layers), key=key))
    return found


def missing(record: StepRecord, layer: LayerRecord, step: int) -> Finding | None:
    """A layer the backward reached whose factors were not captured (it keeps its
    previous factors, or passes its gradient through)."""
    if layer.name not in record.reached or (layer.sums.a_rows and layer.sums.g_rows):
        return None
    return Finding(
        f"layer {layer.name!r} received a gradient at step {step} but its factors were not "
        "captured (its forward ran outside the model's forward hooks, under no_grad/eval, "
        "or its output was not used through autograd; with fisher_type 'mc'/'type2', "
        "inside a reentrant activation checkpoint: use use_reentrant=False); its factor "
        "update is skipped, counted in stats['missing_factor_skips']",
        counter="missing_factor_skips", key="missing")


def nonfinite(name: str, step: int) -> Finding:
    """Non-finite factors of one block: its update is skipped."""
    return Finding(
        f"non-finite activations or gradients in layer {name!r} at step {step}: its factor "
        "update is skipped (counted in stats['nonfinite_factor_skips'])",
        counter="nonfinite_factor_skips", key="nonfinite")


def present(findings: Iterable[Finding | None]) -> list[Finding]:
    """The findings that are there."""
    return [f for f in findings if f is not None]
