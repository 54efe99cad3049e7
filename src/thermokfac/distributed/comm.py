"""Collectives of distributed K-FAC, on torch.distributed (gloo on CPU, NCCL on GPU).

Factors are averaged in buckets: same-dtype tensors are flattened into buffers of at
most ``bucket_bytes`` and every bucket's all-reduce is started asynchronously before the
first is awaited, so a step costs a handful of collectives, not one per factor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype/device, each group under ``bucket_bytes``
    (a larger tensor is a bucket of its own)."""
    out: list[list[int]] = []
    open_: dict[tuple, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        size = t.numel() * t.element_size()
        members, used = open_.get(key, ([], 0))
        if members and used + size > bucket_bytes:
            out.append(members)
            members, used = [], 0
        members.append(i)
        open_[key] = (members, used + size)
    out += [members for members, _ in open_.values() if members]
    return out


def all_reduce_mean(tensors: list[Tensor], group: Any = None,
                    bucket_bytes: int = 32 << 20) -> int:
    """Average ``tensors`` in place over the ranks of ``group``.

    Returns:
        The number of collectives issued (one per bucket).
    """
    if not tensors:
        return 0
    world = dist.get_world_size(group)
    pending = []
    for members in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        pending.append((members, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for members, flat, work in pending:
        work.wait()
        flat.div_(world)
        offset = 0
        for i in members:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n
    return len(pending)


def broadcast_from_owners(tensors: list[tuple[Tensor, int]], group: Any = None) -> None:
    """Broadcast each ``tensor`` from its ``owner`` rank (global rank), all at once."""
    works = [dist.broadcast(t, src=owner, group=group, async_op=True) for t, owner in tensors]
    for work in works:
        work.wait()


def share_objects(local: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """Every rank's ``local`` dict merged (keys are disjoint across ranks)."""
    gathered: list[dict[str, Any] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    merged: dict[str, Any] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def all_reduce_scalars(values: list[float], op: str = "sum", group: Any = None,
                       device: torch.device | None = None) -> list[float]:
    """Sum (``op="sum"``) or maximum (``op="max"``) of a few floats over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                    group=group)
    return t.tolist()


def check_same_setup(description: str, group: Any = None) -> None:
    """Every rank must describe the same model and K-FAC setup (its layers, factor
    shapes, solver and method); a collective (one all-gather of short strings).

    Raises:
        ValueError: On every rank, naming the ranks whose ``description`` differs from
            rank 0's and the first difference (without this check a rank built with
            another model aborts later inside a collective).
    """
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, description, group=group)
    differ = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if differ:
        first = gathered[differ[0]]
        ours, theirs = gathered[0].split(";"), first.split(";")
        where = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
        mine = ours[where] if where < len(ours) else "(nothing)"
        other = theirs[where] if where < len(theirs) else "(nothing)"
        raise ValueError(f"ranks {differ} built a different model or K-FAC setup than rank "
                         f"0: rank 0 has {mine!r} where rank {differ[0]} has {other!r} — "
                         "every rank must build the same model")
