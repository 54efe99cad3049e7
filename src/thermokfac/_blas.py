"""Symmetric rank-k update C ← C + XᵀX that computes one triangle only.

Forming a Kronecker factor A = XᵀX/N with a general matrix product spends half its
FLOPs on the mirror triangle. PyTorch does not expose BLAS ``?syrk``, but its CPU
builds link Intel MKL, whose ``mkl_blas_?syrk`` routine is reachable by name. This module
calls it through :mod:`ctypes` when it is present and passes a self-check against
``torch.mm`` on first use; otherwise (no MKL, CUDA tensors, other dtypes, or the
environment variable ``THERMOKFAC_NO_SYRK=1``) it falls back to ``torch.addmm``.

Convention: results are valid in the **lower triangle** (row-major). The upper triangle
of the output is left as it was (zero for a fresh buffer) on the ``syrk`` path and filled
on the fallback path; callers read only the lower triangle (see :func:`symmetrize_lower`).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import torch
from torch import Tensor

_SYMBOLS = {torch.float32: ("mkl_blas_ssyrk", ctypes.c_float),
            torch.float64: ("mkl_blas_dsyrk", ctypes.c_double)}


@cache
def _routine(dtype: torch.dtype):
    if os.environ.get("THERMOKFAC_NO_SYRK", "") not in ("", "0") or dtype not in _SYMBOLS:
        return None
    name, scalar = _SYMBOLS[dtype]
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    fn.restype = None
    routine = (fn, scalar)
    if not _self_check(routine, dtype):
        return None
    return routine


def _call(routine, x: Tensor, out: Tensor, beta: float) -> None:
    """out[:n, :n] (lower, row-major) ← beta·out + xᵀx for contiguous x [k, n]."""
    fn, scalar = routine
    k, n = x.shape
    ldc = out.stride(0)
    uplo, trans = ctypes.c_char(b"U"), ctypes.c_char(b"N")  # column-major view of xᵀ
    args = (ctypes.c_int(n), ctypes.c_int(k), scalar(1.0))
    fn(ctypes.byref(uplo), ctypes.byref(trans), ctypes.byref(args[0]), ctypes.byref(args[1]),
       ctypes.byref(args[2]), ctypes.c_void_p(x.data_ptr()), ctypes.byref(ctypes.c_int(n)),
       ctypes.byref(scalar(beta)), ctypes.c_void_p(out.data_ptr()), ctypes.byref(ctypes.c_int(ldc)))


def _self_check(routine, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=dtype)
    out = torch.zeros(6, 6, dtype=dtype)
    _call(routine, x, out[:5, :5], 0.0)
    _call(routine, x, out[:5, :5], 1.0)
    ref = 2 * (x.T @ x)
    lower_ok = torch.allclose(out[:5, :5].tril(), ref.tril(), rtol=1e-5, atol=1e-5)
    untouched = bool((out[:5, :5].triu(1) == 0).all()) and bool((out[5] == 0).all())
    return lower_ok and untouched


def syrk_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the one-triangle kernel is used for CPU tensors of ``dtype``."""
    return _routine(dtype) is not None


def add_gram_(out: Tensor, x: Tensor) -> None:
    """Accumulate ``out += xᵀx`` in the lower triangle of ``out``.

    Args:
        out: ``[n, n]`` buffer whose rows are contiguous (it may be a leading block of a
            larger row-major matrix, as when a bias row follows).
        x: ``[k, n]`` rows to accumulate, same dtype and device as ``out``.
    """
    if x.shape[0] == 0:
        return
    routine = _routine(out.dtype) if out.device.type == "cpu" else None
    if routine is not None and out.stride(1) == 1 and x.dtype == out.dtype:
        _call(routine, x.contiguous(), out, 1.0)
    else:
        out.addmm_(x.mT, x)


def symmetrize_lower(m: Tensor) -> Tensor:
    """Return the symmetric matrix whose lower triangle is that of ``m`` (a new tensor).

    >>> symmetrize_lower(torch.tensor([[1.0, 9.0], [2.0, 3.0]]))
    tensor([[1., 2.],
            [2., 3.]])
    """
    lower = m.tril()
    return lower + lower.tril(-1).mT
