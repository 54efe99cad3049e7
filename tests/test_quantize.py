"""Quantizers: grid membership, symmetry, the conservative guarantee, ADC error bound."""

from __future__ import annotations

import pytest
import torch

from thermokfac.solvers.quantize import (
    check_bits,
    grid_step,
    is_positive_definite,
    levels,
    quantize_conservative,
    quantize_nearest,
    quantize_output,
    quantize_stochastic,
)


def _random_spd(n: int, seed: int, batch: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch or n // 2 + 1, n, generator=g, dtype=torch.float64)
    return x.mT @ x / x.shape[0] + 1e-3 * torch.eye(n, dtype=torch.float64)


def _on_grid(values: torch.Tensor, step: float) -> bool:
    codes = values / step
    return bool(torch.allclose(codes, codes.round(), atol=1e-6))


@pytest.mark.parametrize("bits", [6, 8, 12, 16])
@pytest.mark.parametrize(("n", "seed"), [(8, 0), (64, 1), (200, 2)])
def test_conservative_dominates_and_is_on_grid(n, seed, bits):
    """Q(M) − M ⪰ 0 (property over random SPD M), symmetric, diagonal ≥ row errors."""
    m = _random_spd(n, seed)
    q, stats = quantize_conservative(m, bits)
    assert torch.equal(q, q.mT)
    diff = q - m
    assert float(torch.linalg.eigvalsh(diff)[0]) >= -1e-12 * float(m.abs().max())
    eye = torch.eye(n, dtype=torch.bool)
    assert _on_grid(q.masked_fill(eye, 0), stats["offdiag_step"])
    assert _on_grid(q.diagonal(), stats["diag_step"])
    codes = q.diagonal() / stats["diag_step"]
    assert float(codes.max()) <= levels(bits) + 1e-6  # the diagonal never overflows its range
    assert is_positive_definite(q)


def test_conservative_without_absolute_errors_would_fail():
    """Adding the signed (not absolute) errors breaks the guarantee: the test can tell."""
    m = _random_spd(64, 3)
    bits = 6
    off = m - torch.diag(m.diagonal())
    step = grid_step(float(off.abs().max()), bits)
    q_off = torch.round(off / step) * step
    signed = (q_off - off).sum(dim=1)
    q_signed = q_off + torch.diag(m.diagonal() + signed)
    assert float(torch.linalg.eigvalsh(q_signed - m)[0]) < 0


@pytest.mark.parametrize("bits", [3, 8, 16])
def test_nearest_is_on_grid_within_half_step(bits):
    m = _random_spd(16, 4)
    q = quantize_nearest(m, bits)
    step = grid_step(float(m.abs().max()), bits)
    assert _on_grid(q, step)
    assert float((q - m).abs().max()) <= step / 2 + 1e-12
    assert torch.equal(q, q.mT)


def test_nearest_can_break_definiteness_and_it_is_detected():
    m = _random_spd(200, 5, batch=20)  # rank 20 + tiny damping: eigenvalues near 0
    assert is_positive_definite(m)
    assert not is_positive_definite(quantize_nearest(m, 6))


def test_stochastic_rounding_is_unbiased_and_symmetric():
    m = _random_spd(6, 6)
    bits = 4
    g = torch.Generator().manual_seed(7)
    draws = torch.stack([quantize_stochastic(m, bits, g) for _ in range(4000)])
    assert all(torch.equal(d, d.mT) for d in draws[:10])
    step = grid_step(float(m.abs().max()), bits)
    assert _on_grid(draws[0], step)
    se = step / 2 / 4000**0.5  # each draw within one step: variance ≤ step²/4
    assert float((draws.mean(0) - m).abs().max()) < 5 * se


@pytest.mark.parametrize("bits", [6, 8, 12])
def test_adc_error_at_most_half_lsb_in_range_and_counts_clipping(bits):
    x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)[:, None]
    q, clipped = quantize_output(x, bits, 1.0)
    inside = x.abs() <= 1.0
    assert float((q - x)[inside].abs().max()) <= 0.5 / levels(bits) + 1e-15
    assert clipped == int((~inside).sum())
    assert float(q.abs().max()) <= 1.0 + 1e-15


@pytest.mark.parametrize("bad", [1, 33, 8.0, True, None])
def test_bits_outside_range_rejected(bad):
    with pytest.raises(ValueError, match=r"must be an integer in \[2, 32\]"):
        check_bits(bad)
