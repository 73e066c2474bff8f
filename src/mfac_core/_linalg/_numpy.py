"""NumPy: LAPACK through NumPy and SciPy."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from .._errors import NotPositiveDefinite
from ._backend import Backend

__all__ = ["make_backend", "trtrs"]


def make_backend() -> Backend:
    """The backend over ``numpy.linalg`` and ``scipy.linalg``.

    NumPy's and SciPy's wheels each bundle an OpenBLAS with its own thread pool;
    the m x m work alternates between them (NumPy products, SciPy triangular
    solves). The package leaves both pools as the process set them: limiting
    threads would change BLAS for the whole process, and from other threads
    too. What the alternation costs is measured in ``benchmarks/dynamic.py``.
    """
    import scipy.linalg

    def chol(a: Any) -> Any:
        try:
            return np.linalg.cholesky(a)
        except np.linalg.LinAlgError as exc:
            raise NotPositiveDefinite(str(exc)) from None

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        direct = trtrs(t, b, lower, trans)
        if direct is not None:
            return direct
        return scipy.linalg.solve_triangular(
            t, b, lower=lower, trans=1 if trans else 0, check_finite=False
        )

    def inverse(t: Any) -> Any:
        # LAPACK's trtri, a third of the work of a general inverse; SciPy's is not
        # batched, so stacks go matrix by matrix. (A blocked recursion over the whole
        # stack with NumPy's batched products was tried: faster below order ~64 and
        # at 256, 40% slower at 128, where OpenBLAS's small products are no faster
        # than trtri itself; not worth a second code path.)
        if t.ndim == 2:
            return scipy.linalg.lapack.dtrtri(t, lower=1)[0]
        flat = np.reshape(t, (-1, *t.shape[-2:]))
        out = np.empty_like(flat)
        for i in range(flat.shape[0]):
            out[i] = scipy.linalg.lapack.dtrtri(flat[i], lower=1)[0]
        return np.reshape(out, t.shape)

    def matmul_into(a: Any, b: Any, out: Any) -> None:
        np.matmul(a, b, out=out)  # NumPy buffers the product itself if out overlaps b

    # No ``cholesky_inverse``: LAPACK's potri per matrix (trtri + lauum, a third of
    # the flops of trtri and a full product) took 0.77x the CPU time of the generic
    # path with one BLAS thread, but 3.3x its wall time with OpenBLAS's two threads
    # at order 128 (benchmarks/RESULTS.md, 2026-11-29): its small threaded calls
    # synchronise more than they compute.
    return Backend(chol, solve, inverse, matmul_into=matmul_into)


def trtrs(t: Any, b: Any, lower: bool, trans: bool) -> Any:
    """``scipy.linalg.solve_triangular(t, b, ...)`` for float64 NumPy systems, by its LAPACK calls.

    SciPy's wrapper (batch dispatch, validation, the LAPACK lookup) took 10-20 us a call,
    many times the solve at the orders of a window (m <= 64): a small product's two
    solves cost more than its passes over d = 1e3. This makes the calls it makes for a
    square float64 ``t`` and a non-empty float64 ``b`` of NumPy, 2-D (``b`` 1-D or 2-D) or
    stacks of one batch shape (``b`` 2-D per matrix): ``dtrtrs`` with the same arguments
    per matrix, stacked as SciPy stacks them, so the same bits. None for anything else
    (broadcasting, other dtypes, empty arrays), which goes through SciPy.

    Up to :data:`ONE_THREAD_COLUMNS` right-hand sides are solved one at a time (each
    SciPy's bits for that column alone, in SciPy's memory layout) where that is at most
    :data:`ONE_THREAD_WORK` multiply-adds: for two or more, OpenBLAS's ``dtrtrs`` wakes
    its threads at any order, and they then spin for about 0.1 s on the cores that the C
    extension's passes want (an 8-vector product of 64 x 10**6 float32 entries took 107
    ms against 76 ms on 2 cores). Each column costs a LAPACK call (1-8 us at orders 8 to
    256), which many more columns would pay many times over.
    """
    if not (
        type(t) is np.ndarray
        and type(b) is np.ndarray
        and t.dtype == np.float64
        and b.dtype == np.float64
        and t.ndim >= 2
        and b.ndim >= 1
        and t.shape[-1] == t.shape[-2]
        and b.size
    ):
        return None
    if t.ndim == 2:
        if b.ndim > 2 or b.shape[0] != t.shape[0]:
            return None
        return _trtrs_one(t, b, lower, trans)
    batch = t.shape[:-2]
    if b.ndim != t.ndim or b.shape[:-2] != batch or b.shape[-2] != t.shape[-1]:
        return None
    if batch == (1,):  # one block (a full operator's factor): no loop, no reshape
        return _stacked_one(_trtrs_one(t[0], b[0], lower, trans))
    # A stack of factors (one per block) has one batch axis: a plain loop over it.
    indices = range(batch[0]) if len(batch) == 1 else np.ndindex(batch)
    parts = [_trtrs_one(t[i], b[i], lower, trans) for i in indices]
    out = np.stack(parts)  # as SciPy stacks them (each solution's own memory order kept)
    return np.reshape(out, batch + out.shape[1:])


def _stacked_one(x: np.ndarray) -> np.ndarray:
    """``np.stack([x])`` of a 2-D ``x``, its layout included, as a view of x (not a copy).

    The stack's strides: x's size for the batch axis, and NumPy's canonical strides of
    x's order inside (C where both orders hold). The copy and its dispatch cost a small
    product's two solves 1 us each.
    """
    if x.ndim != 2 or not (x.flags.c_contiguous or x.flags.f_contiguous):
        return np.stack([x])
    (rows, cols), size = x.shape, x.itemsize
    if x.flags.c_contiguous:
        memory, inner = x, (cols * size, size)
    else:
        memory, inner = x.T, (size, rows * size)
    return np.ndarray((1, rows, cols), x.dtype, buffer=memory, strides=(x.nbytes, *inner))


@cache
def _lapack() -> Any:
    """``scipy.linalg.lapack``, imported on first use (an import per solve cost 0.5 us)."""
    from scipy.linalg import lapack

    return lapack


#: The most multiply-adds (order^2 x columns) that :func:`trtrs` solves a column at a time
#: on the calling thread: 64 x 10**6 (some 30 ms) is about what OpenBLAS's woken threads
#: cost the passes; a larger solve is worth BLAS's threads.
ONE_THREAD_WORK = 2**26

#: The most right-hand sides that :func:`trtrs` solves a column at a time: a call per
#: column (1-8 us at orders 8 to 256) costs 256 columns 0.2-2 ms, a few times one
#: call's time with OpenBLAS's threads awake; but waking them stalled the passes that
#: followed (32 columns of order 64 at d = 1e3 took 11 ms against 0.4 ms), and asleep
#: they cost a millisecond or more to wake. Past it, a call per column costs more.
ONE_THREAD_COLUMNS = 256


def _trtrs_one(t: np.ndarray, b: np.ndarray, lower: bool, trans: bool) -> np.ndarray:
    """:func:`_trtrs_call` for one matrix, a column at a time where that is cheap enough."""
    n, k = t.shape[0], (b.shape[1] if b.ndim == 2 else 1)
    if k == 1 or k > ONE_THREAD_COLUMNS or n * n * k > ONE_THREAD_WORK:
        return _trtrs_call(t, b, lower, trans)
    out = np.empty(b.shape, order="F")  # dtrtrs's layout for a 2-D b
    # _trtrs_call's arguments, chosen once: the loop's calls are most of its time.
    dtrtrs, fortran = _lapack().dtrtrs, t.flags.f_contiguous
    a, lo, tr = (t, int(lower), int(trans)) if fortran else (t.T, int(not lower), int(not trans))
    for j in range(k):
        x, info = dtrtrs(a, b[:, j], lower=lo, trans=tr)
        if info:  # the same call again, for its error
            _trtrs_call(t, b[:, j], lower, trans)
        out[:, j] = x
    return out


def _trtrs_call(t: np.ndarray, b: np.ndarray, lower: bool, trans: bool) -> np.ndarray:
    """SciPy's ``_solve_triangular`` for one float64 system: its ``dtrtrs`` call and errors."""
    lapack = _lapack()
    # As SciPy: trtrs reads Fortran order, so another t is solved as its transpose.
    if t.flags.f_contiguous:
        x, info = lapack.dtrtrs(t, b, lower=int(lower), trans=int(trans))
    else:
        x, info = lapack.dtrtrs(t.T, b, lower=int(not lower), trans=int(not trans))
    if info > 0:
        raise np.linalg.LinAlgError(f"singular matrix: resolution failed at diagonal {info - 1}")
    if info < 0:
        raise ValueError(f"illegal value in {-info}-th argument of internal trtrs")
    return x
