"""The operations on arrays: shapes, dtypes, stacks, plans, results and errors.

Generic over an executor that owns an array library and a way to launch kernels: the CuPy
launcher (``_launch.py``) runs them on the GPU, the CPU harness (``_host.py``) on NumPy arrays
with the same kernel source. Inputs have been checked for type and device by the caller; this
module checks shapes and dtypes.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Protocol

import numpy as np

from .._errors import NotPositiveDefinite
from . import _plan

__all__ = [
    "cholesky",
    "combine64",
    "combine64_blocks",
    "potrf",
    "project64",
    "project64_blocks",
    "replace",
    "solve_triangular",
    "triangular_inverse",
]


class ArrayExecutor(_plan.Executor, Protocol):
    """An :class:`_plan.Executor` plus the few array functions the operations need."""

    def copy(self, a: Any, dtype: str) -> Any:
        """A new C-contiguous array of ``dtype`` with the values of ``a`` (to be written)."""

    def contiguous(self, a: Any, dtype: str) -> Any:
        """``a`` as a C-contiguous array of ``dtype``; ``a`` itself if it already is one."""

    def full(self, shape: tuple[int, ...], value: float, dtype: str) -> Any:
        """A new array of ``dtype`` filled with ``value`` (on the device: no copy from the host)."""

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


# -- the passes over the stored gradients (passes.cu) ------------------------------------------

#: The dtypes of X that the kernels read as they are; 2-byte ones are widened to float32 (exact).
_X_DTYPES = ("float32", "float64")
_X_WIDENED = ("float16", "bfloat16")


def _index(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _dtype_name(a: Any) -> str:
    return np.dtype(a.dtype).name


def _pass_matrix(ex: ArrayExecutor, G: Any, storage: str | None) -> tuple[Any, str, int, int]:
    """G as the kernels read it (2-byte storage as its uint16 bits), its storage, m and ld.

    G is read in place, never copied by the CuPy launcher: it must be a C-contiguous matrix.
    """
    if G.ndim != 2:
        raise ValueError(f"G must be a matrix (m, d), got shape {tuple(G.shape)}")
    if not G.flags.c_contiguous:
        raise ValueError("G must be C-contiguous: the kernels read its rows in place")
    own = _dtype_name(G)
    if storage is None:
        if own not in _plan.STORAGES:
            raise TypeError(
                f"G's dtype {own} is not a storage dtype: float32, float64, float16, bfloat16, "
                "or uint16 with storage='float16' or 'bfloat16'"
            )
        storage = own
    elif storage not in _plan.STORAGES:
        raise ValueError(
            f"storage must be one of {sorted(_plan.STORAGES)} or None, got {storage!r}"
        )
    elif own != storage and not (own == "uint16" and storage in _X_WIDENED):
        raise TypeError(f"G's dtype {own} does not match storage={storage!r}")
    if storage in _X_WIDENED and own != "uint16":
        G = G.view("uint16")
    m, ld = (int(d) for d in G.shape)
    return ex.contiguous(G, _dtype_name(G)), storage, m, ld


def _pass_columns(start: Any, stop: Any, ld: int) -> tuple[int, int]:
    start, stop = _index(start, "start"), _index(stop, "stop")
    if not 0 <= start <= stop <= ld:
        raise ValueError(
            f"start={start}, stop={stop}: need 0 <= start <= stop <= {ld}, G's columns"
        )
    return start, stop


def _pass_blocks(start: Any, block_size: Any, count: int, ld: int) -> tuple[int, int]:
    start, size = _index(start, "start"), _index(block_size, "block_size")
    if size < 1:
        raise ValueError(f"block_size must be at least 1, got {size}")
    if not 0 <= start or start + count * size > ld:
        raise ValueError(
            f"{count} blocks of {size} columns from start={start} are not all in G's {ld} columns"
        )
    return start, size


def _pass_vectors(ex: ArrayExecutor, X: Any) -> Any:
    """X with its values as float32 or float64, C-contiguous (a copy only where needed)."""
    name = _dtype_name(X)
    if name in _X_DTYPES:
        return ex.contiguous(X, name)
    if name in _X_WIDENED:
        return ex.contiguous(X, "float32")
    raise TypeError(f"X must be float32 or float64 (or float16, bfloat16), got {name}")


def _pass_coefficients(ex: ArrayExecutor, C: Any, shape: tuple[int, ...]) -> Any:
    if np.dtype(C.dtype).kind != "f":
        raise TypeError(f"C must be a real floating array, got {C.dtype}")
    if tuple(C.shape) != shape:
        raise ValueError(f"C must have shape {shape}, got {tuple(C.shape)}")
    return ex.contiguous(C, "float64")


def _pass_alpha(ex: ArrayExecutor, alpha: Any, k: int) -> Any:
    """alpha as a (k,) float64 array: a real number is filled in on the device."""
    if isinstance(alpha, numbers.Real):
        return ex.full((k,), float(alpha), "float64")
    if not hasattr(alpha, "dtype") or np.dtype(alpha.dtype).kind != "f":
        raise TypeError(
            "alpha must be a real number or a real floating array, got "
            f"{getattr(alpha, 'dtype', type(alpha).__name__)}"
        )
    if tuple(alpha.shape) not in ((), (k,)):
        raise ValueError(f"alpha must be a number or have shape ({k},), got {tuple(alpha.shape)}")
    if alpha.ndim == 0:
        alpha = ex.broadcast_to(alpha, (k,))
    return ex.contiguous(alpha, "float64")


def _pass_result(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _plan.PASS_FLOATS:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return name


def _project(
    ex: ArrayExecutor, G: Any, storage: str, ld: int, X: Any, start: int, size: int
) -> Any:
    """P (count, k, m) float64 for X (count, k, size), float32 or float64 and C-contiguous."""
    count, k = int(X.shape[0]), int(X.shape[1])
    m = int(G.shape[0])
    plan = _plan.project64(m, k, count, size, start, ld, storage, _dtype_name(X))
    # The launches write P whole; with no launch (a dimension is 0) it is a sum of nothing.
    P = (ex.empty if plan.launches else ex.zeros)((count, k, m), "float64")
    _plan.execute(plan, ex, {"G": G, "X": X, "P": P})
    return P


def _combine(
    ex: ArrayExecutor,
    G: Any,
    storage: str,
    ld: int,
    C: Any,
    a: Any,
    X: Any,
    start: int,
    size: int,
    dtype: str,
    *,
    shared: bool,
) -> Any:
    """Y (count, k, size) for C (count, k, m) and X (count, k, size), or (count, size) shared."""
    count, k, m = (int(d) for d in C.shape)
    plan = _plan.combine64(
        m, k, count, size, start, ld, storage, _dtype_name(X), dtype, shared=shared
    )
    Y = ex.empty((count, k, size), dtype)
    _plan.execute(plan, ex, {"G": G, "C": C, "a": a, "X": X, "Y": Y})
    return Y


def project64(
    ex: ArrayExecutor, G: Any, X: Any, *, start: Any, stop: Any, storage: str | None = None
) -> Any:
    """``X @ G[:, start:stop].T`` summed in float64: (k, m) float64, or (m,) for a vector.

    ``G`` (m, ld) C-contiguous, of a storage dtype (float32, float64, float16, bfloat16, or
    uint16 bits with ``storage``); ``X`` (k, stop - start) or (stop - start,), float32 or float64
    (2-byte dtypes are widened to float32, exactly).
    """
    G, st, m, ld = _pass_matrix(ex, G, storage)
    start, stop = _pass_columns(start, stop, ld)
    n = stop - start
    vector = X.ndim == 1
    if X.ndim not in (1, 2) or X.shape[-1] != n:
        raise ValueError(f"X must have shape (k, {n}) or ({n},), got {tuple(X.shape)}")
    k = 1 if vector else int(X.shape[0])
    P = _project(ex, G, st, ld, _pass_vectors(ex, X).reshape(1, k, n), start, n)
    return P.reshape(m) if vector else P.reshape(k, m)


def combine64(
    ex: ArrayExecutor,
    G: Any,
    C: Any,
    alpha: Any,
    X: Any,
    *,
    start: Any,
    stop: Any,
    dtype: Any,
    storage: str | None = None,
) -> Any:
    """``alpha[:, None] * X + C @ G[:, start:stop]`` in float64, rounded once: (k, n) of ``dtype``.

    ``C`` (k, m) real (taken as float64), ``alpha`` a number or (k,), ``X`` (k, n) or (n,) shared
    by the k rows, float32 or float64 (2-byte dtypes widened), ``n = stop - start``.
    """
    G, st, m, ld = _pass_matrix(ex, G, storage)
    start, stop = _pass_columns(start, stop, ld)
    n = stop - start
    y = _pass_result(dtype)
    if C.ndim != 2:
        raise ValueError(f"C must have shape (k, {m}), got {tuple(C.shape)}")
    k = int(C.shape[0])
    C = _pass_coefficients(ex, C, (k, m))
    shared = X.ndim == 1
    if tuple(X.shape) != ((n,) if shared else (k, n)):
        raise ValueError(f"X must have shape ({k}, {n}) or ({n},), got {tuple(X.shape)}")
    Xk = _pass_vectors(ex, X)
    Xk = Xk.reshape(1, n) if shared else Xk.reshape(1, k, n)
    a = _pass_alpha(ex, alpha, k)
    Y = _combine(ex, G, st, ld, C.reshape(1, k, m), a, Xk, start, n, y, shared=shared)
    return Y.reshape(k, n)


def project64_blocks(
    ex: ArrayExecutor,
    G: Any,
    X: Any,
    *,
    start: Any,
    block_size: Any,
    storage: str | None = None,
) -> Any:
    """:func:`project64` of each of ``count`` blocks of ``block_size`` columns: (count, k, m).

    ``X`` is (count, k, block_size); block b is columns ``start + b * block_size`` on.
    """
    G, st, _, ld = _pass_matrix(ex, G, storage)
    if X.ndim != 3:
        raise ValueError(f"X must have shape (count, k, block_size), got {tuple(X.shape)}")
    count = int(X.shape[0])
    start, size = _pass_blocks(start, block_size, count, ld)
    if X.shape[2] != size:
        raise ValueError(f"X must have shape (count, k, {size}), got {tuple(X.shape)}")
    return _project(ex, G, st, ld, _pass_vectors(ex, X), start, size)


def combine64_blocks(
    ex: ArrayExecutor,
    G: Any,
    C: Any,
    alpha: Any,
    X: Any,
    *,
    start: Any,
    block_size: Any,
    dtype: Any,
    storage: str | None = None,
) -> Any:
    """:func:`combine64` of each of ``count`` blocks of ``block_size`` columns: (count, k, size).

    ``C`` is (count, k, m) (each block's coefficients), ``alpha`` a number or (k,), ``X``
    (count, k, block_size); block b is columns ``start + b * block_size`` on.
    """
    G, st, m, ld = _pass_matrix(ex, G, storage)
    y = _pass_result(dtype)
    if X.ndim != 3:
        raise ValueError(f"X must have shape (count, k, block_size), got {tuple(X.shape)}")
    count, k = int(X.shape[0]), int(X.shape[1])
    start, size = _pass_blocks(start, block_size, count, ld)
    if X.shape[2] != size:
        raise ValueError(f"X must have shape ({count}, {k}, {size}), got {tuple(X.shape)}")
    C = _pass_coefficients(ex, C, (count, k, m))
    a = _pass_alpha(ex, alpha, k)
    return _combine(ex, G, st, ld, C, a, _pass_vectors(ex, X), start, size, y, shared=False)
