"""Timing model of a thermodynamic solver (SPU) — accounting only, no numerics.

Defaults are the paper's App. E assumptions: RC = 1 µs (R = 1 kΩ, C = 1 nF), 16-bit
input and output, a 50 Gb/s digital link. One solve of k right-hand sides on an
n-dimensional SPU costs

* **load**: the right-hand sides, n·k values × ``input_bits`` / link bandwidth (the
  matrix itself is programmed once per prepare: n² values, or 2·b·n resistor values
  in the resistor-array mode of App. E); the bits are the timed solver's DAC bits — one
  setting, on the solver, which :class:`~thermokfac.solvers.ThermodynamicSolver` hands
  to its hardware model —, :data:`LINK_BITS` where nothing sets them;
* **settle**: by ``settle_model`` —
  ``"rc"``: RC, the paper's own timing ("RC is kept as the relaxation time, because of
  the problem-dependence of α_min", App. E; the default);
  ``"rc_over_alpha_min"``: τ = RC/α_min, the worst case over the spectrum (App. E);
  ``"target_error"``: the burn-in t₀·RC chosen for a target error (bias ≤ e^{−α_min t₀});
* **integrate**: the averaging window T·RC under ``"target_error"`` (zero otherwise: at
  the physical noise level the paper reads the settled mean directly);
* **read-out**: n·k values × ``output_bits`` (the solver's ADC bits, likewise) / link
  bandwidth.

The k right-hand sides run on parallel oscillator banks, so they settle together.
Several SPUs (``n_spus``) run different factors in parallel; a step takes as long as
the busiest SPU, plus — when the link is shared — all transfers in sequence
(:meth:`HardwareModel.step_time`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass
from enum import Enum

from ..enums import parse_enum
from .quantize import check_bits

#: Bits per value on the link where neither the hardware model nor the solver it times
#: sets them: the paper's 16-bit device (App. E).
LINK_BITS = 16


class SettleModel(str, Enum):
    """How the settling time of one solve is counted (see the module docstring)."""

    RC = "rc"
    RC_OVER_ALPHA_MIN = "rc_over_alpha_min"
    TARGET_ERROR = "target_error"


@dataclass(frozen=True)
class TimeBreakdown:
    """Modelled seconds of one device operation.

    ``compute_by_model`` holds, for an operation whose settling depends on the settle
    model, its compute seconds (settle + integrate) under every model, as
    ``((model, seconds), ...)``; empty for one that does not settle (programming a
    matrix), whose time is the same under every model (:meth:`under`).
    """

    load_s: float = 0.0
    settle_s: float = 0.0
    integrate_s: float = 0.0
    readout_s: float = 0.0
    compute_by_model: tuple[tuple[str, float], ...] = ()

    @property
    def transfer_s(self) -> float:
        """Seconds on the link: loading plus read-out."""
        return self.load_s + self.readout_s

    @property
    def compute_s(self) -> float:
        """Seconds on the device: settling plus the averaging window."""
        return self.settle_s + self.integrate_s

    @property
    def total_s(self) -> float:
        """Transfer plus compute seconds of this operation on one SPU."""
        return self.transfer_s + self.compute_s

    def as_dict(self) -> dict[str, float]:
        """Every part in seconds and ``total_s`` (without the per-model compute)."""
        out = {k: v for k, v in asdict(self).items() if k != "compute_by_model"}
        return {**out, "total_s": self.total_s}

    def compute_under(self, model: SettleModel | str) -> float:
        """Compute seconds under ``model`` (this operation's own when it has none).

        Args:
            model: A settle model (``"rc"``, ``"rc_over_alpha_min"``, ``"target_error"``).

        Returns:
            Seconds (NaN where the operation could not be timed under ``model``).

        Raises:
            ValueError: ``model`` is not a settle model.
        """
        return dict(self.compute_by_model).get(SettleModel(model).value, self.compute_s)

    def under(self, model: SettleModel | str) -> TimeBreakdown:
        """This operation timed under ``model`` (its compute as one settle).

        Args:
            model: A settle model.

        Returns:
            A breakdown with the same transfers and ``model``'s compute seconds.

        Raises:
            ValueError: ``model`` is not a settle model.
        """
        if not self.compute_by_model:
            return self
        return TimeBreakdown(self.load_s, self.compute_under(model), 0.0, self.readout_s)

    def __add__(self, other: TimeBreakdown) -> TimeBreakdown:
        models = {m for m, _ in self.compute_by_model + other.compute_by_model}
        return TimeBreakdown(self.load_s + other.load_s, self.settle_s + other.settle_s,
                             self.integrate_s + other.integrate_s,
                             self.readout_s + other.readout_s,
                             tuple((m, self.compute_under(m) + other.compute_under(m))
                                   for m in sorted(models)))

    def scaled(self, factor: float) -> TimeBreakdown:
        """Every part (and every model's compute) times ``factor`` (e.g. repeats).

        Args:
            factor: The multiplier, ≥ 0.

        Returns:
            The scaled breakdown.
        """
        return TimeBreakdown(self.load_s * factor, self.settle_s * factor,
                             self.integrate_s * factor, self.readout_s * factor,
                             tuple((m, s * factor) for m, s in self.compute_by_model))


@dataclass(frozen=True)
class HardwareModel:
    """An SPU bank and its digital link.

    Args:
        rc_s: The RC time constant in seconds (paper: 1 µs).
        input_bits: Bits per value sent to the device (matrix entries, right-hand
            sides). None (the default): the bits of the solver it times — a
            :class:`~thermokfac.solvers.ThermodynamicSolver` sets its own ``input_bits``
            here — or :data:`LINK_BITS` where nothing sets them (a solver loading exact
            values, or the model used on its own). A solver whose bits differ from a
            value set here is refused (:class:`~thermokfac.solvers.thermo.ThermoConfig`).
        output_bits: Bits per value read back (ADC); None as for ``input_bits``.
        link_gbps: Digital link bandwidth in Gb/s (paper: 50).
        n_spus: Number of SPUs working in parallel (each takes whole factors).
        shared_link: All SPUs share one link (transfers serialise) or each has its own.
        max_dim: Largest matrix an SPU holds (None: unbounded). Larger factors are
            solved by block Gauss–Seidel over SPU-sized blocks; each sweep counts.
        settle_model: ``"rc"`` (default), ``"rc_over_alpha_min"`` or ``"target_error"``.
    """

    rc_s: float = 1e-6
    input_bits: int | None = None
    output_bits: int | None = None
    link_gbps: float = 50.0
    n_spus: int = 1
    shared_link: bool = True
    max_dim: int | None = None
    settle_model: SettleModel = SettleModel.RC

    def __post_init__(self) -> None:
        for name in ("rc_s", "link_gbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number")
        for name in ("input_bits", "output_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        if isinstance(self.n_spus, bool) or not isinstance(self.n_spus, int) or self.n_spus < 1:
            raise ValueError(f"n_spus={self.n_spus!r} must be a positive integer")
        if self.max_dim is not None and (not isinstance(self.max_dim, int) or self.max_dim < 2):
            raise ValueError(f"max_dim={self.max_dim!r} must be an integer >= 2 or None")
        object.__setattr__(self, "settle_model",
                           parse_enum(SettleModel, self.settle_model, "settle_model"))

    @property
    def load_bits(self) -> int:
        """Bits per value the link carries to the device: ``input_bits``, or
        :data:`LINK_BITS` when unset."""
        return LINK_BITS if self.input_bits is None else self.input_bits

    @property
    def read_bits(self) -> int:
        """Bits per value read back: ``output_bits``, or :data:`LINK_BITS` when unset."""
        return LINK_BITS if self.output_bits is None else self.output_bits

    # ---------------------------------------------------------------- pieces
    def transfer_s(self, values: float, bits: int) -> float:
        """Seconds to move ``values`` numbers of ``bits`` bits over the link.

        Args:
            values: How many numbers.
            bits: Bits per number.

        Returns:
            ``values · bits / link bandwidth`` in seconds.
        """
        return values * bits / (self.link_gbps * 1e9)

    def time_program(self, n: int, *, array_rows: int | None = None) -> TimeBreakdown:
        """Programming the matrix: n² values, or 2·b·n resistor values (array mode).

        Args:
            n: Dimension of the matrix.
            array_rows: b, the rows of the resistor array (None: the dense matrix).

        Returns:
            The load time as a breakdown.
        """
        values = 2 * array_rows * n if array_rows is not None else n * n
        return TimeBreakdown(load_s=self.transfer_s(values, self.load_bits))

    def settle_s(self, alpha_min: float, t0_rc: float,
                 settle_model: SettleModel | str | None = None) -> float:
        """Settling seconds under ``settle_model`` (this model's when None).

        Args:
            alpha_min: Smallest eigenvalue of the device matrix (RC units).
            t0_rc: Burn-in in RC units.
            settle_model: Overrides the model's ``settle_model``.

        Returns:
            Seconds: RC, RC/α_min or RC·t₀.

        Raises:
            ValueError: If the model needs a quantity that is not a positive finite
                number (α_min for ``rc_over_alpha_min``, t₀ for ``target_error``).
        """
        model = self._model(settle_model)
        if model is SettleModel.RC:
            return self.rc_s
        if model is SettleModel.RC_OVER_ALPHA_MIN:
            if not (math.isfinite(alpha_min) and alpha_min > 0):
                raise ValueError(f"settle model 'rc_over_alpha_min' needs alpha_min > 0, got "
                                 f"{alpha_min!r}")
            return self.rc_s / alpha_min
        if not (math.isfinite(t0_rc) and t0_rc >= 0):
            raise ValueError(f"settle model 'target_error' needs a burn-in t0 >= 0 (RC), got "
                             f"{t0_rc!r}")
        return self.rc_s * t0_rc

    def time_solve(self, n: int, k: int, *, alpha_min: float, t0_rc: float, window_rc: float,
                   settle_model: SettleModel | str | None = None) -> TimeBreakdown:
        """One bank of k right-hand sides on an n-dimensional SPU.

        Args:
            n: Dimension of the system.
            k: Number of right-hand sides (parallel banks).
            alpha_min: Smallest eigenvalue of the device matrix (RC units).
            t0_rc: Burn-in in RC units (used by ``"target_error"``).
            window_rc: Averaging window T in RC units (used by ``"target_error"``).
            settle_model: Overrides the model's ``settle_model``.
        """
        model = self._model(settle_model)
        integrate = self.rc_s * window_rc if model is SettleModel.TARGET_ERROR else 0.0
        return TimeBreakdown(load_s=self.transfer_s(n * k, self.load_bits),
                             settle_s=self.settle_s(alpha_min, t0_rc, model),
                             integrate_s=integrate,
                             readout_s=self.transfer_s(n * k, self.read_bits))

    def all_settle_models(self, n: int, k: int, *, alpha_min: float, t0_rc: float,
                          window_rc: float) -> dict[str, TimeBreakdown]:
        """:meth:`time_solve` under each settle model, for reports.

        Args:
            n: Dimension of the system.
            k: Number of right-hand sides.
            alpha_min: Smallest eigenvalue of the device matrix (RC units).
            t0_rc: Burn-in in RC units.
            window_rc: Averaging window T in RC units.

        Returns:
            ``{settle model: breakdown}``.

        Raises:
            ValueError: A model needs a quantity that is not positive and finite.
        """
        return {m.value: self.time_solve(n, k, alpha_min=alpha_min, t0_rc=t0_rc,
                                         window_rc=window_rc, settle_model=m)
                for m in SettleModel}

    def time_solve_all(self, n: int, k: int, *, alpha_min: float, t0_rc: float,
                       window_rc: float) -> TimeBreakdown:
        """:meth:`time_solve` under this model's ``settle_model``, carrying the compute
        seconds under every settle model (``compute_by_model``) for reports.

        Args:
            n: Dimension of the system.
            k: Number of right-hand sides.
            alpha_min: Smallest eigenvalue of the device matrix (RC units).
            t0_rc: Burn-in in RC units.
            window_rc: Averaging window T in RC units.

        Returns:
            The breakdown (NaN compute under a model that cannot be computed).

        Raises:
            ValueError: This model's own settle model cannot be computed.
        """
        own = self.time_solve(n, k, alpha_min=alpha_min, t0_rc=t0_rc, window_rc=window_rc)
        by_model = []
        for m in SettleModel:  # another model that cannot be computed is NaN, not a guess
            try:
                by_model.append((m.value, self.time_solve(
                    n, k, alpha_min=alpha_min, t0_rc=t0_rc, window_rc=window_rc,
                    settle_model=m).compute_s))
            except ValueError:
                by_model.append((m.value, math.nan))
        return TimeBreakdown(own.load_s, own.settle_s, own.integrate_s, own.readout_s,
                             tuple(by_model))

    def step_times(self, jobs: list[TimeBreakdown]) -> dict[str, float]:
        """:meth:`step_time` of the same jobs under every settle model (NaN for a model
        that some job could not be timed under).

        Args:
            jobs: The step's device operations.

        Returns:
            ``{settle model: seconds}``.
        """
        out = {}
        for m in SettleModel:
            timed = [j.under(m) for j in jobs]
            out[m.value] = math.nan if any(math.isnan(j.total_s) for j in timed) \
                else self.step_time(timed)
        return out

    # ----------------------------------------------------------- aggregation
    def step_time(self, jobs: list[TimeBreakdown]) -> float:
        """Modelled time of a step's device work: jobs spread over ``n_spus``.

        Jobs are assigned greedily, longest first, to the least-loaded SPU (LPT). With a
        shared link all transfers serialise and add to the busiest SPU's compute time;
        with one link per SPU each SPU's transfers and computes run in sequence.

        Args:
            jobs: The step's device operations (prepares and solve banks).

        Returns:
            Seconds (0 without jobs).
        """
        if not jobs:
            return 0.0
        if self.shared_link:
            busiest = _lpt([j.compute_s for j in jobs], self.n_spus)
            return sum(j.transfer_s for j in jobs) + busiest
        return _lpt([j.total_s for j in jobs], self.n_spus)

    def _model(self, settle_model: SettleModel | str | None) -> SettleModel:
        if settle_model is None:
            return self.settle_model
        return parse_enum(SettleModel, settle_model, "settle_model")


def time_stats(timing: TimeBreakdown) -> dict[str, float]:
    """A device operation's time as solver statistics: transfer and compute seconds,
    and the compute under every settle model (``modeled_compute_s/<model>``)."""
    out = {"modeled_transfer_s": timing.transfer_s, "modeled_compute_s": timing.compute_s}
    out.update({f"modeled_compute_s/{m}": t for m, t in timing.compute_by_model})
    return out


def from_stats(modeled_s: float, stats: dict[str, float]) -> TimeBreakdown:
    """The :class:`TimeBreakdown` behind a solver result's time and statistics."""
    if "modeled_transfer_s" not in stats:
        return TimeBreakdown(settle_s=modeled_s)
    by_model = tuple((m.value, stats[f"modeled_compute_s/{m.value}"]) for m in SettleModel
                     if f"modeled_compute_s/{m.value}" in stats)
    return TimeBreakdown(load_s=stats["modeled_transfer_s"],
                         settle_s=stats.get("modeled_compute_s", 0.0),
                         compute_by_model=by_model)


def _lpt(durations: list[float], machines: int) -> float:
    loads = [0.0] * machines
    heapq.heapify(loads)
    for d in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)
