"""One Kronecker factor's running estimate: the cheap per-factor-step half of K-FAC.

A block (:mod:`.blocks`) holds two estimates, A and G. Each reads its part of the
step's curvature sums (:class:`~.curvature.CurvatureSums`), forms this step's factor
(Eq. 12) and folds it into the estimate (Eqs. 16–17); the periodic half — damping,
prepare, invert — reads the estimate through :meth:`FactorEstimate.prepare`.

Three kinds, one class each:

* :class:`MovingAverage` — the factor as a matrix, kept in its lower triangle
  (:mod:`thermokfac._linalg`), averaged with decay β;
* :class:`DiagonalMovingAverage` — A of an embedding (one-hot inputs): its diagonal, a
  vector of token frequencies;
* :class:`RowsEstimate` — the resistor-array mode (App. E): the rows R themselves with
  a scale s, the factor s·RᵀR never formed; the solver realises s·RᵀR + λI from them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._invariants import required
from .._linalg import symmetrize_lower
from ..solvers import LinearSolver, Prepared, all_finite
from .curvature import CurvatureSums
from .factors import lower_is_finite


class FactorEstimate(ABC):
    """The running estimate of factor ``which`` (``"a"`` or ``"g"``) of one block.

    Its checkpoint entries keep the names of the flat per-layer format (``a``, ``g``,
    ``a_rows``, ``a_row_scale``...; see :mod:`.state`).
    """

    #: Whether the factor is diagonal (a vector: no solver work, see :mod:`.caches`).
    diagonal: ClassVar[bool] = False

    def __init__(self, which: str) -> None:
        self.which = which

    @abstractmethod
    def fresh(self, sums: CurvatureSums) -> Any:
        """This step's factor from the step's sums (Eq. 12); the sums' buffers may be
        reused for it."""

    @abstractmethod
    def is_finite(self, fresh: Any) -> bool:
        """Whether a fresh factor is finite (a non-finite one is not folded in)."""

    @abstractmethod
    def update(self, fresh: Any, decay: float) -> None:
        """Fold a fresh factor into the estimate (Eqs. 16–17)."""

    @property
    @abstractmethod
    def present(self) -> bool:
        """Whether there is something to prepare."""

    @abstractmethod
    def mean_diagonal(self) -> float:
        """tr(F)/dim(F) (for the π damping split)."""

    def prepare(self, solver: LinearSolver, damping: float,
                generator: torch.Generator | None) -> Prepared:
        """Hand F + λI to the solver (every ``inv_update_steps``)."""
        raise NotImplementedError(f"{type(self).__name__} is not prepared by a solver")

    def release(self) -> None:  # noqa: B027 - most estimates keep everything
        """Drop what is only needed by a prepare (nothing, except for rows)."""

    @property
    @abstractmethod
    def held(self) -> Tensor | None:
        """The tensor the estimate keeps (for its device and dtype), or None."""

    @abstractmethod
    def matrix(self) -> Tensor | None:
        """The symmetric factor (a copy; a vector when diagonal), or None."""

    def reference(self) -> Tensor | None:
        """The undamped factor a prepare hands to the solver, in float64 ``[n, n]`` (the
        reference of the measured solve error), or None (a diagonal factor: applied
        exactly, without a solver)."""
        return None

    @abstractmethod
    def entries(self) -> dict[str, Any]:
        """Checkpoint entries of this estimate."""

    @abstractmethod
    def load_entries(self, state: dict[str, Any]) -> None:
        """Restore :meth:`entries`."""

    @abstractmethod
    def to_(self, device: torch.device, dtype: torch.dtype) -> None:
        """Replace the tensors by copies on ``device`` in ``dtype``."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held."""


