"""Data parallelism behind the step's seam: a work assignment and a communicator.

:class:`DataParallel` is the :class:`~thermokfac.kfac.parallel.Parallelism` of
:class:`~thermokfac.distributed.DistributedKFACPreconditioner`. It builds

* :class:`KAISAAssignment` — KAISA's two strategies over the greedy cost-balanced
  :class:`~.assignment.Assignment`: ``comm-opt`` (each *factor*'s owner prepares it and
  broadcasts the result; every rank computes every U) and ``mem-opt`` (each *block*'s
  owner prepares both factors, computes U and broadcasts it);
* :class:`ProcessGroupCommunicator` — the step's collectives on a process group (gloo
  on CPU, NCCL on GPU): curvature sums reduced in buckets, prepared factors broadcast
  from their owners, U broadcast from its owner, the busiest rank's device time;

and reads whole ``.grad`` tensors (``DistributedDataParallel`` averages them, so DΘ is
the same on every rank). The K-FAC step itself is
:meth:`KFACPreconditioner.step <thermokfac.KFACPreconditioner.step>`, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from .._invariants import required
from ..enums import parse_enum
from ..kfac.blocks import FACTORS, KroneckerBlock
from ..kfac.caches import receive_cache
from ..kfac.config import KFACConfig, setup_fingerprint
from ..kfac.curvature import CurvatureSums
from ..kfac.gradients import GradientAccess, WholeGradients
from ..kfac.parallel import (
    Communicator,
    Parallelism,
    Plan,
    Update,
    WorkAssignment,
    clip_sum,
)
from .assignment import Assignment, Strategy, cubic_cost, hardware_cost, work_items
from .comm import (
    all_reduce_mean,
    all_reduce_scalars,
    broadcast_from_owners,
    check_same_setup,
    share_objects,
)
from .rows import gather_rows


class KAISAAssignment(WorkAssignment):
    """Who prepares what and who computes U, from a greedy :class:`Assignment`.

    Args:
        greedy: Owner of every work item (factors under ``comm-opt``, blocks under
            ``mem-opt``), the same on every rank.
        strategy: ``comm-opt`` or ``mem-opt``.
        rank: This rank.
    """

    def __init__(self, greedy: Assignment, strategy: Strategy, rank: int) -> None:
        self.greedy, self.strategy = greedy, strategy
        self.rank, self.world_size = rank, greedy.world_size

    def inv_worker(self, block: str, factor: str) -> int | None:
        if self.strategy is Strategy.MEM_OPT:
            return self.greedy.owner(block)
        return self.greedy.owners.get((block, factor))  # a diagonal A is no work item

    def grad_worker(self, block: str) -> int | None:
        return self.greedy.owner(block) if self.strategy is Strategy.MEM_OPT else None

    @property
    def broadcasts_caches(self) -> bool:
        return self.strategy is Strategy.COMM_OPT

    @property
    def broadcasts_updates(self) -> bool:
        return self.strategy is Strategy.MEM_OPT

    # the greedy assignment's views
    @property
    def owners(self) -> dict[tuple[str, str], int]:
        """Owner rank of every work item ``(block, "a" | "g" | "layer")``."""
        return self.greedy.owners

    @property
    def loads(self) -> tuple[float, ...]:
        """Cost assigned to each rank."""
        return self.greedy.loads

    @property
    def makespan(self) -> float:
        """Load of the busiest rank."""
        return self.greedy.makespan

    @property
    def imbalance(self) -> float:
        """Busiest rank's load over the mean load (1.0 is perfect balance)."""
        return self.greedy.imbalance

    def owner(self, layer: str, factor: str = "layer") -> int:
        """Owner of one work item (see :meth:`Assignment.owner`).

        Args:
            layer: A block's name.
            factor: ``"a"``, ``"g"`` or ``"layer"``.
        """
        return self.greedy.owner(layer, factor)


