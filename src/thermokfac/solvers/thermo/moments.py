"""Moments of the Ornstein–Uhlenbeck process, per eigenmode (pure functions of λ).

The device relaxes by dx = −(Mx − b)dt + √(2/β) dW (paper Eq. 22), time in units of RC.
In the eigenbasis of M (eigenvalue λ > 0) the offset z = qᵀ(x − x*) from the solution
x* = M⁻¹b is an independent scalar OU process started at z₀ at t = 0:

    z(t) = e^{−λt} z₀ + w(t),   Var w(t) = (1 − e^{−2λt}) / (βλ),
    Cov(w(s), w(t)) = e^{−λ|t−s|} Var w(min(s, t)).

Everything below is in float64 with ``expm1`` forms that stay accurate for small λt.
Each function takes a torch tensor or a NumPy array of eigenvalues and returns the same
kind (NumPy is the faster of the two on the short vectors of a small device matrix).
"""

from __future__ import annotations

from types import ModuleType
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def _xp(x: Array) -> ModuleType:
    return np if isinstance(x, np.ndarray) else torch


def _one_minus_exp(x: Array) -> Array:
    """1 − e^{−x}, accurate for small x."""
    return -_xp(x).expm1(-x)


def stationary_variance(lam: Array, beta: float) -> Array:
    """Var z at equilibrium: 1/(βλ) (Eq. 23: x ~ N(M⁻¹b, β⁻¹M⁻¹))."""
    return 1.0 / (beta * lam)


def transition(lam: Array, dt: float, beta: float) -> tuple[Array, Array]:
    """Exact AR(1) step over dt: z' = ρ z + √v ξ with ρ = e^{−λdt}, v = (1 − ρ²)/(βλ)."""
    rho = _xp(lam).exp(-lam * dt)
    return rho, _one_minus_exp(2 * lam * dt) / (beta * lam)


def window_mean_factor(lam: Array, t0: float, window: float) -> Array:
    """E[z̄]/z₀ for the time average over [t₀, t₀+T]: e^{−λt₀}(1 − e^{−λT})/(λT)."""
    return _xp(lam).exp(-lam * t0) * _one_minus_exp(lam * window) / (lam * window)


def _h(u: Array) -> Array:
    """u − 2(1 − e^{−u}) + (1 − e^{−2u})/2, with its series u³/3 − u⁴/4 for small u."""
    xp = _xp(u)
    direct = u + 2 * xp.expm1(-u) - xp.expm1(-2 * u) / 2
    series = u**3 / 3 - u**4 / 4 + 7 * u**5 / 60
    return xp.where(u < 1e-3, series, direct)


def window_variance(lam: Array, t0: float, window: float, beta: float) -> Array:
    """Var z̄ of the time average over [t₀, t₀+T], starting from a fixed z₀ at t = 0.

    (2/β)/T² · [ (1 − e^{−λT})² (1 − e^{−2λt₀}) / (2λ³) + h(λT)/λ³ ], which tends to
    (2/β)/(λ²T) for T ≫ 1/λ: Cov x̄ ≈ (2/β) M⁻² / T.
    """
    u = lam * window
    burn = _one_minus_exp(u) ** 2 * _one_minus_exp(2 * lam * t0) / (2 * lam**3)
    return (2.0 / beta) / window**2 * (burn + _h(u) / lam**3)


def window_end_covariance(lam: Array, t0: float, window: float, beta: float) -> Array:
    """Cov(z̄, z(t₀+T)): the window average over [t₀, t₀+T] and the state at its end,
    starting from a fixed z₀ at t = 0.

    (1/T)∫ e^{−λ(t₀+T−t)} Var w(t) dt = (1 − e^{−λT})(1 − e^{−λ(2t₀+T)}) / (βλ²T); at
    equilibrium (t₀ → ∞) it is (1 − e^{−λT})/(βλ²T). With :func:`transition`'s variance
    over t₀ + T it gives the joint law a warm-started closed-form read needs.
    """
    return (_one_minus_exp(lam * window) * _one_minus_exp(lam * (2 * t0 + window))
            / (beta * lam**2 * window))


def samples_mean_factor(lam: Array, t0: float, spacing: float, count: int) -> Array:
    """E[z̄]/z₀ for the mean of N samples at t₀, t₀+Δ, …: e^{−λt₀}(1 − ρ^N)/(N(1 − ρ))."""
    xp = _xp(lam)
    rho = xp.exp(-lam * spacing)
    ratio = _one_minus_exp(lam * spacing * count) / (count * _one_minus_exp(lam * spacing))
    return xp.exp(-lam * t0) * xp.where(rho < 1, ratio, xp.ones_like(rho))


