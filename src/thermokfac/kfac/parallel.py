"""The seam between the K-FAC step and how its work is spread over processes.

:meth:`KFACPreconditioner.step <thermokfac.KFACPreconditioner.step>` is one function
for every kind of parallelism. It asks each rank-dependent question of a
:class:`WorkAssignment` (who prepares a factor, who computes a block's U), does each
collective through a :class:`Communicator`, and reads and writes gradients through a
:class:`~.gradients.GradientAccess`. A :class:`Parallelism` builds the three for a
preconditioner; one process gets :class:`SingleProcess`: the trivial assignment (rank 0
does everything) and a communicator whose collectives do nothing. Data parallelism
(:mod:`thermokfac.distributed`) is another :class:`Parallelism`, with the step
untouched — as kfac-pytorch's assignment and distributed_shampoo's distributors do.

What a new kind of parallelism supplies, and where each answer lives:

* *who owns a block's work* — :meth:`WorkAssignment.inv_worker` (per factor) and
  :meth:`WorkAssignment.grad_worker` (U), with :meth:`WorkAssignment.holds_cache` for
  where the prepared state stays between steps;
* *where the estimates live* — on every rank: :meth:`Communicator.reduce_curvature`
  turns each rank's sums into the global batch's (A and G come from layer inputs and
  output gradients, which every rank holds whole for its own examples);
* *how DΘ is read and U written* — the :class:`~.gradients.GradientAccess`: whole
  ``.grad`` tensors today; a sharded engine (FSDP2) reads each rank's shard of DΘ's
  rows, and its assignment names the rank that gathers a block's rows, applies Eq. 15
  and scatters U back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .blocks import FACTORS, KroneckerBlock
from .config import KFACConfig
from .curvature import CurvatureSums
from .gradients import GradientAccess, WholeGradients


class WorkAssignment(ABC):
    """Which rank does which work of a step: a pure function of the blocks and ranks,
    the same on every rank.

    Attributes:
        rank: This process's rank in the group.
        world_size: Ranks in the group.
    """

    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def inv_worker(self, block: str, factor: str) -> int | None:
        """The rank that prepares (and for Method 1 inverts) ``factor`` (``"a"`` or
        ``"g"``) of ``block``; None when every rank does (a diagonal A: no solver
        work).

        Args:
            block: A block's name.
            factor: ``"a"`` or ``"g"``.
        """

    @abstractmethod
    def grad_worker(self, block: str) -> int | None:
        """The rank that computes U of ``block``, or None when every rank does.

        Args:
            block: A block's name.
        """

    @property
    @abstractmethod
    def broadcasts_caches(self) -> bool:
        """Whether each factor's owner sends its prepared state to every rank."""

    def prepares(self, block: str) -> tuple[str, ...]:
        """The factors of ``block`` this rank prepares.

        Args:
            block: A block's name.

        Returns:
            A subset of ``("a", "g")``.
        """
        return tuple(f for f in FACTORS if self.inv_worker(block, f) in (None, self.rank))

    def holds_cache(self, block: str) -> bool:
        """Whether this rank keeps ``block``'s prepared state between steps.

        Args:
            block: A block's name.
        """
        return self.broadcasts_caches or bool(self.prepares(block))

    def holds_estimates(self, block: str) -> bool:
        """Whether this rank keeps ``block``'s moving averages (every rank, unless the
        curvature is reduced to one owner).

        Args:
            block: A block's name.
        """
        return True

    def computes_update(self, block: str) -> bool:
        """Whether this rank computes U of ``block``.

        Args:
            block: A block's name.
        """
        worker = self.grad_worker(block)
        return worker is None or worker == self.rank

    @property
    def broadcasts_updates(self) -> bool:
        """Whether U is computed by one rank per block and sent to the others."""
        return False


class LocalAssignment(WorkAssignment):
    """One process does everything."""

    def inv_worker(self, block: str, factor: str) -> int:
        return 0

    def grad_worker(self, block: str) -> int | None:
        return None

    @property
    def broadcasts_caches(self) -> bool:
        return False


@dataclass
class Update:
    """One block's preconditioned gradient: ⟨U, DΘ⟩, η of its parameter group (None
    when unknown: then no KL clip), and U itself when it is not in ``.grad`` yet (None:
    written already; the KL clip then scales it there)."""

    inner: float
    rate: float | None
    u: Tensor | None = None