class ProcessGroupCommunicator(Communicator):
    """The step's collectives over ``group``.

    Args:
        group: The process group (None: the world).
        device: Where the buffers of the collectives live.
        bucket_bytes: Size of the flattened buffers of the curvature all-reduce.
        factor_dtype: Returns the dtype of the factors now.
        rows: The resistor-array mode (rows all-gathered instead of sums reduced).
    """

    def __init__(self, group: Any, device: torch.device, bucket_bytes: int,
                 factor_dtype: Callable[[], torch.dtype], rows: bool = False) -> None:
        self.group, self.device = group, device
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.bucket_bytes, self.factor_dtype, self.rows = bucket_bytes, factor_dtype, rows
        self.collectives = 0

    def _src(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # ---------------------------------------------------------------- curvature
    def reduce_curvature(self, sums: dict[str, CurvatureSums],
                         blocks: Sequence[KroneckerBlock]) -> dict[str, CurvatureSums]:
        """Σ over ranks of A's numerators and row counts, the mean of G (a rank without
        rows adds zeros), in bucketed all-reduces; rows all-gathered in the rows mode."""
        if self.rows:
            out, issued = gather_rows(sums, blocks, self.group, self._device(sums),
                                      self._dtype(sums))
            self.collectives += issued
            return out
        dtype, device = self._dtype(sums), self._device(sums)
        tensors: list[torch.Tensor] = []
        rows: list[float] = []
        for block in blocks:
            mine = sums.get(block.name)
            rows.append(0.0 if mine is None else float(mine.a_rows))
            if mine is not None:
                tensors += [required(mine.a, f"A of {block.name}"),
                            required(mine.g, f"G of {block.name}")]
                continue
            h = block.helper
            a_shape = (h.a_dim,) if h.diagonal_a else (h.a_dim, h.a_dim)
            tensors += [torch.zeros(a_shape, dtype=dtype, device=device),
                        torch.zeros(h.d_out, h.d_out, dtype=dtype, device=device)]
        counts = torch.tensor(rows, dtype=torch.float64, device=device)
        self.collectives += all_reduce_mean([*tensors, counts], self.group, self.bucket_bytes)
        out = {}
        for i, (block, mean_rows) in enumerate(zip(blocks, counts.tolist())):
            if mean_rows > 0:  # mean(Σ āāᵀ)/mean(#rows) = Σ āāᵀ/#rows of the global batch
                out[block.name] = CurvatureSums(a=tensors[2 * i], a_rows=mean_rows,
                                                g=tensors[2 * i + 1], g_rows=1.0)
        return out

    def _dtype(self, sums: dict[str, CurvatureSums]) -> torch.dtype:
        """The step's factor dtype (every rank resolves the same from the model)."""
        return next(iter(sums.values())).dtype if sums else self.factor_dtype()

    def _device(self, sums: dict[str, CurvatureSums]) -> torch.device:
        return next(iter(sums.values())).device if sums else self.device

    # ------------------------------------------------------------------ caches
    def share_caches(self, blocks: Sequence[KroneckerBlock],
                     assignment: WorkAssignment) -> None:
        """``comm-opt``: each factor's owner broadcasts what it prepared (metadata in one
        all-gather, then the tensors, in an order every rank agrees on)."""
        if not assignment.broadcasts_caches or not blocks:
            return
        local = {f"{b.name}\x00{w}": b.caches[w].meta() for b in blocks
                 for w in assignment.prepares(b.name)
                 if w in b.caches and not getattr(b, w).diagonal}
        meta = share_objects(local, self.group)
        self.collectives += 1
        pairs: list[tuple[torch.Tensor, int]] = []
        for block in blocks:
            for which in FACTORS:
                info = meta.get(f"{block.name}\x00{which}")
                if info is None:
                    continue
                owner = assignment.inv_worker(block.name, which)
                if owner == self.rank:
                    tensors = block.caches[which].tensors()
                else:
                    block.caches[which], tensors = receive_cache(info, self.device)
                src = self._src(required(owner, f"the owner of {block.name}/{which}"))
                pairs += [(t, src) for t in tensors.values()]
        broadcast_from_owners(pairs, self.group)
        self.collectives += len(pairs)

    # ----------------------------------------------------------------- updates
    def share_updates(self, updates: dict[str, Update], blocks: Sequence[KroneckerBlock],
                      assignment: WorkAssignment, gradients: GradientAccess
                      ) -> tuple[dict[str, Update], float | None]:
        """``mem-opt``: each block's owner broadcasts U; Σ η²⟨U, DΘ⟩ is summed over the
        owners. ``comm-opt``: every rank computed every U
        already."""
        if not assignment.broadcasts_updates:
            return updates, clip_sum(updates)
        n = len(blocks)
        partial = clip_sum(updates)
        flags = torch.tensor([float(b.name in updates) for b in blocks]
                             + [0.0 if partial is None else partial,
                                1.0 if partial is None else 0.0],  # a rate is unknown
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, group=self.group)
        present = flags.tolist()
        pairs: list[tuple[torch.Tensor, int]] = []
        out: dict[str, Update] = {}
        for i, block in enumerate(blocks):
            if present[i] <= 0:
                continue
            owner = assignment.grad_worker(block.name)
            mine = updates.get(block.name)
            if mine is not None:
                u = required(mine.u, f"U of {block.name}").contiguous()  # memory order
                out[block.name] = Update(mine.inner, mine.rate, u)
            else:
                h = block.helper
                u = torch.empty(h.d_out, h.a_dim, dtype=h.weight_param.dtype,
                                device=self.device)
                out[block.name] = Update(0.0, None, u)
            pairs.append((u, self._src(required(owner, f"the owner of {block.name}"))))
        broadcast_from_owners(pairs, self.group)
        self.collectives += 1 + len(pairs)
        return out, (None if present[n + 1] > 0 else present[n])

    # -------------------------------------------------------------------- misc
    def max_over_ranks(self, values: list[float]) -> list[float]:
        return all_reduce_scalars(values, "max", self.group, self.device)

    def example_window(self, rows: int) -> tuple[int, int] | None:
        mine = torch.tensor([rows], device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.group)
        self.collectives += 1
        sizes = [int(c) for c in every]
        return sum(sizes[: self.rank]), sum(sizes)

    def gather_states(self, states: dict[str, dict[str, Any]],
                      assignment: WorkAssignment) -> dict[str, dict[str, Any]]:
        """``mem-opt``: each block's state from its owner (a collective); ``comm-opt``:
        every rank holds every state already."""
        if assignment.broadcasts_caches:
            return states
        owned = {n: s for n, s in states.items() if assignment.holds_cache(n)}
        merged = share_objects(owned, self.group)
        return {n: merged[n] for n in states}

    @contextmanager
    def failing(self, step: int) -> Iterator[None]:
        """A collective that fails (a peer raised, died, or exceeded the process
        group's timeout) becomes a ``RuntimeError`` naming the step and this rank."""
        try:
            yield
        except NotImplementedError:  # a refusal (a RuntimeError subclass), not a failure
            raise
        except RuntimeError as err:
            raise RuntimeError(f"distributed K-FAC step {step} failed on rank {self.rank} "
                               f"of {self.world_size} (where a collective failed: a peer "
                               f"rank raised, exited or timed out): {err}") from err


class DataParallel(Parallelism):
    """Data-parallel K-FAC over a process group (see the module doc).

    Args:
        strategy: ``comm-opt`` or ``mem-opt``.
        group: Process group (default: the world).
        bucket_mb: Size of the flattened buffers of the curvature all-reduce.

    Raises:
        ValueError: On a bad ``strategy`` or ``bucket_mb``.
    """

    averages_factors = True

    def __init__(self, strategy: Strategy | str = "comm-opt", group: Any = None,
                 bucket_mb: float = 32.0) -> None:
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} must be positive")
        self.strategy = parse_enum(Strategy, strategy, "strategy")
        self.group = group
        self.bucket_bytes = int(bucket_mb * 2**20)

    def follow(self, model: torch.nn.Module) -> Parallelism:
        """The owner-rank plan (:class:`~.fully_shard.FullyShard`) if ``model`` was
        sharded with FSDP2 after the preconditioner was built (Accelerate's order), else
        this one."""
        from .fully_shard import FullyShard, is_fully_sharded

        return FullyShard(self.group) if is_fully_sharded(model) else self

    def plan(self, blocks: Sequence[KroneckerBlock], config: KFACConfig,
             device: torch.device, factor_dtype: Callable[[], torch.dtype]) -> Plan:
        """Check that every rank built the same setup (one all-gather), then assign the
        work greedily (cost n³ digital, the hardware model's time thermodynamic)."""
        solver = config.solver
        check_same_setup(";".join(
            [f"solver {solver.name}, method {config.method.value}, strategy "
             f"{self.strategy.value}"]
            + [setup_fingerprint(config)]
            + [f"{b.name}: A {b.helper.a_dim}, G {b.helper.d_out}" for b in blocks]),
            self.group)
        hardware = getattr(solver, "hardware", None)
        cost = hardware_cost(hardware) if hardware is not None else cubic_cost
        dims = [(b.name, None if b.helper.diagonal_a else b.helper.a_dim, b.helper.d_out)
                for b in blocks]
        world = dist.get_world_size(self.group)
        greedy = Assignment.greedy(work_items(dims, self.strategy, cost), world)
        comm = ProcessGroupCommunicator(self.group, device, self.bucket_bytes, factor_dtype,
                                        rows=config.factors.rows)
        return Plan(KAISAAssignment(greedy, self.strategy, comm.rank), comm, WholeGradients())
