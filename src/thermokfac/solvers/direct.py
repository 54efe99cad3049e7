"""Digital direct solvers: Cholesky (the default) and symmetric eigendecomposition.

Both factorise the damped matrix once per ``prepare``; a solve of k right-hand sides
then costs O(n²k). Only unbatched Cholesky and ``eigh`` are used: batched LU-based
routines (``lu_factor``, ``linalg.solve``, ``linalg.inv``) returned wrong pivots for
n ≥ 256 on 2-thread CPU builds of torch 2.13. The Cholesky solver reads one triangle
only (:mod:`thermokfac._linalg`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._linalg import (
    cholesky_inverse_lower,
    cholesky_lower,
    cholesky_solve_cols,
    cholesky_solve_rows,
)
from .base import LinearSolver, Prepared


class CholeskySolver(LinearSolver):
    """(M + λI) = LLᵀ; solves by two triangular solves, inverse from L.

    The factorisation reads the lower triangle only (``prepare(..., lower_only=True)``
    needs no symmetrisation).

    >>> s = CholeskySolver()
    >>> p = s.prepare(torch.eye(2), damping=1.0)
    >>> s.solve(p, torch.tensor([2.0, 4.0])).x
    tensor([1., 2.])
    """

    name = "cholesky"
    # Method 1 measured faster per K-FAC step on CPU (benchmarks/step_time.py: 2.78× vs
    # 2.97× Adam at factors every step, inverses every 10): two GEMMs per step beat
    # four triangular solves.
    default_method = "inverse"

    def _prepare(self, m: Tensor, damping: float, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor] | None:
        damped = m.clone()
        damped.diagonal().add_(damping)
        chol = cholesky_lower(damped)
        return None if chol is None else {"cholesky": chol}

    def _condition_estimate(self, state: dict[str, Tensor]) -> float:
        """(max Lᵢᵢ / min Lᵢᵢ)² from the Cholesky factor's diagonal, in O(n): a lower
        bound of cond(M + λI) (the pivots Lᵢᵢ² lie within its spectrum's range), which
        catches a nearly singular factor that the factorisation itself accepts."""
        diag = state["cholesky"].diagonal()
        low, high = torch.aminmax(diag)
        return float((high / low) ** 2)

    def _solve(self, prepared: Prepared, b: Tensor, generator: torch.Generator | None,
               overwrite_b: bool = False):
        chol = prepared.tensors["cholesky"]
        if b.mT.is_contiguous() and not b.is_contiguous():
            # b is a transposed view: its columns are contiguous rows of bᵀ.
            return cholesky_solve_rows(chol, b.mT).mT, 0.0, {}
        return cholesky_solve_cols(chol, b), 0.0, {}

    def _inverse(self, prepared: Prepared, generator: torch.Generator | None):
        return cholesky_inverse_lower(prepared.tensors["cholesky"]), 0.0, {}


class EighSolver(LinearSolver):
    """M = VΛVᵀ; (M + λI)⁻¹ = V (Λ + λ)⁻¹ Vᵀ.

    Five to six times slower to prepare than Cholesky on CPU, but it exposes the
    spectrum (``stats['eig_min']``, ``stats['eig_max']`` of M + λI).
    """

    name = "eigh"
    default_method = "inverse"  # 3.39× vs 4.10× Adam (benchmarks/step_time.py)

    def _prepare(self, m: Tensor, damping: float, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor] | None:
        try:
            evals, evecs = torch.linalg.eigh(m, UPLO="L")
        except torch.linalg.LinAlgError:
            return None
        damped = evals + damping
        if not bool(torch.isfinite(damped).all()) or float(damped.min()) <= 0.0:
            return None
        tiny = torch.finfo(m.dtype).eps * float(damped.max()) * m.shape[0]
        if float(damped.min()) <= tiny:
            return None
        return {"evals": damped, "evecs": evecs}

    def _prepare_stats(self, state: dict[str, Tensor]) -> dict[str, float]:
        return {"eig_min": float(state["evals"].min()), "eig_max": float(state["evals"].max())}

    def _solve(self, prepared: Prepared, b: Tensor, generator: torch.Generator | None,
               overwrite_b: bool = False):
        evecs, evals = prepared.tensors["evecs"], prepared.tensors["evals"]
        return evecs @ ((evecs.mT @ b) / evals[:, None]), 0.0, {}

    def _inverse(self, prepared: Prepared, generator: torch.Generator | None):
        evecs, evals = prepared.tensors["evecs"], prepared.tensors["evals"]
        return (evecs / evals) @ evecs.mT, 0.0, {}
