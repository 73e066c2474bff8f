"""CUDA kernels for the small, sequential m x m parts of the operators, on CuPy arrays.

The O(dm) passes of the operators run on cuBLAS through CuPy; what is left is small and
sequential: the Cholesky factorisation of the m x m capacitance matrix (the paper's D
recursion), the triangular inverse, forward and back substitution, and the O(m^2) row delete /
append of the dynamic factor. The kernels for these live here as ``.cu`` files, compiled with
NVRTC by ``cupy.RawModule`` once per device (CuPy caches the binary), and launched on CuPy's
current stream (``cupy.cuda.get_current_stream()``):

``cholesky.cu``
    blocked right-looking Cholesky of a stack of SPD n x n matrices (float64, or float32 as an
    explicit option), with LAPACK-style ``info`` for matrices that are not positive definite.
``trsm.cu``
    triangular solves ``op(T)^{-1} B`` (lower or upper, transposed or not, any number of
    right-hand sides, stacks) and triangular inverses.
``update.cu``
    the delete-a-row-and-column / append-a-row-and-column edit of an upper Cholesky factor,
    with the semantics of the generic row edit of ``mfac_core._linalg``.

Every size works (no multiple of 32, no upper bound but memory and CUDA's grid limit); a stack
of small systems (e.g. 8192 blocks of m = 64) is one launch per step.

Functions (each imports CuPy on first use; importing this package does not):

- ``cholesky(a, *, dtype=None)``, ``potrf(a, *, dtype=None)`` (no raise; returns ``info``)
- ``solve_triangular(t, b, *, lower=True, trans=False, dtype=None)``
- ``triangular_inverse(t, *, lower=True, dtype=None)``
- ``replace(xp, U, p, b, c, out, /, *, block=None)``: drop-in for the generic row edit.

Which implementation the operators use for CuPy arrays (these kernels or cuSOLVER/cuBLAS) is
decided by ``mfac_core._linalg``'s CuPy backend; users choose it with
:func:`mfac_core.set_cupy_linalg`. This package is a leaf: it imports nothing of
:mod:`mfac_core` but the ground-floor ``_errors`` module. Timings on an H200 are in
``benchmarks/RESULTS.md``.

Testing without a GPU: ``_host.py`` compiles the same ``.cu`` files with g++ and
``host/cuda_host.h`` and runs them on NumPy arrays through the same launch plans (``_plan.py``)
and array-level operations (``_ops.py``) as the CuPy launcher (``_launch.py``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["cholesky", "potrf", "replace", "solve_triangular", "triangular_inverse"]

_LAUNCHERS = tuple(__all__)


def __getattr__(name: str) -> Any:
    # The launchers import CuPy: load them on first use only.
    if name in _LAUNCHERS:
        from . import _launch

        return getattr(_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
