"""What K-FAC does by default in front of each kind of base optimizer.

K-FAC rewrites the gradient the base optimizer steps with. In front of SGD (with or
without momentum, Nesterov) the update U of Eq. 15 is the step's direction and size,
damped by an absolute λ = 10⁻³ and bounded by the KL clip. An Adam-type optimizer (Adam,
AdamW, NAdam...: parameter groups with ``betas``) normalises each coordinate by a
running second moment, so the scale of what it is given should not swing, and K-FAC's
direction should not lean on the factors' smallest, noisiest eigenvalues: an absolute
10⁻³ damping is tiny against factors of an unknown scale, and the first inverses
(from a batch or two of curvature) swung the preconditioned gradient's norm from ~12 to
~2 600 on a small CNN. So in front of an Adam-type optimizer the damping is relative —
each factor damped by three times its own mean eigenvalue (λ = 3,
``damping_split="relative"``) —
and each block's U is grafted onto its raw gradient's norm
(:class:`~thermokfac.enums.Grafting`), as Distributed Shampoo grafts onto its base.

The numbers were chosen by measurement on three workloads (``benchmarks/adam_recipes.py``;
``benchmarks/results/adam_recipes_pilot.json`` and ``..._final.json``); a warm-up before
the first preconditioned step (``start_preconditioning_step``) did not help once the
damping was relative, and is 0 for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..enums import DampingSplit, Grafting
from .hyperparams import Schedule


@dataclass(frozen=True)
class Recipe:
    """K-FAC's defaults in front of one kind of base optimizer.

    Attributes:
        grafting: How U is scaled.
        start_preconditioning_step: Steps passed through while the factors accumulate.
        damping: λ (value or schedule).
        damping_split: How λ reaches the two factors.
    """

    grafting: Grafting
    start_preconditioning_step: int
    damping: Schedule
    damping_split: DampingSplit


#: Base optimizer kind ↦ its recipe.
RECIPES = {"sgd": Recipe(Grafting.NONE, 0, 1e-3, DampingSplit.EQUAL),
           "adam": Recipe(Grafting.GRADIENT, 0, 3.0, DampingSplit.RELATIVE)}
#: λ when only the split is given.
DAMPING_FOR_SPLIT = {DampingSplit.EQUAL: 1e-3, DampingSplit.PI: 1e-3,
                     DampingSplit.RELATIVE: 3.0}


def optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str:
    """``"adam"`` for an optimizer whose parameter groups have ``betas``, else ``"sgd"``
    (no optimizer: the rate given by ``lr=``, an SGD step).

    >>> optimizer_kind(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
    'adam'
    """
    if optimizer is not None and any("betas" in g for g in optimizer.param_groups):
        return "adam"
    return "sgd"


def defaults(optimizer: torch.optim.Optimizer | None, grafting: Grafting,
             start: int | None, damping: Schedule | None,
             damping_split: DampingSplit | None) -> Recipe:
    """The recipe in effect: what was given, the rest from :data:`RECIPES`.

    A damping given alone is absolute (``equal``); a split given alone takes its usual
    λ (10⁻³, or 3 for ``relative``).
    """
    recipe = RECIPES[optimizer_kind(optimizer)]
    if damping is None and damping_split is None:
        damping, damping_split = recipe.damping, recipe.damping_split
    elif damping_split is None:
        damping_split = DampingSplit.EQUAL
    elif damping is None:
        damping = DAMPING_FOR_SPLIT[damping_split]
    if damping is None:  # every branch above sets it
        raise RuntimeError("internal error: no damping in the recipe; please report it")
    return Recipe(recipe.grafting if grafting is Grafting.AUTO else grafting,
                  recipe.start_preconditioning_step if start is None else start,
                  damping, damping_split)
