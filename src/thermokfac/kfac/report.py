"""What a K-FAC step reports, and the running counters derived from the reports.

:meth:`KFACPreconditioner.step <thermokfac.KFACPreconditioner.step>` returns a
:class:`StepReport`: its timings, its modelled device time, which blocks were prepared,
which passed their gradient through and why, and the events it counted.
``pre.stats`` is the :class:`StatsLedger`'s live dict of counters; each report's
``counts`` are its increments since the previous step (events between steps — a
discarded backward, a warning at a hook — go to the next report).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..solvers import LinearSolver, TimeBreakdown
from ..timing import StepTimings

#: The counters of ``KFACPreconditioner.stats`` (``kl_clip_scale`` is the last step's ν).
STAT_KEYS = ("nonfinite_factor_skips", "missing_factor_skips", "nonfinite_grad_skips",
             "nonfinite_update_skips", "solver_errors", "passthrough_layers",
             "float64_retries", "damping_increases", "prepare_failures", "kl_clip_scale",
             "transformed_passes", "trainable_changes", "ill_conditioned_solves",
             "repeated_gradients", "unbatched_layer_calls", "group_mismatches",
             "discarded_curvature", "multi_rank_warnings", "layout_mismatches",
             "fp16_without_grad_scaler", "changed_layers")

#: Why a block's gradient passed through unchanged ↦ the counter it adds to.
SKIP_COUNTERS = {"passthrough_layers", "nonfinite_grad_skips", "solver_errors",
                 "nonfinite_update_skips"}


@dataclass
class StepReport:
    """One step of the preconditioner.

    Attributes:
        step: Index of the step (0-based).
        timings: Wall-clock seconds of its parts and modelled device seconds
            (:class:`~thermokfac.timing.StepTimings`).
        factors_updated: Whether this step's curvature joined the estimates.
        prepared: Blocks whose factors were prepared (Method 2) or inverted (Method 1)
            this step, failed attempts included (those pass their gradient through,
            counted in ``prepare_failures`` or ``solver_errors``).
        skipped: Blocks whose gradient passed through unchanged, with the counter that
            says why (``passthrough_layers``: nothing prepared or another trainable
            layout; ``nonfinite_grad_skips``; ``solver_errors``;
            ``nonfinite_update_skips``).
        counts: Events counted since the previous step closed, during this step
            included (the increments of ``pre.stats``' counters).
        kl_clip_scale: ν applied to every U (1 when the clip did not bind).
        solve_errors: On a step that measured them (``measure_solve_error_every``),
            ``{block: {"a"|"g": relative error}}`` of each measured solve against float64
            (:meth:`~thermokfac.kfac.caches.FactorCache.solve_error`); else empty.
        predicted_solve_errors: The solver's predictions of those errors, made before
            each solve (:meth:`~thermokfac.solvers.LinearSolver.predict_error`: the
            thermodynamic solver's OU moments, Method 2), in the same layout; empty
            where it has no model.
        measure_s: Seconds spent measuring them, left out of ``timings.update_s``.
        local_modeled_s: This rank's modelled device seconds (``timings`` holds the
            step's: the busiest rank's under data parallelism).
    """

    step: int
    timings: StepTimings = field(default=None)  # type: ignore[assignment]
    factors_updated: bool = False
    prepared: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    kl_clip_scale: float = 1.0
    solve_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    predicted_solve_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    measure_s: float = 0.0
    local_modeled_s: float = 0.0
    jobs: list[TimeBreakdown] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.timings is None:
            self.timings = StepTimings(step=self.step)

    @contextmanager
    def timed(self, part: str, clock: Callable[[], float] = time.perf_counter
              ) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timings.<part>``.

        Args:
            part: A :class:`~thermokfac.StepTimings` field (``"curvature_s"``, ...).
            clock: The clock read before and after the block (seconds).

        Raises:
            AttributeError: ``part`` is not a timing field.
        """
        start = clock()
        try:
            yield
        finally:
            setattr(self.timings, part, getattr(self.timings, part) + clock() - start)

    @property
    def max_solve_error(self) -> float | None:
        """The largest error in :attr:`solve_errors`, or None when none was measured."""
        found = [e for errors in self.solve_errors.values() for e in errors.values()]
        return max(found) if found else None

    def __repr__(self) -> str:
        return (f"StepReport(step={self.step}, factors_updated={self.factors_updated}, "
                f"prepared={len(self.prepared)}, skipped={len(self.skipped)}, "
                f"kl_clip_scale={self.kl_clip_scale:.3g})")


class StatsLedger:
    """The running counters (one live dict) and each step's share of them.

    Attributes:
        stats: Every event counted so far, ``kl_clip_scale`` the last step's ν — the
            dict ``pre.stats`` returns (the guards count into it between steps too).
    """

    def __init__(self) -> None:
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)
        self.stats["kl_clip_scale"] = 1.0
        self._closed = dict(self.stats)

    def count(self, key: str, amount: float = 1.0) -> None:
        """Count an event."""
        self.stats[key] += amount

    def close(self, report: StepReport) -> None:
        """``report.counts``: what was counted since the previous step closed."""
        self.stats["kl_clip_scale"] = report.kl_clip_scale
        report.counts = {k: v - self._closed.get(k, 0.0) for k, v in self.stats.items()
                         if k != "kl_clip_scale" and v != self._closed.get(k, 0.0)}
        self._closed = dict(self.stats)

    def restore(self, stats: dict[str, float]) -> None:
        """Continue from a checkpoint's counters (in the same live dict)."""
        self.stats.clear()
        self.stats.update({**dict.fromkeys(STAT_KEYS, 0.0), "kl_clip_scale": 1.0, **stats})
        self._closed = dict(self.stats)


def device_time(solver: LinearSolver, jobs: list[TimeBreakdown]) -> list[float]:
    """Device time of a step's jobs: over the solver's SPUs when it has a hardware model
    (the busiest SPU), else their sum — under the hardware model's settle model, then
    under ``rc``, ``rc_over_alpha_min`` and ``target_error`` (zeros without a model)."""
    hardware = getattr(solver, "hardware", None)
    if hardware is None:
        return [sum(j.total_s for j in jobs), 0.0, 0.0, 0.0]
    return [hardware.step_time(jobs), *hardware.step_times(jobs).values()]
