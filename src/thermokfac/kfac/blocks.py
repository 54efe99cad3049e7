"""Kronecker blocks: one object per block, owning its state and its three phases.

A block is a layer, a group of a grouped convolution, an attention projection, or the
weight or bias part of a layer (``separate_weight_and_bias``). It holds two
:mod:`estimates <.estimates>` (A and G) and, after a prepare, one :mod:`cache
<.caches>` per factor, and exposes the phases of a K-FAC step:

1. :meth:`KroneckerBlock.update_estimate` — cheap, every factor step: this step's A and
   G (Eq. 12) fold into the estimates (Eqs. 16–17);
2. :meth:`KroneckerBlock.update_cache` — periodic: damp and prepare (Method 2) or
   invert (Method 1) the factors this rank owns (Sec. 4.1), then :meth:`settle_cache`
   once every owner's result is in;
3. :meth:`KroneckerBlock.apply` — every step: U = (G + λ_G I)⁻¹ DΘ (A + λ_A I)⁻¹
   (Eq. 15);

and its checkpoint (:meth:`state_dict`). The kinds of estimate (matrix, diagonal, rows)
and cache (inverse, prepared, diagonal, failed) are separate classes behind one
interface each; the block holds no optional field per mode and tests no tensor shape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..enums import DampingSplit, Method
from ..solvers import LinearSolver, Prepared, TimeBreakdown
from .caches import (
    DiagonalCache,
    FactorCache,
    FailedCache,
    InverseCache,
    PreparedCache,
    build_cache,
    job,
)
from .curvature import CurvatureSums
from .estimates import FactorEstimate, MovingAverage, estimate_for
from .layers import LayerHelper

logger = logging.getLogger("thermokfac")

FACTORS = ("a", "g")
#: Prepare statistics a block accumulates (``stats``), as the solvers report them.
PREPARE_KEYS = ("float64_retries", "damping_increases", "failed", "ill_conditioned",
                "solver_errors")


def split_damping(mean_a: float, mean_g: float, damping: float, split: DampingSplit
                  ) -> tuple[float, float]:
    """(λ_A, λ_G): both λ (equal); √λ·π and √λ/π with π² = (tr A/n_A)/(tr G/n_G) (pi);
    or λ·tr A/n_A and λ·tr G/n_G (relative), from the mean diagonals ``mean_a`` =
    tr A/n_A and ``mean_g`` = tr G/n_G.

    >>> split_damping(4.0, 1.0, 1e-2, DampingSplit.PI)
    (0.2, 0.05)
    """
    if split is DampingSplit.EQUAL:
        return damping, damping
    if split is DampingSplit.RELATIVE:
        return damping * max(mean_a, 0.0), damping * max(mean_g, 0.0)
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    if not math.isfinite(pi) or pi == 0.0:
        pi = 1.0
    root = math.sqrt(damping)
    return root * pi, root / pi


@dataclass
class SolveErrors:
    """What measuring one block's solves found (``measure_solve_error_every``).

    Attributes:
        errors: ``{"a"|"g": relative error}`` of the factors whose cache keeps its
            reference (:meth:`FactorCache.solve_error`).
        predicted: ``{"a"|"g": relative error}`` the solver predicted before the solve
            (:meth:`FactorCache.predicted_error`), where it has a model.
        seconds: Time spent measuring (copies and float64 solves), by ``clock``: the
            caller leaves it out of the step's timings.
        clock: The clock read around the measuring (seconds).
    """

    errors: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    clock: Callable[[], float] = time.perf_counter

    def copy(self, which: str, cache: FactorCache, x: Tensor, solver: LinearSolver,
             side: str) -> Tensor | None:
        """Before an application: a copy of the right-hand side ``x`` if ``cache`` can
        be measured, and the solver's prediction of its error."""
        if cache.reference is None:
            return None
        start = self.clock()
        rhs = x.clone()
        predicted = cache.predicted_error(solver, rhs, side)
        if predicted is not None:
            self.predicted[which] = predicted
        self.seconds += self.clock() - start
        return rhs

    def measure(self, which: str, cache: FactorCache, rhs: Tensor | None, answer: Tensor,
                side: str) -> None:
        """Record ``cache``'s error on ``rhs`` (a :meth:`copy`; nothing if None)."""
        if rhs is None:
            return
        start = self.clock()
        error = cache.solve_error(rhs, answer, side)
        if error is not None:
            self.errors[which] = error
        self.seconds += self.clock() - start


