"""Validated, frozen configuration of a :class:`~thermokfac.KFACPreconditioner`.

The constructor's keywords are grouped by concern, each group checked in its own
``__post_init__`` (a ``ValueError`` naming the value and its valid range):

* :class:`FisherConfig` — which curvature G estimates and how the loss was reduced;
* :class:`FactorConfig` — how the Kronecker factors are captured, stored and averaged;
* :class:`InverseConfig` — the solver, Method 1 or 2, damping and its schedule;
* :class:`ClipConfig` — the KL clip and the learning rate it reads.

:class:`KFACConfig` holds the four; ``config.method``-style flat reads still work (the
keyword's name finds its group).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ..enums import (
    DampingSplit,
    FactorStorage,
    FisherType,
    Grafting,
    KFACApprox,
    LossReduction,
    LossType,
    Method,
    RepeatedCalls,
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
NON_NEGATIVE_INT = Range(0.0, integer=True)


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in its ``__post_init__``."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class FisherConfig:
    """The curvature G estimates (Eq. 6, 12) and the loss behind it.

    Attributes:
        fisher_type: ``empirical``, ``mc`` or ``type2`` (:class:`~thermokfac.enums.FisherType`).
        loss_type: The likelihood of ``mc``/``type2``.
        loss_reduction: ``mean`` or ``sum`` over the loss terms.
        num_per_example_loss_terms: Loss terms per example (empirical Fisher of a mean).
        mc_samples: Sampled labels per prediction (``mc``).
        class_dim: Where the classes lie in the outputs of ``mc``/``type2``, or None.
    """

    fisher_type: FisherType | str = FisherType.EMPIRICAL
    loss_type: LossType | str = LossType.CROSS_ENTROPY
    loss_reduction: LossReduction | str = LossReduction.MEAN
    num_per_example_loss_terms: int = 1
    mc_samples: int = 1
    class_dim: int | None = None

    def __post_init__(self) -> None:
        cd = self.class_dim
        if cd is not None and (isinstance(cd, bool) or not isinstance(cd, int)):
            raise ValueError(f"class_dim={cd!r} must be an integer dimension (e.g. 1 for "
                             "[N, C, T] outputs, -1 for [N, T, C]) or None")
        _set(self, "fisher_type", parse_enum(FisherType, self.fisher_type, "fisher_type"))
        _set(self, "loss_type", parse_enum(LossType, self.loss_type, "loss_type"))
        _set(self, "loss_reduction", parse_enum(LossReduction, self.loss_reduction,
                                                "loss_reduction"))
        _set(self, "num_per_example_loss_terms", int(check_value(
            "num_per_example_loss_terms", self.num_per_example_loss_terms, INTERVAL)))
        _set(self, "mc_samples", int(check_value("mc_samples", self.mc_samples, INTERVAL)))


@dataclass(frozen=True)
class FactorConfig:
    """How the Kronecker factors are captured, stored and averaged (Eqs. 12, 16–21).

    Attributes:
        factor_decay: β of the moving average (value or schedule), in [0, 1).
        factor_update_steps: Capture every this many steps (value or schedule).
        factor_dtype: float32 or float64; None follows the model (float64 when a
            preconditioned parameter is float64, else float32), cast after building
            included.
        factor_storage: ``matrix`` or ``rows`` (the resistor-array mode, App. E).
        kfac_approx: ``expand`` or ``reduce`` (Sec. 3.3).
        skip_layers: Module or class names left to the base optimizer.
        separate_weight_and_bias: Weight and bias as two blocks.
        repeated_calls: A layer called k times per forward under reduce: ``shared``
            (one shared dimension, the default) or ``separate`` examples
            (:class:`~thermokfac.enums.RepeatedCalls`).
    """

    factor_decay: Schedule = 0.95
    factor_update_steps: Schedule = 1
    factor_dtype: torch.dtype | None = None
    factor_storage: FactorStorage | str = FactorStorage.MATRIX
    kfac_approx: KFACApprox | str = KFACApprox.EXPAND
    skip_layers: tuple[str, ...] = ()
    separate_weight_and_bias: bool = False
    repeated_calls: RepeatedCalls | str = RepeatedCalls.SHARED

    def __post_init__(self) -> None:
        _set(self, "repeated_calls", parse_enum(RepeatedCalls, self.repeated_calls,
                                                "repeated_calls"))
        skip = (self.skip_layers,) if isinstance(self.skip_layers, str) else \
            tuple(self.skip_layers)
        if not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip_layers={skip!r} must be module names or class names")
        _set(self, "skip_layers", skip)
        if not isinstance(self.separate_weight_and_bias, bool):
            raise ValueError(f"separate_weight_and_bias={self.separate_weight_and_bias!r} "
                             "must be True or False")
        _set(self, "factor_storage", parse_enum(FactorStorage, self.factor_storage,
                                                "factor_storage"))
        if self.factor_storage is FactorStorage.ROWS and (
                callable(self.factor_decay) or self.factor_decay != 0):
            raise ValueError(f"factor_storage='rows' needs factor_decay=0 (got "
                             f"{self.factor_decay!r}): a moving average needs the factors")
        check_schedule("factor_decay", self.factor_decay, DECAY)
        check_schedule("factor_update_steps", self.factor_update_steps, INTERVAL)
        if self.factor_dtype is not None and self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype={self.factor_dtype!r} is not valid; choose "
                             "torch.float32 or torch.float64")
        _set(self, "kfac_approx", parse_enum(KFACApprox, self.kfac_approx, "kfac_approx"))

    @property
    def rows(self) -> bool:
        """Whether the resistor-array mode keeps rows instead of factors."""
        return self.factor_storage is FactorStorage.ROWS


@dataclass(frozen=True)
class InverseConfig:
    """The solver and the periodic work it does (Sec. 4.1, Eq. 15).

    Attributes:
        solver: A :class:`~thermokfac.solvers.LinearSolver` (a registered name is
            looked up).
        method: ``inverse`` (Method 1) or ``solve`` (Method 2); None: the solver's
            ``default_method``.
        damping: λ ≥ 0 (value or schedule); None: the base optimizer's recipe
            (:mod:`~thermokfac.kfac.recipes`).
        damping_split: ``equal``, ``pi`` or ``relative``; None: the recipe's.
        inv_update_steps: Prepare/invert every this many steps (value or schedule).
        measure_solve_error_every: Every this many steps, measure each solve against a
            float64 solve of the same damped factor and right-hand side (0: never).
    """

    solver: LinearSolver | str = "cholesky"
    method: Method | str | None = None
    damping: Schedule | None = None
    damping_split: DampingSplit | str | None = None
    inv_update_steps: Schedule = 10
    measure_solve_error_every: int = 0

    def __post_init__(self) -> None:
        solver = get_solver(self.solver)
        _set(self, "solver", solver)
        method = solver.default_method if self.method is None else self.method
        _set(self, "method", parse_enum(Method, method, "method"))
        if self.damping is not None:
            check_schedule("damping", self.damping, NON_NEGATIVE)
        check_schedule("inv_update_steps", self.inv_update_steps, INTERVAL)
        _set(self, "measure_solve_error_every", int(check_value(
            "measure_solve_error_every", self.measure_solve_error_every, NON_NEGATIVE_INT)))
        if self.damping_split is not None:
            _set(self, "damping_split", parse_enum(DampingSplit, self.damping_split,
                                                   "damping_split"))


@dataclass(frozen=True)
class ClipConfig:
    """The scale of the step: the KL clip (Ba et al. 2017) with the rate and momentum it
    assumes, grafting, and the first preconditioned step.

    Attributes:
        kl_clip: κ > 0, or None to disable.
        lr: Learning rate (value or schedule), or None to read the optimizer's.
        momentum: μ in [0, 1), or None to read the optimizer's SGD momentum.
        grafting: Each block's U rescaled to its raw gradient's norm
            (:class:`~thermokfac.enums.Grafting`; ``auto`` decides by the optimizer).
        start_preconditioning_step: Steps whose gradients pass through unchanged while
            the factors accumulate (None: decided by the optimizer, see
            :func:`~thermokfac.kfac.recipes.defaults`).
    """

    kl_clip: float | None = 1e-3
    lr: Schedule | None = None
    momentum: float | None = None
    grafting: Grafting | str = Grafting.AUTO
    start_preconditioning_step: int | None = None

    def __post_init__(self) -> None:
        _set(self, "grafting", parse_enum(Grafting, self.grafting, "grafting"))
        if self.start_preconditioning_step is not None:
            _set(self, "start_preconditioning_step", int(check_value(
                "start_preconditioning_step", self.start_preconditioning_step,
                NON_NEGATIVE_INT)))
        if self.kl_clip is not None:
            _set(self, "kl_clip", float(check_value("kl_clip", self.kl_clip, POSITIVE)))
        if self.lr is not None:
            check_schedule("lr", self.lr, POSITIVE)
        if self.momentum is not None:
            _set(self, "momentum", float(check_value("momentum", self.momentum, MOMENTUM)))


_GROUPS = ("fisher", "factors", "inverse", "clip")


@dataclass(frozen=True)
class KFACConfig:
    """Every hyperparameter, checked once; schedules are checked again when read.

    Attributes:
        fisher, factors, inverse, clip: The four groups. A keyword's name reads its
            value from its group (``config.method`` is ``config.inverse.method``).
    """

    fisher: FisherConfig
    factors: FactorConfig
    inverse: InverseConfig
    clip: ClipConfig

    def __post_init__(self) -> None:
        if self.factors.rows and self.inverse.method is not Method.SOLVE:
            raise ValueError("factor_storage='rows' needs method='solve': an explicit "
                             "inverse is an n×n matrix")

    def __getattr__(self, name: str) -> Any:
        group = _GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"KFACConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    @classmethod
    def from_keywords(cls, *, solver: LinearSolver | str = "cholesky",
                      method: Method | str | None = None, damping: Schedule | None = None,
                      factor_decay: Schedule = 0.95, factor_update_steps: Schedule = 1,
                      inv_update_steps: Schedule = 10, fisher_type: str = "empirical",
                      kfac_approx: str = "expand", loss_reduction: str = "mean",
                      skip_layers: Any = (), damping_split: str | None = None,
                      kl_clip: float | None = 1e-3, lr: Schedule | None = None,
                      momentum: float | None = None, loss_type: str = "cross_entropy",
                      num_per_example_loss_terms: int = 1, mc_samples: int = 1,
                      factor_dtype: torch.dtype | None = None,
                      factor_storage: str = "matrix", class_dim: int | None = None,
                      separate_weight_and_bias: bool = False,
                      repeated_calls: str = "shared", grafting: str = "auto",
                      start_preconditioning_step: int | None = None,
                      measure_solve_error_every: int = 0) -> KFACConfig:
        """The preconditioner's keywords, validated into the four groups.

        ``factor_dtype=None`` follows the model (:class:`FactorConfig`); ``method=None``
        is the solver's default (Method 2 in the rows mode).

        Args:
            solver: A solver name or instance.
            method: ``"inverse"`` (Method 1), ``"solve"`` (Method 2) or None.
            damping: λ, a number or a schedule of the step (None: the recipe's).
            factor_decay: The moving averages' decay (Eqs. 16–17), in [0, 1).
            factor_update_steps: Steps between factor updates.
            inv_update_steps: Steps between prepares (inversions under Method 1).
            fisher_type: ``"empirical"``, ``"mc"`` or ``"type2"``.
            kfac_approx: ``"expand"`` or ``"reduce"`` (Eqs. 18–21).
            loss_reduction: ``"mean"`` or ``"sum"`` of the user's loss.
            skip_layers: Layer names or types left to the base optimizer.
            damping_split: ``"equal"``, ``"pi"``, ``"relative"`` or None (the recipe's).
            kl_clip: κ of the KL clip, or None (off).
            lr: η for the KL clip when no optimizer is given.
            momentum: The base optimizer's momentum, for the KL clip.
            loss_type: ``"cross_entropy"`` or ``"mse"`` (the ``mc``/``type2`` Fisher).
            num_per_example_loss_terms: Loss terms per example (sequence positions).
            mc_samples: Samples per example of the ``mc`` Fisher.
            factor_dtype: The factors' dtype, or None (the model's).
            factor_storage: ``"matrix"`` or ``"rows"`` (App. E's resistor-array mode).
            class_dim: The class dimension of the outputs (``mc``/``type2``).
            separate_weight_and_bias: Give the bias its own block.
            repeated_calls: ``"shared"`` or ``"separate"``.
            grafting: ``"auto"``, ``"gradient"`` or ``"none"``.
            start_preconditioning_step: The first preconditioned step (None: the
                recipe's).
            measure_solve_error_every: Steps between measured solve errors (0: never).

        Returns:
            The validated, frozen configuration.

        Raises:
            ValueError: Naming the first invalid value and its valid range or choices.
        """
        clip = ClipConfig(kl_clip=kl_clip, lr=lr, momentum=momentum, grafting=grafting,
                          start_preconditioning_step=start_preconditioning_step)
        fisher = FisherConfig(fisher_type=fisher_type, loss_type=loss_type,
                              loss_reduction=loss_reduction,
                              num_per_example_loss_terms=num_per_example_loss_terms,
                              mc_samples=mc_samples, class_dim=class_dim)
        factors = FactorConfig(factor_decay=factor_decay,
                               factor_update_steps=factor_update_steps,
                               factor_dtype=factor_dtype,
                               factor_storage=factor_storage, kfac_approx=kfac_approx,
                               skip_layers=skip_layers,
                               separate_weight_and_bias=separate_weight_and_bias,
                               repeated_calls=repeated_calls)
        if method is None and factors.rows:
            method = Method.SOLVE  # the rows mode can only solve
        inverse = InverseConfig(solver=solver, method=method, damping=damping,
                                damping_split=damping_split, inv_update_steps=inv_update_steps,
                                measure_solve_error_every=measure_solve_error_every)
        return cls(fisher=fisher, factors=factors, inverse=inverse, clip=clip)


#: Setting name ↦ the group that holds it (``config.method`` reads ``config.inverse``).
_GROUP_OF = {f.name: group for group, cls in zip(_GROUPS, (FisherConfig, FactorConfig,
                                                           InverseConfig, ClipConfig))
             for f in fields(cls)}


__all__ = ["ClipConfig", "FactorConfig", "FisherConfig", "InverseConfig", "KFACConfig",
           "Range"]


def setup_fingerprint(config: KFACConfig) -> str:
    """Every setting of ``config`` as text that ranks can compare: numbers, names and
    flags by value; a schedule (a callable) by its kind only, which cannot be compared;
    the solver by its name (its settings are compared with the solver's own)."""
    parts = []
    for group in (config.fisher, config.factors, config.inverse, config.clip):
        for f in fields(group):
            value = getattr(group, f.name)
            if isinstance(value, LinearSolver):
                value = value.name
            elif callable(value) and not isinstance(value, type):
                value = f"<schedule {type(value).__name__}>"
            parts.append(f"{f.name}={value!r}")
    return ", ".join(parts)
