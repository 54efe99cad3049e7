"""Per-step timing breakdown of the K-FAC update (the parts of the paper's Fig. 2).

The gradient itself (forward + backward) is the user's to time; the preconditioner
records the other three parts — curvature (factor) construction, inversion/prepare and
computing U — plus the hardware time its solver models. Clocks are read after
``torch.cuda.synchronize()`` when the model lives on a GPU.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class StepTimings:
    """Wall-clock seconds spent by ``KFACPreconditioner.step`` and its hooks in one step.

    Attributes:
        step: Index of the step (0-based).
        curvature_s: Factor construction: hook work during forward/backward (and the
            extra backward passes of ``mc``/``type2``) plus the moving average.
        inversion_s: Preparing the factors (factorise / invert; every
            ``inv_update_steps``).
        update_s: Computing U = (G+λI)⁻¹ DΘ (A+λI)⁻¹ and writing it into ``.grad``.
        solve_s: The part of ``update_s`` spent inside the solver's two solve banks
            (Method 2; 0 for Method 1, which multiplies by stored inverses): the work a
            device takes over under Method 2. The rest of ``update_s`` (forming DΘ,
            checks, the KL clip, writing ``.grad``) stays digital.
        modeled_hardware_s: Hardware time reported by the solver for this step's
            prepares and solves, under its hardware model's settle model (0 for digital
            solvers).
        modeled_rc_s, modeled_rc_over_alpha_min_s, modeled_target_error_s: The same
            device work timed under each settle model (App. E): settling in RC (the
            paper's convention), in RC/α_min, or in the burn-in and averaging window the
            simulation used for its target error — with the α_min the simulation used.
    """

    step: int
    curvature_s: float = 0.0
    inversion_s: float = 0.0
    update_s: float = 0.0
    solve_s: float = 0.0
    modeled_hardware_s: float = 0.0
    modeled_rc_s: float = 0.0
    modeled_rc_over_alpha_min_s: float = 0.0
    modeled_target_error_s: float = 0.0

    @property
    def total_s(self) -> float:
        """Curvature + inversion + update: the K-FAC work of the step (seconds)."""
        return self.curvature_s + self.inversion_s + self.update_s

    def as_dict(self) -> dict[str, float]:
        """Every field and ``total_s`` (seconds), for CSV rows and JSON."""
        return {**asdict(self), "total_s": self.total_s}


class TimingLog:
    """The last ``maxlen`` :class:`StepTimings` plus running totals over all steps."""

    PARTS = ("curvature_s", "inversion_s", "update_s", "solve_s", "modeled_hardware_s",
             "modeled_rc_s", "modeled_rc_over_alpha_min_s", "modeled_target_error_s")

    def __init__(self, maxlen: int = 10_000) -> None:
        self.history: deque[StepTimings] = deque(maxlen=maxlen)
        self.totals = dict.fromkeys(self.PARTS, 0.0)
        self.steps = 0
        self.sync_cuda = False

    def append(self, timings: StepTimings) -> None:
        self.history.append(timings)
        for name in self.PARTS:
            self.totals[name] += getattr(timings, name)
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """Medians over the kept history, and means over every step, of each part."""
        out: dict[str, float] = {"steps": float(self.steps)}
        for f in fields(StepTimings):
            if f.name == "step":
                continue
            values = [getattr(t, f.name) for t in self.history]
            out[f"median_{f.name}"] = statistics.median(values) if values else 0.0
            out[f"mean_{f.name}"] = self.totals[f.name] / self.steps if self.steps else 0.0
        return out

    def clock(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def measure(self, timings: StepTimings, part: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timings.<part>``."""
        start = self.clock()
        try:
            yield
        finally:
            setattr(timings, part, getattr(timings, part) + self.clock() - start)


class TimedSolves:
    """A solver seen through its ``solve`` calls: their wall time adds up in
    :attr:`seconds` (read with ``clock``, which synchronises CUDA when it must)."""

    def __init__(self, solver, clock) -> None:
        self.solver, self.clock, self.seconds = solver, clock, 0.0

    def solve(self, *args, **kwargs):
        start = self.clock()
        try:
            return self.solver.solve(*args, **kwargs)
        finally:
            self.seconds += self.clock() - start

    def __getattr__(self, name: str):
        return getattr(self.solver, name)


def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
