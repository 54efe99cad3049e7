"""Configuration of the thermodynamic solver simulator (paper Sec. 4.2–4.5, App. E)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum

from ...enums import parse_enum
from ..hardware import LINK_BITS, HardwareModel
from ..quantize import check_bits

BOLTZMANN_J_PER_K = 1.380649e-23


class Backend(str, Enum):
    """How the device is simulated.

    ``closed-form``: sample the device's output from its exact Gaussian law (one
    ``eigh`` per prepare, O(n²k) per solve; with ``warm_start``, the window mean and the
    end state jointly, average read-out). ``trajectory``: exact discrete transitions
    of the sampled path (per-sample ADC, warm start). ``euler-maruyama``: the reference
    integrator for non-ideal physics (device mismatch: a non-symmetric realised matrix).
    """

    CLOSED_FORM = "closed-form"
    TRAJECTORY = "trajectory"
    EULER_MARUYAMA = "euler-maruyama"


class Readout(str, Enum):
    """What the device returns: the time average over [t₀, t₀+T], or the mean of N
    samples Δ apart after the burn-in t₀."""

    AVERAGE = "average"
    SAMPLES = "samples"


class Quantizer(str, Enum):
    """Input quantizer of the programmed matrix (:mod:`thermokfac.solvers.quantize`)."""

    NEAREST = "nearest"
    CONSERVATIVE = "conservative"
    STOCHASTIC = "stochastic"


class AdcRange(str, Enum):
    """How the ADC full scale is set, from what the hardware knows.

    ``calibrate``: an extra, independent device read sets it (``adc_headroom`` × its
    largest magnitude per column; costs one more solve). ``bound``: ‖b‖₂/α_min, which
    no entry of the solution can exceed (never clips, coarser steps).
    """

    CALIBRATE = "calibrate"
    BOUND = "bound"


class InverseMode(str, Enum):
    """How the inverse is obtained: solves against identity columns, or the sample
    covariance × β of equilibrium samples with b = 0 (Eq. 23)."""

    SOLVES = "solves"
    COVARIANCE = "covariance"


class AlphaSource(str, Enum):
    """Where α_min (for the automatic t₀ and T) comes from: ``damping`` — the bound
    α_min ≥ λ/s that the device knows from the damping it was given (guaranteed);
    ``spectrum`` — the smallest eigenvalue of the programmed matrix (tighter)."""

    DAMPING = "damping"
    SPECTRUM = "spectrum"


_ENUMS = {"backend": Backend, "readout": Readout, "quantizer": Quantizer,
          "adc_range": AdcRange, "inverse_mode": InverseMode, "alpha_min_source": AlphaSource}


@dataclass(frozen=True)
class ThermoConfig:
    """Every knob of the simulated device. Times are in units of RC.

    Noise: β defaults to the physics, β = C·V²/(k_B·T) for capacitance C, voltage scale V
    (the voltage that represents 1.0) and temperature T: 2.4·10¹¹ for 1 nF, 1 V, 300 K.

    A factor larger than ``hardware.max_dim`` is solved by block Gauss–Seidel over
    SPU-sized blocks (:mod:`.blocks`), at most ``block_sweeps`` sweeps, stopping when the
    relative change falls below ``target_error``.

    Timing of a solve: ``t0_rc`` (burn-in) and ``window_rc`` (T, average readout) or
    ``num_samples``/``sample_spacing_rc`` (samples readout, trajectory, Euler–Maruyama).
    Left as None they follow from ``target_error`` ε: t₀ = ln(√2/ε)/α_min bounds the
    relative bias by ε/√2, and T = 4n/(β ε² α_min² ‖b‖²) bounds the expected relative
    variance 2 tr(M⁻²)/(β T ‖x*‖²) by ε²/2 using only bounds the device knows
    (tr M⁻² ≤ n/α_min², ‖x*‖ ≥ ‖b‖/α_max with α_max ≤ 1 after scaling).

    The covariance inverse (``inverse_mode="covariance"``, Eq. 23) reads
    ``covariance_samples`` equilibrium samples ``covariance_spacing_rc`` apart, 1/α_min
    (one relaxation time) when None; every backend simulates exactly that spacing and
    the ``target_error`` clock charges it, so a shorter spacing is cheaper and less
    accurate on the device and in the simulation alike.
    """

    backend: Backend = Backend.CLOSED_FORM
    beta: float | None = None
    capacitance_f: float = 1e-9
    voltage_scale_v: float = 1.0
    temperature_k: float = 300.0
    readout: Readout = Readout.AVERAGE
    t0_rc: float | None = None
    window_rc: float | None = None
    num_samples: int = 64
    sample_spacing_rc: float | None = None
    target_error: float = 1e-3
    alpha_min_source: AlphaSource = AlphaSource.DAMPING
    warm_start: bool = False
    input_bits: int | None = None
    quantizer: Quantizer = Quantizer.CONSERVATIVE
    output_bits: int | None = None
    adc_range: AdcRange = AdcRange.CALIBRATE
    adc_headroom: float = 2.0
    mitigation_samples: int = 1
    inverse_mode: InverseMode = InverseMode.SOLVES
    covariance_samples: int = 100_000
    covariance_spacing_rc: float | None = None
    mismatch_sigma: float = 0.0
    mismatch_seed: int = 0
    em_dt_rc: float = 0.05
    block_sweeps: int = 50
    hardware: HardwareModel = field(default_factory=HardwareModel)

    def __post_init__(self) -> None:
        for name, enum_cls in _ENUMS.items():
            object.__setattr__(self, name, parse_enum(enum_cls, getattr(self, name), name))
        _positive(self, "capacitance_f", "voltage_scale_v", "temperature_k", "adc_headroom",
                  "em_dt_rc")
        _positive(self, "beta", "t0_rc", "window_rc", "sample_spacing_rc",
                  "covariance_spacing_rc", optional=True)
        if self.beta is not None and self.beta > MAX_BETA:
            raise ValueError(f"beta={self.beta!r} is out of range; valid: (0, {MAX_BETA:g}] "
                             "(the averaging window T ∝ 1/β would underflow float64; the "
                             "physical β = C·V²/(k_B·T) is about 2.4e11 at 1 nF, 1 V, 300 K)")
        if not (isinstance(self.target_error, (int, float)) and not isinstance(
                self.target_error, bool) and MIN_TARGET_ERROR <= self.target_error < 1):
            raise ValueError(f"target_error={self.target_error!r} is out of range; valid: "
                             f"[{MIN_TARGET_ERROR:g}, 1) (T ∝ 1/ε² must stay representable)")
        for name in ("num_samples", "mitigation_samples", "covariance_samples", "block_sweeps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("input_bits", "output_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        if not (isinstance(self.mismatch_sigma, (int, float)) and 0 <= self.mismatch_sigma < 1):
            raise ValueError(f"mismatch_sigma={self.mismatch_sigma!r} must lie in [0, 1)")
        if self.mismatch_sigma > 0 and self.backend is not Backend.EULER_MARUYAMA:
            raise ValueError("device mismatch (mismatch_sigma > 0) needs backend="
                             "'euler-maruyama': the realised matrix is not symmetric")
        if (self.warm_start and self.backend is Backend.CLOSED_FORM
                and self.readout is not Readout.AVERAGE):
            raise ValueError("warm_start with backend='closed-form' models the average "
                             "read-out (readout='average'); a samples read-out needs "
                             "backend='trajectory' or 'euler-maruyama'")
        if self.mitigation_samples > 1 and (self.input_bits is None
                                            or self.quantizer is not Quantizer.STOCHASTIC):
            raise ValueError("mitigation_samples > 1 averages independent stochastic "
                             "roundings: set input_bits and quantizer='stochastic'")
        if not isinstance(self.hardware, HardwareModel):
            raise ValueError(f"hardware={self.hardware!r} must be a HardwareModel")
        hardware_of(self)  # the bits set twice must agree (the solver resolves them)

    @property
    def beta_value(self) -> float:
        """β in use: the given value, or C·V²/(k_B·T)."""
        if self.beta is not None:
            return float(self.beta)
        return self.capacitance_f * self.voltage_scale_v**2 / (
            BOLTZMANN_J_PER_K * self.temperature_k)

    def as_dict(self) -> dict:
        """Every setting as a plain value (enums by their value), for JSON reports."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        out["hardware"] = {f.name: getattr(self.hardware, f.name) for f in fields(self.hardware)}
        out["hardware"]["settle_model"] = self.hardware.settle_model.value
        out["beta_value"] = self.beta_value
        return out


