"""Which rank does which K-FAC work: a greedy cost model (pure Python, no communication).

The work items are the factors to prepare (strategy ``comm-opt``: one item per damped
factor, A or G of a layer) or whole layers (strategy ``mem-opt``: the owner prepares both
factors and computes the layer's update). Each item costs n³ for a digital solver (the
Cholesky / eigendecomposition of an n × n factor), or the hardware model's time to
program the matrix and read n columns for the thermodynamic solver. Items are assigned
longest first to the least-loaded rank (LPT), which is within 4/3 of the best makespan;
ties go to the lowest rank, so every process computes the same assignment.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from ..enums import parse_enum


class Strategy(str, Enum):
    """How the inversion / solve work is spread (the KAISA trade-offs).

    ``COMM_OPT``: every factor has an owner that prepares it and broadcasts what it
    prepared; every rank then preconditions every layer itself (the least
    communication per step; every rank holds every prepared factor).
    ``MEM_OPT``: every layer has an owner that prepares both its factors and
    preconditions its gradient, then broadcasts the preconditioned gradient (each rank
    holds only its own layers' prepared factors; one broadcast per layer per step).
    """

    COMM_OPT = "comm-opt"
    MEM_OPT = "mem-opt"


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: ``factor`` is ``"a"``, ``"g"`` or ``"layer"`` (both + update)."""

    layer: str
    factor: str
    cost: float


def cubic_cost(n: int) -> float:
    """Digital solvers: a factorisation of an n × n matrix, n³.

    Args:
        n: The factor's dimension.

    Returns:
        n³ (arbitrary units: only ratios matter to the assignment).
    """
    return float(n) ** 3


def hardware_cost(hardware) -> Callable[[int], float]:
    """Thermodynamic solver: program n² values, then settle and read n columns (the
    inverse's solves), in seconds of the hardware model (settle model ``"rc"``).

    Args:
        hardware: The solver's :class:`~thermokfac.solvers.HardwareModel`.

    Returns:
        The cost of a factor of dimension n, in modelled seconds.
    """
    def cost(n: int) -> float:
        solve = hardware.time_solve(n, n, alpha_min=1.0, t0_rc=0.0, window_rc=0.0,
                                    settle_model="rc")
        return hardware.time_program(n).total_s + solve.total_s
    return cost


def work_items(layers: Iterable[tuple[str, int | None, int]], strategy: Strategy | str,
               cost: Callable[[int], float]) -> list[WorkItem]:
    """The work of one prepare step.

    Args:
        layers: ``(name, a_dim or None for a diagonal A, g_dim)`` per layer, in model order.
        strategy: ``"comm-opt"`` (one item per factor) or ``"mem-opt"`` (one per layer).
        cost: Cost of preparing an n-dimensional factor.
    """
    strategy = parse_enum(Strategy, strategy, "strategy")
    items: list[WorkItem] = []
    for name, a_dim, g_dim in layers:
        parts = [("g", cost(g_dim))] + ([("a", cost(a_dim))] if a_dim is not None else [])
        if strategy is Strategy.MEM_OPT:
            items.append(WorkItem(name, "layer", sum(c for _, c in parts)))
        else:
            items += [WorkItem(name, which, c) for which, c in parts]
    return items


@dataclass(frozen=True)
class Assignment:
    """Owner rank of every work item, and the resulting load per rank."""

    world_size: int
    owners: dict[tuple[str, str], int]
    loads: tuple[float, ...]

    @classmethod
    def greedy(cls, items: list[WorkItem], world_size: int) -> Assignment:
        """Longest-processing-time-first onto the least-loaded rank (ties: lowest rank;
        equal costs keep model order).

        Args:
            items: The work of one prepare step (:func:`work_items`).
            world_size: Ranks to spread it over.

        Returns:
            The assignment, the same on every rank.

        Raises:
            ValueError: ``world_size`` < 1.
        """
        if world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be a positive integer")
        heap = [(0.0, rank) for rank in range(world_size)]
        owners: dict[tuple[str, str], int] = {}
        loads = [0.0] * world_size
        order = sorted(range(len(items)), key=lambda i: (-items[i].cost, i))
        for i in order:
            load, rank = heapq.heappop(heap)
            owners[(items[i].layer, items[i].factor)] = rank
            loads[rank] = load + items[i].cost
            heapq.heappush(heap, (loads[rank], rank))
        return cls(world_size, owners, tuple(loads))

    def owner(self, layer: str, factor: str = "layer") -> int:
        """Rank that owns ``factor`` of ``layer`` (``"layer"`` under ``mem-opt``).

        Args:
            layer: A block's name.
            factor: ``"a"``, ``"g"`` or ``"layer"``.

        Raises:
            KeyError: No such work item.
        """
        return self.owners[(layer, factor)]

    def items_of(self, rank: int) -> list[tuple[str, str]]:
        """The ``(layer, factor)`` items owned by ``rank``.

        Args:
            rank: A rank of the group.
        """
        return [key for key, r in self.owners.items() if r == rank]

    @property
    def makespan(self) -> float:
        """Load of the busiest rank."""
        return max(self.loads)

    @property
    def imbalance(self) -> float:
        """Busiest rank's load over the mean load (1.0 is perfect balance)."""
        mean = sum(self.loads) / self.world_size
        return self.makespan / mean if mean > 0 else 1.0
