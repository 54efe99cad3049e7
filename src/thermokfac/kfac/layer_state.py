"""Per-layer K-FAC state and the maths of one layer: damping, prepare, precondition.

The moving averages are kept in their lower triangle (:mod:`thermokfac._linalg`); they
are symmetrised only when the solver or a user reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._linalg import symmetrize_lower
from ..enums import DampingSplit, Method
from ..solvers import (
    LinearSolver,
    Prepared,
    SolverError,
    SolveResult,
    TimeBreakdown,
    all_finite,
)
from ..solvers.hardware import from_stats
from .factors import FactorSums, lower_is_finite


@dataclass
class LayerState:
    """Moving averages (Eqs. 16–17) and what was prepared from them for one layer.

    Attributes:
        a, g: EMA of A (``[a_dim, a_dim]``, lower triangle; ``[V]`` when diagonal) and G.
        a_rows, g_rows: Resistor-array mode: this step's rows R (factor = scale·RᵀR),
            kept until the next prepare instead of the factors.
        a_prep, g_prep: Prepared factors (Method 2, ``method='solve'``).
        a_inv, g_inv: Damped inverses (Method 1), full symmetric matrices (a general
            matrix product measured faster than a one-triangle ``symm`` here); ``a_inv``
            is a vector for diagonal A (both methods).
        damping: (λ_A, λ_G) used by the last prepare, after any fallback increase.
        failed: The last prepare failed: the layer's gradient passes through unchanged.
        layout: (weight, bias) preconditioned by these factors (``requires_grad`` when
            they were captured); None before the first capture.
        spectra: What the last prepare reported of each factor's device matrix
            (``{"a"|"g": {"alpha_min", "alpha_max", ...}}``, after the solver's scaling;
            empty for solvers that report none).
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
    a_rows: Tensor | None = None
    g_rows: Tensor | None = None
    a_row_scale: float = 1.0
    g_row_scale: float = 1.0
    layout: tuple[bool, bool] | None = None
    spectra: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def has_factors(self) -> bool:
        """Whether there is something to prepare (factors, or rows in array mode)."""
        return (self.a is not None or self.a_rows is not None) and \
            (self.g is not None or self.g_rows is not None)

    def mean_diagonal(self, which: str) -> float:
        """tr(F)/dim(F) of factor ``which`` ("a" or "g"), from rows or the factor."""
        rows = getattr(self, f"{which}_rows")
        if rows is not None:
            return getattr(self, f"{which}_row_scale") * float(rows.pow(2).sum()) / rows.shape[1]
        factor = getattr(self, which)
        return float(factor.sum() if factor.ndim == 1 else factor.diagonal().sum()) / \
            factor.shape[0]

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

    def take_rows(self, sums: FactorSums, g_scale: float) -> bool:
        """Resistor-array mode: keep this step's rows, A = RᵀR/#rows and G = c·RᵀR.

        Returns:
            False (nothing kept) if any row is non-finite.
        """
        g_rows = torch.cat(sums.g_parts)
        a_rows = torch.cat(sums.a_parts) if sums.a_parts else None
        if not all_finite(g_rows) or not (all_finite(a_rows) if a_rows is not None
                                          else lower_is_finite(sums.a)):
            return False
        self.g_rows, self.g_row_scale = g_rows, g_scale
        if a_rows is None:  # diagonal A (embedding): token frequencies
            self.a = sums.a.div_(sums.a_rows)
        else:
            self.a_rows, self.a_row_scale = a_rows, 1.0 / sums.a_rows
        return True

    def symmetric_factors(self) -> tuple[Tensor, Tensor]:
        a = self.a.clone() if self.a.ndim == 1 else symmetrize_lower(self.a)
        return a, symmetrize_lower(self.g)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: moving-average factors, and what was prepared from them."""
        factors = sum(_nbytes(t) for t in (self.a, self.g, self.a_rows, self.g_rows))
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
            "a_rows": self.a_rows, "g_rows": self.g_rows, "a_row_scale": self.a_row_scale,
            "g_row_scale": self.g_row_scale, "layout": self.layout,
        }

    def to_(self, device: torch.device, factor_dtype: torch.dtype) -> LayerState:
        """Move every tensor to ``device`` in place (returns self): the moving averages
        and rows also to ``factor_dtype``; inverses and prepared states keep their dtype
        (a float64 prepare of an ill-conditioned factor stays float64)."""
        for name in ("a", "g", "a_rows", "g_rows"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=factor_dtype))
        for name in ("a_inv", "g_inv"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        for prep in (self.a_prep, self.g_prep):
            if prep is not None:  # 0-d bookkeeping scalars stay where the solver keeps them
                prep.tensors = {k: v.to(device) if v.ndim else v for k, v in prep.tensors.items()}
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LayerState:
        out = cls(**{**state, "a_prep": None, "g_prep": None})
        out.damping = tuple(state["damping"])
        if out.layout is not None:
            out.layout = tuple(out.layout)
        if state["a_prep"] is not None:
            out.a_prep = Prepared.from_state_dict(state["a_prep"])
        if state["g_prep"] is not None:
            out.g_prep = Prepared.from_state_dict(state["g_prep"])
        return out


def split_damping(mean_a: float, mean_g: float, damping: float, split: DampingSplit
                  ) -> tuple[float, float]:
    """(λ_A, λ_G): both λ (equal), or √λ·π and √λ/π with π² = (tr A/n_A)/(tr G/n_G),
    from the mean diagonals ``mean_a`` = tr A/n_A and ``mean_g`` = tr G/n_G."""
    if split is DampingSplit.EQUAL:
        return damping, damping
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    if not math.isfinite(pi) or pi == 0.0:
        pi = 1.0
    root = math.sqrt(damping)
    return root * pi, root / pi


def job(modeled_s: float, stats: dict[str, float]) -> TimeBreakdown:
    """The device work behind a modelled time (transfer vs compute, and the compute
    under every settle model, when reported)."""
    return from_stats(modeled_s, stats)


def prepare_layer(state: LayerState, solver: LinearSolver, method: Method, damping: float,
                  split: DampingSplit,
                  noise: Callable[[str], torch.Generator | None] = lambda part: None
                  ) -> list[TimeBreakdown]:
    """Prepare (Method 2) or invert (Method 1) both damped factors.

    In the resistor-array mode (rows kept instead of factors) the solver realises each
    factor from its rows and the rows are then released. ``noise("a")`` and
    ``noise("g")`` give the generators of each factor's prepare and inverse.

    Returns:
        The device jobs the solver modelled for this work.
    """
    lam_a, lam_g = split_damping(state.mean_diagonal("a"), state.mean_diagonal("g"), damping,
                                 split)
    jobs: list[TimeBreakdown] = []
    state.a_prep = state.g_prep = state.a_inv = state.g_inv = None
    state.failed = False
    state.spectra = {}
    gen_a, gen_g = noise("a"), noise("g")
    if state.a is not None and state.a.ndim == 1:
        state.a_inv = 1.0 / (state.a + lam_a)
        used_a = lam_a
    else:
        state.a_prep = prepare_factor(state, "a", solver, lam_a, gen_a)
        note_spectrum(state, "a", state.a_prep)
        jobs.append(job(state.a_prep.modeled_time_s, state.a_prep.stats))
        count_stats(state.stats, state.a_prep.stats)
        used_a = state.a_prep.damping
    state.g_prep = prepare_factor(state, "g", solver, lam_g, gen_g)
    note_spectrum(state, "g", state.g_prep)
    jobs.append(job(state.g_prep.modeled_time_s, state.g_prep.stats))
    count_stats(state.stats, state.g_prep.stats)
    state.damping = (used_a, state.g_prep.damping)
    state.a_rows = state.g_rows = None
    if state.g_prep.failed or (state.a_prep is not None and state.a_prep.failed):
        state.failed = True
        state.a_prep = state.g_prep = None
        return jobs
    if method is Method.INVERSE:
        try:
            if state.a_prep is not None:
                result = _converged(solver.inverse(state.a_prep, generator=gen_a))
                state.a_inv = result.x
                jobs.append(job(result.modeled_time_s, result.stats))
            result = _converged(solver.inverse(state.g_prep, generator=gen_g))
            state.g_inv = result.x
            jobs.append(job(result.modeled_time_s, result.stats))
        except SolverError:
            state.failed = True
            state.stats["solver_errors"] = state.stats.get("solver_errors", 0.0) + 1
        state.a_prep = state.g_prep = None
    return jobs


SPECTRUM_KEYS = ("alpha_min", "alpha_max", "true_alpha_min", "scale")


def note_spectrum(state: LayerState, which: str, prepared: Prepared) -> None:
    """Keep what a prepare reported of the device matrix's spectrum (α_min, α_max)."""
    found = {k: float(prepared.stats[k]) for k in SPECTRUM_KEYS if k in prepared.stats}
    if "alpha_min" in found and "alpha_max" in found:
        state.spectra[which] = found


