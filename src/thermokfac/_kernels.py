"""Symmetric-matrix kernels that read and write one triangle only.

Kronecker factors are symmetric, so half of the work of forming (A = XᵀX), factorising
and inverting them is spent on a mirror triangle. PyTorch exposes neither BLAS
``?syrk``/``?trsm`` nor LAPACK ``?potri``/``?potrs``, but its CPU builds link Intel MKL, whose
routines are reachable by name in ``libtorch_cpu``. This module calls them through
:mod:`ctypes` when they are present and each passes a self-check against the plain torch
result on first use; otherwise (no MKL, CUDA tensors, or ``THERMOKFAC_NO_MKL=1``) every
function falls back to ordinary torch operations with the same result.

Convention: a "lower" matrix is a row-major ``[n, n]`` tensor whose **lower triangle**
(diagonal included) holds a symmetric matrix; its strict upper triangle is ignored and
may hold anything. (A row-major lower triangle is LAPACK's column-major upper one,
hence the ``'U'`` arguments below.)
"""

from __future__ import annotations

import ctypes
import os
from functools import cache, lru_cache

import torch
from torch import Tensor

_PREFIX = {torch.float32: ("s", ctypes.c_float), torch.float64: ("d", ctypes.c_double)}
_NAMES = {"syrk": "mkl_blas_{}syrk", "trsm": "mkl_blas_{}trsm", "potrf": "{}potrf_",
          "potri": "{}potri_", "potrs": "{}potrs_"}


def _byref_int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _char(value: bytes):
    return ctypes.byref(ctypes.c_char(value))


def _ptr(t: Tensor):
    return ctypes.c_void_p(t.data_ptr())


@cache
def _library():
    if os.environ.get("THERMOKFAC_NO_MKL", "") not in ("", "0"):
        return None
    try:
        return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                        "libtorch_cpu.so"))
    except OSError:
        return None


@cache
def _routine(kind: str, dtype: torch.dtype):
    lib = _library()
    if lib is None or dtype not in _PREFIX:
        return None
    prefix, scalar = _PREFIX[dtype]
    fn = getattr(lib, _NAMES[kind].format(prefix), None)
    if fn is None:
        return None
    fn.restype = None
    routine = (fn, scalar)
    return routine if _SELF_CHECKS[kind](routine, dtype) else None


def _fast(kind: str, *tensors: Tensor):
    """The MKL routine for these CPU tensors, or None to use the torch fallback."""
    t = tensors[0]
    if t.device.type != "cpu" or any(x.dtype != t.dtype for x in tensors):
        return None
    return _routine(kind, t.dtype)


def mkl_available(dtype: torch.dtype = torch.float32) -> dict[str, bool]:
    """Which one-triangle kernels are active for CPU tensors of ``dtype``."""
    return {kind: _routine(kind, dtype) is not None for kind in _NAMES}


# --------------------------------------------------------------------- raw calls
def _syrk(routine, x: Tensor, out: Tensor, beta: float) -> None:
    fn, scalar = routine
    k, n = x.shape
    fn(_char(b"U"), _char(b"N"), _byref_int(n), _byref_int(k), ctypes.byref(scalar(1.0)),
       _ptr(x), _byref_int(n), ctypes.byref(scalar(beta)), _ptr(out), _byref_int(out.stride(0)))


def _potrf(routine, m: Tensor) -> int:
    info = ctypes.c_int(0)
    n = m.shape[0]
    routine[0](_char(b"U"), _byref_int(n), _ptr(m), _byref_int(n), ctypes.byref(info))
    return info.value


def _potri(routine, m: Tensor) -> int:
    info = ctypes.c_int(0)
    n = m.shape[0]
    routine[0](_char(b"U"), _byref_int(n), _ptr(m), _byref_int(n), ctypes.byref(info))
    return info.value


def _potrs(routine, chol: Tensor, rows: Tensor) -> int:
    info = ctypes.c_int(0)
    n, k = chol.shape[0], rows.shape[0]
    routine[0](_char(b"U"), _byref_int(n), _byref_int(k), _ptr(chol), _byref_int(n),
               _ptr(rows), _byref_int(n), ctypes.byref(info))
    return info.value


def _trsm_right(routine, chol: Tensor, b: Tensor) -> None:
    """In place on col-major Bᵀ ``[k, n]`` (= row-major b ``[n, k]``): Bᵀ ← Bᵀ M⁻¹."""
    fn, scalar = routine
    n, k = b.shape
    one = ctypes.byref(scalar(1.0))
    # M = UᵀU with U the column-major upper factor: X UᵀU = Bᵀ in two right-side solves.
    for trans in (b"N", b"T"):
        fn(_char(b"R"), _char(b"U"), _char(trans), _char(b"N"), _byref_int(k), _byref_int(n),
           one, _ptr(chol), _byref_int(n), _ptr(b), _byref_int(k))


