"""The factor half of a K-FAC step: turn this step's captured sums into A and G
(Eq. 12), scaled by the examples and loss terms of the step, and follow the layers'
trainable parameters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from torch import Tensor

from ..enums import FisherType, LossReduction
from .config import KFACConfig
from .factors import lower_is_finite
from .layer_state import LayerState
from .records import LayerRecord

logger = logging.getLogger("thermokfac")


def g_multiplier(cfg: KFACConfig, loss_terms: int, num_examples: int | None,
                 count: Callable[[], tuple[int, str | None]], step: int) -> float:
    """c in G = c·Σ ĝĝᵀ: 1 for a summed loss; 1/(all loss terms of the step) for
    ``mc``/``type2``; N × loss terms per example for the empirical Fisher of a mean.

    Raises:
        ValueError: If ``num_examples`` is not a positive integer, or N is needed and
            ``count()`` finds it ambiguous.
    """
    if cfg.loss_reduction is LossReduction.SUM:
        return 1.0
    if cfg.fisher_type is not FisherType.EMPIRICAL:
        return 1.0 / loss_terms if loss_terms else 1.0
    if num_examples is not None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) \
                or num_examples < 1:
            raise ValueError(f"num_examples={num_examples!r} must be a positive integer")
    else:
        num_examples, problem = count()
        if problem is not None:
            raise ValueError(
                f"cannot count the examples of step {step} for loss_reduction='mean': "
                f"{problem}; pass pre.step(num_examples=N) with N the examples the loss "
                "averaged over")
    return float(num_examples * cfg.num_per_example_loss_terms)


def follow_layouts(records: Mapping[str, LayerRecord], states: dict[str, LayerState],
                   stats: dict[str, float]) -> None:
    """A layer whose trainable parameters changed starts its factors afresh (logged,
    counted in ``stats['trainable_changes']``)."""
    for name, record in records.items():
        state = states[name]
        if record.layout is not None and state.layout is None and state.a is not None \
                and state.a.ndim == 2 and state.a.shape[0] != record.helper.a_dim:
            state.layout = (not record.layout[0], record.layout[1])  # any other layout
        if record.layout is None or state.layout in (None, record.layout):
            if record.layout is not None:
                state.layout = record.layout
            continue
        logger.info("layer %r: trainable parameters changed (weight, bias) %s -> %s; its "
                    "factors start afresh", name, state.layout, record.layout)
        stats["trainable_changes"] += 1
        states[name] = LayerState(layout=record.layout)


def fresh_factors(records: Mapping[str, LayerRecord], multiplier: float,
                  missing: Callable[[str], None]) -> dict[str, tuple[Tensor, Tensor]]:
    """This step's A and G per layer (Eq. 12); a layer without rows is reported to
    ``missing`` and skipped."""
    fresh = {}
    for name, record in records.items():
        sums = record.sums
        if sums.a_rows == 0 or sums.g_rows == 0:
            missing(name)
            continue
        fresh[name] = (sums.a.div_(sums.a_rows),
                       sums.g.mul_(multiplier) if multiplier != 1.0 else sums.g)
    return fresh


def commit_factors(records: Mapping[str, LayerRecord], states: dict[str, LayerState],
                   multiplier: float, decay: float, rows: bool,
                   fresh: Callable[[float], dict[str, tuple[Tensor, Tensor]]],
                   missing: Callable[[str], None], nonfinite: Callable[[str], None]) -> None:
    """Fold this step's sums into each layer's state: the rows (resistor-array mode) or
    the moving averages (Eqs. 16–17) of the factors ``fresh(multiplier)`` returns (the
    distributed preconditioner's are averaged over ranks); a layer without rows goes to
    ``missing``, one with non-finite factors to ``nonfinite`` (its state is kept)."""
    if rows:
        for name, record in records.items():
            if record.sums.a_rows == 0 or record.sums.g_rows == 0:
                missing(name)
            elif not states[name].take_rows(record.sums, multiplier):
                nonfinite(name)
        return
    for name, (a_new, g_new) in fresh(multiplier).items():
        if not (lower_is_finite(a_new) and lower_is_finite(g_new)):
            nonfinite(name)
            continue
        states[name].update_ema(a_new, g_new, decay)