def prepare_factor(state: LayerState, which: str, solver: LinearSolver, damping: float,
                    generator: torch.Generator | None) -> Prepared:
    rows = getattr(state, f"{which}_rows")
    if rows is not None:
        return solver.prepare_rows(rows, getattr(state, f"{which}_row_scale"), damping,
                                   generator=generator)
    return solver.prepare(getattr(state, which), damping, lower_only=True, generator=generator)


def precondition(state: LayerState, d_theta: Tensor, solver: LinearSolver, method: Method,
                 generator: torch.Generator | None) -> tuple[Tensor, list[TimeBreakdown]]:
    """U = (G + λ_G I)⁻¹ DΘ (A + λ_A I)⁻¹ (Eq. 15) for DΘ ``[d_out, a_dim]``.

    Method 1 multiplies by the stored inverses. Method 2 solves two banks of linear
    systems (Sec. 4.1): (G+λI) Q = DΘ for the columns of DΘ, then (A+λI) Uᵀ = Qᵀ for
    the rows of Q. ``d_theta`` (contiguous) is the caller's own buffer: Method 2 works
    in it, and U may share its memory.

    Returns:
        (U in the dtype of ``d_theta``, the device jobs of the solves).

    Raises:
        SolverError: If a solve failed; the caller passes the gradient through.
    """
    if method is Method.INVERSE:
        work = torch.promote_types(state.g_inv.dtype, state.a_inv.dtype)
        q = state.g_inv.to(work) @ d_theta.to(work)
        a_inv = state.a_inv.to(work)
        u = q * a_inv if a_inv.ndim == 1 else q @ a_inv
        return u.to(d_theta.dtype), []
    # A factor prepared in float64 (ill-conditioned in float32) keeps both banks and the
    # intermediate Q in float64: rounding Q to float32 would undo it.
    work = state.g_prep.dtype if state.a_prep is None else torch.promote_types(
        state.g_prep.dtype, state.a_prep.dtype)
    out_dtype = d_theta.dtype
    d_theta = d_theta.to(work)
    # The caller checked DΘ and checks U (through ⟨U, DΘ⟩), so the solves skip it.
    res_g = _converged(solver.solve(state.g_prep, d_theta, generator=generator,
                                    overwrite_b=True, check_finite=False))
    jobs = [job(res_g.modeled_time_s, res_g.stats)]
    q = res_g.x
    if state.a_prep is None:  # diagonal A
        return (q * state.a_inv.to(q.dtype)).to(out_dtype), jobs
    res_a = _converged(solver.solve(state.a_prep, q.mT, generator=generator, overwrite_b=True,
                                    check_finite=False))
    jobs.append(job(res_a.modeled_time_s, res_a.stats))
    return res_a.x.mT.to(out_dtype), jobs