# ------------------------------------------------------------------ public API
def add_gram_(out: Tensor, x: Tensor) -> None:
    """``out += xᵀx`` in the lower triangle of ``out`` (its rows contiguous).

    Args:
        out: ``[n, n]`` buffer; it may be the leading block of a larger row-major matrix.
        x: ``[k, n]``, same dtype and device as ``out``.
    """
    if x.shape[0] == 0:
        return
    routine = _fast("syrk", out, x)
    if routine is not None and out.stride(1) == 1:
        _syrk(routine, x.contiguous(), out, 1.0)
    else:
        out.addmm_(x.mT, x)


def cholesky_lower_(m: Tensor) -> bool:
    """Factorise a lower matrix in place into L (lower, M = LLᵀ); False if not PD."""
    routine = _fast("potrf", m)
    if routine is not None and m.is_contiguous():
        return _potrf(routine, m) == 0 and bool(torch.isfinite(m.diagonal()).all())
    chol, info = torch.linalg.cholesky_ex(symmetrize_lower(m))
    if int(info) != 0 or not bool(torch.isfinite(chol.diagonal()).all()):
        return False
    m.copy_(chol)
    return True


def cholesky_inverse_lower(chol: Tensor) -> Tensor:
    """(LLᵀ)⁻¹ as a lower matrix, from the factor of :func:`cholesky_lower_`."""
    routine = _fast("potri", chol)
    if routine is not None and chol.is_contiguous():
        out = chol.clone()
        if _potri(routine, out) == 0:
            return out
    return torch.cholesky_inverse(chol.tril())


def cholesky_solve_rows(chol: Tensor, rows: Tensor, overwrite: bool = False) -> Tensor:
    """``rows @ (LLᵀ)⁻¹`` for ``rows`` ``[k, n]`` (each row solved).

    With ``overwrite`` and contiguous ``rows`` the result is written into ``rows``.
    """
    routine = _fast("potrs", chol, rows)
    if routine is not None and chol.is_contiguous():
        out = rows.contiguous()  # a copy unless rows is already contiguous
        if out is rows and not overwrite:
            out = rows.clone()
        if _potrs(routine, chol, out) == 0:
            return out
    return torch.cholesky_solve(rows.mT, chol.tril()).mT


def cholesky_solve_cols_(chol: Tensor, b: Tensor) -> Tensor:
    """``b ← (LLᵀ)⁻¹ b`` in place for contiguous ``b`` ``[n, k]``; returns ``b``."""
    routine = _fast("trsm", chol, b)
    if routine is not None and chol.is_contiguous() and b.is_contiguous():
        _trsm_right(routine, chol, b)
        return b
    return b.copy_(torch.cholesky_solve(b, chol.tril()))


@lru_cache(maxsize=64)
def _lower_mask(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def symmetrize_lower(m: Tensor) -> Tensor:
    """The full symmetric matrix of a lower matrix (a new tensor).

    >>> symmetrize_lower(torch.tensor([[1.0, 9.0], [2.0, 3.0]]))
    tensor([[1., 2.],
            [2., 3.]])
    """
    return torch.where(_lower_mask(m.shape[0], m.device), m, m.mT)


# ------------------------------------------------------------------ self-checks
def _case(dtype: torch.dtype, n: int = 5) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 3, n, generator=gen, dtype=torch.float64)
    spd = x.mT @ x + torch.eye(n, dtype=torch.float64)
    return spd.to(dtype), torch.randn(n - 1, n, generator=gen, dtype=torch.float64).to(dtype)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4))


def _check_syrk(routine, dtype) -> bool:
    _, x = _case(dtype)
    out = torch.zeros(6, 6, dtype=dtype)
    _syrk(routine, x, out[:5, :5], 0.0)
    _syrk(routine, x, out[:5, :5], 1.0)
    untouched = bool((out[:5, :5].triu(1) == 0).all()) and bool((out[5] == 0).all())
    return untouched and _close(out[:5, :5].tril(), (2 * x.mT @ x).tril())


def _check_potrf(routine, dtype) -> bool:
    spd, _ = _case(dtype)
    lower = spd.tril()
    ok = _potrf(routine, lower) == 0
    chol = lower.tril()
    return ok and _close(chol @ chol.mT, spd) and _potrf(routine, -spd.clone()) != 0


def _check_potri(routine, dtype) -> bool:
    spd, _ = _case(dtype)
    chol = torch.linalg.cholesky(spd).contiguous()
    ok = _potri(routine, chol) == 0
    return ok and _close(chol.tril(), torch.linalg.inv(spd.double()).tril())


def _check_potrs(routine, dtype) -> bool:
    spd, rows = _case(dtype)
    chol = torch.linalg.cholesky(spd).contiguous()
    out = rows.clone()
    ok = _potrs(routine, chol, out) == 0
    return ok and _close(out, rows.double() @ torch.linalg.inv(spd.double()))


def _check_trsm(routine, dtype) -> bool:
    spd, rows = _case(dtype)
    chol = torch.linalg.cholesky(spd).contiguous()
    b = rows.mT.contiguous()  # [5, 4]
    _trsm_right(routine, chol, b)
    return _close(b, torch.linalg.solve(spd.double(), rows.mT.double()))


_SELF_CHECKS = {"syrk": _check_syrk, "trsm": _check_trsm, "potrf": _check_potrf,
                "potri": _check_potri, "potrs": _check_potrs}