def samples_variance(lam: Array, t0: float, spacing: float, count: int, beta: float) -> Array:
    """Var z̄ for the mean of N samples Δ apart after a burn-in t₀ (z₀ fixed at t = 0).

    With ρ = e^{−λΔ} and s = 1/(βλ): Var = s (S₁ − e^{−2λt₀} S₂) / N², where
    S₁ = Σ_{j,k} ρ^{|j−k|} = N(1+ρ)/(1−ρ) − 2ρ(1−ρᴺ)/(1−ρ)² and
    S₂ = Σ_{j,k} ρ^{|j−k|} ρ^{2 min(j,k)} = (1+ρ)(1−ρ^{2N})/((1−ρ)(1−ρ²)) − 2ρᴺ(1−ρᴺ)/(1−ρ)².
    For large N and t₀ it tends to coth(λΔ/2)/(βλN).
    """
    xp = _xp(lam)
    rho = xp.exp(-lam * spacing)
    one_m = _one_minus_exp(lam * spacing)
    rho_n = xp.exp(-lam * spacing * count)
    s1 = count * (1 + rho) / one_m - 2 * rho * (1 - rho_n) / one_m**2
    s2 = ((1 + rho) * _one_minus_exp(2 * lam * spacing * count) / (one_m * _one_minus_exp(
        2 * lam * spacing)) - 2 * rho_n * (1 - rho_n) / one_m**2)
    var = stationary_variance(lam, beta) * (s1 - xp.exp(-2 * lam * t0) * s2) / count**2
    return xp.where(var > 0, var, 0.0)


def lag_sum_ratio(rate: Array, count: int) -> Array:
    """(1/N) Σ_{j,k<N} ρ^{|j−k|} with ρ = e^{−rate}: how much N samples of an AR(1) series
    with lag-one correlation ρ inflate the variance of their mean over N independent ones.

    Equals (1+ρ)/(1−ρ) − 2ρ(1−ρᴺ)/(N(1−ρ)²): 1 for ρ = 0, N for ρ = 1; the series
    N − rate(N² − 1)/3 replaces it where rate·N < 10⁻⁴ (the closed form cancels there).
    """
    xp = _xp(rate)
    small = rate * count < 1e-4
    safe = xp.where(small, xp.ones_like(rate), rate)
    one_m = _one_minus_exp(safe)
    rho = xp.exp(-safe)
    direct = (1 + rho) / one_m - 2 * rho * _one_minus_exp(safe * count) / (count * one_m**2)
    series = count - rate * (count**2 - 1) / 3
    return xp.where(small, series, direct)


def sample_covariance_inflation(lam: Array, spacing: float, count: int, beta: float,
                                extra_variance: float = 0.0) -> Array:
    """``[n, n]`` factors Var Ŝ_kl(Δ)/Var Ŝ_kl(independent) for the sample covariance
    Ŝ = Σ x xᵀ/N of N equilibrium samples Δ apart (b = 0), in eigen-coordinates.

    Modes are independent AR(1) series with autocovariance γ_k(m) = s_k ρ_k^m (m ≥ 1),
    γ_k(0) = s_k + c, s_k = 1/(βλ_k), ρ_k = e^{−λ_kΔ}, c the ADC's white read-out
    variance. By Isserlis, Var Ŝ_kl = (1 + δ_kl)/N² Σ_{i,j} γ_k(i−j) γ_l(i−j), so the factor
    is 1 + s_k s_l (L(λ_k + λ_l) − 1)/((s_k + c)(s_l + c)) with L = :func:`lag_sum_ratio`.
    """
    s = stationary_variance(lam, beta)
    total = s + extra_variance
    pair_rate = (lam[:, None] + lam[None, :]) * spacing
    ratio = lag_sum_ratio(pair_rate, count)
    weight = (s[:, None] * s[None, :]) / (total[:, None] * total[None, :])
    return 1 + weight * (ratio - 1)


def covariance_inverse_error(lam: Array, spacing: float, count: int, beta: float,
                             extra_variance: float = 0.0) -> float:
    """Expected relative Frobenius error √(E‖βŜ − M⁻¹‖²_F)/‖M⁻¹‖_F of the covariance
    inverse (Eq. 23) from N samples Δ apart, read with white variance c.

    E‖Ŝ − Σ‖² = Σ_{k,l} (1 + δ_kl)(s_k + c)(s_l + c) f_kl/N + n c² (the read-out's bias),
    f from :func:`sample_covariance_inflation`; for independent samples and c = 0 it is
    (tr²Σ + ‖Σ‖²_F)/N, the Wishart value.
    """
    s = stationary_variance(lam, beta)
    total = s + extra_variance
    inflation = sample_covariance_inflation(lam, spacing, count, beta, extra_variance)
    pair = total[:, None] * total[None, :] * inflation
    variance = (pair.sum() + pair.diagonal().sum()) / count
    squared = variance + lam.shape[0] * extra_variance**2
    return float(squared / (s**2).sum()) ** 0.5
