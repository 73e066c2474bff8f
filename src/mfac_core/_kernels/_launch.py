"""CuPy launchers of the kernels (this module imports CuPy; the package loads it lazily).

Each public function checks that its arrays are CuPy arrays on the current device, then runs the
array-level operation of ``_ops`` with a CuPy executor: kernels from ``cupy.RawModule`` (one
module per source file, compiled by NVRTC once per device and cached by CuPy), launched on the
current stream, with CuPy arrays for buffers.
"""

from __future__ import annotations

import os
from typing import Any

import cupy
import numpy as np

from . import _ops, _plan
from ._source import kernel_source

__all__ = ["cholesky", "potrf", "replace", "solve_triangular", "triangular_inverse"]

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
