"""The linear-solver interface every K-FAC backend implements.

A solver works on a symmetric positive semi-definite factor M (a Kronecker factor A or
G) with Tikhonov damping λ: it *prepares* M + λI once every ``inv_update_steps``
(factorise, decompose, program the device...) and then *solves* banks of right-hand
sides against it, or returns its *inverse* (paper Sec. 4.1, Methods 2 and 1).

Implementations read only the **lower triangle** of M (row-major), so a caller that
keeps only that triangle (as the preconditioner does) passes ``lower_only=True`` and
skips the symmetrisation; see :mod:`thermokfac._linalg`.

Failure policy (documented, and the same for every solver): :meth:`LinearSolver.prepare`
validates its input and raises ``ValueError`` on a non-square, non-symmetric or
non-finite matrix or a negative damping. If the factorisation itself fails (M + λI not
numerically positive definite) it retries in float64, then multiplies the damping by 10
up to ``max_damping_increases`` times (default 4, i.e. at most 10⁴·λ, or 10⁻⁸·tr(M)/n
when λ = 0). If that still fails it returns a :class:`Prepared` with ``failed=True``;
the preconditioner then passes that layer's gradient through unchanged. Every event is
counted in :attr:`Prepared.stats`. A solve never returns non-finite values: it raises
:class:`SolverError` instead.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._linalg import symmetrize_lower


class SolverError(RuntimeError):
    """A solve could not produce a finite answer (e.g. CG met negative curvature)."""


@dataclass(frozen=True)
class SolveResult:
    """What a solve or an inversion returns.

    Attributes:
        x: The solution ``[n, k]`` (or ``[n]`` for a vector right-hand side), or the
            inverse ``[n, n]``, in the dtype of the right-hand side.
        modeled_time_s: Hardware time the solver models for this work (0 for digital
            solvers, whose cost is the measured wall time).
        stats: Solver-specific diagnostics (iterations, residuals, clipped values...).
    """

    x: Tensor
    modeled_time_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A factor made ready for repeated solves.

    Attributes:
        solver: Name of the solver that prepared it.
        n: Dimension of the factor.
        damping: The damping in effect (larger than requested after a fallback).
        tensors: Solver-specific state (Cholesky factor, eigenpairs, matrix...).
        stats: Counters of what happened while preparing (``float64_retries``,
            ``damping_increases``, ``failed``) plus solver-specific values.
        failed: True when no damping up to the bound made the factor usable.
        modeled_time_s: Hardware time modelled for preparing (0 for digital solvers).
    """

    solver: str
    n: int
    damping: float
    tensors: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    modeled_time_s: float = 0.0

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype: that of the first matrix in the state (float64 after a
        float64 retry); scalars and spectra kept in float64 do not count."""
        floats = [t for t in self.tensors.values() if t.is_floating_point()]
        return next((t.dtype for t in floats if t.ndim >= 2), floats[0].dtype)

    @property
    def device(self) -> torch.device:
        """Where the state's matrices live (small bookkeeping tensors may be on the CPU)."""
        matrices = [t for t in self.tensors.values() if t.is_floating_point() and t.ndim >= 2]
        return (matrices or list(self.tensors.values()))[0].device

    def state_dict(self) -> dict[str, Any]:
        """The prepared state as plain values and tensors (a checkpoint entry).

        Returns:
            ``{"solver", "n", "damping", "tensors", "stats", "failed",
            "modeled_time_s"}``; :meth:`from_state_dict` rebuilds it.
        """
        return {"solver": self.solver, "n": self.n, "damping": self.damping,
                "tensors": dict(self.tensors), "stats": dict(self.stats),
                "failed": self.failed, "modeled_time_s": self.modeled_time_s}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Prepared:
        """Rebuild a prepared state from :meth:`state_dict`.

        Args:
            state: What :meth:`state_dict` returned.

        Returns:
            The prepared state (its tensors are the ones in ``state``, not copies).

        Raises:
            TypeError: ``state`` misses a field or has one of another version.
        """
        return cls(**state)


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite, from one reduction (a sum propagates NaN and ±inf).

    Conservative: values so large that their sum overflows also count as non-finite.

    Args:
        t: Any tensor.

    Returns:
        True when the sum of all entries is finite.
    """
    return bool(torch.isfinite(t.sum()))


#: A float32 prepare whose condition estimate times eps exceeds this is redone in
#: float64: its solves' forward error could exceed ~0.1% (a residual test cannot see it).
ILL_CONDITIONED = 1e-3


@lru_cache(maxsize=64)
def _probe(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(12345)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


@cache
def _takes_generator(cls: type[LinearSolver]) -> bool:
    return len(inspect.signature(cls._prepare).parameters) >= 4


def _check_square(m: Tensor, what: str) -> None:
    if not isinstance(m, Tensor) or m.ndim != 2 or m.shape[0] != m.shape[1]:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"{what} must be a square 2-D tensor, got shape {shape}")
    if not m.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {m.dtype}")


def check_symmetric_matrix(m: Tensor, what: str = "matrix") -> None:
    """Raise ``ValueError`` unless ``m`` is a finite, square, symmetric 2-D tensor.

    Symmetry is tested in O(n²) with a fixed random probe v: ‖Mv − Mᵀv‖ ≤ 1e3·eps·‖M‖‖v‖
    (any asymmetry larger than rounding is caught with probability one).

    Args:
        m: The matrix, ``[n, n]``.
        what: Its name in the message.

    Raises:
        ValueError: ``m`` is not 2-D and square, holds NaN or infinity, or is not
            symmetric.
    """
    _check_square(m, what)
    if not all_finite(m):
        raise ValueError(f"{what} contains non-finite values")
    if m.numel() == 0:
        return
    v = _probe(m.shape[0], m.dtype, m.device)
    asym = float((m @ v - m.mT @ v).norm())
    tol = 1e3 * torch.finfo(m.dtype).eps * float(m.norm()) * float(v.norm())
    if asym > tol:
        raise ValueError(f"{what} is not symmetric: ‖Mv − Mᵀv‖ = {asym:.3g} > {tol:.3g} "
                         f"(1e3·eps·‖M‖‖v‖ for a random probe v)")


class LinearSolver(ABC):
    """Solves (M + λI) x = b for symmetric positive semi-definite M.

    Subclasses implement :meth:`_prepare` and :meth:`_solve` (and may override
    :meth:`_inverse`); the public methods validate, cast and apply the failure policy.

    Args:
        max_damping_increases: How many times a failed factorisation may multiply the
            damping by 10 before the factor is marked failed.

    Raises:
        ValueError: ``max_damping_increases`` is not an integer >= 0.
    """

    name: ClassVar[str] = "base"
    #: The K-FAC method a preconditioner uses with this solver when none is given:
    #: ``"solve"`` (Method 2) unless an explicit inverse is the cheaper digital route.
    default_method: ClassVar[str] = "solve"

    def __init__(self, *, max_damping_increases: int = 4) -> None:
        if isinstance(max_damping_increases, bool) or not isinstance(max_damping_increases, int) \
                or max_damping_increases < 0:
            raise ValueError(
                f"max_damping_increases={max_damping_increases!r} must be an integer >= 0")
        self.max_damping_increases = max_damping_increases

    # ------------------------------------------------------------------ public
    def prepare(self, m: Tensor, damping: float, *, lower_only: bool = False,
                generator: torch.Generator | None = None) -> Prepared:
        """Prepare M + λI for solves (every ``inv_update_steps``); see the failure policy.

        Args:
            m: The symmetric factor ``[n, n]``.
            damping: λ ≥ 0.
            lower_only: Only the lower triangle of ``m`` holds the matrix (the upper one
                is ignored and cannot be checked for symmetry).
            generator: Random source of stochastic preparation (e.g. stochastic
                rounding of the programmed matrix).

        Returns:
            The prepared state (``failed`` set, and counted, when every retry failed).

        Raises:
            ValueError: ``m`` is not square, symmetric and finite, or λ is not a finite
                number >= 0.
        """
        if lower_only:
            _check_square(m, "factor")
            if not all_finite(m):
                raise ValueError("factor contains non-finite values")
        else:
            check_symmetric_matrix(m, "factor")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping={damping!r} must be a finite number >= 0")
        n = m.shape[0]
        stats = {"float64_retries": 0.0, "damping_increases": 0.0, "failed": 0.0,
                 "ill_conditioned": 0.0}
        state = self._usable(m, float(damping), generator, stats)
        if state is not None:
            return self._finish(state, n, float(damping), stats)
        m64 = m.double()
        if m.dtype != torch.float64:
            stats["float64_retries"] = 1.0
            state = self._usable(m64, float(damping), generator, stats)
            if state is not None:
                return self._finish(state, n, float(damping), stats)
        current = float(damping)
        if current == 0.0:
            current = 1e-8 * float(m64.diagonal().mean().abs()) + 1e-30
        for _ in range(self.max_damping_increases):
            current *= 10.0
            stats["damping_increases"] += 1.0
            state = self._usable(m64, current, generator, stats)
            if state is not None:
                return self._finish(state, n, current, stats)
        stats["failed"] = 1.0
        return Prepared(self.name, n, current, {}, stats, failed=True)

    def solve(self, prepared: Prepared, b: Tensor, *, generator: torch.Generator | None = None,
              overwrite_b: bool = False, check_finite: bool = True) -> SolveResult:
        """Solve (M + λI) x = b for one vector ``[n]`` or a bank of columns ``[n, k]``.

        Args:
            prepared: From :meth:`prepare`.
            b: Right-hand sides.
            generator: Random source of stochastic solvers.
            overwrite_b: Allow the solver to work in ``b``'s memory (the result may then
                share it), saving a copy; ``b`` is garbage afterwards.
            check_finite: Check that ``b`` and the solution are finite (``ValueError`` /
                :class:`SolverError`). A caller that checks both itself may skip it.

        Returns:
            ``SolveResult(x, modeled_time_s, stats)``, ``x`` shaped as ``b``.

        Raises:
            TypeError: ``prepared`` is not a :class:`Prepared`.
            ValueError: ``b`` has another dimension or (checked) non-finite values, or
                ``prepared`` is another solver's.
            SolverError: The factor could not be prepared, or the solution is not
                finite.
        """
        self._check_prepared(prepared)
        if not isinstance(b, Tensor) or b.ndim not in (1, 2) or b.shape[0] != prepared.n:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"right-hand side must have shape [{prepared.n}] or "
                             f"[{prepared.n}, k], got {shape}")
        if check_finite and not all_finite(b):
            raise ValueError("right-hand side contains non-finite values")
        vector = b.ndim == 1
        rhs = b[:, None] if vector else b
        work_dtype = prepared.dtype
        work = rhs.to(work_dtype)
        x, modeled, stats = self._solve(prepared, work, generator,
                                        overwrite_b=overwrite_b or work is not rhs)
        if check_finite and not all_finite(x):
            raise SolverError(f"{self.name} produced non-finite values")
        x = x.to(b.dtype)
        return SolveResult(x[:, 0] if vector else x, modeled, stats)

    def inverse(self, prepared: Prepared, *, generator: torch.Generator | None = None,
                lower_only: bool = False) -> SolveResult:
        """Return (M + λI)⁻¹ ``[n, n]``; with ``lower_only`` only its lower triangle is
        guaranteed (the strict upper one may hold anything).

        Args:
            prepared: What :meth:`prepare` returned for M and λ.
            generator: Random source of a stochastic solver (the thermodynamic one).
            lower_only: Skip mirroring the lower triangle into the upper one.

        Returns:
            ``SolveResult(x, modeled_time_s, stats)`` with ``x`` ``[n, n]`` in the
            prepared dtype.

        Raises:
            TypeError: ``prepared`` is not a :class:`Prepared`.
            ValueError: ``prepared`` is another solver's.
            SolverError: The factor could not be prepared, or the inverse is not finite.
        """
        self._check_prepared(prepared)
        x, modeled, stats = self._inverse(prepared, generator)
        if not lower_only and getattr(self, "_inverse_is_lower", False):
            x = symmetrize_lower(x)
        if not all_finite(x):
            raise SolverError(f"{self.name} produced a non-finite inverse")
        return SolveResult(x, modeled, stats)

    def predict_error(self, prepared: Prepared, damped: Tensor, b: Tensor) -> float | None:
        """The expected relative error of the next :meth:`solve` of ``b`` with
        ``prepared`` against the exact solution of ``damped`` x = b, from a model of the
        solver; None when the solver has none (digital solvers: round-off only).

        Args:
            prepared: The state the solve will use.
            damped: The damped factor M + λI ``[n, n]`` (float64) it was prepared from.
            b: The right-hand sides ``[n, k]``.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---------------------------------------------------------------- subclass
    def prepare_rows(self, rows: Tensor, row_scale: float, damping: float, *,
                     generator: torch.Generator | None = None) -> Prepared:
        """Prepare row_scale·RᵀR + λI from rows R ``[b, n]`` (the resistor-array mode).

        Digital solvers form the n×n matrix; a solver that can realise it from the rows
        (the thermodynamic one) overrides this and never forms it.

        Args:
            rows: R, ``[b, n]``.
            row_scale: The factor's scale (1 / the number of examples behind the rows).
            damping: λ ≥ 0.
            generator: Random source of a stochastic solver.

        Returns:
            The prepared state, as :meth:`prepare` returns it.

        Raises:
            ValueError: As :meth:`prepare` (shapes, finiteness, damping).
        """
        gram = row_scale * (rows.mT @ rows)
        return self.prepare((gram + gram.mT) / 2, damping, generator=generator)

    @abstractmethod
    def _prepare(self, m: Tensor, damping: float, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor] | None:
        """Return the prepared tensors for M + λI (read M's lower triangle only), or None
        if it is not usable."""

    @abstractmethod
    def _solve(self, prepared: Prepared, b: Tensor, generator: torch.Generator | None,
               overwrite_b: bool = False) -> tuple[Tensor, float, dict[str, float]]:
        """Solve for ``b`` ``[n, k]`` in the prepared dtype; return (x, modeled_s, stats).

        ``b`` may be overwritten when ``overwrite_b`` is True."""

    def _inverse(self, prepared: Prepared, generator: torch.Generator | None
                 ) -> tuple[Tensor, float, dict[str, float]]:
        eye = torch.eye(prepared.n, dtype=prepared.dtype, device=prepared.device)
        return self._solve(prepared, eye, generator)

    def _call_prepare(self, m: Tensor, damping: float, generator: torch.Generator | None
                      ) -> dict[str, Tensor] | None:
        if _takes_generator(type(self)):
            return self._prepare(m, damping, generator)
        return self._prepare(m, damping)  # a subclass written without the generator

    def _prepare_stats(self, state: dict[str, Tensor]) -> dict[str, float]:
        """Extra statistics for a successful prepare (solver-specific)."""
        return {}

    def _usable(self, m: Tensor, damping: float, generator: torch.Generator | None,
                stats: dict[str, float]) -> dict[str, Tensor] | None:
        """Prepare M + λI in ``m``'s dtype; None if that failed or is too ill-conditioned
        for the dtype (condition estimate × eps > ``ILL_CONDITIONED``: its solves could
        be off by more than ~0.1%, which a residual test would not reveal). A float32
        rejection is counted in ``stats['ill_conditioned']``."""
        state = self._call_prepare(m, damping, generator)
        if state is None:
            return None
        estimate = self._condition_estimate(state)
        if estimate * torch.finfo(m.dtype).eps <= ILL_CONDITIONED:
            return state
        if m.dtype != torch.float64:
            stats["ill_conditioned"] = 1.0
        stats["condition_estimate"] = estimate
        return None

    def _condition_estimate(self, state: dict[str, Tensor]) -> float:
        """A cheap lower estimate of cond(M + λI) from a successful prepare (1 when the
        solver has none). Above ``ILL_CONDITIONED/eps`` a float32 prepare is redone in
        float64 (counted in ``stats['ill_conditioned']``), and a float64 one with more
        damping (the failure policy)."""
        return 1.0

    def _finish(self, state: dict[str, Tensor], n: int, damping: float,
                stats: dict[str, float]) -> Prepared:
        stats.update(self._prepare_stats(state))
        return Prepared(self.name, n, damping, state, stats)

    def _check_prepared(self, prepared: Prepared) -> None:
        if not isinstance(prepared, Prepared):
            raise TypeError(f"expected a Prepared state, got {type(prepared).__name__}")
        if prepared.solver != self.name:
            raise ValueError(f"state was prepared by {prepared.solver!r}, not {self.name!r}")
        if prepared.failed:
            raise SolverError("the factor could not be prepared (see Prepared.stats); "
                              "pass the gradient through instead")
