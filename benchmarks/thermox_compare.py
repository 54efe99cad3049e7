"""This simulator against thermox 0.0.6, each side at its own best setting for one error.

The problem: an SPD matrix A with eigenvalues evenly in [0.1, 1] and a Gaussian b, for
n = 64, 256, 1024. Every side returns the mean of N samples of an OU path Δ apart after
a burn-in, and is asked for a relative error ≤ 1e-2 (mean over ``KEYS`` seeds).

* thermox: ``thermox.linalg.solve(A, b, num_samples, dt, burnin)``, dx = −(Ax − b)dt + dW.
  Its cost grows with N and not with Δ or the burn-in (each is one exact jump), so its
  best setting is the spacing that needs the fewest samples. Searched: Δ ∈ ``SPACINGS``
  (in units of 1/‖A‖, so 1/α_min = 10) × ``associative_scan`` ∈ {True, False}.
* ours: :class:`ThermodynamicSolver` with ``readout="samples"``, prepare + solve. The
  device divides A by its largest absolute row sum s (so its RC time is s time units of
  A) and b by its largest magnitude; its noise level differs from thermox's, so it needs
  its own N. Searched: the same Δ grid (Δ·s in RC). The trajectory backend steps the
  path (cost ∝ N); the closed form draws the same output law (cost independent of N and
  Δ), timed at the trajectory's best setting.

For every Δ the N is the smallest with a *predicted* error ≤ 0.9·10⁻² (exact OU moments
of the mean of N samples, :mod:`thermokfac.solvers.thermo.moments`), then checked: if
the measured mean error exceeds 1e-2, N grows by 25% until it does not. The burn-in is
ln(10⁴)/α_min for both (bias 10⁻⁴, free for both). Times are medians (with quartiles) of
3–25 calls after a warm-up; thermox's jit compilation is excluded.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import numpy as np
import torch

from thermokfac.solvers import ThermodynamicSolver
from thermokfac.solvers.thermo import moments

SPACINGS = (1.0, 3.0, 10.0, 30.0, 100.0)
TARGET = 1e-2
KEYS = 4
ALPHA_MIN = 0.1


def timed(fn) -> dict[str, float]:
    """Median and quartiles of ``fn``'s seconds over as many calls as fit in ~2 s (3–25)."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    times = []
    for _ in range(max(3, min(25, math.ceil(2.0 / max(once, 1e-6))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "calls": len(times)}


def problem(n: int):
    rng = np.random.default_rng(n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.linspace(ALPHA_MIN, 1.0, n)
    a = (q * lam) @ q.T
    b = rng.standard_normal(n)
    return a, b, np.linalg.solve(a, b), q, lam


def predicted_error(lam, coeffs, t0: float, spacing: float, count: int, beta: float) -> float:
    """E‖x̄ − x*‖/‖x*‖ for the mean of N samples Δ apart from x₀ = 0 (x* = Σ cₖqₖ)."""
    bias = moments.samples_mean_factor(lam, t0, spacing, count) * coeffs
    var = moments.samples_variance(lam, t0, spacing, count, beta)
    return float(np.sqrt((bias**2).sum() + var.sum()) / np.linalg.norm(coeffs))


def fewest_samples(lam, coeffs, t0: float, spacing: float, beta: float) -> int:
    """Smallest N with a predicted error ≤ 0.9·TARGET (bisection; the error falls with N)."""
    low, high = 1, 2
    while predicted_error(lam, coeffs, t0, spacing, high, beta) > 0.9 * TARGET:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if predicted_error(lam, coeffs, t0, spacing, mid, beta) > 0.9 * TARGET:
            low = mid
        else:
            high = mid
    return high


def _checked(run, count: int, x_star) -> tuple[int, float]:
    """Grow N by 25% until the measured mean error over KEYS seeds is ≤ TARGET."""
    while True:
        err = float(np.mean([np.linalg.norm(run(count, key) - x_star) / np.linalg.norm(x_star)
                             for key in range(KEYS)]))
        if err <= TARGET:
            return count, err
        count = math.ceil(1.25 * count)


def thermox_side(a, b, x_star, q, lam) -> dict:
    import jax
    import thermox

    f32 = jax.numpy.float32
    aj, bj = jax.numpy.asarray(a, dtype=f32), jax.numpy.asarray(b, dtype=f32)
    coeffs = q.T @ x_star
    settings = []
    for spacing in SPACINGS:
        burnin = math.ceil(math.log(1e4) / ALPHA_MIN / spacing)  # in steps of Δ
        compiled: dict = {}

        def fn(count, scan, spacing=spacing, burnin=burnin, compiled=compiled):
            if (count, scan) not in compiled:  # N samples: thermox returns num_samples + 1
                compiled[count, scan] = jax.jit(lambda key: thermox.linalg.solve(
                    aj, bj, num_samples=count - 1, dt=spacing, burnin=burnin, key=key,
                    associative_scan=scan))
            return compiled[count, scan]

        def run(count, key, fn=fn):
            return np.asarray(fn(count, True)(jax.random.PRNGKey(key)).block_until_ready())

        guess = fewest_samples(lam, coeffs, burnin * spacing, spacing, beta=2.0)
        count, err = _checked(run, guess, x_star)
        for scan in (True, False):
            call = fn(count, scan)
            clock = timed(lambda call=call: call(jax.random.PRNGKey(7)).block_until_ready())
            settings.append({"spacing": spacing, "burnin_steps": burnin,
                             "associative_scan": scan, "samples": count,
                             "predicted_samples": guess, "error": err, **clock})
            print(f"  thermox {settings[-1]}", file=sys.stderr)
    best = min(settings, key=lambda s: s["median_s"])
    return {"best": best, "searched": settings}


def our_side(a, b, x_star, q, lam) -> dict:
    at, bt = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    ref = torch.tensor(x_star, dtype=torch.float32)
    scale = float(np.abs(a).sum(axis=1).max())  # the device's RC is `scale` units of A's time
    full_scale = float(np.abs(b).max())
    # Device units: M̃ = A/s, b̃ = b/fs, x̃* = s·x*/fs (relative errors are unchanged).
    coeffs = q.T @ x_star * scale / full_scale
    lam_dev = lam / scale

    def solver(backend, spacing, count):
        return ThermodynamicSolver(backend=backend, beta=2.0, readout="samples",
                                   t0_rc=math.log(1e4) / ALPHA_MIN * scale,
                                   num_samples=count, sample_spacing_rc=spacing * scale)

    def make(backend, spacing, count):
        s = solver(backend, spacing, count)
        gen = torch.Generator().manual_seed(0)

        def call():
            return s.solve(s.prepare(at, 0.0), bt, generator=gen).x
        return call

    def run(count, key, spacing):
        s = solver("trajectory", spacing, count)
        x = s.solve(s.prepare(at, 0.0), bt, generator=torch.Generator().manual_seed(key)).x
        return x.double().numpy()

    settings = []
    for spacing in SPACINGS:
        t0 = math.log(1e4) / ALPHA_MIN * scale
        guess = fewest_samples(lam_dev, coeffs, t0, spacing * scale, beta=2.0)
        count, err = _checked(lambda c, k, sp=spacing: run(c, k, sp), guess, x_star)
        clock = timed(make("trajectory", spacing, count))
        settings.append({"spacing": spacing, "spacing_rc": spacing * scale, "samples": count,
                         "predicted_samples": guess, "error": err, **clock})
        print(f"  trajectory {settings[-1]}", file=sys.stderr)
    best = min(settings, key=lambda s: s["median_s"])
    call = make("closed-form", best["spacing"], best["samples"])
    closed_err = float(np.mean([float((call() - ref).norm() / ref.norm())
                                for _ in range(KEYS)]))
    closed = {"spacing": best["spacing"], "samples": best["samples"], "error": closed_err,
              **timed(call)}
    return {"trajectory": {"best": best, "searched": settings}, "closed-form": closed,
            "row_sum_scale": scale}


def solver_part(sizes: list[int]) -> dict:
    try:
        import thermox  # noqa: F401
        have_thermox = True
    except ImportError:
        have_thermox = False
        print("thermox is not installed: only this simulator's side is measured",
              file=sys.stderr)
    out = {"target_error": TARGET, "spacings": list(SPACINGS), "keys": KEYS,
           "problem": "SPD, eigenvalues evenly in [0.1, 1], b ~ N(0, I), float32"}
    for n in sizes:
        a, b, x_star, q, lam = problem(n)
        entry: dict = {"n": n, **our_side(a, b, x_star, q, lam)}
        if have_thermox:
            entry["thermox"] = thermox_side(a, b, x_star, q, lam)
            reference = entry["thermox"]["best"]["median_s"]
            entry["closed-form_speedup"] = reference / entry["closed-form"]["median_s"]
            entry["trajectory_speedup"] = reference / entry["trajectory"]["best"]["median_s"]
        out[str(n)] = entry
        print(f"solver n={n}: speed-ups {entry.get('closed-form_speedup')}, "
              f"{entry.get('trajectory_speedup')}", file=sys.stderr)
    return out
