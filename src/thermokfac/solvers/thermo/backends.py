"""The three ways of producing the device's output (all in device units, times in RC).

* :func:`closed_form` samples the output — the time average over [t₀, t₀+T] or the mean
  of N samples Δ apart — from its exact Gaussian law: mean x* + g(M)(x₀ − x*), covariance
  v(M) with g and v from :mod:`.moments`.
* :func:`trajectory` steps the exact AR(1) transition x* + e^{−MΔ}(x − x*) + noise and
  returns the mean of its samples (each through the ADC) and the final state.
* :func:`euler_maruyama` integrates dx = −(Mx − b)dt + √(2/β)dW with step h on any
  realised matrix (also non-symmetric, for device mismatch).

Noise is always drawn in the original coordinates and coloured by matrix functions
(:mod:`.spectral`), so outputs do not depend on the basis ``eigh`` picked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import moments
from .config import Readout
from .spectral import Spectrum

SampleHook = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Schedule:
    """Device timing of one read, in RC units.

    Attributes:
        readout: Time average or samples.
        t0: Burn-in before the window / first sample.
        window: Averaging window T (average readout).
        num_samples: N (samples readout).
        spacing: Δ between samples (samples readout).
    """

    readout: Readout
    t0: float
    window: float
    num_samples: int
    spacing: float

    @property
    def duration(self) -> float:
        """Time spent after the burn-in: T, or (N − 1)Δ."""
        if self.readout is Readout.AVERAGE:
            return self.window
        return (self.num_samples - 1) * self.spacing


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def closed_form_weights(sched: Schedule, beta: float
                        ) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(g, v): the output's mean factor and variance per eigenvalue for this readout
    (functions of a tensor or a NumPy array of eigenvalues, returning the same kind)."""
    if sched.readout is Readout.AVERAGE:
        def mean_factor(lam):
            return moments.window_mean_factor(lam, sched.t0, sched.window)

        def variance(lam):
            return moments.window_variance(lam, sched.t0, sched.window, beta)
    else:
        def mean_factor(lam):
            return moments.samples_mean_factor(lam, sched.t0, sched.spacing, sched.num_samples)

        def variance(lam):
            return moments.samples_variance(lam, sched.t0, sched.spacing, sched.num_samples,
                                            beta)
    return mean_factor, variance


def closed_form(spec: Spectrum, b: Tensor, x0: Tensor | None, sched: Schedule, beta: float,
                generator: torch.Generator | None) -> Tensor:
    """One draw of the device output for right-hand sides ``b`` ``[n, k]``:
    x̄ = (I − g(M))M⁻¹b + g(M)x₀ + v(M)^{1/2} ξ."""
    mean_factor, variance = closed_form_weights(sched, beta)
    terms = [(lambda lam: (1 - mean_factor(lam)) / lam, b),
             (lambda lam: variance(lam).sqrt(), _randn(b, generator))]
    if x0 is not None:
        terms.append((mean_factor, x0))
    return spec.apply(terms)


