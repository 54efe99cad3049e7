"""The KL clip: bound the step of the local quadratic model (Ba et al. 2017).

With preconditioned gradients U and raw gradients DΘ, the quadratic model predicts a
change of about η²Σ⟨U, DΘ⟩ for a step of learning rate η; every U is scaled by
ν = min(1, √(κ / (η² Σ⟨U, DΘ⟩))) so that it stays below κ. Under heavy-ball momentum μ
the steady-state step is η = lr/(1 − μ), which is the rate used here: with it, K-FAC in
front of SGD with momentum 0.9 stays stable at damping 10⁻³ where the plain rate lets it
diverge (tests/test_learning.py).
"""

from __future__ import annotations

import math

import torch

from .hyperparams import Range, check_value

MOMENTUM = Range(0.0, 1.0)


def effective_learning_rate(lr: float | None, optimizer: torch.optim.Optimizer | None,
                            momentum: float | None) -> float | None:
    """η = lr/(1 − μ): ``lr`` if given, else the optimizer's first group's; μ from
    ``momentum`` if given, else the group's SGD ``momentum`` (0 for Adam-like groups).

    Raises:
        ValueError: If the momentum is outside [0, 1) (torch accepts SGD ``momentum=1``,
            whose steady-state step lr/(1 − μ) is unbounded: pass ``momentum=`` to the
            preconditioner, or ``kl_clip=None``).
    """
    group = optimizer.param_groups[0] if optimizer is not None else {}
    if lr is None and "lr" in group:
        lr = float(group["lr"])
    if lr is None:
        return None
    if momentum is None:
        momentum = float(group.get("momentum", 0.0)) if "betas" not in group else 0.0
        if not MOMENTUM.contains(momentum):
            raise ValueError(
                f"the optimizer's momentum={momentum!r} is out of range for the KL clip, "
                f"whose effective learning rate lr/(1 - momentum) needs momentum in "
                f"{MOMENTUM.describe()}: pass momentum= to the preconditioner or kl_clip=None")
    check_value("momentum", momentum, MOMENTUM)
    return float(lr) / (1.0 - momentum)


def kl_clip_scale(kl_clip: float | None, u_dot_d: float, lr: float | None) -> float:
    """ν = min(1, √(κ / (η² Σ⟨U, DΘ⟩))); 1 when the clip is off or undefined.

    >>> kl_clip_scale(1e-3, u_dot_d=10.0, lr=0.1)
    0.1
    """
    vg = u_dot_d * lr * lr if lr is not None else 0.0
    if kl_clip is None or not math.isfinite(vg) or vg <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / vg))
