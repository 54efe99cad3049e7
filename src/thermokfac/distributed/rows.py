"""Resistor-array mode across ranks: every rank's activation / gradient rows, all-gathered.

In the resistor-array mode (App. E; ``factor_storage="rows"``) a factor is never formed:
the device is loaded with the rows R themselves and realises s·RᵀR + λI. With several
ranks the factor of the global batch is the mean of the ranks' factors,

    F = (1/W) Σ_r s_r R_rᵀ R_r = Σ_r R'_rᵀ R'_r   with   R'_r = √(s_r / W) · R_r,

so each rank scales its own rows by √(s_r/W) and the rows of all ranks are all-gathered
(padded to the largest count, then trimmed) — every rank then holds the rows of the
whole global batch, O(b·n) per layer, and whoever owns a factor prepares it from them.
A diagonal A (embeddings) is a vector and is averaged like a formed factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .comm import all_reduce_mean


def gather_rows(states: dict[str, Any], records: dict[str, Any], world: int, group: Any,
                device: torch.device, dtype: torch.dtype) -> int:
    """Replace each layer's local rows by the scaled rows of every rank (scale 1).

    Returns:
        The number of collectives issued.
    """
    local: list[tuple[str, str, torch.Tensor]] = []
    diagonal: list[tuple[str, torch.Tensor]] = []
    for name, record in records.items():
        state, helper = states[name], record.helper
        for which, dim in (("a", helper.a_dim), ("g", helper.d_out)):
            if which == "a" and helper.diagonal_a:
                vec = state.a if state.a is not None else torch.zeros(dim, dtype=dtype,
                                                                      device=device)
                diagonal.append((name, vec))
                continue
            rows = getattr(state, f"{which}_rows")
            if rows is None:
                rows = torch.zeros(0, dim, dtype=dtype, device=device)
            else:
                rows = rows * math.sqrt(getattr(state, f"{which}_row_scale") / world)
            local.append((name, which, rows))
    counts = torch.tensor([r.shape[0] for _, _, r in local], dtype=torch.int64, device=device)
    every = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(every, counts, group=group)
    issued = 1
    for i, (name, which, rows) in enumerate(local):
        sizes = [int(c[i]) for c in every]
        if max(sizes) == 0:
            continue
        padded = rows.new_zeros(max(sizes), rows.shape[1])
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        issued += 1
        setattr(states[name], f"{which}_rows", torch.cat([p[:k] for p, k in zip(parts, sizes)]))
        setattr(states[name], f"{which}_row_scale", 1.0)
    if diagonal:
        present = torch.tensor([float(states[n].a is not None) for n, _ in diagonal],
                               dtype=dtype, device=device)
        vectors = [v.clone() for _, v in diagonal]
        issued += all_reduce_mean([*vectors, present], group)
        for (name, _), vec, share in zip(diagonal, vectors, present.tolist()):
            if share > 0:
                states[name].a = vec.div_(share)
    return issued
