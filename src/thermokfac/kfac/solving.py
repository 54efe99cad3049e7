"""The solver half of a K-FAC step: prepare the damped factors when due, then
precondition every layer's gradient and apply the KL clip (paper Sec. 4.1, Eq. 15)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..solvers import LinearSolver, TimeBreakdown
from ..timing import TimedSolves
from .config import KFACConfig
from .hyperparams import INTERVAL, NON_NEGATIVE, POSITIVE, resolve
from .kl_clip import LayerRates, kl_clip_scale, trainable_params, weighted_sum
from .layer_state import LayerState, precondition_layer, prepare_layer
from .records import LayerRecord

#: (key in a layer's prepare statistics, key in ``KFACPreconditioner.stats``)
PREPARE_STATS = (("float64_retries", "float64_retries"),
                 ("damping_increases", "damping_increases"), ("failed", "prepare_failures"),
                 ("solver_errors", "solver_errors"), ("ill_conditioned", "ill_conditioned_solves"))

Warn = Callable[[str, str], None]


def modeled_time(solver: LinearSolver, jobs: list[TimeBreakdown]) -> list[float]:
    """Device time of a step's jobs: over the solver's SPUs when it has a hardware model
    (the busiest SPU), else their sum — under the hardware model's settle model, then
    under ``rc``, ``rc_over_alpha_min`` and ``target_error`` (zeros without a model)."""
    hardware = getattr(solver, "hardware", None)
    if hardware is None:
        return [sum(j.total_s for j in jobs), 0.0, 0.0, 0.0]
    return [hardware.step_time(jobs), *hardware.step_times(jobs).values()]


Noise = Callable[[str, str], torch.Generator]  # (layer, part) ↦ its generator
NOISE_PARTS = {"a": 0, "g": 1, "u": 2}


def noise_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of draw ``index`` (3·layer + part) at ``step``: a function of
    (seed, step, index) alone, so every rank, one process and a resumed run agree."""
    value = seed * 1_000_003 + step * 7919 + index
    return torch.Generator(device=device).manual_seed(value % (2**63 - 1))


def prepare_due(states: Mapping[str, LayerState], solver: LinearSolver, cfg: KFACConfig,
                step: int, noise: Noise, stats: dict[str, float],
                warn: Warn) -> list[TimeBreakdown]:
    """Prepare (Method 2) or invert (Method 1) every layer due at ``step``, or not yet
    ready; the failure policy's events are counted in ``stats`` and warned once.
    ``noise(name, part)`` gives the generator of each factor's stochastic work."""
    every = int(resolve("inv_update_steps", cfg.inv_update_steps, step, INTERVAL))
    due = step % every == 0
    damping = resolve("damping", cfg.damping, step, NON_NEGATIVE)
    jobs: list[TimeBreakdown] = []
    for name, state in states.items():
        if not state.has_factors or not (due or (not state.ready and not state.failed)):
            continue
        before = dict(state.stats)
        jobs += prepare_layer(state, solver, cfg.method, damping, cfg.damping_split,
                              lambda part, name=name: noise(name, part))
        for key, stat in PREPARE_STATS:
            stats[stat] += state.stats.get(key, 0.0) - before.get(key, 0.0)
    warn_fallbacks(stats, cfg.factor_dtype, warn)
    return jobs


def warn_fallbacks(stats: dict[str, float], factor_dtype: torch.dtype, warn: Warn) -> None:
    """One-time warnings for the failure policy's events counted in ``stats``."""
    if stats["damping_increases"] or stats["prepare_failures"]:
        warn("fallback", (
            "a damped factor could not be factorised as given (singular or too "
            "ill-conditioned even in float64): its damping was raised ×10 until it could "
            "(counted in stats['damping_increases']) or its gradient passes through "
            "(stats['prepare_failures']); the damping in effect is in "
            "pre.layer_state(name).damping — use more damping"))
    if stats["ill_conditioned_solves"] and factor_dtype != torch.float64:
        warn("ill_conditioned", (
            "a float32 factorisation was ill-conditioned (its solves could be far off a "
            "float64 solve): it was prepared and solved in float64 from the stored "
            "factor instead, counted in stats['ill_conditioned_solves']; "
            "factor_dtype=torch.float64 (or more damping) is the remedy"))


def precondition_all(records: Mapping[str, LayerRecord], states: Mapping[str, LayerState],
                     solver: LinearSolver, cfg: KFACConfig, step: int,
                     noise: Noise, stats: dict[str, float],
                     lr: float | None, optimizer: torch.optim.Optimizer | None, warn: Warn,
                     clock: Callable[[], float] = time.perf_counter
                     ) -> tuple[list[TimeBreakdown], list[LayerRecord], float]:
    """U = (G+λI)⁻¹ DΘ (A+λI)⁻¹ for every layer, scaled by the KL clip, into ``.grad``.

    Returns:
        The device jobs of the solves, the layers whose ``.grad`` now holds U, and the
        seconds spent inside the solver's solves (read with ``clock``).
    """
    solver = TimedSolves(solver, clock)
    updates: list[tuple[LayerRecord, Tensor, float]] = []
    jobs: list[TimeBreakdown] = []
    for name, record in records.items():
        state = states[name]
        if state.layout is not None and state.layout != record.helper.layout \
                and record.helper.has_grad():
            stats["passthrough_layers"] += 1  # factors of other parameters
            continue
        outcome = precondition_layer(record.helper, state, solver, cfg.method,
                                     noise(name, "u"))
        if isinstance(outcome, str):
            if outcome:
                stats[outcome] += 1
            if outcome == "solver_errors":
                warn("solver_errors", (
                    f"the solver failed on layer {name!r} (non-finite or unconverged "
                    "solve): its gradient passes through unchanged, counted in "
                    "stats['solver_errors']"))
            continue
        u, u_dot_d, layer_jobs = outcome
        jobs += layer_jobs
        updates.append((record, u, u_dot_d))
    if lr is None and cfg.lr is not None:
        lr = resolve("lr", cfg.lr, step, POSITIVE)
    rates = LayerRates(lr, optimizer, cfg.momentum)  # each layer's group's η
    vg = weighted_sum([(rates(*trainable_params(r.helper)), v) for r, _, v in updates])
    nu = 1.0 if vg is None else kl_clip_scale(cfg.kl_clip, vg, 1.0)
    stats["kl_clip_scale"] = nu
    for record, u, _ in updates:
        record.helper.set_grad_matrix(u.mul_(nu) if nu != 1.0 else u)
    return jobs, [record for record, _, _ in updates], solver.seconds
