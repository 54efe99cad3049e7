"""What a preconditioner lets you read and save: factors, layer states, memory,
timings, and its whole state for a checkpoint."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..timing import StepTimings
from .layer_state import LayerState
from .state import Snapshot, pack, solver_settings, unpack


class Inspection:
    """Read-only views and checkpoint state of :class:`KFACPreconditioner` (a mixin:
    it reads the preconditioner's layers, capture, timing log and configuration)."""

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Moving-average factors ``{name: (A, G)}`` (symmetric copies).

        A is ``[a_dim, a_dim]`` with the bias as last row/column, or the diagonal as a
        vector ``[V]`` for an embedding; G is ``[d_out, d_out]``. Layers without factors
        yet are absent.
        """
        return {name: s.symmetric_factors() for name, s in self._states.items()
                if s.a is not None and s.g is not None}

    def layer_state(self, name: str) -> LayerState:
        """The full state of one layer (factors, prepared solver state, damping used)."""
        return self._states[name]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the preconditioner holds between steps: ``factors`` (moving averages),
        ``prepared`` (factorisations or inverses) and their ``total``."""
        parts = [s.memory_bytes() for s in self._states.values()]
        out = {k: sum(p[k] for p in parts) for k in ("factors", "prepared")}
        return {**out, "total": out["factors"] + out["prepared"]}

    @property
    def pending_curvature_s(self) -> float:
        """Seconds the hooks spent on this step's factors so far (before :meth:`step`)."""
        return self._capture.elapsed_s

    @property
    def last_timings(self) -> StepTimings | None:
        """Timing breakdown of the latest step (see :class:`StepTimings`)."""
        return self.timing.history[-1] if self.timing.history else None

    def timing_summary(self) -> dict[str, float]:
        """Medians and means of each timing part over the recorded steps."""
        return self.timing.summary()

    def state_dict(self) -> dict[str, Any]:
        """Factors, prepared states, counters, statistics and the generator state."""
        return pack(self._snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, moved to the model's device and, for the moving
        averages, cast to ``factor_dtype`` (a state saved on another device or from a
        float64 model loads as ``torch.optim`` state does).

        Raises:
            ValueError: The state is from another model (naming the mismatched layers),
                solver or method.
        """
        restored = unpack(self._snapshot(), state)
        device = next(self.model.parameters()).device
        for layer in restored.layers.values():
            layer.to_(device, self.config.factor_dtype)
        self._states, self.steps, self.stats = restored.layers, restored.steps, restored.stats
        self._begin_step()

    def _snapshot(self) -> Snapshot:
        return Snapshot(
            steps=self.steps, layers=self._states,
            shapes={name: (r.helper.a_dim, r.helper.d_out) for name, r in self._records.items()},
            stats=self.stats, generator=self.generator, solver=self.solver.name,
            method=self.config.method.value, solver_settings=solver_settings(self.solver),
            layouts={name: r.helper.possible_shapes() for name, r in self._records.items()})
