"""Per-layer K-FAC state and the maths of one layer: damping, prepare, precondition.

The moving averages are kept in their lower triangle (:mod:`thermokfac._kernels`); they
are symmetrised only when the solver or a user reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._kernels import symmetrize_lower
from .enums import DampingSplit, Method
from .solvers import LinearSolver, Prepared, SolverError


@dataclass
class LayerState:
    """Moving averages (Eqs. 16–17) and what was prepared from them for one layer.

    Attributes:
        a, g: EMA of A (``[a_dim, a_dim]``, lower triangle; ``[V]`` when diagonal) and G.
        a_prep, g_prep: Prepared factors (Method 2, ``method='solve'``).
        a_inv, g_inv: Damped inverses (Method 1), full symmetric matrices (a general
            matrix product measured faster than a one-triangle ``symm`` here); ``a_inv``
            is a vector for diagonal A (both methods).
        damping: (λ_A, λ_G) used by the last prepare, after any fallback increase.
        failed: The last prepare failed: the layer's gradient passes through unchanged.
    """

    a: Tensor | None = None
    g: Tensor | None = None
    a_prep: Prepared | None = None
    g_prep: Prepared | None = None
    a_inv: Tensor | None = None
    g_inv: Tensor | None = None
    damping: tuple[float, float] = (0.0, 0.0)
    failed: bool = False
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Whether U can be computed (something was prepared and it did not fail)."""
        return not self.failed and (self.a_prep is not None or self.a_inv is not None)

    def update_ema(self, a_new: Tensor, g_new: Tensor, decay: float) -> None:
        """Ã ← β·Ã + (1 − β)·A (Eqs. 16–17); the first update initialises the average.

        On the first update, or with β = 0, the average takes ``a_new``/``g_new``
        themselves (no copy): the caller hands them over.
        """
        if self.a is None or self.g is None or decay == 0.0:
            self.a, self.g = a_new, g_new
        else:
            self.a.lerp_(a_new, 1.0 - decay)
            self.g.lerp_(g_new, 1.0 - decay)

    def symmetric_factors(self) -> tuple[Tensor, Tensor]:
        a = self.a.clone() if self.a.ndim == 1 else symmetrize_lower(self.a)
        return a, symmetrize_lower(self.g)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: moving-average factors, and what was prepared from them."""
        factors = sum(_nbytes(t) for t in (self.a, self.g))
        prepared = sum(_nbytes(t) for t in (self.a_inv, self.g_inv))
        for prep in (self.a_prep, self.g_prep):
            if prep is not None:
                prepared += sum(_nbytes(t) for t in prep.tensors.values())
        return {"factors": factors, "prepared": prepared}

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "g": self.g,
            "a_prep": None if self.a_prep is None else self.a_prep.state_dict(),
            "g_prep": None if self.g_prep is None else self.g_prep.state_dict(),
            "a_inv": self.a_inv, "g_inv": self.g_inv,
            "damping": tuple(self.damping), "failed": self.failed, "stats": dict(self.stats),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LayerState:
        out = cls(**{**state, "a_prep": None, "g_prep": None})
        out.damping = tuple(state["damping"])
        if state["a_prep"] is not None:
            out.a_prep = Prepared.from_state_dict(state["a_prep"])
        if state["g_prep"] is not None:
            out.g_prep = Prepared.from_state_dict(state["g_prep"])
        return out


def split_damping(a: Tensor, g: Tensor, damping: float, split: DampingSplit
                  ) -> tuple[float, float]:
    """(λ_A, λ_G): both λ (equal), or √λ·π and √λ/π with π² = (tr A/n_A)/(tr G/n_G)."""
    if split is DampingSplit.EQUAL:
        return damping, damping
    mean_a = float(a.sum() if a.ndim == 1 else a.diagonal().sum()) / a.shape[0]
    mean_g = float(g.diagonal().sum()) / g.shape[0]
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    if not math.isfinite(pi) or pi == 0.0:
        pi = 1.0
    root = math.sqrt(damping)
    return root * pi, root / pi


def prepare_layer(state: LayerState, solver: LinearSolver, method: Method, damping: float,
                  split: DampingSplit, generator: torch.Generator | None) -> float:
    """Prepare (Method 2) or invert (Method 1) both damped factors.

    Returns:
        The hardware time the solver modelled for this work.
    """
    a, g = state.a, state.g  # lower triangles (a: vector when diagonal)
    lam_a, lam_g = split_damping(a, g, damping, split)
    modeled = 0.0
    state.a_prep = state.g_prep = state.a_inv = state.g_inv = None
    state.failed = False
    if a.ndim == 1:
        state.a_inv = 1.0 / (a + lam_a)
        used_a = lam_a
    else:
        prep_a = solver.prepare(a, lam_a, lower_only=True)
        modeled += prep_a.modeled_time_s
        _count(state.stats, prep_a.stats)
        used_a = prep_a.damping
        state.a_prep = prep_a
    prep_g = solver.prepare(g, lam_g, lower_only=True)
    modeled += prep_g.modeled_time_s
    _count(state.stats, prep_g.stats)
    state.g_prep = prep_g
    state.damping = (used_a, prep_g.damping)
    if prep_g.failed or (state.a_prep is not None and state.a_prep.failed):
        state.failed = True
        state.a_prep = state.g_prep = None
        return modeled
    if method is Method.INVERSE:
        try:
            if state.a_prep is not None:
                result = solver.inverse(state.a_prep, generator=generator)
                state.a_inv, modeled = result.x, modeled + result.modeled_time_s
            result = solver.inverse(state.g_prep, generator=generator)
            state.g_inv, modeled = result.x, modeled + result.modeled_time_s
        except SolverError:
            state.failed = True
            state.stats["solver_errors"] = state.stats.get("solver_errors", 0.0) + 1
        state.a_prep = state.g_prep = None
    return modeled


def precondition(state: LayerState, d_theta: Tensor, solver: LinearSolver, method: Method,
                 generator: torch.Generator | None) -> tuple[Tensor, float]:
    """U = (G + λ_G I)⁻¹ DΘ (A + λ_A I)⁻¹ (Eq. 15) for DΘ ``[d_out, a_dim]``.

    Method 1 multiplies by the stored inverses. Method 2 solves two banks of linear
    systems (Sec. 4.1): (G+λI) Q = DΘ for the columns of DΘ, then (A+λI) Uᵀ = Qᵀ for
    the rows of Q. ``d_theta`` (contiguous) is the caller's own buffer: Method 2 works
    in it, and U may share its memory.

    Returns:
        (U in the dtype of ``d_theta``, modelled hardware time).

    Raises:
        SolverError: If a solve failed; the caller passes the gradient through.
    """
    if method is Method.INVERSE:
        work = state.g_inv.dtype
        q = state.g_inv @ d_theta.to(work)
        a_inv = state.a_inv.to(work)
        u = q * a_inv if a_inv.ndim == 1 else q @ a_inv
        return u.to(d_theta.dtype), 0.0
    # The caller checked DΘ and checks U (through ⟨U, DΘ⟩), so the solves skip it.
    res_g = solver.solve(state.g_prep, d_theta, generator=generator, overwrite_b=True,
                         check_finite=False)
    q = res_g.x
    if state.a_prep is None:  # diagonal A
        return (q * state.a_inv.to(q.dtype)).to(d_theta.dtype), res_g.modeled_time_s
    res_a = solver.solve(state.a_prep, q.mT, generator=generator, overwrite_b=True,
                         check_finite=False)
    return res_a.x.mT.to(d_theta.dtype), res_g.modeled_time_s + res_a.modeled_time_s


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _count(into: dict[str, float], stats: dict[str, float]) -> None:
    for key in ("float64_retries", "damping_increases", "failed"):
        into[key] = into.get(key, 0.0) + stats.get(key, 0.0)
