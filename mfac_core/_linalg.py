"""Small dense linear algebra, chosen per array library.

The operators need three things on (stacks of) small float64 matrices: a
Cholesky factor, triangular solves, and the inverse of a triangular factor.
This module is the only place that knows which library provides them best
(``scipy.linalg`` for NumPy, ``torch.linalg``, ``cupyx.scipy.linalg``,
``jax.scipy.linalg``); any other Array-API namespace gets a pure
``xp.linalg`` fallback. Backends are data: a table of functions looked up by
namespace, not branches inside the algorithms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from ._compat import (
    device,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = ["FactorizationError", "IllConditionedWarning", "cholesky", "matmul_into", "replace_row",
           "single_threaded", "solve_triangular", "triangular_inverse"]


class FactorizationError(np.linalg.LinAlgError):
    """A matrix that should be positive definite could not be factorised.

    Subclasses :class:`numpy.linalg.LinAlgError` (and so ``ValueError``). The
    message names the damping and the condition number, the two knobs that
    decide whether the factorisation can succeed.
    """


class IllConditionedWarning(UserWarning):
    """The problem is so ill-conditioned that results may have few correct digits."""


class _NotPositiveDefinite(Exception):
    """Raised by the backends; callers turn it into a :class:`FactorizationError`."""


@dataclass(frozen=True)
class _Backend:
    # cholesky(A) -> lower factor of each matrix in the stack A; raises _NotPositiveDefinite.
    cholesky: Callable[[Any], Any]
    # solve_triangular(T, B, lower, trans) -> T^{-1} B (or T^{-T} B), batched over leading axes.
    solve_triangular: Callable[[Any, Any, bool, bool], Any]
    # inverse(T) -> T^{-1} for a stack of lower triangular T; None: solve against the identity.
    inverse: Callable[[Any], Any] | None = None
    # replace(U, p, b, c, out): _cholesky.replace's row edit; None: the generic one.
    replace: Callable[..., Any] | None = None
    # matmul_into(A, B, out): out[...] = A @ B without a temporary; None: with one.
    matmul_into: Callable[[Any, Any, Any], None] | None = None


def _numpy_backend() -> _Backend:
    import scipy.linalg

    def chol(a: Any) -> Any:
        try:
            return np.linalg.cholesky(a)
        except np.linalg.LinAlgError as exc:
            raise _NotPositiveDefinite(str(exc)) from None

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        return scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0,
                                             check_finite=False)

    def inverse(t: Any) -> Any:
        # LAPACK's trtri, a third of the work of a general inverse; SciPy's is not
        # batched, so stacks go matrix by matrix.
        if t.ndim == 2:
            return scipy.linalg.lapack.dtrtri(t, lower=1)[0]
        flat = np.reshape(t, (-1, *t.shape[-2:]))
        out = np.empty_like(flat)
        for i in range(flat.shape[0]):
            out[i] = scipy.linalg.lapack.dtrtri(flat[i], lower=1)[0]
        return np.reshape(out, t.shape)

    def matmul_into(a: Any, b: Any, out: Any) -> None:
        np.matmul(a, b, out=out)  # NumPy buffers the product itself if out overlaps b

    return _Backend(chol, solve, inverse, matmul_into=matmul_into)


def _torch_backend() -> _Backend:
    import torch

    def chol(a: Any) -> Any:
        factor, info = torch.linalg.cholesky_ex(a)
        if bool((info != 0).any()):
            raise _NotPositiveDefinite("leading minor not positive definite")
        return factor

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        if trans:
            return torch.linalg.solve_triangular(t.mT, b, upper=lower)
        return torch.linalg.solve_triangular(t, b, upper=not lower)

    return _Backend(chol, solve)


def _cupy_backend() -> _Backend:
    # Chosen at every call (MFAC_CUPY_LINALG or mfac_core._kernels.set_cupy_linalg; see
    # mfac_core._kernels): this project's CUDA kernels, CuPy's cuSOLVER/cuBLAS routines,
    # or ("auto", the default) each operation where it measured faster.
    import cupy
    import cupyx.scipy.linalg

    from . import _kernels

    def kernels_for(stacked: bool) -> bool:
        mode = _kernels.get_cupy_linalg()
        return mode == "kernels" or (mode == "auto" and stacked)

    def chol(a: Any) -> Any:
        if kernels_for(a.ndim > 2):
            # Raises _NotPositiveDefinite from the kernels' LAPACK-style info.
            return _kernels.cholesky(a)
        # CuPy returns NaN instead of raising; cholesky() below catches that.
        return cupy.linalg.cholesky(a)

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        if kernels_for(t.ndim > 2):
            return _kernels.solve_triangular(t, b, lower=lower, trans=trans)
        if t.ndim == 2:
            return cupyx.scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0)
        # cupyx's triangular solve is not batched; a batched LU solve is, and the
        # systems are small.
        return cupy.linalg.solve(cupy.swapaxes(t, -1, -2) if trans else t, b)

    def inverse(t: Any) -> Any:
        if kernels_for(t.ndim > 2):
            return _kernels.triangular_inverse(t)
        eye = cupy.broadcast_to(cupy.eye(t.shape[-1], dtype=t.dtype), t.shape)
        return solve(t, eye, True, False)

    def replace(U: Any, p: int, b: Any, c: float, out: Any) -> Any:
        mode = _kernels.get_cupy_linalg()
        if mode == "kernels" or (mode == "auto" and U.shape[0] <= 1024):
            return _kernels.replace(cupy, U, p, b, c, out)
        from ._cholesky import replace as generic
        from ._compat import array_namespace

        return generic(array_namespace(U), U, p, b, c, out)

    return _Backend(chol, solve, inverse, replace)


def _jax_backend() -> _Backend:
    import jax.numpy as jnp
    import jax.scipy.linalg

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        return jax.scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0)

    return _Backend(jnp.linalg.cholesky, solve)


def _fallback_backend(xp: Any) -> _Backend:
    def chol(a: Any) -> Any:
        try:
            return xp.linalg.cholesky(a)
        except Exception as exc:  # each library raises its own LinAlgError
            raise _NotPositiveDefinite(str(exc)) from None

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        # The Array API has no triangular solve; a general solve is exact enough
        # for the small, well-conditioned triangular factors used here.
        return xp.linalg.solve(xp.matrix_transpose(t) if trans else t, b)

    return _Backend(chol, solve)


@cache
def _backend_for(xp: Any) -> _Backend:
    for test, make in ((is_numpy_namespace, _numpy_backend), (is_torch_namespace, _torch_backend),
                       (is_cupy_namespace, _cupy_backend), (is_jax_namespace, _jax_backend)):
        if test(xp):
            return make()
    return _fallback_backend(xp)


def cholesky(xp: Any, a: Any, /) -> Any:
    """Lower Cholesky factor of each SPD matrix in the stack ``a``.

    Raises ``_NotPositiveDefinite`` when any matrix is not numerically positive
    definite, whether the library raises or (CuPy, JAX) returns NaN.
    """
    factor = _backend_for(xp).cholesky(a)
    diag = xp.linalg.diagonal(factor)
    if not bool(xp.all(xp.isfinite(factor))) or not bool(xp.all(diag > 0)):
        raise _NotPositiveDefinite("factor has non-finite or non-positive pivots")
    return factor


def solve_triangular(xp: Any, t: Any, b: Any, /, *, lower: bool = True,
                     trans: bool = False) -> Any:
    """``t^{-1} b`` (or ``t^{-T} b`` with ``trans``) for triangular ``t``, batched."""
    return _backend_for(xp).solve_triangular(t, b, lower, trans)


def triangular_inverse(xp: Any, t: Any, /, *, lower: bool = True) -> Any:
    """The inverse of each triangular matrix in the stack ``t``."""
    inverse = _backend_for(xp).inverse
    if inverse is not None and lower:
        return inverse(t)
    n = t.shape[-1]
    eye = xp.eye(n, dtype=t.dtype, device=device(t))
    if t.ndim > 2:
        eye = xp.broadcast_to(eye, t.shape)
    return solve_triangular(xp, t, eye, lower=lower)



def matmul_into(xp: Any, a: Any, b: Any, out: Any, /) -> None:
    """``out[...] = a @ b``, without a temporary where the library allows it."""
    into = _backend_for(xp).matmul_into
    if into is None:
        out[...] = a @ b
    else:
        into(a, b, out)


def replace_row(xp: Any, U: Any, p: int, b: Any, c: float, out: Any, /) -> Any:
    """Replace row/column ``p`` of the factored matrix (see ``_cholesky.replace``)."""
    edit = _backend_for(xp).replace
    if edit is None:
        from ._cholesky import replace

        return replace(xp, U, p, b, c, out)
    return edit(U, p, b, c, out)


@cache
def _blas_controller() -> Any:
    # Created on first use, once NumPy's and SciPy's BLAS libraries are both loaded.
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded(xp: Any) -> Iterator[None]:
    """Run small m x m work on one BLAS thread (NumPy only; elsewhere a no-op).

    NumPy and SciPy wheels each bundle an OpenBLAS. When a step alternates
    between them (NumPy products, SciPy triangular solves), the idle threads
    of one library spin while the other works: on 2 cores a 1024 x 1024
    factor edit took 210 ms instead of 9 ms. Matrices this small gain nothing
    from threads, so the limit costs nothing; entering it costs ~16 us.
    """
    if not is_numpy_namespace(xp):
        yield
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield
