"""The K-FAC core: capture, factors, per-layer maths and the preconditioner.

* :mod:`.layers` — one helper per module kind, mapping it to K-FAC's
  ``[batch, shared, features]`` format (Eqs. 4, 18–21);
* :mod:`.discovery` — which modules are preconditioned, left out or tied;
* :mod:`.capture` — forward/output hooks that accumulate this step's factor sums
  (:mod:`.records` what it keeps, :mod:`.tracing` compile and ``torch.func``);
* :mod:`.examples` — the example count of a step;
* :mod:`.checks` — the checks that make a step right or loud, pure functions of the
  step record (:class:`~.records.StepRecord`); :mod:`.guards` — the reporter they go
  through, and the construction-time checks;
* :mod:`.factors` — the sums themselves (expand/reduce, bias column, Eq. 12);
* :mod:`.fisher` — backward vectors of the ``mc`` and ``type2`` Fisher types;
* :mod:`.curvature` — this step's sums per block (Eq. 12's numerators and row counts);
* :mod:`.estimates` — one factor's running estimate (matrix, diagonal, rows; Eqs. 16–17);
* :mod:`.caches` — what a prepare makes of a damped factor (Method 1, Method 2, diagonal);
* :mod:`.blocks` — :class:`~.blocks.KroneckerBlock`: a block's estimates, caches and phases
  (update the estimate, update the cache, apply Eq. 15, checkpoint);
* :mod:`.parallel` — the work assignment, communicator and gradient access the step asks
  every rank-dependent question of (:mod:`.gradients`: reading DΘ, writing U);
* :mod:`.report` — the :class:`~.report.StepReport` a step returns, and ``stats``;
* :mod:`.kl_clip`, :mod:`.hyperparams`, :mod:`.config` — the KL clip, schedules and the
  validated configuration;
* :mod:`.state` — the checkpoint format;
* :mod:`.preconditioner` — :class:`KFACPreconditioner`, which ties them together.

Dependencies point one way: ``preconditioner`` imports the others, ``layers`` imports
none of them, and nothing here imports ``preconditioner``.
"""

from .blocks import KroneckerBlock
from .config import ClipConfig, FactorConfig, FisherConfig, InverseConfig, KFACConfig
from .parallel import Communicator, Parallelism, Plan, SingleProcess, Update, WorkAssignment
from .preconditioner import KFACPreconditioner
from .report import StepReport

__all__ = ["ClipConfig", "Communicator", "FactorConfig", "FisherConfig", "InverseConfig",
           "KFACConfig", "KFACPreconditioner", "KroneckerBlock", "Parallelism", "Plan",
           "SingleProcess", "StepReport", "Update", "WorkAssignment"]
