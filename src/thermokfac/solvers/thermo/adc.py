"""The output ADC of a solve: quantization with a full scale the hardware can know."""

from __future__ import annotations

from torch import Tensor

from ..quantize import quantize_output
from .config import AdcRange, ThermoConfig


class Adc:
    """Output quantization with a full scale set from what the hardware knows."""

    def __init__(self, cfg: ThermoConfig, rhs: Tensor, alpha_min: float) -> None:
        self.bits = cfg.output_bits
        self.headroom = cfg.adc_headroom
        self.clipped = 0
        self.full_scale: Tensor | None = None
        if self.bits is not None and cfg.adc_range is AdcRange.BOUND:
            self.full_scale = rhs.norm(dim=0) / alpha_min

    @property
    def active(self) -> bool:
        return self.bits is not None

    def calibrate(self, reading: Tensor) -> None:
        self.full_scale = self.headroom * reading.abs().amax(dim=0)

    def __call__(self, x: Tensor) -> Tensor:
        if self.bits is None:
            return x
        if self.full_scale is None:  # path backends: the first sample sets the range
            self.calibrate(x)
        full_scale = self.full_scale
        if full_scale is None:  # calibrate() always sets it
            raise RuntimeError("the ADC's full scale was not set by its calibration")
        out, clipped = quantize_output(x, self.bits, full_scale)
        self.clipped += clipped
        return out
