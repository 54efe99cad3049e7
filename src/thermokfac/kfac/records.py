"""What the capture keeps for one step: each preconditioned layer and its calls."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .factors import FactorSums
from .layers import LayerHelper


@dataclass(eq=False)
class SharedCalls:
    """The calls of one layer within one forward of the model with the same leading
    dimension N (its batch), under reduce: one weight-sharing dimension over all of
    them (the calls stacked; :class:`~thermokfac.enums.RepeatedCalls`).

    Attributes:
        a_sum: ``[N, d_in]`` Σ of the activations over the positions of every call
            whose output gradient arrived.
        positions: The positions summed (Σ R over those calls).
        g_sum: Per backward vector (``0`` for the user's backward; (call, vector) of a
            ``curvature_backward``): ``[N, d_out]`` Σ of the output gradients over the
            calls' positions, already scaled.
        reached: An output gradient of one of the calls arrived.
    """

    a_sum: Tensor | None = None
    positions: int = 0
    g_sum: dict = field(default_factory=dict)
    reached: bool = False


@dataclass(eq=False)
class LayerCall:
    """One captured forward call of a layer, waiting for its output gradient.

    The call's A contribution is formed at the forward (before any later in-place op
    can change the input) into its own sums, and joins the step's A when the call's
    output gradient first arrives: a call whose output is never back-propagated (a
    detached branch, an unused head, a recomputation) adds nothing.

    Attributes:
        groups: Row groups active at the call (``grouped_rows``).
        forward_id: Which call of the root module it belongs to (its backward's first
            gradient is where a skipped step's curvature is dropped).
        sums: This call's A sums (``a``, ``a_rows``, ``a_parts``) until committed.
        edge: Gradient edge of the output (``mc``/``type2``).
        hits: Output gradients received (empirical: more than one is reported).
        reached_by: Index of the ``curvature_backward`` call that reached it, or -1.
        shared: The forward's :class:`SharedCalls` this call belongs to (its A and G go
            there instead of ``sums``), or None.
        shared_a: The call's activations summed over its positions ``[N, d_in]`` and
            their number, until its output gradient arrives.
    """

    groups: tuple[Tensor, int] | None
    forward_id: int = 0
    sums: FactorSums | None = field(default_factory=FactorSums)
    edge: GradientEdge | None = None
    hits: int = 0
    reached_by: int = -1
    shared: SharedCalls | None = None
    shared_a: tuple[Tensor, int] | None = None


@dataclass
class LayerRecord:
    """One preconditioned layer: its helper and this step's captured sums.

    Attributes:
        layout: (weight, bias) preconditioned when this step's factors were captured
            (``helper.layout`` at the first call of the step).
        outputs: This step's calls with their gradient edges (``mc``/``type2``).
        pending: Calls whose forward started and whose output hook has not run yet
            (``None`` for a call that is not captured).
        shared: This step's :class:`SharedCalls` by (root forward, leading dimension).
    """

    name: str
    helper: LayerHelper
    sums: FactorSums = field(default_factory=FactorSums)
    outputs: list[LayerCall] = field(default_factory=list)
    layout: tuple[bool, bool] | None = None
    pending: list[LayerCall | None] = field(default_factory=list)
    shared: dict[tuple[int, int], SharedCalls] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingStep:
    """What the capture holds for the coming ``step()``: a read-only view.

    Attributes:
        examples: The example count of the step so far (0 when ambiguous or none).
        examples_problem: Why the count is ambiguous, or None.
        rows: ``{block: (activation rows, gradient rows)}`` captured so far.
        hook_calls: Forward pre-hook calls of the preconditioned layers (captured or
            not: eval mode and ``no_grad`` passes count).
        buffers: Blocks holding factor-sum buffers (released at every ``step()``).
    """

    examples: int
    examples_problem: str | None
    rows: dict[str, tuple[int, int]]
    hook_calls: int
    buffers: tuple[str, ...]


def pending_step(records: Iterable[LayerRecord], count: tuple[int, str | None],
                 hook_calls: int) -> PendingStep:
    """The :class:`PendingStep` of these records."""
    records = list(records)
    return PendingStep(
        examples=count[0], examples_problem=count[1],
        rows={r.name: (int(r.sums.a_rows), int(r.sums.g_rows)) for r in records},
        hook_calls=hook_calls,
        buffers=tuple(r.name for r in records if r.sums.a is not None or r.sums.g is not None
                      or r.sums.a_parts or r.sums.g_parts))


@dataclass
class StepRecord:
    """Everything the hooks observed since the last step — the one record the step's
    example count, factor sums and checks are derived from (:mod:`.checks`).

    Attributes:
        root_calls: Captured calls of the model itself.
        hook_calls: Calls of the preconditioned layers' hooks (captured or not).
        transformed_passes: Passes under a ``torch.func`` transform (not captured).
        fp16_autocast: A captured forward ran under float16 autocast.
        repeated_gradients: Layer outputs back-propagated again after their first.
        unbatched_calls: ``{layer: why}`` calls whose input shows no batch.
        group_mismatches: ``{layer: why}`` rows not matching ``grouped_rows``.
        layout_mismatches: ``{layer: why}`` a layer saw another batch than the model.
        problems: ``{layer: why}`` calls that could not be read (refused at the step).
        param_gradients: Gradient arrivals into preconditioned parameters.
        reached: Blocks whose parameters a backward reached.
        added_onto_update: A block whose gradient was about to accumulate onto the
            preconditioned gradient of the previous step (no zeroing in between).
        forward_mark: ``param_gradients`` at the last captured forward of the model.
        discarded: Backwards whose curvature was dropped (their gradients were reset
            without a step: a skipped step).
        refused_at: ``param_gradients`` when a step was refused, or None.
        curvature_calls, curvature_outputs, loss_terms, curvature_done: The
            ``mc``/``type2`` backwards of the step and their loss terms.
        elapsed_s: Seconds the hooks spent on this step's factors.
    """

    root_calls: int = 0
    hook_calls: int = 0
    transformed_passes: int = 0
    fp16_autocast: bool = False
    repeated_gradients: int = 0
    unbatched_calls: dict[str, str] = field(default_factory=dict)
    group_mismatches: dict[str, str] = field(default_factory=dict)
    layout_mismatches: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    param_gradients: int = 0
    reached: set[str] = field(default_factory=set)
    added_onto_update: str | None = None
    forward_mark: int = -1
    discarded: int = 0
    refused_at: int | None = None
    curvature_calls: int = 0
    curvature_outputs: list[torch.Tensor] = field(default_factory=list)
    loss_terms: int = 0
    curvature_done: bool = False
    elapsed_s: float = 0.0