def closed_form_warm(spec: Spectrum, b: Tensor, x0: Tensor | None, sched: Schedule,
                     beta: float, generator: torch.Generator | None
                     ) -> tuple[Tensor, Tensor]:
    """One draw of the window mean and of the device's state at the window's end, jointly
    (average read-out): the closed form of a device that is not reset between solves.

    Per eigenmode (offset z from x* = M⁻¹b, started at z₀ = qᵀ(x₀ − x*)) the mean z̄ and
    the end state z(t₀+T) are jointly Gaussian: means g·z₀ and e^{−λ(t₀+T)}·z₀, variances
    :func:`~.moments.window_variance` and :func:`~.moments.transition`'s over t₀ + T,
    covariance :func:`~.moments.window_end_covariance`. Both are drawn from the same
    standard normals ξ₁, ξ₂: z̄ = g z₀ + √v ξ₁ and
    z(t₀+T) = e^{−λ(t₀+T)} z₀ + (c/√v) ξ₁ + √(v_end − c²/v) ξ₂.

    Args:
        spec: The device matrix's spectrum.
        b: Right-hand sides ``[n, k]``.
        x0: The state the device starts from ``[n, k]`` (None: reset to zero).
        sched: The read's timing (``Readout.AVERAGE``).
        beta: Inverse temperature β.
        generator: Random source.

    Returns:
        (window mean ``[n, k]``, end state ``[n, k]``).

    Raises:
        ValueError: ``sched`` is a samples read-out (use the trajectory backend).
    """
    if sched.readout is not Readout.AVERAGE:
        raise ValueError("the closed-form warm start models the average read-out; a "
                         "samples read-out needs backend='trajectory'")
    t0, window, end = sched.t0, sched.window, sched.t0 + sched.window
    mean_factor, variance = closed_form_weights(sched, beta)

    def decay(lam):  # e^{−λ(t₀+T)}
        return moments.transition(lam, end, beta)[0]

    def mixed(lam):  # c / √v
        return moments.window_end_covariance(lam, t0, window, beta) / variance(lam).sqrt()

    def rest(lam):  # √(v_end − c²/v), clamped at 0 against round-off
        c = moments.window_end_covariance(lam, t0, window, beta)
        left = moments.transition(lam, end, beta)[1] - c**2 / variance(lam)
        return left.clamp_min(0.0).sqrt()

    xi1, xi2 = _randn(b, generator), _randn(b, generator)
    mean_terms = [(lambda lam: (1 - mean_factor(lam)) / lam, b),
                  (lambda lam: variance(lam).sqrt(), xi1)]
    end_terms = [(lambda lam: (1 - decay(lam)) / lam, b), (mixed, xi1), (rest, xi2)]
    if x0 is not None:
        mean_terms.append((mean_factor, x0))
        end_terms.append((decay, x0))
    return spec.apply(mean_terms), spec.apply(end_terms)


