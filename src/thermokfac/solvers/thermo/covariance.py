"""Method 1 on the device: the inverse from the equilibrium covariance (paper Eq. 23).

With b = 0 the device's state is distributed as N(0, β⁻¹M⁻¹), so β times the sample
covariance of N equilibrium samples estimates M⁻¹, with expected relative Frobenius error
√((tr²Σ/‖Σ‖²_F + 1)/N) ≤ √((n+1)/N) for independent samples.

The N samples are Δ = ``covariance_spacing_rc`` apart on the path (1/α_min by default).
Neighbours are correlated (ρ = e^{−λΔ} per mode), so the error exceeds the independent
value; :func:`.moments.covariance_inverse_error` predicts it and every backend simulates
the same Δ:

* closed-form: the sample covariance drawn without the samples (:func:`.backends.
  wishart_covariance`) with each entry's exact mean and variance for samples Δ apart;
  the ADC adds its quantization variance LSB²/12 (Sheppard), with the full scale from
  one calibration sample.
* trajectory / Euler–Maruyama: the actual samples of the path, each read through the
  ADC. Euler–Maruyama's stationary covariance is β⁻¹M⁻¹(I − hM/2)⁻¹, so its estimate is
  corrected by (I − hM/2) with the programmed M.

Timing: one settle (t₀), then N samples, each after one settle and followed by a
read-out of n values. A settle is Δ under ``target_error`` (the time simulated), RC/α_min
under ``rc_over_alpha_min`` and RC under ``rc`` (the paper's convention, far shorter than
the Δ the accuracy needs unless Δ ≤ 1 RC).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..._stack import user_stacklevel
from ..base import Prepared
from ..hardware import HardwareModel, SettleModel, TimeBreakdown, time_stats
from ..quantize import levels
from . import backends, moments
from .adc import Adc
from .config import Backend, ThermoConfig
from .spectral import Spectrum


def covariance_inverse(cfg: ThermoConfig, hardware: HardwareModel, prepared: Prepared,
                       spectra: Sequence[Spectrum | None], sched: backends.Schedule,
                       generator: torch.Generator | None
                       ) -> tuple[Tensor, float, dict[str, float]]:
    """(M + λI)⁻¹ ≈ β·Cov(x) from the equilibrium samples of each programmed matrix
    (``spectra``), averaged; returns (inverse, modelled s, stats).

    The stats carry the timing and ``covariance_predicted_error``, the expected relative
    Frobenius error of one programmed matrix's estimate (the ADC's bias included); a
    UserWarning says when it exceeds 0.5.
    """
    beta = cfg.beta_value
    n, dtype = prepared.n, prepared.dtype
    samples = cfg.covariance_samples
    spacing = float(prepared.tensors["covariance_spacing"])
    estimates, predicted = [], 0.0
    for i, kept in enumerate(spectra):
        if kept is None:  # the covariance mode keeps every spectrum (keep_vectors)
            raise ValueError("the covariance inverse needs the device matrix's spectrum, "
                             "which this prepared state did not keep")
        spec = kept.completed()
        extra = 0.0
        if cfg.backend is Backend.CLOSED_FORM:
            if cfg.output_bits is not None:
                probe = torch.randn(n, 1, generator=generator, dtype=torch.float64,
                                    device=prepared.device)
                calib = spec.apply([(lambda lam: (beta * lam).rsqrt(), probe.to(dtype))])
                lsb = cfg.adc_headroom * float(calib.abs().max()) / levels(cfg.output_bits)
                extra = lsb**2 / 12
            cov = backends.wishart_covariance(spec, samples, beta, extra, generator, dtype,
                                              spacing)
        else:
            cov = _path_covariance(cfg, prepared, i, spec, sched, samples, spacing, generator)
        estimates.append(beta * cov)
        predicted = max(predicted, moments.covariance_inverse_error(
            spec.evals, spacing, samples, beta, extra))
    inverse = torch.stack(estimates).mean(0) / float(prepared.tensors["scale"])
    inverse = (inverse + inverse.mT) / 2
    timing = _covariance_time(cfg, hardware, prepared, samples)
    if predicted > 0.5:
        warnings.warn(
            f"the covariance inverse's predicted relative error is {predicted:.3g} "
            f"({samples} samples {spacing:.3g} RC apart, alpha_min="
            f"{float(prepared.tensors['alpha_min']):.3g}): raise covariance_samples or "
            "covariance_spacing_rc, or use inverse_mode='solves'",
            UserWarning, stacklevel=user_stacklevel())
    return inverse, timing.total_s, {**time_stats(timing),
                                     "covariance_predicted_error": predicted}


def _path_covariance(cfg: ThermoConfig, prepared: Prepared, index: int, spec,
                     sched: backends.Schedule, samples: int, spacing: float,
                     generator: torch.Generator | None) -> Tensor:
    n, dtype = prepared.n, prepared.dtype
    zero = torch.zeros(n, 1, dtype=dtype, device=prepared.device)
    path = backends.Schedule(sched.readout, sched.t0, sched.window, samples, spacing)
    adc = Adc(cfg, zero, float(prepared.tensors["alpha_min"]))

    def run(hook):
        def read(x):
            return hook(adc(x))
        if cfg.backend is Backend.TRAJECTORY:
            return backends.trajectory(spec, zero, None, path, cfg.beta_value, generator, read)
        return backends.euler_maruyama(prepared.tensors[f"realised_{index}"], zero, None, path,
                                       cfg.em_dt_rc, cfg.beta_value, generator, read)

    cov = backends.sample_covariance(run, n, dtype, prepared.device)
    if cfg.backend is Backend.EULER_MARUYAMA:  # undo the scheme's variance inflation
        programmed = spec.matrix(lambda lam: lam, dtype)
        cov = cov - (cfg.em_dt_rc / 2) * cov @ programmed
    return cov


def _covariance_time(cfg: ThermoConfig, hw: HardwareModel, prepared: Prepared, samples: int
                     ) -> TimeBreakdown:
    alpha = float(prepared.tensors["alpha_min"])
    t0 = float(prepared.tensors["t0"])
    spacing = float(prepared.tensors["covariance_spacing"])

    def compute(model: SettleModel) -> tuple[float, float]:
        return hw.settle_s(alpha, t0, model), samples * hw.settle_s(alpha, spacing, model)

    settle, between = compute(hw.settle_model)
    one = TimeBreakdown(settle_s=settle, integrate_s=between,
                        readout_s=hw.transfer_s(samples * prepared.n, hw.read_bits),
                        compute_by_model=tuple((m.value, sum(compute(m)))
                                               for m in SettleModel))
    return one.scaled(cfg.mitigation_samples)
