"""Matrix functions of the device matrix, applied without choosing an eigenbasis.

``eigh`` may return any orthonormal basis inside a degenerate eigenspace (a Kronecker
factor from b < n rows has a large one), so nothing here works in eigen-coordinates:
every operation is a matrix function f(M) = V f(Λ) Vᵀ applied to vectors given in the
original coordinates, which is the same whatever basis ``eigh`` picked. Random vectors
are drawn in the original coordinates and coloured this way, so a seed gives the same
output on any process.

A :class:`Spectrum` is either full (V ``[n, n]``) or low-rank plus a multiple of the
identity — M = V diag(λ) Vᵀ + μ (I − VVᵀ), the form of aaᵀ/b + λI in the resistor-array
mode (App. E), which never forms the n×n matrix: memory O(n·r).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Fn = Callable[[Tensor], Tensor]


@dataclass
class Spectrum:
    """Eigenpairs of a symmetric positive definite matrix.

    Attributes:
        evecs: ``[n, r]`` orthonormal columns.
        evals: ``[r]`` eigenvalues (float64, for the moment formulas).
        rest: Eigenvalue on the orthogonal complement of ``evecs`` (low-rank form), or
            None when ``r = n``.
    """

    evecs: Tensor
    evals: Tensor
    rest: float | None = None

    @property
    def n(self) -> int:
        return self.evecs.shape[0]

    @property
    def alpha_min(self) -> float:
        low = float(self.evals.min()) if self.evals.numel() else float("inf")
        return min(low, self.rest) if self.rest is not None and self.evecs.shape[1] < self.n \
            else low

    @property
    def alpha_max(self) -> float:
        high = float(self.evals.max()) if self.evals.numel() else 0.0
        return max(high, self.rest) if self.rest is not None else high

    @classmethod
    def of_matrix(cls, m: Tensor) -> Spectrum:
        """Full eigendecomposition of a symmetric matrix (lower triangle read)."""
        evals, evecs = torch.linalg.eigh(m, UPLO="L")
        return cls(evecs, evals.double())

    @classmethod
    def of_rows(cls, rows: Tensor, scale: float, shift: float) -> Spectrum:
        """M = scale·RᵀR + shift·I from rows R ``[b, n]`` by a thin SVD (never n×n).

        Eigenvalues scale·σ² + shift on the row space, ``shift`` on its complement.
        """
        _, sigma, vh = torch.linalg.svd(rows, full_matrices=False)
        keep = sigma > sigma.max() * torch.finfo(rows.dtype).eps * max(rows.shape) \
            if sigma.numel() else sigma > 0
        evecs = vh[keep].mT.contiguous()
        evals = scale * sigma[keep].double() ** 2 + shift
        return cls(evecs, evals, rest=float(shift))

    def completed(self) -> Spectrum:
        """The same matrix with all n eigenvectors (the low-rank form made full, O(n²))."""
        if self.rest is None or self.evecs.shape[1] == self.n:
            return self
        v = self.evecs.double()
        dense = (v * (self.evals - self.rest)) @ v.mT + self.rest * torch.eye(
            self.n, dtype=torch.float64, device=v.device)
        evals, evecs = torch.linalg.eigh(dense)
        return Spectrum(evecs.to(self.evecs.dtype), evals)

    def apply(self, terms: Sequence[tuple[Fn, Tensor]]) -> Tensor:
        """Σᵢ fᵢ(M) xᵢ for ``[n, k]`` blocks xᵢ, in two matrix products.

        Each fᵢ maps float64 eigenvalues to float64 weights; the low-rank form applies
        fᵢ(rest) on the complement.
        """
        dtype = terms[0][1].dtype
        stacked = torch.cat([x for _, x in terms], dim=1)
        coeffs = self.evecs.mT.to(dtype) @ stacked  # [r, Σk]
        k = terms[0][1].shape[1]
        out_coeffs = torch.zeros(coeffs.shape[0], k, dtype=dtype, device=coeffs.device)
        for i, (f, _) in enumerate(terms):
            block = coeffs[:, i * k:(i + 1) * k]
            out_coeffs += f(self.evals).to(dtype)[:, None] * block
        out = self.evecs.to(dtype) @ out_coeffs
        if self.rest is not None and self.evecs.shape[1] < self.n:
            rest = torch.tensor([self.rest], dtype=torch.float64)
            for i, (f, x) in enumerate(terms):
                weight = float(f(rest)[0])
                if weight != 0.0:
                    block = coeffs[:, i * k:(i + 1) * k]
                    out += weight * (x - self.evecs.to(dtype) @ block)
        return out

    def matrix(self, f: Fn | Tensor, dtype: torch.dtype) -> Tensor:
        """f(M) as a dense ``[n, n]`` matrix (full form only); ``f`` is a function of the
        eigenvalues or the weights f(λ) themselves."""
        weights = (f if isinstance(f, Tensor) else f(self.evals)).to(dtype)
        v = self.evecs.to(dtype)
        return (v * weights) @ v.mT