def trajectory(spec: Spectrum, b: Tensor, x0: Tensor | None, sched: Schedule, beta: float,
               generator: torch.Generator | None, hook: SampleHook | None = None
               ) -> tuple[Tensor, Tensor]:
    """Exact transitions of the sampled path; returns (mean of hooked samples, last state).

    The offset from x* is carried as y = Vᵀ(x − x*), where each mode decays by ρ = e^{−λΔ}
    per sample; the noise of a chunk of samples is drawn in the original coordinates and
    projected at once (one matrix product), so V y — the state — does not depend on the
    basis ``eigh`` picked. Without a per-sample ``hook`` (no ADC) the samples are never
    formed in the original coordinates: only their mean is.
    """
    if spec.rest is not None and spec.evecs.shape[1] < spec.n:
        return _trajectory_generic(spec, b, x0, sched, beta, generator, hook)
    v = spec.evecs.to(b.dtype)
    lam = spec.evals
    x_star = v @ ((v.mT @ b) / lam.to(b.dtype)[:, None])
    y = -(v.mT @ x_star) if x0 is None else v.mT @ (x0 - x_star)
    k = b.shape[1]
    if sched.t0 > 0:
        rho0, var0 = moments.transition(lam, sched.t0, beta)
        y = rho0.to(b.dtype)[:, None] * y + var0.sqrt().to(b.dtype)[:, None] * (
            v.mT @ _randn(b, generator))
    rho, var = moments.transition(lam, sched.spacing, beta)
    total = torch.zeros_like(b)
    chunk = max(2, min(4096, 2**22 // max(1, b.numel())))  # samples per chunk: ≤ 4M values
    done = 0
    while done < sched.num_samples:
        steps = min(chunk, sched.num_samples - done)
        fresh = steps - (1 if done == 0 else 0)  # the first sample needs no innovation
        noise = (v.mT @ torch.randn(b.shape[0], fresh * k, generator=generator, dtype=b.dtype,
                                    device=b.device)).view(b.shape[0], fresh, k)
        block, y = _ar1_scan(y, noise, rho, var.sqrt(), include_start=done == 0)
        if hook is None:
            total += block.sum(dim=1).to(b.dtype)
        else:
            samples = (v @ block.to(b.dtype).reshape(b.shape[0], -1)).view(
                b.shape[0], steps, k) + x_star[:, None, :]
            for j in range(steps):
                total += hook(samples[:, j])
        done += steps
    if hook is None:
        return x_star + v @ (total / sched.num_samples), x_star + v @ y
    return total / sched.num_samples, x_star + v @ y


def _ar1_scan(y0: Tensor, noise: Tensor, rho: Tensor, sd: Tensor, include_start: bool
              ) -> tuple[Tensor, Tensor]:
    """All states of y_{j+1} = ρ y_j + σ h_j for a chunk, vectorised (float64 inside).

    Uses y_j = ρʲ (y₀ + Σ_{i≤j} ρ^{−i} σ h_i), a cumulative sum, for modes with λΔ ≤ 30
    (in sub-chunks short enough that ρ^{−i} stays in range), and y_j = σ h_j for faster
    modes, whose memory ρ ≤ e^{−30} is below float64 resolution.

    Args:
        y0: ``[n, k]`` state before the chunk.
        noise: ``[n, m, k]`` innovations h (already in eigen-coordinates).
        rho, sd: ``[n]`` float64 decay and innovation scale.
        include_start: Whether y₀ itself is the chunk's first sample.

    Returns:
        (samples ``[n, m (+1), k]``, last state ``[n, k]``) in float64 / y0's dtype.
    """
    _n, m, _k = noise.shape
    rate = -torch.log(rho.clamp_min(1e-300))  # λΔ
    y = y0.double()
    h = noise.double().mul_(sd[:, None, None])
    slow = rate <= 30.0
    everything_slow = bool(slow.all())
    out = h if not bool(slow.any()) else torch.empty_like(h)
    if not everything_slow:
        out[~slow] = h[~slow]
    if bool(slow.any()) and m > 0:
        r = rate if everything_slow else rate[slow]
        hs = h if everything_slow else h[slow]
        ys = y if everything_slow else y[slow]
        span = max(1, min(m, int(600.0 / max(float(r.max()), 1e-12))))
        blocks = []
        for start in range(0, m, span):
            stop = min(m, start + span)
            steps = torch.arange(1, stop - start + 1, dtype=torch.float64, device=noise.device)
            grow = torch.exp(r[:, None] * steps)[:, :, None]  # ρ^{−i}
            acc = torch.cumsum(hs[:, start:stop].mul_(grow), dim=1).add_(ys[:, None, :])
            block = acc.div_(grow)
            blocks.append(block)
            ys = block[:, -1]
        solved = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        if everything_slow:
            out = solved
        else:
            out[slow] = solved
    last = out[:, -1] if m > 0 else y
    if include_start:
        out = torch.cat([y[:, None, :], out], dim=1)
    return out, last.to(y0.dtype)


def _trajectory_generic(spec: Spectrum, b: Tensor, x0: Tensor | None, sched: Schedule,
                        beta: float, generator: torch.Generator | None,
                        hook: SampleHook | None) -> tuple[Tensor, Tensor]:
    """Step by step through matrix functions (low-rank spectra)."""
    hook = hook or (lambda x: x)
    x_star = spec.apply([(lambda lam: 1 / lam, b)])
    z = -x_star if x0 is None else x0 - x_star

    def step(z: Tensor, dt: float) -> Tensor:
        return spec.apply([(lambda lam: torch.exp(-lam * dt), z),
                           (lambda lam: moments.transition(lam, dt, beta)[1].sqrt(),
                            _randn(z, generator))])

    if sched.t0 > 0:
        z = step(z, sched.t0)
    total = hook(x_star + z)
    for _ in range(sched.num_samples - 1):
        z = step(z, sched.spacing)
        total = total + hook(x_star + z)
    return total / sched.num_samples, x_star + z


def euler_maruyama(matrix: Tensor, b: Tensor, x0: Tensor | None, sched: Schedule, dt: float,
                   beta: float, generator: torch.Generator | None,
                   hook: SampleHook | None = None) -> tuple[Tensor, Tensor]:
    """x ← x − h(Mx − b) + √(2h/β) ξ; samples every round(Δ/h) steps after ⌈t₀/h⌉ steps.

    One step is one fused product x ← P x + c with P = I − hM, c = hb + √(2h/β) ξ; the
    noise of a block of steps is drawn at once and turned into c in one pass.

    Raises:
        ValueError: If h·α_max ≥ 2 (the scheme diverges), with α_max bounded by the
            largest absolute row sum of M (Gershgorin).
    """
    alpha_max = float(matrix.abs().sum(dim=1).max())
    if dt * alpha_max >= 2.0:
        raise ValueError(f"Euler–Maruyama step dt={dt:g} (RC) is unstable: dt·α_max = "
                         f"{dt * alpha_max:.3g} ≥ 2 (α_max ≤ {alpha_max:.3g}); use "
                         f"em_dt_rc < {2 / alpha_max:.3g}")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    step = torch.eye(b.shape[0], dtype=b.dtype, device=b.device).sub_(matrix, alpha=dt)
    drive = b * dt
    scale = math.sqrt(2 * dt / beta)
    per_block = max(1, min(4096, _EM_BLOCK_VALUES // max(1, b.numel())))
    hook = hook or (lambda v: v)
    burn = math.ceil(sched.t0 / dt)
    between = max(1, round(sched.spacing / dt))
    total_steps = burn + between * (sched.num_samples - 1)
    total = hook(x) if burn == 0 else None
    done = 0
    while done < total_steps:
        count = min(per_block, total_steps - done)
        forcing = torch.randn((count, *b.shape), generator=generator, dtype=b.dtype,
                              device=b.device)
        forcing.mul_(scale).add_(drive)
        for j in range(count):
            x = torch.addmm(forcing[j], step, x)
            index = done + j + 1 - burn  # steps since the first sample
            if index >= 0 and index % between == 0:
                total = hook(x) if total is None else total + hook(x)
        done += count
    if total is None:  # a schedule reads at least one sample at step `burn`
        raise ValueError(f"the schedule read no sample (num_samples={sched.num_samples})")
    return total / sched.num_samples, x


_EM_BLOCK_VALUES = 1 << 20  # noise values drawn per block of Euler–Maruyama steps


def wishart_covariance(spec: Spectrum, samples: int, beta: float, extra_variance: float,
                       generator: torch.Generator | None, dtype: torch.dtype,
                       spacing: float = math.inf) -> Tensor:
    """Sample covariance Ŝ = Σ x xᵀ/N of N equilibrium samples x ~ N(0, β⁻¹M⁻¹ + cI) taken
    Δ = ``spacing`` apart on the path (``inf``: independent), ``c`` the ADC's white
    read-out variance (Sheppard: LSB²/12).

    Drawn without the N samples, in eigen-coordinates (the law of a Wishart matrix is
    rotation invariant): Bartlett's decomposition W = LLᵀ ~ Wishart(N, I) (L lower
    triangular, L_ii² ~ χ²_{N−i}, L_ij ~ N(0, 1)) gives the independent-sample estimate
    E = D^{1/2}(W/N)D^{1/2}, D = diag(1/(βλ) + c). Correlated samples keep E's mean and
    scale each entry's deviation by the square root of
    :func:`.moments.sample_covariance_inflation`, so every entry has the exact mean and
    variance of the AR(1) path's estimate (the entries are near Gaussian when N ≫ n).

    Args:
        spec: Full spectrum of the device matrix M (``[n, n]`` eigenvectors).
        samples: N.
        beta: β.
        extra_variance: c, per sample and node.
        generator: Random source.
        dtype: Output dtype.
        spacing: Δ in RC units (> 0).

    Returns:
        Ŝ ``[n, n]`` in the original coordinates.
    """
    n, device = spec.n, spec.evecs.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    chi2 = np.random.default_rng(seed).chisquare(samples - np.arange(n))
    lower = torch.randn(n, n, generator=generator, dtype=torch.float64, device=device).tril_(-1)
    lower.diagonal().copy_(torch.from_numpy(np.sqrt(chi2)).to(device))
    lam = spec.evals.to(device)
    variance = moments.stationary_variance(lam, beta) + extra_variance
    root = variance.sqrt()
    estimate = root[:, None] * (lower @ lower.mT / samples) * root[None, :]
    if math.isfinite(spacing):
        inflation = moments.sample_covariance_inflation(lam, spacing, samples, beta,
                                                        extra_variance)
        mean = torch.diag(variance)
        estimate = mean + inflation.sqrt() * (estimate - mean)
    v = spec.evecs.to(torch.float64)
    return (v @ estimate @ v.mT).to(dtype)


def sample_covariance(mean_fn: Callable[[SampleHook], tuple[Tensor, Tensor]], n: int,
                      dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Σ xxᵀ/N of the samples a path backend produces (b = 0: the mean is known, zero)."""
    acc = torch.zeros(n, n, dtype=dtype, device=device)
    count = 0

    def hook(x: Tensor) -> Tensor:
        nonlocal acc, count
        acc += x @ x.mT
        count += x.shape[1]
        return x

    mean_fn(hook)
    return acc / max(count, 1)
