"""Solver registry: ``get_solver(name, **kwargs)`` builds any registered backend."""

from __future__ import annotations

from typing import Any

from .base import (
    LinearSolver,
    Prepared,
    SolverError,
    SolveResult,
    all_finite,
    check_symmetric_matrix,
)
from .direct import CholeskySolver, EighSolver
from .hardware import HardwareModel, SettleModel, TimeBreakdown
from .iterative import CGSolver
from .thermo import ThermoConfig, ThermodynamicSolver

#: The solver registry: name → solver class (:func:`register_solver` adds to it,
#: :func:`get_solver` builds from it).
SOLVERS: dict[str, type[LinearSolver]] = {}


def register_solver(cls: type[LinearSolver]) -> type[LinearSolver]:
    """Class decorator adding a solver to the registry under ``cls.name``.

    Args:
        cls: A :class:`LinearSolver` subclass with a unique ``name``.

    Returns:
        ``cls``, registered.

    Raises:
        ValueError: Another class is registered under the same name.
    """
    if cls.name in SOLVERS and SOLVERS[cls.name] is not cls:
        raise ValueError(f"a solver named {cls.name!r} is already registered")
    SOLVERS[cls.name] = cls
    return cls


for _cls in (CholeskySolver, EighSolver, CGSolver, ThermodynamicSolver):
    register_solver(_cls)


def available_solvers() -> list[str]:
    """Names accepted by :func:`get_solver`."""
    return sorted(SOLVERS)


def get_solver(name: str | LinearSolver, **kwargs: Any) -> LinearSolver:
    """Build the solver registered as ``name`` (an instance is returned as it is).

    Args:
        name: A registered name (``"cholesky"``, ``"eigh"``, ``"cg"``,
            ``"thermodynamic"``) or a :class:`LinearSolver` instance.
        **kwargs: The solver class's keyword arguments (only with a name).

    Returns:
        The solver.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names),
            or keyword arguments come with an instance.

    >>> get_solver("cholesky")
    CholeskySolver()
    """
    if isinstance(name, LinearSolver):
        if kwargs:
            raise ValueError("keyword arguments are only accepted with a solver name")
        return name
    key = getattr(name, "value", name)
    if key not in SOLVERS:
        raise ValueError(f"solver={name!r} is not registered; choose one of "
                         f"{', '.join(map(repr, available_solvers()))}")
    return SOLVERS[key](**kwargs)


__all__ = ["SOLVERS", "CGSolver", "CholeskySolver", "EighSolver", "HardwareModel",
           "LinearSolver", "Prepared", "SettleModel", "SolveResult", "SolverError",
           "ThermoConfig", "ThermodynamicSolver", "TimeBreakdown", "all_finite",
           "available_solvers", "check_symmetric_matrix", "get_solver", "register_solver"]