class MovingAverage(FactorEstimate):
    """F̃ ← β·F̃ + (1 − β)·F (Eqs. 16–17) of a matrix factor, lower triangle.

    Attributes:
        value: ``[n, n]`` (lower triangle), or None before the first update.
    """

    def __init__(self, which: str) -> None:
        super().__init__(which)
        self.value: Tensor | None = None

    def fresh(self, sums: CurvatureSums) -> Tensor:
        """A = Σāāᵀ/#rows; G = c·Σĝĝᵀ (the multiplier c was applied at capture)."""
        if self.which == "a":
            return required(sums.a, "the captured A").div_(sums.a_rows)
        return required(sums.g, "the captured G")

    def is_finite(self, fresh: Tensor) -> bool:
        return lower_is_finite(fresh)

    def update(self, fresh: Tensor, decay: float) -> None:
        """The first update, or β = 0, takes ``fresh`` itself (no copy)."""
        if self.value is None or decay == 0.0:
            self.value = fresh
        else:
            self.value.lerp_(fresh, 1.0 - decay)

    @property
    def present(self) -> bool:
        return self.value is not None

    @property
    def held(self) -> Tensor | None:
        return self.value

    @property
    def _value(self) -> Tensor:
        return required(self.value, f"the moving average of {self.which.upper()}")

    def mean_diagonal(self) -> float:
        return float(self._value.diagonal().sum()) / self._value.shape[0]

    def prepare(self, solver: LinearSolver, damping: float,
                generator: torch.Generator | None) -> Prepared:
        return solver.prepare(self._value, damping, lower_only=True, generator=generator)

    def matrix(self) -> Tensor | None:
        return None if self.value is None else symmetrize_lower(self.value)

    def reference(self) -> Tensor | None:
        return symmetrize_lower(self._value.to(torch.float64))

    def entries(self) -> dict[str, Any]:
        return {self.which: self.value}

    def load_entries(self, state: dict[str, Any]) -> None:
        self.value = state.get(self.which)

    def to_(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.value is not None:
            self.value = self.value.to(device=device, dtype=dtype, copy=True)

    def nbytes(self) -> int:
        return _nbytes(self.value)


class DiagonalMovingAverage(MovingAverage):
    """The moving average of a diagonal A ``[V]`` (an embedding's token frequencies)."""

    diagonal = True

    def is_finite(self, fresh: Tensor) -> bool:
        return lower_is_finite(fresh)

    def mean_diagonal(self) -> float:
        return float(self._value.sum()) / self._value.shape[0]

    def matrix(self) -> Tensor | None:
        return None if self.value is None else self.value.clone()

    def reference(self) -> Tensor | None:
        return None  # 1/(a + λ) is exact


class RowsEstimate(FactorEstimate):
    """The resistor-array mode (App. E): this step's rows R and scale s, F = s·RᵀR.

    Kept from a capture until the next prepare, which hands them to the solver
    (``prepare_rows``) and releases them: memory O(b·n) instead of O(n²).

    Attributes:
        rows: ``[b, n]`` or None.
        scale: s.
    """

    def __init__(self, which: str) -> None:
        super().__init__(which)
        self.rows: Tensor | None = None
        self.scale = 1.0

    def fresh(self, sums: CurvatureSums) -> tuple[Tensor, float]:
        """A = RᵀR/#rows; G = c·RᵀR (the rows of the step, concatenated)."""
        if self.which == "a":
            return required(sums.a_parts, "the captured rows of A"), 1.0 / sums.a_rows
        return required(sums.g_parts, "the captured rows of G"), sums.g_scale

    def is_finite(self, fresh: tuple[Tensor, float]) -> bool:
        return all_finite(fresh[0])

    def update(self, fresh: tuple[Tensor, float], decay: float) -> None:
        """Replace the rows (the rows mode needs ``factor_decay=0``)."""
        self.rows, self.scale = fresh

    @property
    def present(self) -> bool:
        return self.rows is not None

    @property
    def held(self) -> Tensor | None:
        return self.rows

    @property
    def _rows(self) -> Tensor:
        return required(self.rows, f"the rows of {self.which.upper()}")

    def mean_diagonal(self) -> float:
        return self.scale * float(self._rows.pow(2).sum()) / self._rows.shape[1]

    def prepare(self, solver: LinearSolver, damping: float,
                generator: torch.Generator | None) -> Prepared:
        return solver.prepare_rows(self._rows, self.scale, damping, generator=generator)

    def release(self) -> None:
        self.rows = None

    def matrix(self) -> Tensor | None:
        return None  # never formed

    def reference(self) -> Tensor | None:
        rows = self._rows.to(torch.float64)  # formed only to measure the solve error
        return self.scale * (rows.mT @ rows)

    def entries(self) -> dict[str, Any]:
        return {f"{self.which}_rows": self.rows, f"{self.which}_row_scale": self.scale}

    def load_entries(self, state: dict[str, Any]) -> None:
        self.rows = state.get(f"{self.which}_rows")
        self.scale = float(state.get(f"{self.which}_row_scale", 1.0))

    def to_(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.rows is not None:
            self.rows = self.rows.to(device=device, dtype=dtype, copy=True)

    def nbytes(self) -> int:
        return _nbytes(self.rows)


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def estimate_for(which: str, *, diagonal: bool, rows: bool) -> FactorEstimate:
    """The estimate kind of a factor: diagonal A (embedding), rows, or a matrix."""
    if diagonal:
        return DiagonalMovingAverage(which)
    return RowsEstimate(which) if rows else MovingAverage(which)
