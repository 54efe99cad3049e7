"""Resistor-array mode across ranks: every rank's activation / gradient rows, all-gathered.

In the resistor-array mode (App. E; ``factor_storage="rows"``) a factor is never formed:
the device is loaded with the rows R themselves and realises s·RᵀR + λI. Over W ranks
the factors of the global batch are

    A = (1/N) Σ_r R_rᵀ R_r          with N the activation rows of all ranks,
    G = (1/W) Σ_r c_r S_rᵀ S_r      (a rank without rows adds nothing, still counted in W),

so each rank scales its activation rows by √(1/N) and its gradient rows by √(c_r/W),
and the rows of all ranks are all-gathered (padded to the largest count, then trimmed):
every rank then holds the rows of the whole global batch, O(b·n) per block, and whoever
owns a factor prepares it from them with scale 1. A diagonal A (embeddings) is a vector
and is reduced like a formed factor (Σ counts / Σ tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .._invariants import required
from ..kfac.blocks import KroneckerBlock
from ..kfac.curvature import CurvatureSums
from .comm import all_reduce_mean


def gather_rows(sums: dict[str, CurvatureSums], blocks: Sequence[KroneckerBlock],
                group: Any, device: torch.device, dtype: torch.dtype
                ) -> tuple[dict[str, CurvatureSums], int]:
    """The global batch's rows of every block, scaled as the module doc says.

    Returns:
        (the sums of every block some rank captured, the collectives issued).
    """
    world = dist.get_world_size(group)
    entries: list[tuple[KroneckerBlock, str, torch.Tensor]] = []
    diagonal: list[KroneckerBlock] = []
    for block in blocks:
        mine, h = sums.get(block.name), block.helper
        if h.diagonal_a:
            diagonal.append(block)
        for which, dim in (("a", h.a_dim), ("g", h.d_out)):
            if which == "a" and h.diagonal_a:
                continue
            rows = None if mine is None else getattr(mine, f"{which}_parts")
            entries.append((block, which, rows if rows is not None else
                            torch.zeros(0, dim, dtype=dtype, device=device)))
    counts = torch.tensor([r.shape[0] for _, _, r in entries], dtype=torch.int64,
                          device=device)
    every = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(every, counts, group=group)
    issued = 1
    sizes = torch.stack(every).T.tolist()  # [entry][rank]
    gathered: dict[tuple[str, str], torch.Tensor] = {}
    for (block, which, rows), per_rank in zip(entries, sizes):
        if max(per_rank) == 0:
            continue
        if rows.shape[0]:
            scale = 1.0 / sum(per_rank) if which == "a" else sums[block.name].g_scale / world
            rows = rows * math.sqrt(scale)
        padded = rows.new_zeros(max(per_rank), rows.shape[1])
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        issued += 1
        gathered[(block.name, which)] = torch.cat([p[:k] for p, k in zip(parts, per_rank)])
    vectors: dict[str, tuple[torch.Tensor, float]] = {}
    if diagonal:
        local = [required(sums[b.name].a, f"A of {b.name}") if b.name in sums else
                 torch.zeros(b.helper.a_dim, dtype=dtype, device=device) for b in diagonal]
        tokens = torch.tensor([sums[b.name].a_rows if b.name in sums else 0.0
                               for b in diagonal], dtype=torch.float64, device=device)
        issued += all_reduce_mean([*local, tokens], group)
        vectors = {b.name: (v, n) for b, v, n in zip(diagonal, local, tokens.tolist())}
    out: dict[str, CurvatureSums] = {}
    for block in blocks:
        g = gathered.get((block.name, "g"))
        a, a_rows = vectors.get(block.name, (None, 1.0))
        a_parts = gathered.get((block.name, "a"))
        if g is None or (a_parts is None if a is None else not a_rows > 0):
            continue  # no rank captured this block
        out[block.name] = CurvatureSums(a=a, a_rows=a_rows, a_parts=a_parts, g_parts=g,
                                        g_rows=float(g.shape[0]), g_scale=1.0)
    return out, issued
