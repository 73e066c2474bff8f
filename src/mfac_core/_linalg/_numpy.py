"""NumPy: LAPACK through NumPy and SciPy."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import NotPositiveDefinite
from ._backend import Backend

__all__ = ["make_backend"]


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
