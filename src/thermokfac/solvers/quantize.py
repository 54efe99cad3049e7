"""Input and output quantization of an analog solver (paper Sec. 4.5), as pure functions.

Grids are symmetric and signed: a ``bits``-bit value holds the integer codes
−(2^{bits−1}−1) … 2^{bits−1}−1 times a step ``scale / (2^{bits−1}−1)``, so ``scale`` is
the largest representable magnitude. Every function returns the de-quantized values in
the input's dtype.

Input (the matrix programmed into the device):

* :func:`quantize_nearest` — round to nearest on one grid scaled to max|M|. May break
  positive-definiteness (:func:`is_positive_definite` tells).
* :func:`quantize_conservative` — the diagonal-dominant quantizer of Sec. 4.5.1: round
  the off-diagonal entries to nearest, add each row's sum of *absolute* rounding errors
  to its diagonal, round the diagonal up. Then Q(M) − M is diagonally dominant with a
  non-negative diagonal, hence positive semi-definite: Q(M) ⪰ M. With one grid the
  shifted diagonal can outgrow the code range (for n ≈ 500 at 8 bits it needs about
  twice the range), so the diagonal gets its own scale: two grids, one for the
  off-diagonal conductances and one for the diagonal, each with ``bits`` bits.
* :func:`quantize_stochastic` — unbiased stochastic rounding (E[Q(M)] = M), symmetric.

Output (the analog-to-digital converter): :func:`quantize_output` clips to a full scale
set from what the hardware knows and rounds to nearest, counting clipped values.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 32


def check_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` if it is an integer in [2, 32], else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name}={bits!r} must be an integer in [{MIN_BITS}, {MAX_BITS}]")
    return bits


def levels(bits: int) -> int:
    """Largest integer code of a signed ``bits``-bit grid: 2^{bits−1} − 1."""
    return 2 ** (check_bits(bits) - 1) - 1


def grid_step(scale: float | Tensor, bits: int) -> float | Tensor:
    """Quantization step (one LSB) of a grid whose largest magnitude is ``scale``."""
    return scale / levels(bits)


def _safe_scale(m: Tensor, scale: float | None) -> float:
    value = float(m.abs().max()) if scale is None else float(scale)
    return value if value > 0 else 1.0


def quantize_nearest(m: Tensor, bits: int, scale: float | None = None) -> Tensor:
    """Round every entry to the nearest grid point (grid scaled to max|M| by default).

    >>> quantize_nearest(torch.tensor([0.30, -1.0]), bits=3)
    tensor([ 0.3333, -1.0000])
    """
    step = grid_step(_safe_scale(m, scale), bits)
    codes = torch.round(m / step).clamp_(-levels(bits), levels(bits))
    return codes * step


def quantize_stochastic(m: Tensor, bits: int, generator: torch.Generator | None = None,
                        scale: float | None = None) -> Tensor:
    """Unbiased stochastic rounding: floor(M/δ + U)·δ, U ~ U[0, 1); symmetric in, symmetric out.

    The upper triangle (diagonal included) is rounded and mirrored, so a symmetric matrix
    stays symmetric; E[Q(M)] = M entrywise.
    """
    step = grid_step(_safe_scale(m, scale), bits)
    noise = torch.rand(m.shape, generator=generator, dtype=m.dtype, device=m.device)
    codes = torch.floor(m / step + noise).clamp_(-levels(bits), levels(bits))
    out = codes * step
    if m.ndim == 2 and m.shape[0] == m.shape[1]:
        upper = torch.triu(out)
        out = upper + torch.triu(out, 1).mT
    return out


def quantize_conservative(m: Tensor, bits: int) -> tuple[Tensor, dict[str, float]]:
    """The diagonal-dominant conservative quantizer (Sec. 4.5.1): Q(M) ⪰ M.

    Args:
        m: Symmetric ``[n, n]`` matrix.
        bits: Bits per programmed value (off-diagonal and diagonal grids alike).

    Returns:
        ``(Q(M), stats)`` with ``offdiag_step``, ``diag_step`` and the mean and maximum
        diagonal shift (``diag_shift_mean``, ``diag_shift_max``). The guarantee
        Q(M) − M ⪰ 0 is exact in real arithmetic; stored values carry the dtype's rounding.
    """
    n = m.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=m.device)
    off = m.masked_fill(eye, 0.0)
    off_step = grid_step(_safe_scale(off, None), bits)
    q_off = torch.round(off / off_step).clamp_(-levels(bits), levels(bits)) * off_step
    row_error = (q_off - off).abs().sum(dim=1)  # Σ_j |rounding error| — absolute, for PSD
    target = m.diagonal() + row_error
    # The diagonal's own grid reaches max(target); a hair of headroom keeps ceil() within
    # the code range despite floating-point rounding.
    diag_step = grid_step(_safe_scale(target, None), bits) * (1 + 4 * torch.finfo(m.dtype).eps)
    q_diag = torch.ceil(target / diag_step) * diag_step
    out = q_off + torch.diag(q_diag)
    shift = q_diag - m.diagonal()
    return out, {"offdiag_step": float(off_step), "diag_step": float(diag_step),
                 "diag_shift_mean": float(shift.mean()), "diag_shift_max": float(shift.max())}


def quantize_output(x: Tensor, bits: int, full_scale: float | Tensor) -> tuple[Tensor, int]:
    """ADC read-out: clip to ±``full_scale`` (scalar or per column) and round to nearest.

    Returns:
        ``(values, number of clipped values)``; in range, the error is at most half a
        step ``full_scale / (2^{bits−1}−1)``.
    """
    scale = torch.as_tensor(full_scale, dtype=x.dtype, device=x.device).clamp_min(
        torch.finfo(x.dtype).tiny)
    step = scale / levels(bits)
    clipped = int((x.abs() > scale).sum())
    codes = torch.round(x / step).clamp_(-levels(bits), levels(bits))
    return codes * step, clipped


def is_positive_definite(m: Tensor) -> bool:
    """Whether a symmetric matrix is numerically positive definite (a Cholesky succeeds)."""
    return int(torch.linalg.cholesky_ex(m)[1]) == 0
