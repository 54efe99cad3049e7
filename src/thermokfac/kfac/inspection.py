"""What a preconditioner lets you read and save: factors, blocks, memory, timings, and
its whole state for a checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..solvers import LinearSolver
from ..timing import StepTimings, TimingLog
from .blocks import KroneckerBlock
from .records import LayerRecord, PendingStep, pending_step
from .state import Snapshot, pack, solver_settings, unpack

if TYPE_CHECKING:
    from .capture import CurvatureCapture
    from .config import KFACConfig
    from .parallel import Plan
    from .report import StatsLedger


class Inspection:
    """Read-only views and checkpoint state of :class:`KFACPreconditioner` (a mixin:
    it reads the preconditioner's blocks, capture, timing log and configuration)."""

    # What the mixin reads from the preconditioner (set by its constructor).
    model: nn.Module
    config: KFACConfig
    solver: LinearSolver
    plan: Plan
    timing: TimingLog
    generator: torch.Generator
    steps: int
    _blocks: dict[str, KroneckerBlock]
    _records: dict[str, LayerRecord]
    _capture: CurvatureCapture
    _ledger: StatsLedger

    if TYPE_CHECKING:
        @property
        def factor_dtype(self) -> torch.dtype: ...

        @property
        def stats(self) -> dict[str, float]: ...

        def block(self, name: str) -> KroneckerBlock: ...

        def _new_blocks(self) -> dict[str, KroneckerBlock]: ...

        def _begin_step(self) -> None: ...

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Moving-average factors ``{name: (A, G)}`` (symmetric copies).

        A is ``[a_dim, a_dim]`` with the bias as last row/column, or the diagonal as a
        vector ``[V]`` for an embedding; G is ``[d_out, d_out]``. Blocks without factors
        yet (or in the rows mode, which never forms them) are absent.
        """
        out = {}
        for name, block in self._blocks.items():
            pair = block.factors()
            if pair is not None:
                out[name] = pair
        return out

    def layer_state(self, name: str) -> KroneckerBlock:
        """The Kronecker block ``name`` (its estimates, prepared state and the damping
        in effect: ``damping``, ``a_prep``/``g_prep``, ``a_inv``/``g_inv``); the same as
        :meth:`block`."""
        return self.block(name)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the preconditioner holds between steps: ``factors`` (moving averages),
        ``prepared`` (factorisations or inverses) and their ``total``."""
        parts = [b.memory_bytes() for b in self._blocks.values()]
        out = {k: sum(p[k] for p in parts) for k in ("factors", "prepared")}
        return {**out, "total": out["factors"] + out["prepared"]}

    def pending_step(self) -> PendingStep:
        """What the hooks captured for the coming ``step()``: the example count, the
        rows per block, the layers' hook calls (a read-only snapshot)."""
        return pending_step(self._records.values(), self._capture.example_count(),
                            self._capture.step_record.hook_calls)

    @property
    def pending_curvature_s(self) -> float:
        """Seconds the hooks spent on this step's factors so far (before :meth:`step`)."""
        return self._capture.step_record.elapsed_s

    @property
    def last_timings(self) -> StepTimings | None:
        """Timing breakdown of the latest step (see :class:`StepTimings`)."""
        return self.timing.history[-1] if self.timing.history else None

    def timing_summary(self) -> dict[str, float]:
        """Medians and means of each timing part over the recorded steps."""
        return self.timing.summary()

    def state_dict(self) -> dict[str, Any]:
        """Estimates, prepared states, counters, statistics and the generator state.

        Under data parallelism this is a collective when ranks hold only their own
        blocks' prepared state (``mem-opt``, FSDP2's owner blocks): call it on every
        rank; every rank then returns the whole state, which any number of ranks can
        load (each keeps what it owns).
        """
        state = pack(self._snapshot())
        state["layers"] = self.plan.communicator.gather_states(state["layers"],
                                                               self.plan.assignment)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, moved to the model's device and, for the moving
        averages, cast to ``factor_dtype`` (a state saved on another device or from a
        float64 model loads as ``torch.optim`` state does). States of the previous
        format version are migrated; nothing changes unless the whole state loads.

        Raises:
            ValueError: The state is from another model (naming the mismatched layers),
                solver or method, or of an unknown format version.
        """
        restored = unpack(self._snapshot(), state)
        device = next(self.model.parameters()).device
        blocks = self._new_blocks()
        for name, block in blocks.items():
            if not self.plan.assignment.holds_estimates(name):
                continue  # another rank owns it (FSDP2): it stays empty here
            block.load_state_dict(restored.layers[name])
            block.to_(device, self.factor_dtype)
            if not self.plan.assignment.holds_cache(name):
                block.drop_cache()
        self.generator.set_state(restored.generator_state)
        self._blocks, self.steps = blocks, restored.steps
        self._ledger.restore(restored.stats)
        self._begin_step()

    def _snapshot(self) -> Snapshot:
        return Snapshot(
            steps=self.steps, layers={n: b.state_dict() for n, b in self._blocks.items()},
            shapes={name: _shape(b) for name, b in self._blocks.items()},
            stats=self.stats, generator_state=self.generator.get_state(),
            solver=self.solver.name, method=self.config.method.value,
            solver_settings=solver_settings(self.solver),
            layouts={name: b.helper.possible_shapes() for name, b in self._blocks.items()})


def _shape(block: KroneckerBlock) -> tuple[int, int]:
    """(A, G) dimensions of the block's estimates: those of the trainable layout they
    were captured with (a ``requires_grad`` change takes effect at the next factor
    update), else of the parameters trainable now."""
    shapes = block.helper.possible_shapes()
    if block.layout is not None and block.layout in shapes:
        return shapes[block.layout]
    return block.helper.a_dim, block.helper.d_out
