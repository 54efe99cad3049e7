"""The preconditioner's state through ``torch.distributed.checkpoint`` (DCP).

DCP saves and loads the objects of a state dict that follow its ``Stateful`` protocol
(``state_dict()`` / ``load_state_dict()``) on every rank. :class:`KFACState` adapts a
preconditioner to it::

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict)
    from thermokfac.distributed.checkpoint import KFACState

    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt),
              "kfac": KFACState(pre)}, checkpoint_id=folder)        # every rank
    ...
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt), "kfac": KFACState(pre)}
    dcp.load(state, checkpoint_id=folder)                           # every rank
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])

:meth:`KFACPreconditioner.state_dict <thermokfac.KFACPreconditioner.state_dict>` is a
collective that gives every rank the whole K-FAC state (under FSDP2 each block's state
comes from its owner), so the state is saved once, as one serialized item (DCP keeps a
single copy of an item every rank holds), and any number of ranks can load it: each keeps
the blocks its own assignment gives it. A run saved on N ranks resumes on M.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ..kfac.preconditioner import KFACPreconditioner


class KFACState:
    """A preconditioner as a DCP ``Stateful``: its whole state as one serialized item.

    Args:
        preconditioner: The preconditioner (one process, DDP or FSDP2).

    Raises:
        TypeError: ``preconditioner`` is not a :class:`~thermokfac.KFACPreconditioner`.
    """

    def __init__(self, preconditioner: KFACPreconditioner) -> None:
        if not isinstance(preconditioner, KFACPreconditioner):
            raise TypeError(f"KFACState needs a KFACPreconditioner, got "
                            f"{type(preconditioner).__name__}")
        self.preconditioner = preconditioner

    def state_dict(self) -> dict[str, Any]:
        """``{"kfac": BytesIO}``: the preconditioner's whole state, serialized (a
        collective under data parallelism and FSDP2: call it on every rank)."""
        buffer = io.BytesIO()
        torch.save(self.preconditioner.state_dict(), buffer)
        buffer.seek(0)
        return {"kfac": buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (checked as
        :meth:`KFACPreconditioner.load_state_dict
        <thermokfac.KFACPreconditioner.load_state_dict>` checks it).

        Args:
            state: What :meth:`state_dict` returned, as DCP loaded it.

        Raises:
            KeyError: ``state`` has no ``"kfac"`` item.
            ValueError: The state is from another model, solver or method, or of an
                unknown format version.
        """
        buffer = state["kfac"]
        buffer.seek(0)
        self.preconditioner.load_state_dict(torch.load(buffer, weights_only=True))
