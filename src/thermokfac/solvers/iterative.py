"""Conjugate gradient on all right-hand sides at once, warm-started.

Each column of the bank runs its own CG recurrence (its own step sizes), vectorised as
one matrix product per iteration. The previous solution for a bank of the same shape is
kept in the prepared state and used as the starting point of the next solve: K-FAC's
gradients change little between steps, so this saves iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._linalg import symmetrize_lower
from .base import LinearSolver, Prepared, SolverError


class CGSolver(LinearSolver):
    """Warm-started conjugate gradient with a relative-residual tolerance.

    Args:
        tol: Stop when every column's ‖b − (M+λI)x‖ ≤ tol·‖b‖.
        max_iter: Iteration cap (default: the dimension n, CG's exact-arithmetic bound,
            at least 10).
        warm_start: Start from the previous solution of a bank of the same shape.
        max_damping_increases: See :class:`LinearSolver`.

    The iteration count and final relative residual are reported in ``stats``; a column
    that meets non-positive curvature (M + λI not positive definite) raises
    :class:`SolverError`.

    Raises:
        ValueError: ``tol`` outside (0, 1) or ``max_iter`` not a positive integer.
    """

    name = "cg"

    def __init__(self, *, tol: float = 1e-6, max_iter: int | None = None,
                 warm_start: bool = True, max_damping_increases: int = 4) -> None:
        super().__init__(max_damping_increases=max_damping_increases)
        if not (isinstance(tol, (int, float)) and 0.0 < tol < 1.0):
            raise ValueError(f"tol={tol!r} must lie in (0, 1)")
        if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
            raise ValueError(f"max_iter={max_iter!r} must be a positive integer or None")
        self.tol, self.max_iter, self.warm_start = float(tol), max_iter, bool(warm_start)

    def __repr__(self) -> str:
        return f"CGSolver(tol={self.tol:g}, max_iter={self.max_iter}, warm_start={self.warm_start})"

    def _prepare(self, m: Tensor, damping: float, generator: torch.Generator | None = None
                 ) -> dict[str, Tensor] | None:
        matrix = symmetrize_lower(m)
        matrix.diagonal().add_(damping)
        if float(matrix.diagonal().min()) <= 0.0:
            return None
        return {"matrix": matrix}

    def _solve(self, prepared: Prepared, b: Tensor, generator: torch.Generator | None,
               overwrite_b: bool = False):
        a = prepared.tensors["matrix"]
        x0 = prepared.tensors.get("x0")
        x = x0.clone() if self.warm_start and x0 is not None and x0.shape == b.shape \
            else torch.zeros_like(b)
        max_iter = self.max_iter or max(10, a.shape[0])
        x, iters, rel = _block_cg(a, b, x, self.tol, max_iter)
        retried = 0.0
        if rel > self.tol and a.dtype != torch.float64:
            # float32 round-off can stall CG above its tolerance: continue in float64
            # from where it stopped (the preconditioner treats a solve that still did not
            # converge as a failure).
            x64, more, rel = _block_cg(a.double(), b.double(), x.double(), self.tol, max_iter)
            x, iters, retried = x64.to(b.dtype), iters + more, 1.0
        if self.warm_start:
            prepared.tensors["x0"] = x.clone()
        stats = {"iterations": float(iters), "rel_residual": rel,
                 "converged": float(rel <= self.tol), "float64_retries": retried}
        return x, 0.0, stats


def _block_cg(a: Tensor, b: Tensor, x: Tensor, tol: float, max_iter: int
              ) -> tuple[Tensor, int, float]:
    """Independent CG recurrences for the columns of ``b`` (``[n, k]``)."""
    b_norm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
    r = b - a @ x
    p = r.clone()
    rs = (r * r).sum(0)
    rel = float((rs.sqrt() / b_norm).max())
    iters = 0
    while rel > tol and iters < max_iter:
        ap = a @ p
        curv = (p * ap).sum(0)
        active = rs > 0
        if bool((curv[active] <= 0).any()):
            raise SolverError("CG met non-positive curvature: the damped factor is not "
                              "positive definite")
        alpha = torch.where(active, rs / torch.where(active, curv, 1), 0)
        x.add_(p * alpha)
        r.sub_(ap * alpha)
        rs_new = (r * r).sum(0)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1), 0)
        p = r + p * beta
        rs = rs_new
        iters += 1
        rel = float((rs.sqrt() / b_norm).max())
    return x, iters, rel
