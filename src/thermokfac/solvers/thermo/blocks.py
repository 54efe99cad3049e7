"""Matrices larger than one SPU: block Gauss–Seidel over SPU-sized blocks.

When ``HardwareModel.max_dim`` is smaller than the factor, the damped matrix is cut into
contiguous diagonal blocks of at most ``max_dim`` rows. Each diagonal block is
programmed on an SPU (quantization, noise and timing as for a whole factor); the
off-diagonal blocks stay digital. A solve sweeps

    x_i ← solve_SPU(M_ii, b_i − Σ_{j≠i} M_ij x_j),   i = 1, …, B,

until the relative change of x falls below ``target_error`` or ``block_sweeps`` sweeps
are done. For a symmetric positive definite matrix block Gauss–Seidel converges
(from the energy-norm contraction of the symmetric splitting), at a rate set by the
coupling between blocks. Blocks are solved one after the other, so the modelled time
is the sum over sweeps and blocks of each block solve, plus the digital-link transfer
of the residuals (counted in each block solve's load).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._linalg import symmetrize_lower
from ..base import LinearSolver, Prepared


def block_ranges(n: int, max_dim: int) -> list[tuple[int, int]]:
    """Contiguous blocks of near-equal size, each at most ``max_dim``.

    >>> block_ranges(10, 4)
    [(0, 4), (4, 7), (7, 10)]
    """
    count = -(-n // max_dim)
    base, extra = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def prepare_blocks(max_dim: int, inner: LinearSolver, m: Tensor, damping: float,
                   generator: torch.Generator | None) -> dict[str, Tensor] | None:
    """Program each diagonal block (at most ``max_dim``, an SPU's size) with ``inner``;
    keep M + λI for the coupling."""
    full = symmetrize_lower(m)
    full.diagonal().add_(damping)
    tensors: dict[str, Tensor] = {"coupling": full}
    ranges = block_ranges(m.shape[0], max_dim)
    for i, (lo, hi) in enumerate(ranges):
        block = inner.prepare(full[lo:hi, lo:hi].contiguous(), 0.0, generator=generator)
        if block.failed:
            return None
        for key, value in block.tensors.items():
            tensors[f"block{i}/{key}"] = value
        tensors[f"block{i}/range"] = torch.tensor([lo, hi])
    tensors["blocks"] = torch.tensor(float(len(ranges)), dtype=torch.float64)
    tensors["alpha_min"] = torch.stack([tensors[f"block{i}/alpha_min"]
                                        for i in range(len(ranges))]).min()
    return tensors


def _block(prepared: Prepared, i: int, inner: LinearSolver) -> tuple[Prepared, int, int]:
    prefix = f"block{i}/"
    tensors = {k[len(prefix):]: v for k, v in prepared.tensors.items() if k.startswith(prefix)}
    lo, hi = (int(v) for v in tensors.pop("range"))
    return Prepared(inner.name, hi - lo, 0.0, tensors), lo, hi


def solve_blocks(inner: LinearSolver, prepared: Prepared, b: Tensor,
                 generator: torch.Generator | None, tol: float, max_sweeps: int
                 ) -> tuple[Tensor, float, dict[str, float]]:
    """Block Gauss–Seidel with SPU block solves, at most ``max_sweeps`` sweeps, until the
    relative change is below ``tol``; returns (x, modelled s, stats)."""
    coupling = prepared.tensors["coupling"].to(b.dtype)
    blocks = [_block(prepared, i, inner) for i in range(int(prepared.tensors["blocks"]))]
    x = torch.zeros_like(b)
    seconds, transfer, sweeps, change = 0.0, 0.0, 0, float("inf")
    by_model: dict[str, float] = {}
    while sweeps < max_sweeps and change > tol:
        previous = x.clone()
        for block, lo, hi in blocks:
            residual = b[lo:hi] - coupling[lo:hi] @ x + coupling[lo:hi, lo:hi] @ x[lo:hi]
            result = inner.solve(block, residual, generator=generator, check_finite=False)
            x[lo:hi] = result.x
            seconds += result.modeled_time_s
            transfer += result.stats.get("modeled_transfer_s", 0.0)
            for key, value in result.stats.items():
                if key.startswith("modeled_compute_s/"):
                    by_model[key] = by_model.get(key, 0.0) + value
        sweeps += 1
        change = float((x - previous).norm() / x.norm().clamp_min(1e-300))
    stats = {"block_sweeps": float(sweeps), "block_change": change,
             "modeled_transfer_s": transfer, "modeled_compute_s": seconds - transfer,
             **by_model}
    return x, seconds, stats
