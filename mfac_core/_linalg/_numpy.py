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
        return scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0,
                                             check_finite=False)

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

    def cholesky_inverse(U: Any, out: Any) -> None:
        # LAPACK's potri (trtri and lauum: 2 k^3 / 3 flops, a third of what the
        # triangular inverse and a full product with it cost), matrix by matrix: SciPy's
        # is not batched, and at these orders the call costs little next to the work.
        # potri writes the upper triangle of the inverse; the strict lower one keeps
        # what it had, zeros from U. The transpose of each result, cast on assignment
        # into ``out``, holds the lower triangle; the upper one is mirrored afterwards.
        k = U.shape[-1]
        flat_U = np.reshape(U, (-1, k, k))
        flat = np.reshape(out, (-1, k, k))
        for i in range(flat_U.shape[0]):
            inv, info = scipy.linalg.lapack.dpotri(flat_U[i], lower=0)
            if info != 0:
                raise NotPositiveDefinite(f"potri failed with info={info}")
            flat[i] = inv.T
        flat += np.matrix_transpose(np.tril(flat, -1))

    return Backend(chol, solve, inverse, matmul_into=matmul_into,
                   cholesky_inverse=cholesky_inverse)
