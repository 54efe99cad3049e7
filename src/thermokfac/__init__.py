"""thermokfac: K-FAC with pluggable digital and simulated thermodynamic linear solvers."""

from importlib import metadata as _metadata

from .enums import DampingSplit, FisherType, KFACApprox, LossReduction, LossType, Method
from .kfac import KFACPreconditioner, StepReport
from .optim import KFACOptimizer
from .solvers import LinearSolver, Prepared, SolverError, SolveResult, get_solver
from .timing import StepTimings

try:  # single-sourced: the version in pyproject.toml, as installed
    __version__: str = _metadata.version("thermokfac")
except _metadata.PackageNotFoundError:  # imported from a source tree never installed
    __version__ = "0+unknown"

__all__ = ["DampingSplit", "FisherType", "KFACApprox", "KFACOptimizer", "KFACPreconditioner",
           "LinearSolver", "LossReduction", "LossType", "Method", "Prepared", "SolveResult",
           "SolverError", "StepReport", "StepTimings", "get_solver"]
