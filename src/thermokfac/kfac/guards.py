"""Right or loud: where a step's findings are reported, and the construction-time
checks of a model (sharded, DDP on several ranks, lazy or meta parameters, the setup).

The per-step checks are pure functions of the step record (:mod:`.checks`); the
:class:`Reporter` counts, warns or raises what they find.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .._stack import user_stacklevel
from .checks import Finding
from .config import KFACConfig
from .discovery import is_ddp
from .kl_clip import effective_learning_rate
from .records import LayerRecord


class Reporter:
    """The one place a step's findings go (:mod:`.checks`): counted in ``stats``,
    warned once per kind, or raised.

    Args:
        stats: Returns the preconditioner's live ``stats`` dict.
    """

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats
        self._warned: set[str] = set()

    def report(self, *findings: Finding | None) -> None:
        """Count, warn or raise each finding, in order.

        Raises:
            ValueError, RuntimeError: The first finding that refuses the step.
        """
        for found in findings:
            if found is None:
                continue
            if found.error is not None:
                raise found.error(found.message)
            if found.counter is not None:
                self._stats()[found.counter] += found.count
            if found.key is not None:
                self.warn_once(found.key, found.message)

    def warn_once(self, key: str, message: str) -> None:
        """Warn about ``key`` the first time only."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " (warned once)", stacklevel=user_stacklevel())


def world_size() -> int:
    """Ranks of the default process group (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sharded(wrapper: nn.Module, model: nn.Module) -> str | None:
    """What makes the model sharded (FSDP, FSDP2 ``fully_shard``, DTensor parameters),
    or None."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    for module in (wrapper, *model.modules()):
        if isinstance(module, FullyShardedDataParallel):
            return f"module {type(module).__name__} is FSDP1-wrapped"
        if isinstance(module, FSDPModule):
            return f"module {type(module).__name__} is FSDP2-sharded (fully_shard)"
    for name, p in model.named_parameters():
        if isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor):
            return f"parameter {name!r} is a DTensor (sharded)"
    return None


def fully_shard_problem(model: nn.Module) -> str | None:
    """Why ``model`` is not one that owner-rank K-FAC preconditions exactly — FSDP1
    (``FullyShardedDataParallel``), a 2-D mesh (HSDP), a placement other than row
    shards (tensor parallelism) — or None for an FSDP2 model (every DTensor parameter
    ``Shard(0)`` on a 1-D mesh) or an unsharded one."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Shard

    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return f"module {type(module).__name__} is FSDP1 (FullyShardedDataParallel)"
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        if p.device_mesh.ndim != 1:
            return (f"parameter {name!r} lives on a {p.device_mesh.ndim}-D device mesh "
                    "(HSDP or tensor parallelism)")
        if tuple(p.placements) != (Shard(0),):
            return (f"parameter {name!r} has placements {tuple(p.placements)}, not "
                    "FSDP2's (Shard(0),)")
    return None


def refuse_sharded(wrapper: nn.Module, model: nn.Module, shards: bool = False) -> None:
    """Raise NotImplementedError for a sharded model (see :func:`sharded`) unless
    ``shards`` (the FSDP2 plan) — and then for a sharding other than FSDP2's (see
    :func:`fully_shard_problem`)."""
    path = ("the supported sharded path is FSDP2 (torch.distributed.fsdp.fully_shard) "
            "with thermokfac.distributed.DistributedKFACPreconditioner (built before or "
            "after fully_shard); or DistributedDataParallel with "
            "DistributedKFACPreconditioner")
    if shards:
        reason = fully_shard_problem(model)
        if reason is not None:
            raise NotImplementedError(f"this sharding is not supported ({reason}): {path}")
        return
    reason = sharded(wrapper, model)
    if reason is not None:
        raise NotImplementedError(
            f"FSDP / sharded parameters are not supported here ({reason}): K-FAC needs each "
            f"layer's whole weight gradient on the rank that preconditions it — {path}")


def check_model(wrapper: nn.Module, model: nn.Module, averages_factors: bool,
                shards: bool = False) -> None:
    """Refuse what cannot be preconditioned: a DDP model on several ranks for a
    preconditioner that keeps each rank's own factors, a sharded model, lazy or meta
    parameters. (Nothing else happens at construction but registering hooks: a model
    compiled *and run* before building has graphs without them, refused at the first
    step; a compiled submodule reports through its wrapper's hooks.)

    Raises:
        NotImplementedError: The model is FSDP-wrapped or has DTensor parameters.
        RuntimeError: DDP-wrapped, more than one rank, and not ``averages_factors``.
        ValueError: Lazy parameters not yet materialised, or parameters on the meta
            device.
    """
    refuse_sharded(wrapper, model, shards)
    if is_ddp(wrapper) and not averages_factors and world_size() > 1:
        raise RuntimeError(
            f"the model is DistributedDataParallel-wrapped on {world_size()} ranks: "
            "KFACPreconditioner would use each rank's own factors and the replicas "
            "would drift apart; use thermokfac.distributed.DistributedKFACPreconditioner")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        shown = ", ".join(meta[:4]) + (f" and {len(meta) - 4} more" if len(meta) > 4 else "")
        raise ValueError(f"parameters {shown} are on the meta device (no values yet): "
                         "materialise the model first (model.to_empty(device=...), then "
                         "initialise or load its weights) and build the preconditioner after")
    if any(is_lazy(p) for p in model.parameters()):
        raise ValueError("the model has uninitialised lazy parameters (nn.LazyLinear, "
                         "nn.LazyConv2d, ...): run one forward pass to materialise them, "
                         "then build the preconditioner")


def check_setup(records: list[LayerRecord], cfg: KFACConfig,
                optimizer: torch.optim.Optimizer | None) -> None:
    """Construction-time warnings and checks: every layer frozen, a KL clip without a
    learning rate, an optimizer momentum the KL clip cannot use (``ValueError``)."""
    if not any(r.helper.trainable for r in records):
        warnings.warn("every preconditioned layer is frozen (requires_grad=False): K-FAC "
                      "does nothing until one is trainable", stacklevel=3)
    if cfg.kl_clip is not None and optimizer is not None:
        effective_learning_rate(None, optimizer, cfg.momentum)  # momentum < 1
    if cfg.kl_clip is not None and cfg.lr is None and optimizer is None:
        warnings.warn("kl_clip is inactive: it needs the learning rate (pass lr= or "
                      "optimizer=, or kl_clip=None to silence this)", stacklevel=3)
    if cfg.kl_clip is not None and cfg.lr is not None and optimizer is None \
            and cfg.momentum is None:
        warnings.warn("kl_clip uses lr= as the step size, assuming no momentum: under SGD "
                      "momentum μ the step is lr/(1 − μ), and a clip sized for lr lets it "
                      "overshoot (pass momentum=μ, or optimizer=, the base optimizer)",
                      stacklevel=3)