def _converged(result: SolveResult) -> SolveResult:
    """An iterative solve that reports it did not converge is a solver failure."""
    if result.stats.get("converged", 1.0) == 0.0:
        raise SolverError(f"the solve did not converge (relative residual "
                          f"{result.stats.get('rel_residual', float('nan')):.3g})")
    return result


def precondition_layer(helper, state: LayerState, solver: LinearSolver, method: Method,
                       generator: torch.Generator | None
                       ) -> tuple[Tensor, float, list[TimeBreakdown]] | str:
    """Precondition one layer's gradient, or say why not.

    Returns:
        ``(U, ⟨U, DΘ⟩, jobs)``; or the name of the statistic to count when the gradient
        is passed through: ``"passthrough_layers"`` (nothing prepared),
        ``"nonfinite_grad_skips"``, ``"solver_errors"``, ``"nonfinite_update_skips"``;
        or ``""`` when the layer has no gradient.
    """
    if not helper.has_grad():
        return ""
    if not state.ready:
        return "passthrough_layers"
    d_theta = helper.grad_matrix()
    if not all_finite(d_theta):
        return "nonfinite_grad_skips"
    try:
        u, jobs = precondition(state, d_theta, solver, method, generator)
    except SolverError:
        return "solver_errors"
    # ⟨U, DΘ⟩ is non-finite whenever U is (DΘ is finite): one inner product checks U
    # and feeds the KL clip.
    u_dot_d = helper.inner_with_grad(u)
    if not math.isfinite(u_dot_d):
        return "nonfinite_update_skips"
    return u, u_dot_d, jobs


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def count_stats(into: dict[str, float], stats: dict[str, float]) -> None:
    for key in ("float64_retries", "damping_increases", "failed", "ill_conditioned"):
        into[key] = into.get(key, 0.0) + stats.get(key, 0.0)
