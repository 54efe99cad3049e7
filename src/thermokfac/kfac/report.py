"""What a K-FAC step reports, and the running counters derived from the reports.

:meth:`KFACPreconditioner.step <thermokfac.KFACPreconditioner.step>` returns a
:class:`StepReport`: its timings, its modelled device time, which blocks were prepared,
which passed their gradient through and why, and the events it counted.
``pre.stats`` is the :class:`StatsLedger`'s view: the counts of every report so far,
plus those of events between steps (a discarded backward, a warning at a hook).
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
             "fp16_without_grad_scaler")

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
        prepared: Blocks prepared (Method 2) or inverted (Method 1) this step.
        skipped: Blocks whose gradient passed through unchanged, with the counter that
            says why (``passthrough_layers``: nothing prepared or another trainable
            layout; ``nonfinite_grad_skips``; ``solver_errors``;
            ``nonfinite_update_skips``).
        counts: Events counted during the step and since the previous one (the keys of
            ``pre.stats``).
        kl_clip_scale: ν applied to every U (1 when the clip did not bind).
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
    local_modeled_s: float = 0.0
    jobs: list[TimeBreakdown] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.timings is None:
            self.timings = StepTimings(step=self.step)

    @contextmanager
    def timed(self, part: str, clock: Callable[[], float] = time.perf_counter
              ) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timings.<part>``."""
        start = clock()
        try:
            yield
        finally:
            setattr(self.timings, part, getattr(self.timings, part) + clock() - start)

    def __repr__(self) -> str:
        return (f"StepReport(step={self.step}, factors_updated={self.factors_updated}, "
                f"prepared={len(self.prepared)}, skipped={len(self.skipped)}, "
                f"kl_clip_scale={self.kl_clip_scale:.3g})")


class StatsLedger:
    """Running totals of the reports' counts, plus events not yet in a report.

    Attributes:
        pending: Events counted since the last report (the guards add to it).
        totals: Counts of every report so far.
        kl_clip_scale: ν of the latest step.
    """

    def __init__(self) -> None:
        self.pending: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)
        self.totals: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)
        self.kl_clip_scale = 1.0

    def count(self, key: str, amount: float = 1.0) -> None:
        """Count an event."""
        self.pending[key] += amount

    def close(self, report: StepReport) -> None:
        """Move the pending events into ``report.counts`` and the totals."""
        report.counts = {k: v for k, v in self.pending.items() if v and k != "kl_clip_scale"}
        for key, value in report.counts.items():
            self.totals[key] += value
            self.pending[key] = 0.0
        self.kl_clip_scale = report.kl_clip_scale

    def view(self) -> dict[str, float]:
        """Totals with the pending events, and the last ν as ``kl_clip_scale``."""
        out = {k: self.totals[k] + self.pending[k] for k in STAT_KEYS}
        out["kl_clip_scale"] = self.kl_clip_scale
        return out

    def restore(self, stats: dict[str, float]) -> None:
        """Continue from a checkpoint's counters."""
        self.totals = {**dict.fromkeys(STAT_KEYS, 0.0), **stats}
        self.pending = dict.fromkeys(STAT_KEYS, 0.0)
        self.kl_clip_scale = float(stats.get("kl_clip_scale", 1.0))
        self.totals["kl_clip_scale"] = 0.0


def device_time(solver: LinearSolver, jobs: list[TimeBreakdown]) -> list[float]:
    """Device time of a step's jobs: over the solver's SPUs when it has a hardware model
    (the busiest SPU), else their sum — under the hardware model's settle model, then
    under ``rc``, ``rc_over_alpha_min`` and ``target_error`` (zeros without a model)."""
    hardware = getattr(solver, "hardware", None)
    if hardware is None:
        return [sum(j.total_s for j in jobs), 0.0, 0.0, 0.0]
    return [hardware.step_time(jobs), *hardware.step_times(jobs).values()]
