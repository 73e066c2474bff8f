"""The operations on arrays: shapes, dtypes, stacks, plans, results and errors.

Generic over an executor that owns an array library and a way to launch kernels: the CuPy
launcher (``_launch.py``) runs them on the GPU, the CPU harness (``_host.py``) on NumPy arrays
with the same kernel source. Inputs have been checked for type and device by the caller; this
module checks shapes and dtypes.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Protocol

import numpy as np

from .._errors import NotPositiveDefinite
from . import _plan

__all__ = ["cholesky", "potrf", "replace", "solve_triangular", "triangular_inverse"]


class ArrayExecutor(_plan.Executor, Protocol):
    """An :class:`_plan.Executor` plus the few array functions the operations need."""

    def copy(self, a: Any, dtype: str) -> Any:
        """A new C-contiguous array of ``dtype`` with the values of ``a`` (to be written)."""

    def contiguous(self, a: Any, dtype: str) -> Any:
        """``a`` as a C-contiguous array of ``dtype``; ``a`` itself if it already is one."""

    def broadcast_to(self, a: Any, shape: tuple[int, ...]) -> Any: ...

    def to_host(self, a: Any) -> np.ndarray: ...

    def may_share_memory(self, a: Any, b: Any) -> bool: ...


def compute_dtype(dtype: Any, default: str = "float64") -> str:
    """The name of the compute dtype: float64 (default) or float32, as an explicit option."""
    if dtype is None:
        return default
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _plan.SUFFIX:
        raise ValueError(f"the kernels compute in float64 or float32, got dtype={dtype!r}")
    return name


def _check_floating(a: Any, name: str) -> None:
    if np.dtype(a.dtype).kind != "f" or np.dtype(a.dtype).itemsize not in (4, 8):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")


def _check_square(a: Any, name: str) -> int:
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"{name} must be a square matrix or a stack of them (..., n, n), "
            f"got shape {tuple(a.shape)}"
        )
    return int(a.shape[-1])


def potrf(ex: ArrayExecutor, a: Any, *, dtype: Any = None) -> tuple[Any, Any]:
    """Lower Cholesky factors of the stack ``a`` (..., n, n), and LAPACK-style ``info``.

    Only the lower triangle of ``a`` is read. ``info[...] = 0`` where the factorisation
    succeeded, else the 1-based order of the first leading minor found not positive
    definite; that factor is then partial. The upper triangle of each factor is zero.
    """
    _check_floating(a, "a")
    n = _check_square(a, "a")
    dt = compute_dtype(dtype)
    batch = tuple(a.shape[:-2])
    count = math.prod(batch)
    factor = ex.copy(a, dt)
    if factor.size == 0:
        return factor, ex.zeros(batch, "int32")
    arrays = _plan.execute(_plan.cholesky(n, count, dt), ex, {"A": factor})
    return factor, arrays["info"].reshape(batch)


def cholesky(ex: ArrayExecutor, a: Any, *, dtype: Any = None) -> Any:
    """:func:`potrf` that raises ``NotPositiveDefinite`` (after a synchronisation)."""
    factor, info = potrf(ex, a, dtype=dtype)
    if info.size:
        host = ex.to_host(info)
        bad = np.flatnonzero(host)
        if bad.size:
            where = ""
            if host.ndim:
                index = tuple(int(i) for i in np.unravel_index(bad[0], host.shape))
                where = f" (matrix {index} of the stack)"
            raise NotPositiveDefinite(
                f"leading minor of order {int(host.flat[bad[0]])} is not positive definite{where}"
            )
    return factor


def solve_triangular(
    ex: ArrayExecutor, t: Any, b: Any, *, lower: bool = True, trans: bool = False, dtype: Any = None
) -> Any:
    """``op(t)^{-1} b`` for triangular ``t`` (..., m, m) and ``b`` (..., m, k) or (m,).

    Only the triangle of ``t`` named by ``lower`` is read. The leading (stack) dimensions
    broadcast. The result is float32 when both inputs are float32, else float64, unless
    ``dtype`` says otherwise.
    """
    _check_floating(t, "t")
    _check_floating(b, "b")
    m = _check_square(t, "t")
    vector = b.ndim == 1
    if vector:
        b = b.reshape(b.shape[0], 1)
    if b.ndim < 2 or b.shape[-2] != m:
        raise ValueError(
            f"b must have shape (m,) or (..., m, k) with m = {m}, got {tuple(b.shape)}"
        )
    both32 = np.dtype(t.dtype) == np.float32 and np.dtype(b.dtype) == np.float32
    dt = compute_dtype(dtype, "float32" if both32 else "float64")
    k = int(b.shape[-1])
    batch = tuple(np.broadcast_shapes(tuple(t.shape[:-2]), tuple(b.shape[:-2])))
    count = math.prod(batch)
    broadcast_t = t.ndim == 2
    if not broadcast_t and tuple(t.shape[:-2]) != batch:
        t = ex.broadcast_to(t, (*batch, m, m))
    if tuple(b.shape[:-2]) != batch:
        b = ex.broadcast_to(b, (*batch, m, k))
    tt = ex.contiguous(t, dt)
    bb = ex.contiguous(b, dt)
    x = ex.empty((*batch, m, k), dt)
    plan = _plan.trsm(m, k, count, dt, lower=lower, trans=trans, broadcast_t=broadcast_t)
    _plan.execute(plan, ex, {"T": tt, "B": bb, "X": x})
    return x.reshape((*batch, m)) if vector else x


def triangular_inverse(ex: ArrayExecutor, t: Any, *, lower: bool = True, dtype: Any = None) -> Any:
    """The inverse of each triangular matrix of the stack ``t`` (..., m, m).

    Only the triangle named by ``lower`` is read; the other triangle of the result is zero.
    The result is float32 for a float32 ``t``, else float64, unless ``dtype`` says otherwise.
    """
    _check_floating(t, "t")
    m = _check_square(t, "t")
    dt = compute_dtype(dtype, "float32" if np.dtype(t.dtype) == np.float32 else "float64")
    batch = tuple(t.shape[:-2])
    tt = ex.contiguous(t, dt)
    x = ex.empty(tuple(t.shape), dt)
    plan = _plan.trsm(m, m, math.prod(batch), dt, lower=lower, trans=False, identity=True)
    _plan.execute(plan, ex, {"T": tt, "X": x})
    return x


def replace(ex: ArrayExecutor, U: Any, p: Any, b: Any, c: Any, out: Any) -> Any:
    """Factor of ``C = U^T U`` with row/column ``p`` removed and ``[b; c]`` appended last.

    The semantics of ``mfac_core._linalg.replace_row``: ``U`` (k, k) upper (its strict
    lower triangle is not read), ``b`` (k - 1,), ``out`` (k, k) C-contiguous with U's dtype
    and not overlapping ``U``, written and returned. Raises ``NotPositiveDefinite`` (after a
    synchronisation) if the new pivot is not > 1e-13 |c|; ``out`` then holds the edited
    factor with the last row and column of the identity.
    """
    _check_floating(U, "U")
    k = _check_square(U, "U")
    if U.ndim != 2:
        raise ValueError(f"U must be one k x k factor, got shape {tuple(U.shape)}")
    if tuple(out.shape) != (k, k) or out.dtype != U.dtype:
        raise ValueError(
            f"out must have shape {(k, k)} and dtype {U.dtype}, got "
            f"{tuple(out.shape)} and {out.dtype}"
        )
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if ex.may_share_memory(out, U):
        raise ValueError("out must not overlap U")
    try:
        p = operator.index(p)
    except TypeError:
        raise TypeError(f"p must be an integer, got {p!r}") from None
    if not 0 <= p < k:
        raise ValueError(f"p={p} is not a row of a {k} x {k} factor")
    if tuple(b.shape) != (k - 1,):
        raise ValueError(f"b must have shape {(k - 1,)}, got {tuple(b.shape)}")
    dt = np.dtype(U.dtype).name
    plan = _plan.replace(k, p, float(c), dt)
    arrays = {"U": ex.contiguous(U, dt), "out": out, "b": ex.contiguous(b, dt)}
    status = ex.to_host(_plan.execute(plan, ex, arrays)["status"])
    if status[1] != 0:
        raise NotPositiveDefinite(f"pivot {float(status[0]):g} not positive")
    return out
