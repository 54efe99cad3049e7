"""The thermodynamic linear solver: a simulated SPU behind the ``LinearSolver`` interface.

Conventions (one scaling, stated once):

* **Scaling.** The damped factor M + λI is divided by s = max_i Σ_j |(M + λI)_ij|, the
  largest absolute row sum (the largest total conductance of a node), so that this
  conductance maps to 1/RC. By Gershgorin every eigenvalue of the device matrix
  M̃ = (M + λI)/s is at most 1: α_max ≤ 1, α_min = λ_min(M + λI)/s ≥ λ/s, and the
  relaxation time is τ = RC/α_min (App. E). Right-hand sides are divided by their
  largest magnitude (the DAC's full scale) and the answer is scaled back.
* **Programming.** With ``input_bits`` the device matrix is quantized (conservative,
  nearest or stochastic; nearest/stochastic results that are not positive definite fall
  back to the conservative quantizer, counted in ``stats['quantizer_fallbacks']``), and
  the right-hand sides are rounded to nearest on the same number of bits.
* **Reading.** One solve returns the time average (or the mean of N samples) after the
  burn-in t₀, through the ADC when ``output_bits`` is set; the inverse comes from solves
  against identity columns or from the equilibrium covariance (Eq. 23).

Times reported in ``modeled_time_s`` come from :class:`~thermokfac.solvers.hardware.HardwareModel`.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._linalg import symmetrize_lower
from ..base import LinearSolver, Prepared
from ..hardware import TimeBreakdown, time_stats
from ..quantize import (
    is_positive_definite,
    levels,
    quantize_conservative,
    quantize_nearest,
    quantize_stochastic,
)
from . import backends
from .adc import Adc
from .backends import Schedule
from .blocks import prepare_blocks, solve_blocks
from .config import (
    AdcRange,
    AlphaSource,
    Backend,
    InverseMode,
    Quantizer,
    Readout,
    ThermoConfig,
    hardware_of,
)
from .covariance import covariance_inverse
from .spectral import Spectrum


class ThermodynamicSolver(LinearSolver):
    """Simulated thermodynamic (OU) solver; see :class:`ThermoConfig` for every option.

    Args:
        config: A :class:`ThermoConfig` (default: the paper's device, closed-form).
        max_damping_increases: See :class:`~thermokfac.solvers.LinearSolver`.
        **overrides: Fields of :class:`ThermoConfig` to change, e.g. ``input_bits=8``.

    Raises:
        ValueError: An override that is not a :class:`ThermoConfig` field, or a value
            out of its range (named, with the range).

    >>> solver = ThermodynamicSolver(t0_rc=200.0)
    >>> prepared = solver.prepare(torch.eye(3), damping=0.0)
    >>> result = solver.solve(prepared, torch.ones(3), generator=torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(result.x, torch.ones(3), atol=1e-4)), result.modeled_time_s > 0
    (True, True)
    """

    name = "thermodynamic"

    def __init__(self, config: ThermoConfig | None = None, *, max_damping_increases: int = 4,
                 **overrides: Any) -> None:
        super().__init__(max_damping_increases=max_damping_increases)
        valid = {f.name for f in fields(ThermoConfig)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown thermodynamic solver options {unknown}; valid: "
                             f"{sorted(valid)}")
        self.config = replace(config or ThermoConfig(), **overrides)
        #: The hardware model that times this solver: ``config.hardware`` with the
        #: solver's DAC/ADC bits (:func:`~.config.hardware_of`).
        self.hardware = hardware_of(self.config)
        self._inner: ThermodynamicSolver | None = None
        if self.hardware.max_dim is not None:  # the per-SPU solver of block Gauss–Seidel
            self._inner = ThermodynamicSolver(replace(
                self.config, hardware=replace(self.hardware, max_dim=None)))

    def __repr__(self) -> str:
        cfg = self.config
        return (f"ThermodynamicSolver(backend={cfg.backend.value!r}, input_bits={cfg.input_bits}"
                f", output_bits={cfg.output_bits})")

    # ------------------------------------------------------------------ prepare
    def _prepare(self, m: Tensor, damping: float, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor] | None:
        max_dim = self.hardware.max_dim
        if self._inner is not None and max_dim is not None and m.shape[0] > max_dim:
            return prepare_blocks(max_dim, self._inner, m, damping, generator)
        damped = symmetrize_lower(m)
        damped.diagonal().add_(damping)
        scale = float(damped.abs().sum(dim=1).max())
        if not math.isfinite(scale) or scale <= 0:
            return None
        device = damped / scale
        return self._program(device, damping / scale, scale, generator)

    def prepare_rows(self, rows: Tensor, row_scale: float, damping: float, *,
                     generator: torch.Generator | None = None) -> Prepared:
        """Resistor-array mode (App. E): realise row_scale·RᵀR + λI from rows R ``[b, n]``.

        The n×n matrix is never formed: a thin SVD gives its spectrum (memory O(bn)).
        With ``input_bits`` the rows (the resistor values) are quantized to nearest; the
        realised matrix stays positive definite. Programming time counts 2·b·n values.

        Args:
            rows: R, ``[b, n]``, floating point.
            row_scale: The factor's scale (1 / the number of examples behind the rows).
            damping: λ > 0.
            generator: Random source of the device's noise and mismatch.

        Returns:
            The prepared device state.

        Raises:
            ValueError: ``rows`` is not a finite 2-D floating tensor, or λ ≤ 0.
        """
        if rows.ndim != 2 or not rows.is_floating_point():
            raise ValueError(f"rows must be a 2-D floating tensor, got shape {tuple(rows.shape)}")
        if not bool(torch.isfinite(rows).all()) or damping <= 0:
            raise ValueError("rows must be finite and damping > 0 in the resistor-array mode")
        if self.config.input_bits is not None:
            rows = quantize_nearest(rows, self.config.input_bits)
        # The largest absolute row sum of row_scale·RᵀR + λI, bounded without forming it:
        # Σ_j |Σ_k R_ki R_kj| ≤ (|R|ᵀ |R| 1)_i (exact for non-negative rows).
        magnitude = rows.abs()
        scale = row_scale * float((magnitude.mT @ magnitude.sum(dim=1)).max()) + damping
        spec = Spectrum.of_rows(rows, row_scale / scale, damping / scale)
        tensors = self._store([spec], scale, damping / scale, 0.0)
        n = rows.shape[1]
        program = self.hardware.time_program(n, array_rows=rows.shape[0])
        stats = {"float64_retries": 0.0, "damping_increases": 0.0, "failed": 0.0,
                 "alpha_min": spec.alpha_min, "alpha_max": spec.alpha_max, "scale": scale,
                 **_time_stats(program)}
        return Prepared(self.name, n, damping, tensors, stats, modeled_time_s=program.total_s)

    def _program(self, device: Tensor, damping_bound: float, scale: float,
                 generator: torch.Generator | None) -> dict[str, Tensor] | None:
        cfg = self.config
        matrices, fallbacks = [], 0
        for _ in range(cfg.mitigation_samples):
            programmed, fell_back = self._quantize(device, generator)
            matrices.append(programmed)
            fallbacks += fell_back
        spectra = [Spectrum.of_matrix(q) for q in matrices]
        if min(s.alpha_min for s in spectra) <= 0:
            return None
        shift = 0.0
        if cfg.input_bits is not None:
            base = float(torch.linalg.eigvalsh(device.double())[0])
            shift = min(s.alpha_min for s in spectra) - base
        tensors = self._store(spectra, scale, damping_bound, shift)
        tensors["quantizer_fallbacks"] = torch.tensor(float(fallbacks), dtype=torch.float64)
        if cfg.backend is Backend.CLOSED_FORM and not cfg.warm_start:
            self._densify(tensors, spectra)  # a warm start reads through the spectrum
        if cfg.backend is Backend.EULER_MARUYAMA:
            for i, q in enumerate(matrices):
                tensors[f"realised_{i}"] = self._realise(q)
        return tensors

    def _quantize(self, device: Tensor, generator: torch.Generator | None
                  ) -> tuple[Tensor, int]:
        cfg = self.config
        if cfg.input_bits is None:
            return device, 0
        if cfg.quantizer is Quantizer.CONSERVATIVE:
            return quantize_conservative(device, cfg.input_bits)[0], 0
        if cfg.quantizer is Quantizer.NEAREST:
            q = quantize_nearest(device, cfg.input_bits)
        else:
            q = quantize_stochastic(device, cfg.input_bits, generator)
        if is_positive_definite(q):
            return q, 0
        return quantize_conservative(device, cfg.input_bits)[0], 1

    def _realise(self, programmed: Tensor) -> Tensor:
        """The matrix the device realises: each conductance off by a relative N(0, σ²)."""
        sigma = self.config.mismatch_sigma
        if sigma == 0:
            return programmed.clone()
        gen = torch.Generator().manual_seed(self.config.mismatch_seed)
        noise = torch.randn(programmed.shape, generator=gen, dtype=torch.float64)
        return programmed * (1 + sigma * noise).to(device=programmed.device,
                                                  dtype=programmed.dtype)

    def _store(self, spectra: list[Spectrum], scale: float, damping_bound: float,
               shift: float) -> dict[str, Tensor]:
        cfg = self.config
        n = spectra[0].n
        tensors: dict[str, Tensor] = {}
        for i, spec in enumerate(spectra):
            tensors[f"evecs_{i}"] = spec.evecs
            tensors[f"evals_{i}"] = spec.evals
            if spec.rest is not None:
                tensors[f"rest_{i}"] = torch.tensor(spec.rest, dtype=torch.float64)
        true_min = min(s.alpha_min for s in spectra)
        if cfg.alpha_min_source is AlphaSource.DAMPING and damping_bound > 0:
            alpha = min(damping_bound, true_min)
        else:
            alpha = true_min
        beta = cfg.beta_value
        eps = cfg.target_error
        t0 = cfg.t0_rc if cfg.t0_rc is not None else math.log(math.sqrt(2) / eps) / alpha
        window = cfg.window_rc if cfg.window_rc is not None else \
            _over(4 * n, beta * eps**2 * alpha**2)
        spacing = cfg.sample_spacing_rc or window / cfg.num_samples
        if cfg.readout is Readout.SAMPLES and cfg.window_rc is None:
            window = spacing * cfg.num_samples
        covariance_spacing = cfg.covariance_spacing_rc or 1.0 / alpha
        for what, value in (("burn-in t0", t0), ("window T", window), ("spacing", spacing),
                            ("covariance sample spacing", covariance_spacing)):
            if not (math.isfinite(value) and value > 0.0 and math.isfinite(_over(1.0, value**2))):
                raise ValueError(
                    f"the {what} of this solve, {value!r} RC, is not representable "
                    f"(beta={beta:g}, target_error={eps:g}, alpha_min={alpha:g}): choose "
                    "beta, target_error, t0_rc or window_rc so that it is a normal number")
        values = {"scale": scale, "alpha_min": alpha, "t0": t0, "window": window,
                  "spacing": spacing, "samples": float(cfg.num_samples),
                  "covariance_spacing": covariance_spacing,
                  "damping_shift": shift * scale, "true_alpha_min": true_min,
                  "alpha_max": max(s.alpha_max for s in spectra)}
        scalars = torch.tensor(list(values.values()), dtype=torch.float64).unbind(0)
        tensors.update(zip(values, scalars))  # 0-d tensors, made at once
        return tensors

    def _densify(self, tensors: dict[str, Tensor], spectra: list[Spectrum]) -> None:
        """Closed form: precompute F = (I − g(M))M⁻¹ and S = v(M)^{1/2} so that a read is
        F b + S ξ — two matrix products instead of three. The eigenvectors are dropped
        unless the covariance inverse needs them (memory: 2n² instead of n²)."""
        sched = self._schedule_from(tensors)
        keep_vectors = self.config.inverse_mode is InverseMode.COVARIANCE
        mean_factor, variance = backends.closed_form_weights(sched, self.config.beta_value)
        for i, spec in enumerate(spectra):
            dtype = spec.evecs.dtype
            lam = spec.evals.cpu().numpy()  # the moment formulas are faster in NumPy here
            with np.errstate(all="ignore"):
                solve_w, noise_w = (1 - mean_factor(lam)) / lam, np.sqrt(variance(lam))
            tensors[f"solve_{i}"] = spec.matrix(_weights(solve_w, spec.evals), dtype)
            tensors[f"noise_{i}"] = spec.matrix(_weights(noise_w, spec.evals), dtype)
            if not keep_vectors:
                del tensors[f"evecs_{i}"]

    def _prepare_stats(self, state: dict[str, Tensor]) -> dict[str, float]:
        keys = ("scale", "alpha_min", "true_alpha_min", "alpha_max", "t0", "window",
                "damping_shift", "quantizer_fallbacks")
        out = {k: float(state[k]) for k in keys if k in state}
        out["effective_added_damping"] = out.pop("damping_shift", 0.0)
        return out

    def _finish(self, state: dict[str, Tensor], n: int, damping: float,
                stats: dict[str, float]) -> Prepared:
        prepared = super()._finish(state, n, damping, stats)
        if "blocks" in state:
            sizes = [int(r[1] - r[0]) for k, r in state.items() if k.endswith("/range")]
            program = TimeBreakdown()
            for size in sizes:
                program = program + self.hardware.time_program(size)
            program = program.scaled(self.config.mitigation_samples)
        else:
            program = self.hardware.time_program(n).scaled(self.config.mitigation_samples)
        prepared.modeled_time_s = program.total_s
        prepared.stats.update(_time_stats(program))
        return prepared

    # -------------------------------------------------------------------- solve
    def _spectra(self, prepared: Prepared) -> list[Spectrum | None]:
        """One spectrum per programmed matrix (None where only F and S were kept)."""
        t = prepared.tensors
        out: list[Spectrum | None] = []
        for i in range(self.config.mitigation_samples):
            if f"evecs_{i}" in t:
                rest = float(t[f"rest_{i}"]) if f"rest_{i}" in t else None
                out.append(Spectrum(t[f"evecs_{i}"], t[f"evals_{i}"], rest))
            elif f"solve_{i}" in t:
                out.append(None)
        return out

    def schedule(self, prepared: Prepared) -> Schedule:
        """The burn-in t₀, averaging window T (RC units), samples and their spacing
        that this solver's solves with ``prepared`` use (set by its target error and
        the device matrix's α_min at the prepare).

        Args:
            prepared: A state this solver prepared.

        Returns:
            The schedule.

        Raises:
            KeyError: ``prepared`` is not a thermodynamic state.
        """
        return self._schedule_from(prepared.tensors)

    def _schedule_from(self, t: dict[str, Tensor]) -> Schedule:
        readout = self.config.readout if self.config.backend is Backend.CLOSED_FORM \
            else Readout.SAMPLES
        return Schedule(readout, float(t["t0"]), float(t["window"]), int(t["samples"]),
                        float(t["spacing"]))

    def _solve(self, prepared: Prepared, b: Tensor, generator: torch.Generator | None,
               overwrite_b: bool = False):
        cfg = self.config
        if "blocks" in prepared.tensors:
            if self._inner is None:
                raise ValueError("this state was prepared in blocks, but this solver's "
                                 "hardware has no max_dim: prepare it with this solver")
            return solve_blocks(self._inner, prepared, b, generator, cfg.target_error,
                                cfg.block_sweeps)
        rows = not b.is_contiguous() and b.mT.is_contiguous()
        # A transposed view (the rows of Q in Method 2): work on its contiguous layout;
        # a reduction over the strided view would copy it first.
        lo, hi = torch.aminmax(b.mT if rows else b)
        full_scale = max(float(hi), -float(lo))  # the DAC's full scale
        if full_scale == 0.0:
            return torch.zeros_like(b), 0.0, {}
        sched = self.schedule(prepared)
        timing = self._solve_time(prepared, b.shape[0], b.shape[1], sched)
        stats = _time_stats(timing)
        if self._plain_closed_form(prepared):
            # x = x̃·fs/s with x̃ = F b̃ + S ξ and b̃ = b/fs: (F b)/s + (fs/s) S ξ, fused.
            t, scale = prepared.tensors, float(prepared.tensors["scale"])
            rhs = b.mT if rows else b
            noise = torch.randn(rhs.shape, generator=generator, dtype=b.dtype, device=b.device)
            if rows:  # (F b)ᵀ = bᵀF and (S ξ)ᵀ = ξᵀS for symmetric F, S
                x = (rhs @ t["solve_0"]).addmm_(noise, t["noise_0"], beta=1 / scale,
                                                alpha=full_scale / scale).mT
            else:
                x = (t["solve_0"] @ rhs).addmm_(t["noise_0"], noise, beta=1 / scale,
                                                alpha=full_scale / scale)
            return x, timing.total_s, {"clipped": 0.0, **stats}
        rhs = b / full_scale
        if cfg.input_bits is not None:
            rhs = quantize_nearest(rhs, cfg.input_bits, scale=1.0)
        x0 = prepared.tensors.get("x_state") if cfg.warm_start else None
        if x0 is not None and x0.shape != rhs.shape:
            x0 = None
        reads, clipped = [], 0
        for i, spec in enumerate(self._spectra(prepared)):
            x, state, clips = self._read(prepared, i, spec, rhs, x0, sched, generator)
            reads.append(x)
            clipped += clips
            if cfg.warm_start and i == 0 and state is not None:
                prepared.tensors["x_state"] = state
        x = reads[0] if len(reads) == 1 else torch.stack(reads).mean(0)
        x = x.mul_(full_scale / float(prepared.tensors["scale"]))
        return x, timing.total_s, {"clipped": float(clipped), **stats}

    def predict_error(self, prepared: Prepared, damped: Tensor, b: Tensor) -> float | None:
        """The device's expected relative error √(E‖x̂ − x‖²_F)/‖x‖_F for the next solve
        of ``b``, x = (M + λI)⁻¹b, from the OU moments (:mod:`.moments`) of the matrices
        the device was programmed with (quantized, when ``input_bits`` is set).

        Per programmed matrix Q and eigenmode (λᵢ, qᵢ) the read-out x̂ has mean
        (1 − gᵢ)/λᵢ·qᵢᵀb̃ + gᵢ·qᵢᵀx₀ — the burn-in bias, with x₀ the device's state: zero
        after a reset, or the last solve's end under ``warm_start`` (its head start) — and
        variance vᵢ per right-hand side (window average or N samples), b̃ the right-hand
        sides scaled to the DAC's full scale (and rounded to ``input_bits``). With K =
        ``mitigation_samples`` reads averaged,
        E‖x̂ − x*‖² = ‖mean of the K means − x*‖² + k·Σᵢ vᵢ summed over the reads / K²,
        x* = D⁻¹b̃ the exact answer of the unquantized D = (M + λI)/s; the ADC
        (``output_bits``) adds its rounding variance (:meth:`_adc_variance`). Device
        mismatch (``mismatch_sigma``) is not modelled.

        Args:
            prepared: This solver's state, before the solve (its warm-start state is
                read, not changed).
            damped: M + λI ``[n, n]``, the matrix ``prepared`` was made from (λ the
                damping in effect).
            b: Right-hand sides ``[n, k]``.

        Returns:
            The predicted relative error; None for a state prepared in blocks
            (``hardware.max_dim``) and for the Euler–Maruyama backend (its step's own
            error is not modelled), 0 for b = 0.

        Raises:
            ValueError: ``damped`` or ``b`` does not fit ``prepared``.
        """
        self._check_prepared(prepared)
        cfg, n, t = self.config, prepared.n, prepared.tensors
        if tuple(damped.shape) != (n, n) or b.ndim != 2 or b.shape[0] != n:
            raise ValueError(f"damped {tuple(damped.shape)} and b {tuple(b.shape)} do not "
                             f"fit a prepared factor of size {n}")
        if "blocks" in t or cfg.backend is Backend.EULER_MARUYAMA:
            return None  # sweeps of blocks, and the integrator's own error: not modelled
        rhs = b.to(torch.float64)
        full_scale = float(rhs.abs().max())
        if full_scale == 0.0:
            return 0.0
        rhs = rhs / full_scale
        x_star = torch.linalg.solve(damped.to(torch.float64) / float(t["scale"]), rhs)
        if cfg.input_bits is not None:
            rhs = quantize_nearest(rhs, cfg.input_bits, scale=1.0)
        state = t.get("x_state") if cfg.warm_start else None
        x0 = state.to(torch.float64) if state is not None and state.shape == rhs.shape \
            else None
        mean_factor, variance = backends.closed_form_weights(self.schedule(prepared),
                                                             cfg.beta_value)
        k, means, spread = rhs.shape[1], [], 0.0
        for i, spec in enumerate(self._spectra(prepared)):
            if spec is None:  # closed form, reset: x̂ = F b̃ + S ξ
                means.append(t[f"solve_{i}"].to(torch.float64) @ rhs)
                spread += k * float(t[f"noise_{i}"].to(torch.float64).square().sum())
                continue
            terms = [(lambda lam: (1 - mean_factor(lam)) / lam, rhs)]
            if x0 is not None:
                terms.append((mean_factor, x0))
            means.append(spec.apply(terms))
            spread += k * float(variance(spec.evals.to(torch.float64)).sum())
            if spec.rest is not None and spec.evecs.shape[1] < n:  # the complement
                rest = torch.tensor([spec.rest], dtype=torch.float64)
                spread += k * (n - spec.evecs.shape[1]) * float(variance(rest)[0])
        if cfg.output_bits is not None:
            spread += sum(self._adc_variance(prepared, mean, rhs) for mean in means)
        bias = torch.stack(means).mean(0) - x_star
        squared = float(bias.square().sum()) + spread / len(means) ** 2
        return math.sqrt(squared) / float(torch.linalg.norm(x_star))

    def _adc_variance(self, prepared: Prepared, mean: Tensor, rhs: Tensor) -> float:
        """Σ over a read's entries of the ADC's rounding variance step²/12 (Sheppard),
        step = full scale / levels per column: the calibrated scale taken at the read's
        mean (``adc_range="calibrate"``) or the bound ‖b̃ⱼ‖/α_min. A samples read-out
        rounds each of its N samples, but samples closer than a relaxation time and a
        step apart round alike, so their mean keeps the variance of one rounding (where
        the noise decorrelates the roundings it dominates the error anyway)."""
        cfg = self.config
        if cfg.adc_range is AdcRange.BOUND:
            scale = rhs.norm(dim=0) / float(prepared.tensors["alpha_min"])
        else:
            scale = cfg.adc_headroom * mean.abs().amax(dim=0)
        step = scale / levels(cfg.output_bits or 2)
        return mean.shape[0] * float(step.square().sum()) / 12

    def _plain_closed_form(self, prepared: Prepared) -> bool:
        """Closed form with one programmed matrix, precomputed F and S, and no
        right-hand-side or output quantization: the fused fast path."""
        cfg = self.config
        return (cfg.mitigation_samples == 1 and cfg.input_bits is None
                and cfg.output_bits is None and not cfg.warm_start
                and "solve_0" in prepared.tensors)

    def _read(self, prepared: Prepared, index: int, kept: Spectrum | None, rhs: Tensor,
              x0: Tensor | None, sched: Schedule, generator: torch.Generator | None
              ) -> tuple[Tensor, Tensor | None, int]:
        cfg = self.config
        beta = cfg.beta_value
        adc = Adc(cfg, rhs, float(prepared.tensors["alpha_min"]))

        def spectrum() -> Spectrum:
            if kept is None:  # only the fused closed form reads without one
                raise ValueError("this read needs the device matrix's spectrum, which the "
                                 "prepared state did not keep")
            return kept
        if cfg.backend is Backend.CLOSED_FORM and cfg.warm_start:
            if adc.active and cfg.adc_range is AdcRange.CALIBRATE:  # its own device run
                adc.calibrate(backends.closed_form_warm(spectrum(), rhs, x0, sched, beta,
                                                        generator)[0])
            mean, state = backends.closed_form_warm(spectrum(), rhs, x0, sched, beta,
                                                    generator)
            return adc(mean), state, adc.clipped
        if cfg.backend is Backend.CLOSED_FORM:
            def read() -> Tensor:
                if f"solve_{index}" in prepared.tensors:
                    t = prepared.tensors
                    noise = torch.randn(rhs.shape, generator=generator, dtype=rhs.dtype,
                                        device=rhs.device)
                    return torch.addmm(t[f"solve_{index}"] @ rhs, t[f"noise_{index}"], noise)
                return backends.closed_form(spectrum(), rhs, x0, sched, beta, generator)
            if adc.active and cfg.adc_range is AdcRange.CALIBRATE:
                adc.calibrate(read())
            return adc(read()), None, adc.clipped
        hook = adc if adc.active else None
        if cfg.backend is Backend.TRAJECTORY:
            mean, state = backends.trajectory(spectrum(), rhs, x0, sched, beta, generator,
                                              hook)
        else:
            mean, state = backends.euler_maruyama(
                prepared.tensors[f"realised_{index}"], rhs, x0, sched, cfg.em_dt_rc, beta,
                generator, hook)
        return mean, state, adc.clipped

    @property
    def reads_per_solve(self) -> int:
        """Device reads behind one solve: one per programmed matrix
        (``mitigation_samples``), twice where the closed form's ADC calibrates its full
        scale on a read of its own."""
        cfg = self.config
        return cfg.mitigation_samples * (2 if cfg.output_bits is not None and cfg.adc_range
                                         is AdcRange.CALIBRATE and cfg.backend
                                         is Backend.CLOSED_FORM else 1)

    @property
    def programs_per_prepare(self) -> int:
        """Matrices programmed per prepare (``mitigation_samples``)."""
        return self.config.mitigation_samples

    def _solve_time(self, prepared: Prepared, n: int, k: int, sched: Schedule) -> TimeBreakdown:
        one = self.hardware.time_solve_all(n, k, alpha_min=float(prepared.tensors["alpha_min"]),
                                           t0_rc=sched.t0, window_rc=sched.duration)
        return one.scaled(self.reads_per_solve)

    # ------------------------------------------------------------------ inverse
    def _inverse(self, prepared: Prepared, generator: torch.Generator | None):
        cfg = self.config
        if cfg.inverse_mode is InverseMode.SOLVES:
            eye = torch.eye(prepared.n, dtype=prepared.dtype, device=prepared.device)
            x, seconds, stats = self._solve(prepared, eye, generator)
            return (x + x.mT) / 2, seconds, stats
        if "blocks" in prepared.tensors:
            raise ValueError("the covariance inverse needs the whole factor on one SPU: use "
                             "inverse_mode='solves' with hardware.max_dim")

        return covariance_inverse(self.config, self.hardware, prepared,
                                  self._spectra(prepared), self.schedule(prepared), generator)


def _weights(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(values).to(like.device)


def _time_stats(timing: TimeBreakdown) -> dict[str, float]:
    return time_stats(timing)


def _over(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, infinite where the denominator underflowed to zero
    (below float64's range, or a subnormal flushed by ``torch.set_flush_denormal``), so
    the range checks name the setting instead of a ``ZeroDivisionError``."""
    return numerator / denominator if denominator != 0.0 else math.inf