class KroneckerBlock:
    """One Kronecker block of the block-diagonal curvature (Eq. 11).

    Args:
        name: The block's name (the module's, with a suffix for multi-block modules).
        index: Its position in model order (seeds its noise, :meth:`KFACPreconditioner.noise`).
        helper: Maps the module to K-FAC's format and to its gradient matrix DΘ.
        rows: Keep rows instead of factors (the resistor-array mode, App. E).

    Attributes:
        a, g: The factor estimates (:mod:`.estimates`).
        caches: ``{"a"|"g": FactorCache}`` after a prepare (:mod:`.caches`); a rank
            that owns no part of the block's work under a distributed assignment
            holds none.
        prepared: Whether a prepare completed (on some rank) since the estimates started
            (a block not prepared yet is prepared at the next step, due or not).
        damping: (λ_A, λ_G) of the last prepare, after any fallback increase (of the
            factors this rank prepared or received: under ``mem-opt`` a rank knows its
            own blocks').
        failed: The last prepare (on this rank) failed: the block's gradient passes
            through.
        layout: (weight, bias) trainable when the estimates were captured; None before.
        stats: Prepare statistics summed over this block's prepares on this rank.
        spectra: ``{"a"|"g": {"alpha_min", "alpha_max", ...}}`` of the last prepare's
            device matrices (thermodynamic solver; empty for others).
    """

    def __init__(self, name: str, index: int, helper: LayerHelper, *, rows: bool = False
                 ) -> None:
        self.name, self.index, self.helper = name, index, helper
        self._rows = rows
        self.restart(None)

    def restart(self, layout: tuple[bool, bool] | None) -> None:
        """Start afresh (at construction, or when the trainable parameters changed).

        Args:
            layout: Which of (weight, bias) are trainable, or None (not known yet).
        """
        diagonal = self.helper.diagonal_a
        self.a: FactorEstimate = estimate_for("a", diagonal=diagonal, rows=self._rows)
        self.g: FactorEstimate = estimate_for("g", diagonal=False, rows=self._rows)
        self.caches: dict[str, FactorCache] = {}
        self.prepared = False
        self.damping: tuple[float, float] = (0.0, 0.0)
        self.failed = False
        self.layout = layout
        self.stats: dict[str, float] = {}
        self.spectra: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------- estimates
    @property
    def has_estimate(self) -> bool:
        """Whether both factors have something to prepare."""
        return self.a.present and self.g.present

    def update_estimate(self, sums: CurvatureSums, decay: float) -> bool:
        """Fold this step's A and G (Eq. 12) into the estimates (Eqs. 16–17).

        Args:
            sums: This step's curvature sums of the block (over the global batch).
            decay: The moving averages' decay ε, in [0, 1).

        Returns:
            False, leaving the estimates as they were, if a fresh factor is not finite.
        """
        a, g = self.a.fresh(sums), self.g.fresh(sums)
        if not (self.a.is_finite(a) and self.g.is_finite(g)):
            return False
        self.a.update(a, decay)
        self.g.update(g, decay)
        return True

    def follow(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Move the estimates to where (and the dtype in which) the step's factors now
        come, when the model was moved or cast; the caches are prepared again.

        Args:
            device: Where the step's factors come from.
            dtype: The factors' dtype now.

        Returns:
            Whether anything moved.
        """
        held = self.g.held
        if held is None or (held.device == device and held.dtype == dtype):
            return False
        self.to_(device, dtype)
        self.prepared = False
        return True

    def follow_layout(self, captured: tuple[bool, bool] | None) -> bool:
        """Restart if the trainable parameters differ from those of the estimates.

        Args:
            captured: Which of (weight, bias) were trainable at this capture, or None.

        Returns:
            Whether the block restarted (logged).
        """
        a = self.a
        if captured is not None and self.layout is None and isinstance(a, MovingAverage) \
                and not a.diagonal and a.value is not None \
                and a.value.shape[0] != self.helper.a_dim:
            self.layout = (not captured[0], captured[1])  # a state saved without layout
        if captured is None or self.layout in (None, captured):
            if captured is not None:
                self.layout = captured
            return False
        logger.info("layer %r: trainable parameters changed (weight, bias) %s -> %s; its "
                    "factors start afresh", self.name, self.layout, captured)
        self.restart(captured)
        return True

    @property
    def layout_matches(self) -> bool:
        """Whether the estimates belong to the parameters trainable now."""
        return self.layout is None or self.layout == self.helper.layout

    # ----------------------------------------------------------------- caches
    def update_cache(self, solver: LinearSolver, method: Method, damping: float,
                     split: DampingSplit, owned: Iterable[str],
                     noise: Callable[[str], torch.Generator | None],
                     keep_reference: bool = False) -> list[TimeBreakdown]:
        """Damp, then prepare (Method 2) or invert (Method 1) the ``owned`` factors.

        A diagonal A is inverted by every rank (no solver work). The factors a rank
        does not own arrive through its communicator; :meth:`settle_cache` follows.

        Args:
            solver: The solver.
            method: Method 1 (``inverse``) or 2 (``solve``).
            damping: λ of this step.
            split: How λ is shared between the factors.
            owned: The factors (``"a"``, ``"g"``) this rank prepares.
            noise: ``noise(factor)``: the generator of that factor's stochastic work.
            keep_reference: Keep each prepared factor's float64 copy in its cache
                (:attr:`FactorCache.reference`), so that :meth:`apply` can measure the
                solve error.

        Returns:
            The device jobs the solver modelled.
        """
        means = (0.0, 0.0) if split is DampingSplit.EQUAL else \
            (self.a.mean_diagonal(), self.g.mean_diagonal())
        lam = dict(zip(FACTORS, split_damping(*means, damping, split)))
        self.caches, self.prepared = {}, False  # prepared again once settled
        jobs: list[TimeBreakdown] = []
        prepared: dict[str, tuple[Prepared, torch.Generator | None]] = {}
        for which in FACTORS:
            estimate = getattr(self, which)
            if estimate.diagonal:
                self.caches[which] = DiagonalCache.of(estimate.value, lam[which])
            elif which in owned:
                generator = noise(which)
                prepared[which] = (estimate.prepare(solver, lam[which], generator), generator)
                jobs.append(job(prepared[which][0]))
        # Method 1 inverts once every prepare here succeeded, and stops at a failure.
        failed = any(p.failed for p, _ in prepared.values())
        for which, (prep, generator) in prepared.items():
            cache = FailedCache(prep.damping, prep.stats) if failed else \
                build_cache(prep, method, solver, generator, jobs)
            failed = failed or cache.failed
            if keep_reference and not cache.failed:
                cache.reference = getattr(self, which).reference()
            self.caches[which] = cache
        new = [self.caches[w] for w in prepared]
        for key in PREPARE_KEYS:  # a block's solver error counts once
            total = sum(c.stats.get(key, 0.0) for c in new)
            self.stats[key] = self.stats.get(key, 0.0) + (min(total, 1.0)
                                                          if key == "solver_errors" else total)
        return jobs

    def settle_cache(self) -> None:
        """After a prepare: the damping in effect, failure, spectra; rows released."""
        caches = self.caches
        self.damping = (caches["a"].damping if "a" in caches else self.damping[0],
                        caches["g"].damping if "g" in caches else self.damping[1])
        self.spectra = {w: c.spectrum for w, c in caches.items() if c.spectrum}
        self.failed = any(c.failed for c in caches.values())
        if self.failed:
            self.caches = {}
        self.prepared = True
        self.a.release()
        self.g.release()

    def drop_cache(self) -> None:
        """Forget the caches (a rank that does not hold this block's prepared state)."""
        self.caches = {}

    @property
    def ready(self) -> bool:
        """Whether U can be computed here (both caches present and none failed)."""
        return not self.failed and "a" in self.caches and "g" in self.caches

    # ------------------------------------------------------------ precondition
    def apply(self, d_theta: Tensor, solver: LinearSolver,
              generator: torch.Generator | None, measure: SolveErrors | None = None
              ) -> tuple[Tensor, list[TimeBreakdown]]:
        """U = (G + λ_G I)⁻¹ DΘ (A + λ_A I)⁻¹ (Eq. 15) for DΘ ``[d_out, a_dim]``.

        Method 1 multiplies by the inverses; Method 2 solves two banks of linear systems
        (Sec. 4.1): (G+λI) Q = DΘ for the columns of DΘ, then (A+λI) Uᵀ = Qᵀ for the
        rows of Q. Both work in the wider dtype of the two caches (a factor prepared in
        float64 keeps Q in float64). ``d_theta`` is the caller's own buffer: the solves
        work in it, and U may share its memory.

        Args:
            d_theta: DΘ, ``[d_out, a_dim]`` (the weight's gradient, the bias's column
                appended when the bias shares the block).
            solver: The solver of Method 2's solves.
            generator: Random source of a stochastic solver.
            measure: If given, filled with each factor's measured solve error
                (:meth:`FactorCache.solve_error`: G's against DΘ, A's against the Q the
                G solve gave), for the factors whose cache keeps its reference, and the
                solver's prediction of it; the right-hand sides are copied first, as the
                solves work in them.

        Returns:
            (U in the dtype of ``d_theta``, the device jobs of the solves).

        Raises:
            SolverError: A solve failed or did not converge.
        """
        a, g = self.caches["a"], self.caches["g"]
        work = torch.promote_types(g.dtype, a.dtype)
        jobs: list[TimeBreakdown] = []
        x = d_theta.to(work)
        rhs = None if measure is None else measure.copy("g", g, x, solver, "left")
        q = g.left(x, solver, generator, jobs)
        if measure is not None:
            measure.measure("g", g, rhs, q, "left")
            rhs = measure.copy("a", a, q, solver, "right")
        u = a.right(q, solver, generator, jobs)
        if measure is not None:
            measure.measure("a", a, rhs, u, "right")
        return u.to(d_theta.dtype), jobs

    @property
    def keeps_input(self) -> bool:
        """Whether :meth:`apply` leaves its DΘ buffer as it was (Method 1, diagonal)."""
        return not any(c.overwrites for c in self.caches.values())

    # -------------------------------------------------------------- inspection
    def factors(self) -> tuple[Tensor, Tensor] | None:
        """(A, G), symmetric copies (A a vector when diagonal); None without both."""
        a, g = self.a.matrix(), self.g.matrix()
        return None if a is None or g is None else (a, g)

    def prepared_factor(self, which: str) -> Prepared | None:
        """The solver's prepared state of factor ``which`` (Method 2), or None.

        Args:
            which: ``"a"`` or ``"g"``.
        """
        cache = self.caches.get(which)
        return cache.prepared if isinstance(cache, PreparedCache) else None

    def inverse(self, which: str) -> Tensor | None:
        """The damped inverse of factor ``which`` (Method 1; 1/(a + λ) for a diagonal
        A), or None.

        Args:
            which: ``"a"`` or ``"g"``.
        """
        cache = self.caches.get(which)
        if isinstance(cache, InverseCache):
            return cache.inverse
        return cache.reciprocal if isinstance(cache, DiagonalCache) else None

    @property
    def a_prep(self) -> Prepared | None:
        """:meth:`prepared_factor` of A."""
        return self.prepared_factor("a")

    @property
    def g_prep(self) -> Prepared | None:
        """:meth:`prepared_factor` of G."""
        return self.prepared_factor("g")

    @property
    def a_inv(self) -> Tensor | None:
        """:meth:`inverse` of A."""
        return self.inverse("a")

    @property
    def g_inv(self) -> Tensor | None:
        """:meth:`inverse` of G."""
        return self.inverse("g")

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: the estimates (``factors``) and the caches (``prepared``)."""
        return {"factors": self.a.nbytes() + self.g.nbytes(),
                "prepared": sum(c.nbytes() for c in self.caches.values())}

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The block's state in the flat per-layer checkpoint format (:mod:`.state`)."""
        out: dict[str, Any] = {"a": None, "g": None, "a_prep": None, "g_prep": None,
                               "a_inv": None, "g_inv": None, "a_rows": None, "g_rows": None,
                               "a_row_scale": 1.0, "g_row_scale": 1.0}
        out.update(self.a.entries())
        out.update(self.g.entries())
        for which, cache in self.caches.items():
            out.update(cache.entries(which))
        out.update(damping=tuple(self.damping), failed=self.failed, stats=dict(self.stats),
                   layout=self.layout, prepared=self.prepared)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked by :func:`.state.unpack` beforehand).

        Args:
            state: What :meth:`state_dict` returned (after migration).
        """
        self.restart(None if state.get("layout") is None else tuple(state["layout"]))
        self.a.load_entries(state)
        self.g.load_entries(state)
        damping_a, damping_g = (float(d) for d in state["damping"])
        self.damping = (damping_a, damping_g)
        for i, which in enumerate(FACTORS):
            prep, inv = state.get(f"{which}_prep"), state.get(f"{which}_inv")
            if prep is not None:
                self.caches[which] = PreparedCache(Prepared.from_state_dict(prep))
            elif inv is not None and getattr(self, which).diagonal:
                self.caches[which] = DiagonalCache(inv, self.damping[i])
            elif inv is not None:
                self.caches[which] = InverseCache(inv, self.damping[i])
        self.failed = bool(state["failed"])
        self.stats = dict(state.get("stats", {}))
        self.prepared = bool(state["prepared"])

    def to_(self, device: torch.device, factor_dtype: torch.dtype) -> KroneckerBlock:
        """Copy every tensor to ``device`` (returns self): the estimates also to
        ``factor_dtype``; caches keep their dtype (a float64 prepare of an
        ill-conditioned factor stays float64). The copies leave the tensors of a loaded
        state dict untouched by later steps.

        Args:
            device: The target device.
            factor_dtype: The estimates' dtype.

        Returns:
            This block.
        """
        self.a.to_(device, factor_dtype)
        self.g.to_(device, factor_dtype)
        for cache in self.caches.values():
            cache.to_(device)
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, a={type(self.a).__name__}, "
                f"g={type(self.g).__name__}, ready={self.ready})")
