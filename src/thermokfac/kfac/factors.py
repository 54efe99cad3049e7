"""Kronecker-factor sums for one step, in the shared ``[batch, shared, features]`` format.

For each supported layer the hooks add the contributions of every call in the step
(several micro-batches, or a module called several times in one forward) into a
:class:`FactorSums`. At ``step()`` the sums become this step's factors

    A = Σ āāᵀ / #rows                          (Eq. 12 / 18 / 20)
    G = c · Σ ĝĝᵀ                               (Eq. 12 / 19 / 21)

where ``ĝ`` is the gradient that was back-propagated and ``c`` restores the gradient of
the *summed* loss and its mean (see :meth:`KFACPreconditioner.step`). Expand treats each
shared position as a row; reduce first averages the activations (and sums the output
gradients) over the shared dimension, then appends the bias column (Eq. 20).

Sums are kept in their **lower triangle** (see :mod:`thermokfac._linalg`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._linalg import add_gram_
from ..enums import KFACApprox


@dataclass
class FactorSums:
    """Running sums for one layer within one step.

    The buffers live for one step only (released by :meth:`reset`), so between steps the
    preconditioner holds just the factors and what was prepared from them.

    Attributes:
        a: Σ āāᵀ ``[a_dim, a_dim]`` (lower triangle), or Σ counts ``[V]`` for a diagonal A.
        g: Σ ĝĝᵀ ``[d_out, d_out]`` (lower triangle).
        a_rows: Number of rows accumulated into ``a`` this step.
        g_rows: Number of rows accumulated into ``g`` this step.
        a_parts, g_parts: The rows themselves (ā with its bias 1, and ĝ), when the
            preconditioner keeps rows instead of factors (resistor-array mode).
    """

    a: Tensor | None = None
    g: Tensor | None = None
    a_rows: int = 0
    g_rows: int = 0
    a_parts: list[Tensor] = field(default_factory=list)
    g_parts: list[Tensor] = field(default_factory=list)

    def reset(self) -> None:
        """Start a new step: drop this step's buffers."""
        self.a = self.g = None
        self.a_rows = self.g_rows = 0
        self.a_parts.clear()
        self.g_parts.clear()


Groups = tuple[Tensor, int]  # (membership of each row, number of groups)


def _grouped(rows: Tensor, groups: Groups | None) -> bool:
    return groups is not None and rows.shape[1] == 1 and rows.shape[0] == groups[0].shape[0]


def _group_sum(rows: Tensor, groups: Groups) -> Tensor:
    membership, count = groups
    out = rows.new_zeros(count, rows.shape[-1])
    return out.index_add_(0, membership, rows.reshape(-1, rows.shape[-1]))


def group_mismatch(shared: Tensor, groups: Groups | None) -> str | None:
    """Why the rows of ``shared`` ``[batch, shared, d]`` cannot be grouped by ``groups``
    (None if they can): one row per member (per atom), or already one per group (after
    pooling), is what ``grouped_rows`` expects."""
    if groups is None:
        return None
    rows, members = shared.shape[0] * shared.shape[1], groups[0].shape[0]
    if shared.shape[1] != 1 or rows not in (members, groups[1]):
        return f"{rows} rows while the membership has {members} entries"
    return None


def activation_rows(x: Tensor, approx: KFACApprox, groups: Groups | None = None) -> Tensor:
    """``[batch, shared, d]`` ↦ rows of A (expand: every position; reduce: the mean).

    With ``groups`` (ragged examples, e.g. the atoms of each molecule: 2-D inputs whose
    rows belong to groups), reduce averages the rows of each group.
    """
    if approx is KFACApprox.REDUCE and groups is not None and _grouped(x, groups):
        counts = torch.bincount(groups[0], minlength=groups[1]).clamp_min(1)
        return _group_sum(x, groups) / counts[:, None].to(x.dtype)
    if approx is KFACApprox.EXPAND or x.shape[1] == 1:
        return x.reshape(-1, x.shape[-1])
    return x.mean(dim=1)


