"""Small dense linear algebra on float64 matrices, chosen per array library.

The operators need a few things on (stacks of) small float64 matrices: a
Cholesky factor, triangular solves, the inverse of a triangular factor and the
row edit of a factor. This package is the only place that knows which library
provides them best: one module per backend (``_numpy``: NumPy/SciPy, ``_torch``,
``_cupy``: this project's CUDA kernels or cuSOLVER/cuBLAS, with the policy
that chooses, ``_jax``; ``_fallback``: any other Array-API namespace through
``xp.linalg``). Backends are data: a :class:`~._backend.Backend` table looked up
by namespace, not branches inside the algorithms.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np

from .. import _engine, _pieces
from .._compat import (
    array_namespace,
    device,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)
from .._errors import NotPositiveDefinite
from . import _cupy, _fallback, _jax, _numpy, _rowedit, _torch
from ._backend import Backend
from ._cupy import CUPY_LINALG_CHOICES, get_cupy_linalg, set_cupy_linalg

__all__ = [
    "CUPY_LINALG_CHOICES",
    "HOST_CHOLESKY_ORDER",
    "cholesky",
    "cholesky_inverse",
    "get_cupy_linalg",
    "host_namespace",
    "host_views",
    "matmul",
    "matmul_into",
    "replace_row",
    "replaced_row",
    "set_cupy_linalg",
    "solve_triangular",
    "triangular_inverse",
]

_MAKERS = (
    (is_numpy_namespace, _numpy.make_backend),
    (is_torch_namespace, _torch.make_backend),
    (is_cupy_namespace, _cupy.make_backend),
    (is_jax_namespace, _jax.make_backend),
)


@cache
def _backend_for(xp: Any) -> Backend:
    for test, make in _MAKERS:
        if test(xp):
            return make()
    return _fallback.make_backend(xp)


#: The order from which a PyTorch CPU factorisation stays PyTorch's: OpenBLAS's
#: ``dpotrf`` wakes its threads from about order 256 too (measured at 256 and 1024).
HOST_CHOLESKY_ORDER = 256


def cholesky(xp: Any, a: Any, /) -> Any:
    """Lower Cholesky factor of each SPD matrix in the stack ``a``.

    Raises ``NotPositiveDefinite`` when any matrix is not numerically positive
    definite, whether the library raises or (CuPy, JAX) returns NaN.
    """
    views = host_views(xp, a) if a.shape[-1] < HOST_CHOLESKY_ORDER else None
    if views is not None:  # PyTorch's factorisation wakes its team even at order 8
        factor = xp.asarray(_backend_for(host_namespace()).cholesky(views[0]), device=device(a))
    else:
        factor = _backend_for(xp).cholesky(a)
    diag = xp.linalg.diagonal(factor)
    if not bool(xp.all(xp.isfinite(factor))) or not bool(xp.all(diag > 0)):
        raise NotPositiveDefinite("factor has non-finite or non-positive pivots")
    return factor


def solve_triangular(xp: Any, t: Any, b: Any, /, *, lower: bool = True, trans: bool = False) -> Any:
    """``t^{-1} b`` (or ``t^{-T} b`` with ``trans``) for triangular ``t``, batched.

    PyTorch CPU tensors with several right-hand sides or matrices are solved by
    SciPy's LAPACK on their memory (no copy): PyTorch solves them on its intra-op team,
    as :func:`_host_views` says (one right-hand side of one matrix it solves on the
    calling thread, also for autograd).
    """
    several = (b.ndim >= 2 and b.shape[-1] > 1) or math.prod(t.shape[:-2]) > 1
    views = host_views(xp, t, b) if several else None
    if views is not None:
        t_host, b_host = views
        try:
            direct = _numpy.trtrs(t_host, b_host, lower, trans)
        except np.linalg.LinAlgError:  # singular: the library's own infinities, as elsewhere
            direct = None
        if direct is not None:  # on b's device (a default device set by the user is not)
            return xp.asarray(direct, device=device(b))
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


def cholesky_inverse(xp: Any, U: Any, dtype: Any, /, *, out: Any = None) -> Any:
    """``(U^T U)^{-1}`` for a stack ``(b, k, k)`` of upper Cholesky factors, in ``dtype``.

    The inverse is computed in U's precision (float64) and only then rounded to
    ``dtype``, into ``out`` (a writeable ``(b, k, k)`` array of ``dtype``) if given, so
    that a caller can fill one array chunk by chunk. A backend may provide its own
    (``Backend.cholesky_inverse``); the generic one is ``U^{-1} U^{-T}`` from the
    triangular inverse. Returns the result (``out`` where given).
    """
    into = _backend_for(xp).cholesky_inverse
    if into is None:
        Linv = triangular_inverse(xp, xp.matrix_transpose(U), lower=True)
        inv = xp.astype(xp.matrix_transpose(Linv) @ Linv, dtype)
        if out is None:
            return inv
        out[...] = inv
        return out
    if out is None:
        out = xp.empty(U.shape, dtype=dtype, device=device(U))
    into(U, out)
    return out


def matmul(xp: Any, a: Any, b: Any, /) -> Any:
    """``a @ b`` of small float64 matrices; NumPy's for PyTorch CPU tensors.

    PyTorch multiplies even 64 x 64 x 2 on its intra-op team, which then spins on the
    cores that the passes want (:func:`_host_views`); NumPy's small products do not
    wake OpenBLAS's threads. The result is on the operands' device.
    """
    views = host_views(xp, a, b)
    if views is None:
        return a @ b
    return xp.asarray(np.matmul(*views), device=device(b))


def matmul_into(xp: Any, a: Any, b: Any, out: Any, /) -> None:
    """``out[...] = a @ b``, without a temporary where the library allows it."""
    into = _backend_for(xp).matmul_into
    if into is None:
        out[...] = a @ b
    else:
        into(a, b, out)


def replace_row(
    xp: Any, U: Any, p: int, b: Any, c: Any, out: Any, /, *, deferred: bool = False
) -> Any:
    """The upper factor of ``C = U^T U`` with row/column ``p`` removed and ``[b; c]`` appended.

    Written into ``out`` (not ``U``) and returned; raises ``NotPositiveDefinite``
    if the new pivot is not positive. O(k^2). With ``deferred`` the generic edit
    returns ``(out, margin)``, the pivot's check left to the caller (``margin > 0``
    when it passes), without reading a value on the host; a backend's own edit,
    which checks the pivot itself, returns ``(out, None)``.
    """
    views = None if deferred else _host_views(xp, U, b, out)
    if views is not None:
        Uh, bh, outh = views
        replace_row(host_namespace(), Uh, p, bh, float(c), outh)  # into out's memory
        return out
    backend = _backend_for(xp)
    if backend.replace is None:
        return _rowedit.replace(xp, backend.solve_triangular, U, p, b, c, out, deferred=deferred)
    U = backend.replace(U, p, b, float(c), out)
    return (U, None) if deferred else U


def host_views(xp: Any, *arrays: Any) -> tuple[Any, ...] | None:
    """:func:`_host_views` of arrays off the device route (``_pieces.is_accelerator``).

    For small float64 work that PyTorch would run on its intra-op team; the caller
    computes with :func:`host_namespace` and wraps its results on the arrays' device.
    """
    if _pieces.is_accelerator(xp, arrays[0]):
        return None
    return _host_views(xp, *arrays)


def _host_views(xp: Any, *arrays: Any) -> tuple[Any, ...] | None:
    """NumPy views of PyTorch CPU tensors (no copy), or None for any other arrays.

    PyTorch runs a small product on its intra-op (OpenMP) team, whose threads then spin
    on the cores the passes' threads want, and, on a loaded machine, wait for each
    other: the row edit of a 64 x 64 factor took 1.1 ms against NumPy's 0.5 ms on one
    idle thread, and one of its 32 x 32 products a median of 32 ms under load. NumPy's
    and SciPy's small calls run on the calling thread.
    """
    if not is_torch_namespace(xp):
        return None
    views = tuple(_engine.vector_view(xp, a) for a in arrays)
    return None if any(v is None for v in views) else views


@cache
def host_namespace() -> Any:
    """The array namespace of :func:`host_views`' arrays (NumPy's)."""
    return array_namespace(np.empty(0))


def replaced_row(xp: Any, U: Any, p: int, b: Any, c: Any, /) -> tuple[Any, Any]:
    """:func:`replace_row` as a pure function of arrays: ``(new, margin)``.

    New arrays only and no read on the host (``margin > 0`` exactly when the new
    pivot passes), so that it traces under ``jax.jit`` for a static ``p``: the edit of
    :mod:`mfac_core.jax`'s window. O(k^2).
    """
    backend = _backend_for(xp)
    if backend.replaced is None:
        return _rowedit.replaced(xp, backend.solve_triangular, U, p, b, c)
    return backend.replaced(U, p, b, c)
