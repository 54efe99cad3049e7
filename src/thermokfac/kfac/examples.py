"""The example count of a step: how many examples the loss averaged over.

``loss_reduction="mean"`` with the empirical Fisher scales G by N. N is counted from the
calls of the root module (the model itself): each call's N is the leading dimension of
its tensor arguments (found through tuples, lists, mappings and dataclasses; 0-d
tensors are ignored), or the number of groups inside ``grouped_rows``. A call counts
only once a gradient reaches its outputs, so detached passes, forwards after the
backward and activation-checkpoint recomputations add nothing. The count is ambiguous —
and the caller must be told so — when the arguments' leading dimensions disagree, when
no tensor argument is visible, when the model itself was never called, or when several
counted calls were made before one backward into the parameters (a siamese model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from .layers import LayerHelper


@dataclass(eq=False)
class RootCall:
    """One call of the root module: its examples count once its output gets a gradient.

    Attributes:
        examples: Leading dimension of its tensor arguments (or groups), if unambiguous.
        problem: Why its examples cannot be counted, if they cannot.
        backward_at: Parameter gradients seen before this call (two counted calls with
            the same value were made before one backward: a siamese pattern).
        counted: Whether a gradient reached its outputs.
    """

    examples: int
    problem: str | None
    backward_at: int
    counted: bool = False


class ExampleCounter:
    """The root calls of one step and their examples."""

    def __init__(self) -> None:
        self.calls: list[RootCall] = []
        self._pending: list[RootCall | None] = []
        self.current: int | None = None  # N of the root call in progress, if clear

    def reset(self) -> None:
        self.calls.clear()
        self._pending.clear()
        self.current = None

    def drop_counted(self) -> None:
        """Forget the calls whose backward already ran (their curvature is being
        discarded); the calls still waiting for theirs are kept, as made before any
        backward of the step."""
        self.calls = [c for c in self.calls if not c.counted]
        for call in self.calls:
            call.backward_at = 0

    def skip(self) -> None:
        """A root call that is not counted (inactive, transformed)."""
        self.current = None
        self._pending.append(None)

    def start(self, args: tuple, kwargs: dict, groups: tuple[Tensor, int] | None,
              backward_at: int) -> None:
        """A root call begins: read its examples from its arguments."""
        examples, problem = 0, None
        self.current = None
        if groups is not None:
            examples = groups[1]
        else:
            dims = set(leading_dims((args, kwargs)))
            if len(dims) == 1:
                examples = self.current = dims.pop()
            else:
                problem = (f"the model's tensor inputs have different leading dimensions "
                           f"{sorted(dims)}" if dims else
                           "the model's inputs hold no tensor with a batch dimension")
        self._pending.append(RootCall(examples, problem, backward_at))

    def contradict(self, problem: str) -> None:
        """A layer of the root call in progress saw another batch than its arguments
        showed (a sequence-first model): its count is ambiguous."""
        call = self._pending[-1] if self._pending else None
        if call is not None and call.problem is None:
            call.problem = problem

    def finish(self, output, paused: Callable[[], bool]) -> None:
        """A root call returned: count it when a gradient reaches its outputs (at once
        when no output can carry one), unless ``paused()`` then."""
        self.current = None
        call = self._pending.pop() if self._pending else None
        if call is None:
            return
        self.calls.append(call)
        carriers = [t for t in tensors_in(output) if t.requires_grad]
        if not carriers:
            call.counted = True
            return

        def counted(grad: Tensor) -> None:
            if not paused():
                call.counted = True
        for tensor in carriers:
            tensor.register_hook(counted)

    def batchless(self, helper: LayerHelper, x: Tensor, grouped: bool) -> str | None:
        """Why a layer input does not carry the current root call's batch (None if it
        does, or if that cannot be told). A layer applied to a batch-less input (a
        position embedding of ``arange(T)`` broadcast over the batch afterwards, an
        unbatched example) only ever sees batch-summed gradients. A Linear may see any
        number of rows (tokens, a masked subset, MoE routing); 1-D inputs, unbatched
        images and embedding indices that are not a whole number of the batch are what
        a batch-less input looks like."""
        n = self.current
        if n is None or n <= 1 or grouped:
            return None
        lead = x.shape[0] if x.ndim > 0 else 1
        if (x.ndim <= 1 and not helper.diagonal_a) or helper.unbatched_input(x) \
                or (helper.diagonal_a and lead % n != 0):
            return f"input of shape {tuple(x.shape)} while the model's call has {n} examples"
        return None

    def count(self) -> tuple[int, str | None]:
        """(N, None) from the calls whose outputs got a gradient, or (0, why N is
        ambiguous)."""
        counted = [c for c in self.calls if c.counted]
        for call in counted:
            if call.problem is not None:
                return 0, call.problem
        at = [c.backward_at for c in counted]
        if len(set(at)) < len(at):
            return 0, (
                f"the model was called {len(at)} times and several calls were made before "
                "one backward into its parameters (a siamese or contrastive loss may average "
                "over fewer examples than the calls hold, while micro-batches are "
                "back-propagated one by one; run auxiliary passes — crafting adversarial "
                "examples — inside `with pre.paused():`)")
        if not counted:
            return 0, ("no call of the model itself received a gradient in this step (its "
                       "submodules were called directly, e.g. model.head(model.body(x)))")
        return sum(c.examples for c in counted), None


def tensors_in(obj, depth: int = 0) -> Iterable[Tensor]:
    """Every tensor in ``obj``: through tuples, lists, mappings and dataclasses."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth > 8:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item, depth + 1)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from tensors_in(item, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name, None), depth + 1)


def leading_dims(obj) -> list[int]:
    """Leading dimensions of the tensors of ``obj`` with at least one dimension.

    >>> import torch
    >>> leading_dims(({"x": torch.zeros(4, 3)}, torch.tensor(1.0), [torch.zeros(4)]))
    [4, 4]
    """
    return [t.shape[0] for t in tensors_in(obj) if t.ndim > 0]
