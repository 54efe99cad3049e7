"""Validated, frozen configuration of a :class:`~thermokfac.KFACPreconditioner`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..enums import (
    DampingSplit,
    FactorStorage,
    FisherType,
    KFACApprox,
    LossReduction,
    LossType,
    Method,
    parse_enum,
)
from ..solvers import LinearSolver, get_solver
from .hyperparams import (
    DECAY,
    INTERVAL,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    Schedule,
    check_schedule,
    check_value,
)
from .kl_clip import MOMENTUM

FACTOR_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class KFACConfig:
    """Every hyperparameter, checked once; schedules are checked again when read."""

    solver: LinearSolver
    method: Method
    damping: Schedule
    factor_decay: Schedule
    factor_update_steps: Schedule
    inv_update_steps: Schedule
    fisher_type: FisherType
    kfac_approx: KFACApprox
    loss_reduction: LossReduction
    skip_layers: tuple[str, ...]
    damping_split: DampingSplit
    kl_clip: float | None
    lr: Schedule | None
    loss_type: LossType
    num_per_example_loss_terms: int
    mc_samples: int
    factor_dtype: torch.dtype
    momentum: float | None
    factor_storage: FactorStorage
    class_dim: int | None = None
    separate_weight_and_bias: bool = False

    @classmethod
    def build(cls, *, solver, method, damping, factor_decay, factor_update_steps,
              inv_update_steps, fisher_type, kfac_approx, loss_reduction, skip_layers,
              damping_split, kl_clip, lr, loss_type, num_per_example_loss_terms, mc_samples,
              factor_dtype, momentum, factor_storage, model: nn.Module,
              class_dim: int | None = None,
              separate_weight_and_bias: bool = False) -> KFACConfig:
        """Validate every argument (``ValueError`` naming the value and valid range)."""
        if isinstance(skip_layers, str):
            skip_layers = (skip_layers,)
        skip = tuple(skip_layers)
        if not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip_layers={skip!r} must be module names or class names")
        if kl_clip is not None:
            check_value("kl_clip", kl_clip, POSITIVE)
        if lr is not None:
            check_schedule("lr", lr, POSITIVE)
        if class_dim is not None and (isinstance(class_dim, bool)
                                      or not isinstance(class_dim, int)):
            raise ValueError(f"class_dim={class_dim!r} must be an integer dimension (e.g. 1 "
                             "for [N, C, T] outputs, -1 for [N, T, C]) or None")
        if not isinstance(separate_weight_and_bias, bool):
            raise ValueError(f"separate_weight_and_bias={separate_weight_and_bias!r} must be "
                             "True or False")
        storage = parse_enum(FactorStorage, factor_storage, "factor_storage")
        solver = get_solver(solver)
        if method is None:  # the solver's default; the rows mode can only solve
            method = Method.SOLVE if storage is FactorStorage.ROWS else solver.default_method
        if storage is FactorStorage.ROWS:
            if callable(factor_decay) or factor_decay != 0:
                raise ValueError(f"factor_storage='rows' needs factor_decay=0 (got "
                                 f"{factor_decay!r}): a moving average needs the factors")
            if parse_enum(Method, method, "method") is not Method.SOLVE:
                raise ValueError("factor_storage='rows' needs method='solve': an explicit "
                                 "inverse is an n×n matrix")
        return cls(
            solver=solver,
            method=parse_enum(Method, method, "method"),
            damping=check_schedule("damping", damping, NON_NEGATIVE),
            factor_decay=check_schedule("factor_decay", factor_decay, DECAY),
            factor_update_steps=check_schedule("factor_update_steps", factor_update_steps,
                                               INTERVAL),
            inv_update_steps=check_schedule("inv_update_steps", inv_update_steps, INTERVAL),
            fisher_type=parse_enum(FisherType, fisher_type, "fisher_type"),
            kfac_approx=parse_enum(KFACApprox, kfac_approx, "kfac_approx"),
            loss_reduction=parse_enum(LossReduction, loss_reduction, "loss_reduction"),
            skip_layers=skip,
            damping_split=parse_enum(DampingSplit, damping_split, "damping_split"),
            kl_clip=None if kl_clip is None else float(kl_clip),
            lr=lr,
            loss_type=parse_enum(LossType, loss_type, "loss_type"),
            num_per_example_loss_terms=int(check_value(
                "num_per_example_loss_terms", num_per_example_loss_terms, INTERVAL)),
            mc_samples=int(check_value("mc_samples", mc_samples, INTERVAL)),
            factor_dtype=_factor_dtype(factor_dtype, model),
            momentum=None if momentum is None else float(check_value("momentum", momentum,
                                                                      MOMENTUM)),
            factor_storage=storage,
            class_dim=class_dim,
            separate_weight_and_bias=separate_weight_and_bias,
        )


def _factor_dtype(requested: torch.dtype | None, model: nn.Module) -> torch.dtype:
    if requested is None:
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        return torch.float64 if torch.float64 in dtypes else torch.float32
    if requested not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype={requested!r} is not valid; choose torch.float32 or "
                         "torch.float64")
    return requested


__all__ = ["KFACConfig", "Range"]
