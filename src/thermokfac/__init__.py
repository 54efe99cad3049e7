"""thermokfac: K-FAC with pluggable digital and simulated thermodynamic linear solvers."""

from .enums import DampingSplit, FisherType, KFACApprox, LossReduction, LossType, Method
from .kfac import KFACPreconditioner, StepReport
from .optim import KFACOptimizer
from .solvers import LinearSolver, Prepared, SolverError, SolveResult, get_solver
from .timing import StepTimings

__version__ = "0.1.0"

__all__ = ["DampingSplit", "FisherType", "KFACApprox", "KFACOptimizer", "KFACPreconditioner",
           "LinearSolver", "LossReduction", "LossType", "Method", "Prepared", "SolveResult",
           "SolverError", "StepReport", "StepTimings", "get_solver"]
