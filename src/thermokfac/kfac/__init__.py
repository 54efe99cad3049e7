"""The K-FAC core: capture, factors, per-layer maths and the preconditioner.

* :mod:`.layers` — one helper per module kind, mapping it to K-FAC's
  ``[batch, shared, features]`` format (Eqs. 4, 18–21);
* :mod:`.discovery` — which modules are preconditioned, left out or tied;
* :mod:`.capture` — forward/output hooks that accumulate this step's factor sums
  (:mod:`.records` what it keeps, :mod:`.tracing` compile and ``torch.func``);
* :mod:`.examples` — the example count of a step;
* :mod:`.guards` — the checks that make a step right or loud;
* :mod:`.factors` — the sums themselves (expand/reduce, bias column, Eq. 12);
* :mod:`.fisher` — backward vectors of the ``mc`` and ``type2`` Fisher types;
* :mod:`.layer_state` — moving averages, damping, prepare and precondition (Eqs. 15–17);
* :mod:`.factor_update`, :mod:`.solving` — the two halves of a step;
* :mod:`.kl_clip`, :mod:`.hyperparams`, :mod:`.config` — the KL clip, schedules and the
  validated configuration;
* :mod:`.state` — the checkpoint format;
* :mod:`.preconditioner` — :class:`KFACPreconditioner`, which ties them together.

Dependencies point one way: ``preconditioner`` imports the others, ``layers`` imports
none of them, and nothing here imports ``preconditioner``.
"""

from .preconditioner import KFACPreconditioner

__all__ = ["KFACPreconditioner"]