#: Largest β accepted: T = 4n/(β ε² α²) and its square must stay normal float64 numbers.
MAX_BETA = 1e60
#: Smallest target error accepted (T ∝ 1/ε²).
MIN_TARGET_ERROR = 1e-12


def _positive(cfg: ThermoConfig, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive finite number")


def hardware_of(cfg: ThermoConfig) -> HardwareModel:
    """``cfg.hardware`` with the solver's DAC/ADC bits: one setting, on the solver (the
    hardware model a :class:`~thermokfac.solvers.ThermodynamicSolver` times with).

    The hardware model's ``input_bits``/``output_bits`` left unset take the solver's, or
    :data:`~thermokfac.solvers.hardware.LINK_BITS` where the solver loads or reads exact
    values. Bits set on the hardware model must equal those.

    Raises:
        ValueError: The hardware model sets bits that differ from the solver's (or other
            than ``LINK_BITS`` for values the solver loads or reads exactly), naming both.
    """
    hardware = cfg.hardware
    for name, part in (("input_bits", "DAC (loads)"), ("output_bits", "ADC (read-outs)")):
        solver_bits, device_bits = getattr(cfg, name), getattr(hardware, name)
        wanted = LINK_BITS if solver_bits is None else solver_bits
        if device_bits is None:
            hardware = (replace(hardware, input_bits=wanted) if name == "input_bits" else
                        replace(hardware, output_bits=wanted))
        elif device_bits != wanted:
            simulated = ("exact values, carried as LINK_BITS = 16-bit numbers"
                         if solver_bits is None else f"{solver_bits}-bit values")
            raise ValueError(
                f"hardware.{name}={device_bits} but the solver's {name}={solver_bits!r}: the "
                f"device model would charge {device_bits}-bit transfers for the {part} "
                f"while the simulation uses {simulated}; set the bits once, on the solver "
                f"({name}=...), and leave HardwareModel's unset (it takes them)")
    return hardware
