"""The KL clip: bound the step of the local quadratic model (Ba et al. 2017).

With preconditioned gradients U and raw gradients DΘ, the quadratic model predicts a
change of about η²Σ⟨U, DΘ⟩ for a step of learning rate η; every U is scaled by
ν = min(1, √(κ / (η² Σ⟨U, DΘ⟩))) so that it stays below κ. Under heavy-ball momentum μ
the steady-state step is η = lr/(1 − μ), which is the rate used here: with it, K-FAC in
front of SGD with momentum 0.9 stays stable at damping 10⁻³ where the plain rate lets it
diverge (tests/test_learning.py).

Under a learning-rate schedule (a torch scheduler, which records each group's base rate as
``initial_lr``), η is computed from the larger of the current and the base rate. The
clip then bounds the step at the schedule's base rate and the schedule scales it: a
warm-up warms up and a decay decays. With the current rate alone the clip would undo the
schedule (a clipped step η ν U is √(κ/Σ⟨U, DΘ⟩) U whatever η), and a warm-up would fill
the momentum buffer with preconditioned gradients left unclipped at a small rate, which
the rising rate then applies in full: K-FAC in front of Nesterov on the solubility GIN
diverged within 30 steps of a 40-step warm-up that a constant rate trains through.

With several parameter groups each layer l takes the rate of the group holding its
weight (its bias's group when only the bias is trainable): ν = min(1, √(κ / Σₗ η²_{g(l)}
⟨Uₗ, DΘₗ⟩)). A rate given explicitly (``lr=``) applies to every layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .hyperparams import Range, check_value

MOMENTUM = Range(0.0, 1.0)


def effective_learning_rate(lr: float | None, optimizer: torch.optim.Optimizer | None,
                            momentum: float | None, group: int = 0) -> float | None:
    """η = lr(1 − d)/(1 − μ): ``lr`` if given, else the optimizer's ``group``-th group's
    (the larger of its ``lr`` and, under a torch scheduler, its ``initial_lr``);
    μ from ``momentum`` if given, else the group's SGD ``momentum`` (0 for Adam-like
    groups) with its ``dampening`` d (0 when ``momentum`` is given).

    Raises:
        ValueError: If the momentum is outside [0, 1) (torch accepts SGD ``momentum=1``,
            whose steady-state step lr/(1 − μ) is unbounded: pass ``momentum=`` to the
            preconditioner, or ``kl_clip=None``).
    """
    settings: dict[str, Any] = optimizer.param_groups[group] if optimizer is not None else {}
    if lr is None and "lr" in settings:
        # under a torch scheduler, the larger of the current and the base rate (its
        # initial_lr): see the module docstring
        lr = max(float(settings["lr"]), float(settings.get("initial_lr", 0.0)))
    if lr is None:
        return None
    dampening = 0.0
    if momentum is None:
        momentum = float(settings.get("momentum", 0.0)) if "betas" not in settings else 0.0
        if momentum:  # SGD's steady-state step is lr(1 − dampening)/(1 − μ)
            dampening = float(settings.get("dampening", 0.0))
        if not MOMENTUM.contains(momentum):
            raise ValueError(
                f"the optimizer's momentum={momentum!r} is out of range for the KL clip, "
                f"whose effective learning rate lr/(1 - momentum) needs momentum in "
                f"{MOMENTUM.describe()}: pass momentum= to the preconditioner or kl_clip=None")
    check_value("momentum", momentum, MOMENTUM)
    return float(lr) * (1.0 - dampening) / (1.0 - momentum)


#: Group hyperparameters that must be finite and >= 0 (``betas`` also < 1), whichever
#: torch optimizer holds them.
GROUP_NUMBERS = ("momentum", "dampening", "weight_decay", "eps", "alpha")


def check_group_rates(optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse a parameter group whose rate is NaN, infinite or negative, or whose other
    numeric hyperparameters (:data:`GROUP_NUMBERS`, ``betas``) are not finite and >= 0
    (betas < 1): set by hand, by a scheduler or by a loaded state, each would turn the
    parameters into NaN with no word.

    Raises:
        ValueError: Naming the group, the hyperparameter and its value.
    """
    for index, group in enumerate(optimizer.param_groups if optimizer is not None else ()):
        if "lr" in group:
            lr = float(group["lr"])
            if not (math.isfinite(lr) and lr >= 0.0):
                raise ValueError(
                    f"the optimizer's learning rate of parameter group {index} is {lr!r} "
                    "(set by you or a scheduler): it must be a finite number >= 0, or the "
                    "step turns the parameters into NaN — nothing was changed by this step")
        checks = [(k, group[k], math.inf) for k in GROUP_NUMBERS
                  if isinstance(group.get(k), (int, float, torch.Tensor))]
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)):
            checks += [(f"betas[{i}]", b, 1.0) for i, b in enumerate(betas)
                       if isinstance(b, (int, float, torch.Tensor))]
        for key, value, high in checks:
            number = float(value)
            if not (math.isfinite(number) and number >= 0.0 and (number < high or
                                                                  high == math.inf)):
                valid = "[0, 1)" if high == 1.0 else "a finite number >= 0"
                raise ValueError(
                    f"the optimizer's {key} of parameter group {index} is {number!r}: it "
                    f"must be {valid} — nothing was changed by this step")


def kl_clip_scale(kl_clip: float | None, u_dot_d: float, lr: float | None) -> float:
    """ν = min(1, √(κ / (η² Σ⟨U, DΘ⟩))); 1 when the clip is off or undefined.

    >>> kl_clip_scale(1e-3, u_dot_d=10.0, lr=0.1)
    0.1
    """
    vg = u_dot_d * lr * lr if lr is not None else 0.0
    if kl_clip is None or not math.isfinite(vg) or vg <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / vg))


class LayerRates:
    """η per layer for one step: ``lr`` for all when given, else each layer's group's.

    Args:
        lr: An explicit rate for every layer, or None.
        optimizer: Where the groups' rates and momenta are read.
        momentum: μ for every group, or None to read each group's.
    """

    def __init__(self, lr: float | None, optimizer: torch.optim.Optimizer | None,
                 momentum: float | None) -> None:
        self.optimizer, self.momentum = optimizer, momentum
        self.single = lr is not None or optimizer is None
        self.rate = effective_learning_rate(lr, optimizer, momentum) if self.single else None
        self.group_of = {} if optimizer is None or self.single else {
            id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._cache: dict[int, float | None] = {}

    def __call__(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> float | None:
        """η of the layer with these parameters (trainable weight first, else bias)."""
        if self.single:
            return self.rate
        param = weight if weight is not None else bias
        group = self.group_of.get(id(param), 0)  # a layer outside the optimizer: group 0
        if group not in self._cache:
            self._cache[group] = effective_learning_rate(None, self.optimizer, self.momentum,
                                                         group)
        return self._cache[group]


def trainable_params(helper) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of a layer helper, None for a part that is not trained."""
    return (helper.weight_param if helper.weight_trainable else None,
            helper.bias_param if helper.has_bias else None)


def weighted_sum(parts: list[tuple[float | None, float]]) -> float | None:
    """Σ η² ⟨U, DΘ⟩ over (η, ⟨U, DΘ⟩) pairs; None when some η is unknown (no clip)."""
    total = 0.0
    for eta, dot in parts:
        if eta is None:
            return None
        total += eta * eta * dot
    return total
