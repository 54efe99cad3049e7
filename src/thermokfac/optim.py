"""``KFACOptimizer``: K-FAC in front of any ``torch.optim`` optimizer, as one optimizer.

Training stacks (Lightning, the Hugging Face ``Trainer``, Accelerate, learning-rate
schedulers) take a ``torch.optim.Optimizer``: they step it, zero it, save and restore its
``state_dict`` and change the rates in its ``param_groups``. :class:`KFACOptimizer` is
one, wrapping a base optimizer the way Lookahead-style wrappers do: its ``param_groups``
and ``state`` *are* the base optimizer's (the same objects), so a scheduler that changes
a rate changes the base optimizer's rate and the KL clip's; ``step()`` preconditions the
gradients (Eq. 15) and then runs the base step, once per optimizer step.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .kfac import KFACPreconditioner
from .kfac.discovery import is_ddp
from .kfac.guards import world_size

__all__ = ["KFACOptimizer"]

def _outside(pre: KFACPreconditioner, base: torch.optim.Optimizer) -> list[str]:
    """Names of the modules whose preconditioned parameters ``base`` does not step."""
    stepped = {id(p) for group in base.param_groups for p in group["params"]}
    names = {id(m): n for n, m in pre.model.named_modules()}
    out = []
    for block in pre.blocks.values():
        params = block.helper.parameters
        if params and not any(id(p) in stepped for p in params):
            name = names.get(id(block.helper.module))
            if name is not None and name not in out:
                out.append(name)
    return out


class KFACOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that preconditions with K-FAC, then steps ``base``.

    Args:
        model: The network whose parameters ``base_optimizer`` updates (bare,
            ``torch.compile``'d, DDP-wrapped or FSDP2-sharded; with DDP on several ranks
            or FSDP2 the :class:`~thermokfac.distributed.DistributedKFACPreconditioner`
            is used).
        base_optimizer: A ``torch.optim.Optimizer`` over the model's parameters (not
            LBFGS, whose closure would overwrite the preconditioned gradient). Layers
            whose parameters it does not step are left out (``skip_layers``).
        **preconditioner_options: Keyword arguments of
            :class:`~thermokfac.KFACPreconditioner` (``solver``, ``damping``, ...).
            ``optimizer`` is this object: the KL clip reads the rates (and SGD momentum)
            of its ``param_groups``.

    Raises:
        TypeError: If ``base_optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: If ``optimizer=`` is passed among the preconditioner options, or the
            base optimizer is LBFGS or another ``KFACOptimizer``.

    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.zeros(8).long()).backward()
    >>> opt.step(); opt.zero_grad()
    >>> opt.preconditioner.steps, model[0].weight.grad is None
    (1, True)
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 **preconditioner_options: Any) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got "
                            f"{type(base_optimizer).__name__}")
        if "optimizer" in preconditioner_options:
            raise ValueError("optimizer= is set by KFACOptimizer itself (the KL clip reads "
                             "its param_groups); pass the base optimizer as base_optimizer")
        if isinstance(base_optimizer, (torch.optim.LBFGS, KFACOptimizer)):
            raise ValueError(
                f"base_optimizer={type(base_optimizer).__name__} is not supported: "
                + ("LBFGS re-evaluates its closure, which would overwrite the preconditioned "
                   "gradient" if isinstance(base_optimizer, torch.optim.LBFGS) else
                   "it already preconditions (the gradient would be preconditioned twice)"))
        self.base_optimizer = base_optimizer
        # Optimizer.__init__ registers the groups (the base optimizer's own dicts, already
        # complete) and sets up torch's step hooks; the list and the state are then shared.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        from .distributed.fully_shard import is_fully_sharded

        if (is_ddp(model) and world_size() > 1) or is_fully_sharded(model):
            from .distributed import DistributedKFACPreconditioner
            preconditioner_cls: type[KFACPreconditioner] = DistributedKFACPreconditioner
        else:
            preconditioner_cls = KFACPreconditioner
        self.preconditioner = preconditioner_cls(model, optimizer=self, **preconditioner_options)
        outside = _outside(self.preconditioner, base_optimizer)
        if outside:  # layers another optimizer steps are left alone, and said so
            warnings.warn(f"layers {outside} are left out of K-FAC: the base optimizer does "
                          "not step their parameters", UserWarning, stacklevel=2)
            self.preconditioner.remove()
            skip = tuple(preconditioner_options.pop("skip_layers", ())) + tuple(outside)
            self.preconditioner = preconditioner_cls(model, optimizer=self, skip_layers=skip,
                                                     **preconditioner_options)

    @torch.no_grad()
    def step(self, closure=None):
        """Precondition the gradients (K-FAC, Eq. 15), then take the base step.

        Args:
            closure: Re-evaluates the model and returns the loss (called with gradients
                enabled, before the preconditioning), as in ``torch.optim``.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.preconditioner.step()
        self.base_optimizer.step()
        return loss

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a KFACOptimizer cannot be copied or pickled (its preconditioner "
                        "holds hooks on the model): save and load state_dict() instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's gradients; the curvature of backwards whose
        gradients are dropped without a step (a skipped step) goes with them
        (:meth:`~thermokfac.KFACPreconditioner.discard_unstepped`).

        Args:
            set_to_none: Set each ``.grad`` to ``None`` instead of zeros, as
                :meth:`torch.optim.Optimizer.zero_grad`.
        """
        self.preconditioner.discard_unstepped()
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (the list is shared). Parameters of layers
        the preconditioner already watches are preconditioned; others are stepped as
        they are.

        Args:
            param_group: A parameter group as ``torch.optim.Optimizer.add_param_group``
                takes it (``{"params": [...], "lr": ...}``).

        Raises:
            ValueError: As the base optimizer raises it (a parameter in two groups).
        """
        if any(param_group is g for g in self.base_optimizer.param_groups):
            super().add_param_group(param_group)  # Optimizer.__init__ registering the groups
            return
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """``{"base": base_optimizer.state_dict(), "preconditioner": ...}``."""
        return {"base": self.base_optimizer.state_dict(),
                "preconditioner": self.preconditioner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both parts; the base state is cast as ``torch.optim`` casts it, the
        preconditioner's moved to the model's device, its moving averages cast to
        ``factor_dtype`` (inverses and factorisations keep their dtype until the next
        prepare).

        Args:
            state_dict: What :meth:`state_dict` returned: ``{"base": ...,
                "preconditioner": ...}``.

        Raises:
            ValueError: If ``state_dict`` is not a :meth:`state_dict` of this class, or
                either part refuses its state (another model, other parameter groups):
                then neither part has changed.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "preconditioner"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(f"not a KFACOptimizer state (keys {keys}); expected 'base' and "
                             "'preconditioner'")
        # A refused load leaves both parts as they were: the base loads first (torch
        # checks before it changes anything) and is put back if the preconditioner then
        # refuses its part (which checks everything before it changes anything).
        previous = self.base_optimizer.state_dict()  # references: a load makes new ones
        self.base_optimizer.load_state_dict(state_dict["base"])
        try:
            self.preconditioner.load_state_dict(state_dict["preconditioner"])
        except BaseException:
            self.base_optimizer.load_state_dict(previous)
            raise
        finally:
            self.param_groups = self.base_optimizer.param_groups  # torch rebuilds the list
            self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        pre = self.preconditioner
        return (f"KFACOptimizer(base={type(self.base_optimizer).__name__}, "
                f"layers={len(pre.layer_names)}, solver={pre.solver.name!r}, "
                f"method={pre.config.method.value!r}, steps={pre.steps})")
