"""CuPy launchers of the kernels (this module imports CuPy; the package loads it lazily).

Each public function checks that its arrays are CuPy arrays on the current device, then runs the
array-level operation of ``_ops`` with a CuPy executor: kernels from ``cupy.RawModule`` (one
module per source file, compiled by NVRTC once per device and cached by CuPy), launched on the
current stream, with CuPy arrays for buffers.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import cupy
import numpy as np

from . import _ops, _plan
from ._source import kernel_source

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

#: NVRTC options. No fast-math: the factorisations rely on IEEE division and square root.
NVRTC_OPTIONS = ("--std=c++17",)

_modules: dict[str, Any] = {}
_functions: dict[tuple[str, str], Any] = {}


def _function(source: str, name: str) -> Any:
    """The kernel ``name`` of ``source`` as a ``cupy.RawKernel``.

    Cached here: ``RawModule.get_function`` returns a new ``RawKernel`` whose per-device cache
    starts empty, so calling it per launch would look the module up again every time. CuPy
    compiles and loads the module once per device, on a kernel's first launch there.
    """
    function = _functions.get((source, name))
    if function is None:
        module = _modules.get(source)
        if module is None:
            module = _modules[source] = cupy.RawModule(
                code=kernel_source(source), options=NVRTC_OPTIONS
            )
        function = _functions[source, name] = module.get_function(name)
    return function


class _CupyExecutor:
    """The :class:`_ops.ArrayExecutor` of CuPy."""

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return cupy.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        return cupy.zeros(shape, dtype=dtype)

    def full(self, shape: tuple[int, ...], value: float, dtype: str) -> Any:
        # A fill kernel with the value as its argument: no copy from the host.
        return cupy.full(shape, value, dtype=dtype)

    def copy(self, a: Any, dtype: str) -> Any:
        return cupy.array(a, dtype=dtype, order="C", copy=True)

    def contiguous(self, a: Any, dtype: str) -> Any:
        return cupy.ascontiguousarray(a, dtype=dtype)

    def broadcast_to(self, a: Any, shape: tuple[int, ...]) -> Any:
        return cupy.broadcast_to(a, shape)

    def to_host(self, a: Any) -> np.ndarray:
        return cupy.asnumpy(a)

    def may_share_memory(self, a: Any, b: Any) -> bool:
        return bool(cupy.may_share_memory(a, b))

    def launch(self, kernel: _plan.Kernel, name: str, grid: int, args: tuple[Any, ...]) -> None:
        scalar = np.float64 if name.endswith("_f64") else np.float32
        converted: list[Any] = []
        for kind, value in zip(kernel.params, args, strict=True):
            if kind.endswith("*"):
                array, offset = value
                # A view from `offset` on passes that address; arrays are C-contiguous here.
                converted.append(array.reshape(-1)[offset:] if offset else array)
            elif kind == "T":
                converted.append(scalar(value))
            elif kind == "i64":
                converted.append(np.int64(value))
            else:
                converted.append(np.int32(value))
        function = _function(kernel.source, name)
        # CuPy launches on the current stream and raises if the driver refuses the launch.
        function((grid,), (_plan.THREADS,), tuple(converted))
        if os.environ.get("MFAC_CUPY_SYNC_LAUNCHES", "") not in ("", "0"):
            cupy.cuda.get_current_stream().synchronize()


_EXECUTOR = _CupyExecutor()


def _check(x: Any, name: str) -> None:
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(x).__name__}")
    current = cupy.cuda.Device().id
    if x.device.id != current:
        raise ValueError(
            f"{name} is on GPU {x.device.id} but the current device is GPU "
            f"{current}; call under `with cupy.cuda.Device({x.device.id}):`"
        )


def potrf(a: Any, *, dtype: Any = None) -> tuple[Any, Any]:
    """Lower Cholesky factors of the SPD stack ``a`` (..., n, n) and ``info`` (int32, ...).

    Computed in float64 unless ``dtype=cupy.float32``. Does not synchronise: ``info`` is 0
    where the factorisation succeeded, else the 1-based order of the first leading minor that
    is not positive definite (that factor is then partial).
    """
    _check(a, "a")
    return _ops.potrf(_EXECUTOR, a, dtype=dtype)


def cholesky(a: Any, *, dtype: Any = None) -> Any:
    """Lower Cholesky factors of the SPD stack ``a`` (..., n, n); upper triangles are zero.

    Computed in float64 unless ``dtype=cupy.float32``. Reads ``info`` back (one
    synchronisation) and raises ``mfac_core._errors.NotPositiveDefinite`` naming the first
    failing matrix and minor.
    """
    _check(a, "a")
    return _ops.cholesky(_EXECUTOR, a, dtype=dtype)


def solve_triangular(
    t: Any, b: Any, *, lower: bool = True, trans: bool = False, dtype: Any = None
) -> Any:
    """``op(t)^{-1} b``, ``op(t) = t`` or ``t.T``, for triangular ``t`` (..., m, m).

    ``b`` is (..., m, k) or a vector (m,); leading dimensions broadcast. Only the triangle
    named by ``lower`` is read. float32 when both inputs are, else float64 (or ``dtype``).
    """
    _check(t, "t")
    _check(b, "b")
    return _ops.solve_triangular(_EXECUTOR, t, b, lower=lower, trans=trans, dtype=dtype)


def triangular_inverse(t: Any, *, lower: bool = True, dtype: Any = None) -> Any:
    """The inverse of each triangular matrix in the stack ``t`` (..., m, m)."""
    _check(t, "t")
    return _ops.triangular_inverse(_EXECUTOR, t, lower=lower, dtype=dtype)


def replace(
    xp: Any, U: Any, p: int, b: Any, c: float, out: Any, /, *, block: int | None = None
) -> Any:
    """Drop-in for the generic row edit ``mfac_core._linalg.replace_row`` on CuPy arrays.

    ``xp`` and ``block`` (the panel height of the array-API version) are accepted for the
    same signature and not used. Raises ``NotPositiveDefinite`` if the new pivot is not
    positive (after a synchronisation, as the array-API version).
    """
    del xp, block
    for value, name in ((U, "U"), (b, "b"), (out, "out")):
        _check(value, name)
    return _ops.replace(_EXECUTOR, U, p, b, c, out)


# -- the passes over the stored gradients --------------------------------------------------------
#
# Every array argument must be a cupy.ndarray on the current device (alpha may also be a real
# number); the results are new arrays. See the package's docstring for the semantics.


def _check_passes(**arrays: Any) -> None:
    for name, value in arrays.items():
        if not (name == "alpha" and isinstance(value, numbers.Real)):
            _check(value, name)


def project64(G: Any, X: Any, /, *, start: int, stop: int, storage: str | None = None) -> Any:
    """``X @ G[:, start:stop].T`` summed in float64, on the GPU.

    Parameters
    ----------
    G : cupy.ndarray
        (m, ld), C-contiguous, read in place: float32, float64, float16, or uint16 holding
        float16 or bfloat16 bits (``storage`` says which).
    X : cupy.ndarray
        (k, stop - start), or (stop - start,) for one vector; float32 or float64 (float16 is
        widened to a float32 copy, exactly).
    start, stop : int
        The columns of G, ``0 <= start <= stop <= ld``.
    storage : {"float32", "float64", "float16", "bfloat16"}, optional
        How G's items are stored; None: from G's dtype.

    Returns
    -------
    cupy.ndarray
        (k, m) float64, or (m,) for a 1-D ``X``: ``P[k, i] = sum_j G[i, start + j] X[k, j]``.

    Notes
    -----
    Every product and sum is in float64, in an order fixed by the shapes (the same inputs give
    the same bits at every call). Launches on the current stream, with no synchronisation and no
    copy between host and device: at most 2 per group of 8 vectors, whatever the columns.
    """
    _check_passes(G=G, X=X)
    return _ops.project64(_EXECUTOR, G, X, start=start, stop=stop, storage=storage)


def combine64(
    G: Any,
    C: Any,
    alpha: Any,
    X: Any,
    /,
    *,
    start: int,
    stop: int,
    dtype: Any,
    storage: str | None = None,
) -> Any:
    """``alpha[:, None] * X + C @ G[:, start:stop]`` in float64, rounded once, on the GPU.

    Parameters
    ----------
    G : cupy.ndarray
        (m, ld), C-contiguous, as for :func:`project64`.
    C : cupy.ndarray
        (k, m), real floating (taken as float64: a device copy unless it is C-contiguous
        float64).
    alpha : float or cupy.ndarray
        A real number for all k rows (filled into a device array by a kernel), or (k,) real
        floating.
    X : cupy.ndarray
        (k, stop - start), or (stop - start,) shared by the k rows; float32 or float64.
    start, stop : int
        The columns of G, ``0 <= start <= stop <= ld``.
    dtype : cupy.float32 or cupy.float64
        The result's dtype.
    storage : str, optional
        As for :func:`project64`.

    Returns
    -------
    cupy.ndarray
        (k, stop - start) of ``dtype``: ``Y[k, j] = alpha[k] X[k, j] + sum_i C[k, i] G[i, start
        + j]``, the m terms summed first, ``alpha x`` added last (one FMA), every operation in
        float64 and the result rounded once to ``dtype``. For the engine's ``alpha (X - G^T A)``
        pass ``C = -alpha A^T``.

    Notes
    -----
    One launch per group of 8 rows of C, on the current stream, whatever the columns; no
    synchronisation, no copy between host and device. The result is the same bits at every call.
    """
    _check_passes(G=G, C=C, alpha=alpha, X=X)
    return _ops.combine64(
        _EXECUTOR, G, C, alpha, X, start=start, stop=stop, dtype=dtype, storage=storage
    )


def project64_blocks(
    G: Any, X: Any, /, *, start: int, block_size: int, storage: str | None = None
) -> Any:
    """:func:`project64` of each of ``count`` consecutive blocks of ``block_size`` columns.

    Parameters
    ----------
    G : cupy.ndarray
        (m, ld), C-contiguous, as for :func:`project64`.
    X : cupy.ndarray
        (count, k, block_size), float32 or float64.
    start, block_size : int
        Block b is the columns ``start + b * block_size`` to ``start + (b + 1) * block_size``;
        all must lie in G.
    storage : str, optional
        As for :func:`project64`.

    Returns
    -------
    cupy.ndarray
        (count, k, m) float64: block b's ``X[b] @ G_b.T``. All blocks in the same launches as
        one :func:`project64`.
    """
    _check_passes(G=G, X=X)
    return _ops.project64_blocks(
        _EXECUTOR, G, X, start=start, block_size=block_size, storage=storage
    )


def combine64_blocks(
    G: Any,
    C: Any,
    alpha: Any,
    X: Any,
    /,
    *,
    start: int,
    block_size: int,
    dtype: Any,
    storage: str | None = None,
) -> Any:
    """:func:`combine64` of each of ``count`` consecutive blocks of ``block_size`` columns.

    Parameters
    ----------
    G : cupy.ndarray
        (m, ld), C-contiguous, as for :func:`project64`.
    C : cupy.ndarray
        (count, k, m), real floating: each block's coefficients.
    alpha : float or cupy.ndarray
        A real number, or (k,) real floating (the same for every block).
    X : cupy.ndarray
        (count, k, block_size), float32 or float64.
    start, block_size : int
        As for :func:`project64_blocks`.
    dtype : cupy.float32 or cupy.float64
        The result's dtype.
    storage : str, optional
        As for :func:`project64`.

    Returns
    -------
    cupy.ndarray
        (count, k, block_size) of ``dtype``: block b's ``alpha[:, None] * X[b] + C[b] @ G_b``,
        summed and rounded as in :func:`combine64`. One launch per group of 8 rows of C for all
        blocks.
    """
    _check_passes(G=G, C=C, alpha=alpha, X=X)
    return _ops.combine64_blocks(
        _EXECUTOR,
        G,
        C,
        alpha,
        X,
        start=start,
        block_size=block_size,
        dtype=dtype,
        storage=storage,
    )
