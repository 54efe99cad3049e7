"""The optimizers a run can train with, and the learning-rate schedule they share.

K-FAC preconditions the first-order optimizers (``sgd``, ``nesterov``, ``adam``,
``adamw``, ``nadamw``). The optimizers it is compared with run alone:

- ``muon``: ``torch.optim.Muon`` on the 2-D hidden weights (:func:`muon_split`), AdamW on
  everything else (embeddings, the output head — tied or not —, biases, norms,
  convolution kernels, class tokens) — or, with ``muon_conv_kernels``, the hidden
  convolution kernels on Muon too, each viewed as an (out channels, in channels·kernel
  size) matrix (:class:`MatrixViewMuon`). Muon's step is rescaled to AdamW's RMS
  (``adjust_lr_fn="match_rms_adamw"``, 0.2·√max(rows, cols)), so one learning rate and
  one weight decay serve both parts; Muon's own momentum (0.95, Nesterov) is kept.
- ``soap`` and ``klshampoo``: ``heavyball.SOAP`` and ``heavyball.KLShampoo`` (the
  ``baselines`` extra), every ``precondition_frequency`` steps, with heavyball's
  compilation off (``heavyball.utils.compile_mode = None``: its default compiles the step
  with inductor, about 18 s before the first step on this machine).

Every optimizer takes the same schedule (:func:`make_schedulers`): constant, or a linear
warm-up over a fraction of the steps followed by a cosine decay to zero at the last step
(the schedule family of AlgoPerf's baselines).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from .config import TrainConfig

#: Optimizers K-FAC can precondition (the KL clip reads their rate and momentum).
PRECONDITIONABLE = ("sgd", "nesterov", "adam", "adamw", "nadamw")
#: Optimizers that run alone, as baselines of K-FAC.
BASELINES = ("muon", "soap", "klshampoo")
OPTIMIZERS = PRECONDITIONABLE + BASELINES
#: Learning-rate schedules (see :func:`schedule_factor`).
SCHEDULES = ("constant", "warmup-cosine")


class OptimizerSplit:
    """Several torch optimizers over disjoint parameter sets, used as one (Muon's split).

    ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` go to every part;
    :attr:`param_groups` lists the parts' groups (the same dicts, so a change reaches the
    part that owns it).

    Args:
        parts: ``{name: optimizer}``; at least one.

    Raises:
        ValueError: ``parts`` is empty.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        if not parts:
            raise ValueError("an optimizer split needs at least one part")
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every part's parameter groups, part by part."""
        return [g for opt in self.parts.values() for g in opt.param_groups]

    def step(self) -> None:
        """One step of every part."""
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every part's parameters."""
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{part name: its state_dict}``."""
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: ``state`` names other parts than this split's.
        """
        if set(state) != set(self.parts):
            raise ValueError(f"the saved optimizer has parts {sorted(state)}, this one "
                             f"{sorted(self.parts)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def optimizers_of(opt: torch.optim.Optimizer | OptimizerSplit) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside ``opt`` (itself, or a split's parts)."""
    return list(opt.parts.values()) if isinstance(opt, OptimizerSplit) else [opt]


def muon_split(model: nn.Module, conv_kernels: bool = False
               ) -> tuple[list[str], list[str]]:
    """Names of the parameters Muon steps and of those AdamW steps.

    Muon takes the 2-D weights of hidden ``nn.Linear`` layers and of
    ``nn.MultiheadAttention`` projections; AdamW takes the rest: embedding tables, the
    output head (the last ``nn.Linear`` in module order, or a head tied to an
    embedding), biases, norms, convolution kernels and any other parameter. With
    ``conv_kernels``, Muon also takes the kernels of the hidden convolutions (every
    ``nn.Conv1d/2d/3d`` but the first in module order, which reads the input as an
    embedding does), to be stepped as matrices (:class:`MatrixViewMuon`).

    Args:
        model: The network (unwrapped).
        conv_kernels: Whether hidden convolution kernels go to Muon.

    Returns:
        (Muon's names, AdamW's names), in ``named_parameters`` order; together every
        trainable parameter once.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1].weight if linears else None
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = {id(m.weight) for m in linears} | {
        id(p) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
        for p in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        if p is not None}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    kernels = {id(m.weight) for m in convs[1:]} if conv_kernels else set()
    muon: list[str] = []
    adamw: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        on_muon = ((p.ndim == 2 and id(p) in hidden and p is not head
                    and id(p) not in embedded) or id(p) in kernels)
        (muon if on_muon else adamw).append(name)
    return muon, adamw


class MatrixViewMuon(torch.optim.Muon):
    """``torch.optim.Muon`` that also steps parameters of more than two dimensions, each
    as the matrix ``p.view(p.shape[0], -1)`` (a convolution kernel as (out channels,
    in channels·kernel size), how Muon's authors train hidden convolutions).

    Muon accepts 2-D parameters only; each higher-dimensional one is stood in for by a
    2-D parameter sharing its storage, whose gradient is the parameter's gradient viewed
    the same way (sharing its memory): bound as soon as a backward pass has accumulated
    it (a post-accumulate-grad hook), so tools that read ``param_groups`` between the
    backward and the step — ``GradScaler`` unscaling and its inf checks, gradient
    clipping — see and change the parameters' gradients; and bound again at the step
    (after the closure, if any), for gradients set by hand. Muon's in-place update of the
    stand-in is the update of the parameter; :meth:`zero_grad` also clears the
    parameters' own gradients. Arguments are Muon's.

    Raises:
        ValueError: a parameter has fewer than two dimensions, or is not contiguous.
        RuntimeError: at a step, a parameter's storage was replaced since construction
            (``p.data = ...``, a move to another device): its stand-in would no longer
            update it.
    """

    def __init__(self, params: list[nn.Parameter], **kwargs: Any) -> None:
        self._views: list[tuple[nn.Parameter, nn.Parameter]] = []
        stand_ins: list[nn.Parameter] = []
        for p in params:
            if p.ndim < 2 or not p.is_contiguous():
                raise ValueError(f"MatrixViewMuon steps contiguous parameters of 2 or more "
                                 f"dimensions; got one of shape {tuple(p.shape)}"
                                 f"{'' if p.is_contiguous() else ' (not contiguous)'}")
            if p.ndim == 2:
                stand_ins.append(p)
                continue
            view = nn.Parameter(p.detach().view(p.shape[0], -1))
            self._views.append((p, view))
            stand_ins.append(view)
            p.register_post_accumulate_grad_hook(
                lambda param, view=view: self._bind(param, view))
        super().__init__(stand_ins, **kwargs)

    @staticmethod
    def _bind(p: Tensor, view: nn.Parameter) -> None:
        """The stand-in's gradient: the parameter's, viewed as a matrix (same memory
        where the gradient is contiguous)."""
        view.grad = None if p.grad is None else p.grad.reshape(view.shape)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Muon's step, the higher-dimensional parameters through their matrix views;
        a ``closure`` is evaluated first (it recomputes the gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, view in self._views:
            if p.data_ptr() != view.data_ptr():
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} no longer uses "
                                   "the storage MatrixViewMuon was built over (replaced "
                                   "or moved): build the optimizer after the model is "
                                   "placed")
            self._bind(p, view)
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the stand-ins' and the parameters' gradients."""
        super().zero_grad(set_to_none=set_to_none)
        for p, _ in self._views:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


def _params(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    by_name = dict(model.named_parameters())
    return [by_name[n] for n in names]


def _torch(kind: Callable[..., torch.optim.Optimizer], **fixed: Any
           ) -> Callable[[TrainConfig, nn.Module], torch.optim.Optimizer]:
    def build(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fixed)
    return build


def _sgd(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.optimizer == "nesterov", weight_decay=cfg.weight_decay)


def _muon(cfg: TrainConfig, model: nn.Module) -> OptimizerSplit:
    muon, adamw = muon_split(model, conv_kernels=cfg.muon_conv_kernels)
    parts: dict[str, torch.optim.Optimizer] = {}
    if muon:
        kind = MatrixViewMuon if cfg.muon_conv_kernels else torch.optim.Muon
        parts["muon"] = kind(_params(model, muon), lr=cfg.lr,
                                         weight_decay=cfg.weight_decay,
                                         adjust_lr_fn="match_rms_adamw")
    if adamw:
        parts["adamw"] = torch.optim.AdamW(_params(model, adamw), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
    return OptimizerSplit(parts)


def heavyball_module() -> Any:
    """``heavyball`` with its compilation turned off (``compile_mode = None``).

    Raises:
        ModuleNotFoundError: heavyball is not installed (naming the extra to install).
    """
    try:
        import heavyball  # type: ignore[import-untyped]
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "soap and klshampoo come from heavyball: pip install 'thermokfac[baselines]'"
        ) from None
    heavyball.utils.compile_mode = None  # eager steps: no inductor compile time
    return heavyball


def _heavyball(kind: str) -> Callable[[TrainConfig, nn.Module], torch.optim.Optimizer]:
    def build(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        cls = getattr(heavyball_module(), kind)
        params = [p for p in model.parameters() if p.requires_grad]
        # heavyball 3.2.1 fails on a 0-d parameter (a GIN's ε) when it merges dimensions
        # (IndexError in dim_merger); such a parameter gets a group of its own that does
        # not merge, which steps it as its diagonal preconditioner does a 1-element one
        scalars = [p for p in params if p.ndim == 0]
        groups: list[dict[str, Any]] = [{"params": [p for p in params if p.ndim > 0]}]
        if scalars:
            groups.append({"params": scalars, "merge_dims": False})
        return cls([g for g in groups if g["params"]], lr=cfg.lr,
                   weight_decay=cfg.weight_decay,
                   precondition_frequency=cfg.precondition_frequency, compile_step=False)
    return build


#: name ↦ builder(cfg, model) of every optimizer a run can use.
BUILDERS: dict[str, Callable[[TrainConfig, nn.Module], Any]] = {
    "sgd": _sgd, "nesterov": _sgd,
    "adam": _torch(torch.optim.Adam),
    "adamw": _torch(torch.optim.AdamW),
    "nadamw": _torch(torch.optim.NAdam, decoupled_weight_decay=True),
    "muon": _muon,
    "soap": _heavyball("SOAP"),
    "klshampoo": _heavyball("KLShampoo"),
}


def make_optimizer(cfg: TrainConfig, model: nn.Module
                   ) -> torch.optim.Optimizer | OptimizerSplit:
    """The optimizer ``cfg.optimizer`` over ``model``'s trainable parameters, at
    ``cfg.lr`` and ``cfg.weight_decay`` (and ``cfg.momentum`` for sgd/nesterov,
    ``cfg.precondition_frequency`` for soap/klshampoo).

    Raises:
        ValueError: ``cfg.optimizer`` is not one of :data:`OPTIMIZERS`.
        ModuleNotFoundError: soap or klshampoo without heavyball installed.
    """
    if cfg.optimizer not in BUILDERS:
        raise ValueError(f"optimizer={cfg.optimizer!r} is not one of {list(BUILDERS)}")
    return BUILDERS[cfg.optimizer](cfg, model)


def schedule_factor(schedule: str, step: int, steps: int, warmup_fraction: float) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based).

    ``constant``: 1. ``warmup-cosine``: (k + 1)/W over the first W = ⌊f·S⌉ steps, then
    ½(1 + cos(π (k − W)/(S − W))) until the last step S − 1 (S = ``steps``, f =
    ``warmup_fraction``).

    Raises:
        ValueError: An unknown schedule.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "warmup-cosine":
        raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
    warmup = round(warmup_fraction * steps)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def make_schedulers(cfg: TrainConfig, opt: torch.optim.Optimizer | OptimizerSplit,
                    step: int = 0) -> list[LambdaLR]:
    """``LambdaLR`` schedulers of ``cfg.schedule`` over every optimizer in ``opt``, placed
    at optimizer step ``step`` (a resumed run's; the groups then need ``initial_lr``, as
    a saved optimizer state holds it). None for a constant rate."""
    if cfg.schedule == "constant":
        return []

    def factor(k: int) -> float:
        return schedule_factor(cfg.schedule, k, cfg.steps, cfg.warmup_fraction)

    return [LambdaLR(o, factor, last_epoch=step - 1) for o in optimizers_of(opt)]

