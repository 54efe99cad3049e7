"""This step's curvature: the capture's sums, per block, ready for the estimates.

At ``step()`` the per-layer sums the hooks accumulated become one
:class:`CurvatureSums` per block — the numerators and row counts of Eq. 12, with the
multiplier c of G (examples and loss terms of the step) already applied. A
communicator (:mod:`.parallel`) may then sum them over ranks before the blocks'
estimates read them: A = Σ āāᵀ / #rows over the *global* batch, G = c·Σ ĝĝᵀ averaged
over the ranks with zeros where a rank saw no rows — so a layer used on only some ranks
equals one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._invariants import required
from ..enums import FisherType, LossReduction
from .config import KFACConfig
from .records import LayerRecord


@dataclass
class CurvatureSums:
    """One block's curvature of this step.

    Attributes:
        a: Σ āāᵀ ``[a_dim, a_dim]`` (lower triangle), Σ token counts ``[V]`` for a
            diagonal A, or None (rows mode).
        a_rows: Rows behind ``a`` (or ``a_parts``).
        g: c·Σ ĝĝᵀ ``[d_out, d_out]`` (lower triangle), or None (rows mode).
        g_rows: Rows behind ``g``.
        a_parts: Rows mode: the activation rows ``[a_rows, a_dim]`` (bias column of ones).
        g_parts: Rows mode: the gradient rows ``[g_rows, d_out]``.
        g_scale: Rows mode: G = ``g_scale``·RᵀR.
    """

    a: Tensor | None = None
    a_rows: float = 0.0
    g: Tensor | None = None
    g_rows: float = 0.0
    a_parts: Tensor | None = None
    g_parts: Tensor | None = None
    g_scale: float = 1.0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the step's G (and A)."""
        return required(self.g if self.g is not None else self.g_parts, "this step's G").dtype

    @property
    def device(self) -> torch.device:
        """Where the step's G (and A) live."""
        return required(self.g if self.g is not None else self.g_parts, "this step's G").device


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


def close_step(records: Mapping[str, LayerRecord], multiplier: float, rows: bool,
               missing: Callable[[str], None]) -> dict[str, CurvatureSums]:
    """Each block's sums of this step, G scaled by ``multiplier``; a block without rows
    (of A or of G) is reported to ``missing`` and left out.

    The capture's buffers are handed over (no copy) and the records emptied: whatever
    happens later in the step, the next backward starts new buffers.
    """
    out: dict[str, CurvatureSums] = {}
    for name, record in records.items():
        sums = record.sums
        if sums.a_rows == 0 or sums.g_rows == 0:
            missing(name)
            continue
        if rows:
            out[name] = CurvatureSums(
                a=sums.a, a_rows=sums.a_rows, g_rows=sums.g_rows,
                a_parts=torch.cat(sums.a_parts) if sums.a_parts else None,
                g_parts=torch.cat(sums.g_parts), g_scale=multiplier)
        else:
            out[name] = CurvatureSums(
                a=sums.a, a_rows=sums.a_rows, g_rows=sums.g_rows,
                g=required(sums.g, f"G of {name}").mul_(multiplier) if multiplier != 1.0
                else sums.g)
        sums.reset()
    return out
