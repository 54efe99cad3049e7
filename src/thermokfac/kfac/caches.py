"""What a prepare makes of one damped factor: the periodic, expensive half of K-FAC.

Every ``inv_update_steps`` each block hands its damped factors F + λI to the solver
(:meth:`~thermokfac.solvers.LinearSolver.prepare`) and keeps, per factor, a cache that
applies (F + λI)⁻¹ from the left (G, to the columns of DΘ) or from the right (A, to the
rows of Q = (G+λI)⁻¹DΘ) at every step — Eq. 15 as two products or two solve banks:

* :class:`InverseCache` — Method 1 (Sec. 4.1): the explicit inverse, applied by a
  matrix product;
* :class:`PreparedCache` — Method 2: the solver's prepared state, applied by a bank of
  linear solves (on the device, for the thermodynamic solver);
* :class:`DiagonalCache` — a diagonal A (embeddings): 1/(a + λ), under either method;
* :class:`FailedCache` — a factor that could not be prepared: its block passes the
  gradient through.

:data:`CACHE_FOR_METHOD` is the registry from :class:`~thermokfac.enums.Method` to the
class that builds a cache from a prepared factor.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..enums import Method
from ..solvers import LinearSolver, Prepared, SolverError, SolveResult, TimeBreakdown
from ..solvers.hardware import from_stats

#: Keys of a prepare's statistics that describe the device matrix's spectrum.
SPECTRUM_KEYS = ("alpha_min", "alpha_max", "true_alpha_min", "scale")


def job(result: Prepared | SolveResult) -> TimeBreakdown:
    """The device work behind a prepare's or solve's modelled time."""
    return from_stats(result.modeled_time_s, result.stats)


def converged(result: SolveResult) -> SolveResult:
    """An iterative solve that reports it did not converge is a solver failure.

    Raises:
        SolverError: Naming the relative residual reached.
    """
    if result.stats.get("converged", 1.0) == 0.0:
        raise SolverError(f"the solve did not converge (relative residual "
                          f"{result.stats.get('rel_residual', float('nan')):.3g})")
    return result


class FactorCache(ABC):
    """(F + λI)⁻¹ of one factor, ready to apply.

    Attributes:
        damping: The λ in effect (larger than requested after a fallback increase).
        stats: What the prepare reported (``float64_retries``, ``damping_increases``,
            ``failed``, ``ill_conditioned``, spectrum and timing values).
        reference: The undamped factor F the solver was given, float64 ``[n, n]``, kept
            only while solve errors are measured (``measure_solve_error_every``) and only
            where the factor was prepared (not sent with the cache, nor checkpointed);
            otherwise None.
    """

    kind: ClassVar[str]
    failed: ClassVar[bool] = False
    #: Whether applying it may write into its input (a solve working in its buffer).
    overwrites: ClassVar[bool] = False

    def __init__(self, damping: float, stats: dict[str, float] | None = None) -> None:
        self.damping = float(damping)
        self.stats = dict(stats or {})
        self.reference: Tensor | None = None

    def solve_error(self, rhs: Tensor, answer: Tensor, side: str) -> float | None:
        """The relative error of an application against a float64 solve of the same
        damped factor and right-hand side: ‖X̂ − X‖_F / ‖X‖_F with X = (F + λI)⁻¹B
        (``side="left"``) or B(F + λI)⁻¹ (``"right"``), λ the damping in effect.

        Args:
            rhs: B as it was before the application (``[n, k]`` left, ``[k, n]`` right).
            answer: X̂, what :meth:`left` or :meth:`right` returned for it.
            side: ``"left"`` or ``"right"``.

        Returns:
            The error, or None without a :attr:`reference` (a diagonal factor, a cache
            prepared on another rank or before a load, or measuring off). 0 when X = 0
            and X̂ = 0; ``inf`` when only X = 0.

        Raises:
            ValueError: ``side`` is neither, or the shapes do not match the factor.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side={side!r} must be 'left' or 'right'")
        if self.reference is None:
            return None
        n = self.reference.shape[0]
        b = rhs.to(torch.float64)
        b = b if side == "left" else b.mT
        got = answer.to(torch.float64)
        got = got if side == "left" else got.mT
        if b.shape[0] != n or got.shape != b.shape:
            raise ValueError(f"rhs {tuple(rhs.shape)} and answer {tuple(answer.shape)} do "
                             f"not fit a {side} application of a factor of size {n}")
        damped = self.reference + self.damping * torch.eye(
            n, dtype=torch.float64, device=self.reference.device)
        exact = torch.linalg.solve(damped, b.to(damped.device))
        size = float(torch.linalg.norm(exact))
        miss = float(torch.linalg.norm(got.to(damped.device) - exact))
        if size == 0.0:
            return 0.0 if miss == 0.0 else math.inf
        return miss / size

    def predicted_error(self, solver: LinearSolver, rhs: Tensor, side: str) -> float | None:
        """The solver's prediction of the error :meth:`solve_error` will measure for this
        right-hand side (:meth:`~thermokfac.solvers.LinearSolver.predict_error`), asked
        before the application; None where the solver has no model or this cache applies
        no solve of it (Method 1's inverse, a diagonal factor), or without a
        :attr:`reference`."""
        return None

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype it applies in (float64 after a float64 retry)."""

    @abstractmethod
    def left(self, x: Tensor, solver: LinearSolver, generator: torch.Generator | None,
             jobs: list[TimeBreakdown]) -> Tensor:
        """(F + λI)⁻¹ x for ``x`` ``[n, k]`` (may work in ``x``'s memory)."""

    @abstractmethod
    def right(self, x: Tensor, solver: LinearSolver, generator: torch.Generator | None,
              jobs: list[TimeBreakdown]) -> Tensor:
        """x (F + λI)⁻¹ for ``x`` ``[k, n]`` (may work in ``x``'s memory)."""

    @property
    def spectrum(self) -> dict[str, float]:
        """α_min, α_max (and the device scaling) of the matrix the solver was given;
        empty for solvers that report none."""
        found = {k: float(self.stats[k]) for k in SPECTRUM_KEYS if k in self.stats}
        return found if "alpha_min" in found and "alpha_max" in found else {}

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors to send to another rank (contiguous) or to checkpoint."""

    def meta(self) -> dict[str, Any]:
        """Everything but the tensors' contents: enough to rebuild the cache on a rank
        that receives them (:func:`receive_cache`)."""
        return {"kind": self.kind, "damping": self.damping, "stats": dict(self.stats),
                "shapes": {k: (tuple(t.shape), t.dtype) for k, t in self.tensors().items()}}

    @classmethod
    @abstractmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> FactorCache:
        """Rebuild from :meth:`meta` and :meth:`tensors`."""

    @abstractmethod
    def entries(self, which: str) -> dict[str, Any]:
        """Checkpoint entries (``a_inv``/``g_inv`` or ``a_prep``/``g_prep``)."""

    @abstractmethod
    def to_(self, device: torch.device) -> None:
        """Replace the tensors by copies on ``device`` (keeping the dtype)."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class InverseCache(FactorCache):
    """Method 1: the explicit inverse ``[n, n]`` (full symmetric), applied by a product."""

    kind = "inverse"

    def __init__(self, inverse: Tensor, damping: float,
                 stats: dict[str, float] | None = None) -> None:
        super().__init__(damping, stats)
        self.inverse = inverse

    @classmethod
    def build(cls, prepared: Prepared, solver: LinearSolver,
              generator: torch.Generator | None, jobs: list[TimeBreakdown]) -> FactorCache:
        """Invert a prepared factor; a failed inversion is a :class:`FailedCache`."""
        try:
            result = converged(solver.inverse(prepared, generator=generator))
        except SolverError:
            return FailedCache(prepared.damping, {**prepared.stats, "solver_errors": 1.0})
        jobs.append(job(result))
        return cls(result.x, prepared.damping, prepared.stats)

    @property
    def dtype(self) -> torch.dtype:
        return self.inverse.dtype

    def left(self, x, solver, generator, jobs):
        return self.inverse.to(x.dtype) @ x

    def right(self, x, solver, generator, jobs):
        return x @ self.inverse.to(x.dtype)

    def tensors(self) -> dict[str, Tensor]:
        self.inverse = self.inverse.contiguous()
        return {"inverse": self.inverse}

    @classmethod
    def from_parts(cls, meta, tensors):
        return cls(tensors["inverse"], meta["damping"], meta["stats"])

    def entries(self, which: str) -> dict[str, Any]:
        return {f"{which}_inv": self.inverse}

    def to_(self, device: torch.device) -> None:
        self.inverse = self.inverse.to(device, copy=True)


class PreparedCache(FactorCache):
    """Method 2: the solver's prepared state, applied by a bank of linear solves."""

    kind = "prepared"
    overwrites = True

    def __init__(self, prepared: Prepared) -> None:
        super().__init__(prepared.damping, prepared.stats)
        self.prepared = prepared

    @classmethod
    def build(cls, prepared: Prepared, solver: LinearSolver,
              generator: torch.Generator | None, jobs: list[TimeBreakdown]) -> FactorCache:
        return cls(prepared)

    @property
    def dtype(self) -> torch.dtype:
        return self.prepared.dtype

    def left(self, x, solver, generator, jobs):
        # The block checked DΘ and checks U (through ⟨U, DΘ⟩): the solve skips it.
        result = converged(solver.solve(self.prepared, x, generator=generator,
                                        overwrite_b=True, check_finite=False))
        jobs.append(job(result))
        return result.x

    def right(self, x, solver, generator, jobs):
        return self.left(x.mT, solver, generator, jobs).mT

    def predicted_error(self, solver: LinearSolver, rhs: Tensor, side: str) -> float | None:
        if self.reference is None:
            return None
        damped = self.reference + self.damping * torch.eye(
            self.reference.shape[0], dtype=torch.float64, device=self.reference.device)
        return solver.predict_error(self.prepared, damped, rhs if side == "left" else rhs.mT)

    def tensors(self) -> dict[str, Tensor]:
        self.prepared.tensors = {k: t.contiguous() for k, t in self.prepared.tensors.items()}
        return self.prepared.tensors

    def meta(self) -> dict[str, Any]:
        p = self.prepared
        return {**super().meta(), "solver": p.solver, "n": p.n,
                "modeled_time_s": p.modeled_time_s}

    @classmethod
    def from_parts(cls, meta, tensors):
        return cls(Prepared(meta["solver"], meta["n"], meta["damping"], tensors,
                            meta["stats"], False, meta["modeled_time_s"]))

    def entries(self, which: str) -> dict[str, Any]:
        return {f"{which}_prep": self.prepared.state_dict()}

    def to_(self, device: torch.device) -> None:
        # 0-d bookkeeping scalars stay where the solver keeps them
        p = self.prepared
        p.tensors = {k: v.to(device, copy=True) if v.ndim else v.clone()
                     for k, v in p.tensors.items()}


class DiagonalCache(FactorCache):
    """1/(a + λ) of a diagonal A ``[V]`` (computed on every rank: no solver work)."""

    kind = "diagonal"

    def __init__(self, reciprocal: Tensor, damping: float) -> None:
        super().__init__(damping)
        self.reciprocal = reciprocal

    @classmethod
    def of(cls, diagonal: Tensor, damping: float) -> DiagonalCache:
        return cls(1.0 / (diagonal + damping), damping)

    @property
    def dtype(self) -> torch.dtype:
        return self.reciprocal.dtype

    def left(self, x, solver, generator, jobs):
        return self.reciprocal.to(x.dtype)[:, None] * x

    def right(self, x, solver, generator, jobs):
        return x * self.reciprocal.to(x.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"reciprocal": self.reciprocal}

    @classmethod
    def from_parts(cls, meta, tensors):
        return cls(tensors["reciprocal"], meta["damping"])

    def entries(self, which: str) -> dict[str, Any]:
        return {f"{which}_inv": self.reciprocal}

    def to_(self, device: torch.device) -> None:
        self.reciprocal = self.reciprocal.to(device, copy=True)


class FailedCache(FactorCache):
    """A factor that could not be prepared (or inverted): nothing to apply."""

    kind = "failed"
    failed = True

    @property
    def dtype(self) -> torch.dtype:
        raise SolverError("a failed factor has no dtype")

    def left(self, x, solver, generator, jobs):
        raise SolverError("the factor could not be prepared")

    right = left

    def tensors(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def from_parts(cls, meta, tensors):
        return cls(meta["damping"], meta["stats"])

    def entries(self, which: str) -> dict[str, Any]:
        return {}

    def to_(self, device: torch.device) -> None:
        pass


#: Method ↦ the cache a prepared (non-failed) factor becomes.
CACHE_FOR_METHOD: dict[Method, type[InverseCache] | type[PreparedCache]] = {
    Method.INVERSE: InverseCache, Method.SOLVE: PreparedCache}

_KINDS: dict[str, type[FactorCache]] = {
    c.kind: c for c in (InverseCache, PreparedCache, DiagonalCache, FailedCache)}


def build_cache(prepared: Prepared, method: Method, solver: LinearSolver,
                generator: torch.Generator | None, jobs: list[TimeBreakdown]) -> FactorCache:
    """The cache of a prepared factor under ``method`` (a failed prepare fails)."""
    if prepared.failed:
        return FailedCache(prepared.damping, prepared.stats)
    return CACHE_FOR_METHOD[method].build(prepared, solver, generator, jobs)


def receive_cache(meta: dict[str, Any], device: torch.device
                  ) -> tuple[FactorCache, dict[str, Tensor]]:
    """A cache rebuilt from another rank's :meth:`FactorCache.meta` around empty
    tensors, and those tensors (to be filled by a broadcast)."""
    tensors = {k: torch.empty(shape, dtype=dtype, device=device)
               for k, (shape, dtype) in meta["shapes"].items()}
    return _KINDS[meta["kind"]].from_parts(meta, tensors), tensors