class Communicator(ABC):
    """The collectives of a K-FAC step (all no-ops in one process).

    Attributes:
        collectives: Collectives issued so far by this rank.
    """

    collectives: int = 0

    @abstractmethod
    def reduce_curvature(self, sums: dict[str, CurvatureSums],
                         blocks: Sequence[KroneckerBlock]) -> dict[str, CurvatureSums]:
        """This step's sums over the global batch: A's numerators and row counts summed
        over ranks, G (already scaled by each rank's c) averaged over ranks with zeros
        where a rank saw no rows; rows all-gathered in the rows mode.

        Args:
            sums: This rank's sums, by block name (blocks it did not capture absent).
            blocks: Every block, in the same order on every rank.

        Returns:
            The sums of every block that some rank captured (on a rank that keeps the
            block's estimates).
        """

    @abstractmethod
    def share_caches(self, blocks: Sequence[KroneckerBlock],
                     assignment: WorkAssignment) -> None:
        """Complete each block's caches with the factors other ranks prepared.

        Args:
            blocks: Every block, in the same order on every rank.
            assignment: Who prepared which factor.
        """

    def gather_gradients(self, blocks: Sequence[KroneckerBlock],
                         assignment: WorkAssignment, gradients: GradientAccess) -> None:
        """Bring each block's gradient to the rank that computes its U, before any U is
        computed (a sharded engine's rows; nothing to do when every rank holds whole
        gradients, the default).

        Args:
            blocks: Every block, in the same order on every rank.
            assignment: Who computes each U.
            gradients: Reads and writes the parameters' gradients.
        """
        return None

    @abstractmethod
    def share_updates(self, updates: dict[str, Update], blocks: Sequence[KroneckerBlock],
                      assignment: WorkAssignment, gradients: GradientAccess
                      ) -> tuple[dict[str, Update], float | None]:
        """Every block's U for this rank — as ``u``, or written into ``.grad`` through
        ``gradients`` already (``u`` None: a sharded engine's rows) — and Σ η²⟨U, DΘ⟩
        over all blocks (None when a rate is unknown).

        Args:
            updates: The updates this rank computed, by block name.
            blocks: Every block, in the same order on every rank.
            assignment: Who computed each U.
            gradients: Reads and writes the parameters' gradients.

        Returns:
            ``(updates of every block, the KL clip's sum)``.
        """

    @abstractmethod
    def max_over_ranks(self, values: list[float]) -> list[float]:
        """The element-wise maximum over ranks.

        Args:
            values: This rank's values (the same length on every rank).

        Returns:
            The maxima, in the same order.
        """

    @abstractmethod
    def example_window(self, rows: int) -> tuple[int, int] | None:
        """(offset of this rank's first prediction, predictions of the global batch)
        for drawing ``mc`` labels by global index; None in one process.

        Args:
            rows: Predictions on this rank.
        """

    @abstractmethod
    def gather_states(self, states: dict[str, dict[str, Any]],
                      assignment: WorkAssignment) -> dict[str, dict[str, Any]]:
        """Every block's checkpoint state, each from a rank that holds its prepared
        state (:meth:`WorkAssignment.holds_cache`).

        Args:
            states: This rank's block states, by block name.
            assignment: Who holds which prepared state.

        Returns:
            Every block's state, by block name.
        """

    def failing(self, step: int) -> AbstractContextManager[None]:
        """A context in which a failed collective becomes an error naming ``step``.

        Args:
            step: The preconditioner's step, for the message.
        """
        return nullcontext()


def clip_sum(updates: Mapping[str, Update]) -> float | None:
    """Σ η²⟨U, DΘ⟩ (None when some η is unknown: no KL clip then)."""
    total = 0.0
    for update in updates.values():
        if update.rate is None:
            return None
        total += update.rate * update.rate * update.inner
    return total


class LocalCommunicator(Communicator):
    """One process: every collective is the identity."""

    def reduce_curvature(self, sums, blocks):
        return sums

    def share_caches(self, blocks, assignment):
        pass

    def share_updates(self, updates, blocks, assignment, gradients):
        return updates, clip_sum(updates)

    def max_over_ranks(self, values):
        return values

    def example_window(self, rows):
        return None

    def gather_states(self, states, assignment):
        return states


@dataclass(frozen=True)
class Plan:
    """What a :class:`Parallelism` builds for one preconditioner."""

    assignment: WorkAssignment
    communicator: Communicator
    gradients: GradientAccess


class Parallelism(ABC):
    """How a preconditioner's work is spread: builds its :class:`Plan`.

    Attributes:
        averages_factors: Several ranks share one set of factors (a data-parallel
            model is then expected; a plain one-process preconditioner refuses it).
        shards_parameters: The plan works on an FSDP2 model's row shards.
    """

    averages_factors: bool = False
    #: Whether the plan reads and writes FSDP2's row shards of the gradients (a sharded
    #: model is refused otherwise).
    shards_parameters: bool = False

    def follow(self, model: torch.nn.Module) -> Parallelism:
        """The parallelism for ``model`` as it is at the first step (a framework may
        shard it after the preconditioner was built): this one, unless a subclass knows
        better.

        Args:
            model: The model the preconditioner watches.
        """
        return self

    @abstractmethod
    def plan(self, blocks: Sequence[KroneckerBlock], config: KFACConfig,
             device: torch.device, factor_dtype: Callable[[], torch.dtype]) -> Plan:
        """The assignment, communicator and gradient access for these blocks.

        Args:
            blocks: Every Kronecker block of the preconditioner, in order.
            config: The preconditioner's configuration.
            device: Where the factors live.
            factor_dtype: Returns the factors' dtype now.

        Returns:
            The :class:`Plan`.

        Raises:
            ValueError: The model or the blocks do not fit this parallelism (named).
        """


class SingleProcess(Parallelism):
    """One process: :class:`LocalAssignment`, :class:`LocalCommunicator`, whole
    ``.grad`` tensors."""

    def plan(self, blocks, config, device, factor_dtype):
        return Plan(LocalAssignment(), LocalCommunicator(), WholeGradients())
