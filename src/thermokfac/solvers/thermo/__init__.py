"""Simulator of a thermodynamic (Ornstein–Uhlenbeck) analog linear solver."""

from .config import (
    AdcRange,
    AlphaSource,
    Backend,
    InverseMode,
    Quantizer,
    Readout,
    ThermoConfig,
)
from .solver import ThermodynamicSolver
from .spectral import Spectrum

__all__ = ["AdcRange", "AlphaSource", "Backend", "InverseMode", "Quantizer", "Readout",
           "Spectrum", "ThermoConfig", "ThermodynamicSolver"]