def gradient_rows(g: Tensor, approx: KFACApprox, groups: Groups | None = None) -> Tensor:
    """``[batch, shared, d_out]`` ↦ rows of G (expand: every position; reduce: the sum,
    per group with ``groups``)."""
    if approx is KFACApprox.REDUCE and groups is not None and _grouped(g, groups):
        return _group_sum(g, groups)
    if approx is KFACApprox.EXPAND or g.shape[1] == 1:
        return g.reshape(-1, g.shape[-1])
    return g.sum(dim=1)


def accumulate_a(sums: FactorSums, rows: Tensor | None, has_bias: bool, dtype: torch.dtype,
                 count: int = 0, device: torch.device | None = None) -> None:
    """Add Σ āāᵀ for ``rows`` ``[k, d]``; with a bias ā = [a, 1] (Eq. 4).

    ``rows=None`` (a frozen weight, trainable bias) adds only the bias entry, ā = [1],
    for ``count`` rows (on ``device``): A is then the 1×1 matrix [1].
    """
    if rows is None:
        if sums.a is None:
            sums.a = torch.zeros(1, 1, dtype=dtype, device=device)
        sums.a += count
        sums.a_rows += count
        return
    rows = rows.detach().to(dtype).contiguous()
    k, d = rows.shape
    if sums.a is None:  # zero-filled: the strict upper triangle stays finite
        sums.a = rows.new_zeros(d + int(has_bias), d + int(has_bias))
    add_gram_(sums.a[:d, :d], rows)
    if has_bias:
        sums.a[d, :d] += rows.sum(dim=0)
        sums.a[d, d] += k
    sums.a_rows += k


def accumulate_a_diagonal(sums: FactorSums, counts: Tensor, tokens: int) -> None:
    """Add token counts to a diagonal A."""
    sums.a = counts if sums.a is None else sums.a.add_(counts)
    sums.a_rows += tokens


def accumulate_g(sums: FactorSums, rows: Tensor, dtype: torch.dtype) -> None:
    """Add Σ ĝĝᵀ for ``rows`` ``[k, d_out]``."""
    rows = rows.detach().to(dtype).contiguous()
    if sums.g is None:
        sums.g = rows.new_zeros(rows.shape[1], rows.shape[1])
    add_gram_(sums.g, rows)
    sums.g_rows += rows.shape[0]


def append_rows(parts: list[Tensor], rows: Tensor, has_bias: bool, dtype: torch.dtype) -> int:
    """Keep ``rows`` (with a column of ones for the bias) for the resistor-array mode.

    The kept rows are always a copy: the layer input they come from may be modified in
    place later in the forward pass.
    """
    if has_bias:
        rows = torch.cat([rows.detach().to(dtype), rows.new_ones(rows.shape[0], 1, dtype=dtype)],
                         dim=1)
    else:
        rows = rows.detach().to(dtype, copy=True)
    parts.append(rows.contiguous())
    return rows.shape[0]


def lower_is_finite(m: Tensor) -> bool:
    """Whether a sum of outer products is finite, from its diagonal alone.

    A non-finite entry of any row makes its squared norm on the diagonal non-finite, and
    a diagonal below ``finfo.max/64`` bounds every off-diagonal entry well inside the
    range (Cauchy–Schwarz: |Σxᵢyᵢ| ≤ √(Σxᵢ² Σyᵢ²)), so checking the diagonal is O(n)
    instead of O(n²). Bias sums (last row) are checked too.
    """
    limit = torch.finfo(m.dtype).max / 64
    diag = m if m.ndim == 1 else m.diagonal()
    if not bool((diag.abs() < limit).all()):  # also False for NaN
        return False
    return m.ndim == 1 or bool((m[-1].abs() < limit).all())
