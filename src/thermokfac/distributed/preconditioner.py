"""K-FAC on torch.distributed: averaged factors, and the solver work spread over ranks.

    dist.init_process_group("gloo")            # or "nccl"; e.g. under torchrun
    model = DistributedDataParallel(model)
    pre = DistributedKFACPreconditioner(model, strategy="comm-opt", optimizer=opt)
    loss.backward(); pre.step(); opt.step()    # the same three lines on every rank

The step is :meth:`KFACPreconditioner.step <thermokfac.KFACPreconditioner.step>`
itself; this class only builds its data-parallel plan (:mod:`.data_parallel`):

1. Factor-update steps: every block's curvature sums of this step are reduced over the
   ranks (bucketed asynchronous all-reduces) before they join the moving averages — A
   over every activation row of the global batch, G averaged over the ranks with zeros
   where a rank saw no rows — so every rank holds identical factors, equal to one
   process on the whole batch even for a layer used on only some ranks. In the
   resistor-array mode (``factor_storage="rows"``) the rows are all-gathered instead
   (:mod:`.rows`).
2. Prepare steps: the work is split by an :class:`~.assignment.Assignment` computed the
   same way on every rank (greedy, cost n³ digital or the hardware model's time).
   ``comm-opt``: the owner of each factor prepares (and, for Method 1, inverts) it and
   broadcasts the result; ``mem-opt``: the owner of each block prepares both factors.
3. ``comm-opt``: every rank preconditions every block itself; ``mem-opt``: the owner
   preconditions its block and broadcasts U. The KL clip uses the global Σ η²⟨U, DΘ⟩.
4. With the thermodynamic solver each rank models the SPUs of its own work; the step's
   modelled time is the busiest rank's (all-reduce max).

The gradients must already be averaged over ranks (``DistributedDataParallel``), so
that DΘ is the same everywhere. A model sharded with FSDP2 (``fully_shard`` applied
before building) gets the owner-rank plan of :mod:`.fully_shard` instead: each block's
estimates and prepared state on one rank, its gradient rows gathered there and U's rows
scattered back. Stochastic solvers draw from generators seeded by
(seed, step, block, factor), identical on every rank and independent of the assignment.
``stats`` count this rank's work.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from ..kfac.preconditioner import KFACPreconditioner
from .assignment import Strategy
from .data_parallel import DataParallel, KAISAAssignment
from .fully_shard import FullyShard, OwnerAssignment, is_fully_sharded


class DistributedKFACPreconditioner(KFACPreconditioner):
    """:class:`~thermokfac.KFACPreconditioner` for data-parallel training (see module doc).

    Args:
        model: The ``DistributedDataParallel``-wrapped model (or the bare one, whose
            gradients you average yourself).
        strategy: For a DDP model, ``"comm-opt"`` (the default: factor owners broadcast
            prepared factors; every rank preconditions every block) or ``"mem-opt"``
            (block owners precondition and broadcast the gradient). An FSDP2 model
            (``fully_shard`` applied before building) always uses owner-rank blocks
            (:mod:`.fully_shard`); ``strategy`` must then be left unset.
        group: Process group (default: the world).
        bucket_mb: Size of the flattened buffers of the curvature all-reduce.
        **kwargs: Everything :class:`~thermokfac.KFACPreconditioner` takes, but
            ``parallel``.

    Raises:
        RuntimeError: If torch.distributed is not initialised.
        ValueError: On a bad ``strategy`` or ``bucket_mb``, a ``strategy`` for an FSDP2
            model, if ``parallel`` is given, or
            (on every rank) if the ranks built different models or setups.
    """

    def __init__(self, model: nn.Module, *, strategy: Strategy | str | None = None,
                 group: Any = None, bucket_mb: float = 32.0, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedKFACPreconditioner needs torch.distributed: call "
                               "torch.distributed.init_process_group first (or use "
                               "KFACPreconditioner in a single process)")
        if "parallel" in kwargs:
            raise ValueError("DistributedKFACPreconditioner builds its own plan: pass "
                             "strategy=, group= and bucket_mb=, not parallel=")
        parallelism: DataParallel | FullyShard
        if is_fully_sharded(model):
            if strategy is not None:
                raise ValueError(f"strategy={strategy!r} is for DistributedDataParallel "
                                 "models; an FSDP2 model's blocks each have one owner rank "
                                 "(leave strategy unset)")
            parallelism = FullyShard(group)
        else:  # sharded later (Accelerate's order): the first step switches to FullyShard
            parallelism = DataParallel(strategy or "comm-opt", group, bucket_mb)
        super().__init__(model, parallel=parallelism, **kwargs)

    @property
    def parallelism(self) -> DataParallel | FullyShard:
        """The plan builder in effect: :class:`~.fully_shard.FullyShard` for an FSDP2
        model (sharded before building, or by the first step), else
        :class:`~.data_parallel.DataParallel` (strategy, group, bucket size)."""
        return self.parallel  # type: ignore[return-value]

    @property
    def data_parallel(self) -> DataParallel | FullyShard:
        """The plan builder (alias of :attr:`parallelism`)."""
        return self.parallelism

    @property
    def strategy(self) -> Strategy | None:
        """``comm-opt`` or ``mem-opt`` (None on an FSDP2 model: owner-rank blocks)."""
        return getattr(self.parallelism, "strategy", None)

    @property
    def group(self) -> Any:
        """The process group (None: the world)."""
        return self.data_parallel.group

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self.plan.assignment.rank

    @property
    def world_size(self) -> int:
        """Ranks in the group."""
        return self.plan.assignment.world_size

    @property
    def assignment(self) -> KAISAAssignment | OwnerAssignment:
        """Who prepares which factor and who computes which U: a
        :class:`KAISAAssignment` under DDP (``owners``, ``loads``, ``imbalance``), an
        :class:`OwnerAssignment` under FSDP2 (``owners``)."""
        assignment = self.plan.assignment
        if not isinstance(assignment, KAISAAssignment | OwnerAssignment):
            raise TypeError(f"this preconditioner's plan holds a "
                            f"{type(assignment).__name__}, not a distributed assignment")
        return assignment

    @property
    def collectives(self) -> int:
        """Collectives this rank has issued."""
        return self.plan.communicator.collectives

    @property
    def local_modeled_s(self) -> float:
        """This rank's modelled device seconds of the last step (the step's own figure,
        in ``last_timings``, is the busiest rank's)."""
        return 0.0 if self.last_report is None else self.last_report.local_modeled_s
