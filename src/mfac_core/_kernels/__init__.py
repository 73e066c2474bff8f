"""CUDA kernels of the operators, on CuPy arrays: the exact O(dm) passes over the stored
gradients, and the small, sequential m x m parts.

The passes read G (m x d) in its storage dtype and sum in float64 (the GPU form of the pass
engine's C extension, ``mfac_core._fused``). The m x m parts are small and sequential: the
Cholesky factorisation of the m x m capacitance matrix (the paper's D recursion), the triangular
inverse, forward and back substitution, and the O(m^2) row delete / append of the dynamic
factor. The kernels live here as ``.cu`` files, compiled with NVRTC by ``cupy.RawModule`` once
per device (CuPy caches the binary), and launched on CuPy's current stream
(``cupy.cuda.get_current_stream()``):

``passes.cu``
    ``project64`` (``P = X G[:, cols]^T``) and ``combine64`` (``Y = a X + C G[:, cols]``) over a
    column range or a group of equal-size column blocks, for G in float32, float64, float16 or
    bfloat16 (its uint16 bits), X in float32 or float64: every item widened to float64 exactly,
    every product and sum a float64 FMA, in an order fixed by the shapes (results are the same
    bits at every run). Up to 8 vectors or rows of C share one read of G.

``cholesky.cu``
    blocked right-looking Cholesky of a stack of SPD n x n matrices (float64, or float32 as an
    explicit option), with LAPACK-style ``info`` for matrices that are not positive definite.
``trsm.cu``
    triangular solves ``op(T)^{-1} B`` (lower or upper, transposed or not, any number of
    right-hand sides, stacks) and triangular inverses.
``update.cu``
    the delete-a-row-and-column / append-a-row-and-column edit of an upper Cholesky factor,
    with the semantics of the generic row edit of ``mfac_core._linalg``; row 0 (the one the
    sliding window edits) with one triangular solve of two right-hand sides, other rows with
    two solves of one.

Every size works (no multiple of 32, no upper bound but memory and CUDA's grid limit); a stack
of small systems (e.g. 8192 blocks of m = 64) is one launch per step.

Functions (each imports CuPy on first use; importing this package does not):

- ``cholesky(a, *, dtype=None)``, ``potrf(a, *, dtype=None)`` (no raise; returns ``info``)
- ``solve_triangular(t, b, *, lower=True, trans=False, dtype=None)``
- ``triangular_inverse(t, *, lower=True, dtype=None)``
- ``replace(xp, U, p, b, c, out, /, *, block=None)``: drop-in for the generic row edit.
- ``project64(G, X, /, *, start, stop, storage=None)``: ``X @ G[:, start:stop].T`` summed in
  float64; X (k, n) or (n,), float32 or float64; returns (k, m) float64, or (m,).
- ``combine64(G, C, alpha, X, /, *, start, stop, dtype, storage=None)``:
  ``alpha[:, None] * X + C @ G[:, start:stop]``, the m terms summed first and ``alpha x``
  added last, in float64, rounded once to ``dtype`` (float32 or float64); C (k, m), alpha a
  number or (k,), X (k, n) or (n,) shared by the k rows; returns (k, n). The engine's
  ``alpha (X - G^T A)`` is ``C = -alpha A^T`` with X transposed.
- ``project64_blocks(G, X, /, *, start, block_size, storage=None)``: the same for each of the
  ``count`` blocks of ``block_size`` columns from ``start`` on; X (count, k, block_size);
  returns (count, k, m).
- ``combine64_blocks(G, C, alpha, X, /, *, start, block_size, dtype, storage=None)``: C
  (count, k, m), alpha a number or (k,), X (count, k, block_size); returns (count, k,
  block_size).

These have the signatures and semantics of ``mfac_core._fused``'s functions of the same names
(less its ``isa``). G is (m, ld), C-contiguous and read in place: float32, float64, float16, or
uint16 holding float16 or bfloat16 bits with ``storage`` naming which. All arrays must be CuPy
arrays on the current device; the kernels run on the current stream, with no synchronisation
and no copy between host and device (a real ``alpha`` is filled in on the device, by CuPy's
fill kernel; C and alpha are copied on the device if they are not C-contiguous float64, X if it
is not C-contiguous float32 or float64). Launches per call: ``combine64`` one per group of 8
rows of C, ``project64`` one or two per group of 8 vectors (the second adds the partial sums of
column slices), whatever the number of columns.

Which implementation the operators use for the m x m parts on CuPy arrays (these kernels or
cuSOLVER/cuBLAS) is decided by ``mfac_core._linalg``'s CuPy backend; users choose it with
:func:`mfac_core.set_cupy_linalg`. This package is a leaf: it imports nothing of
:mod:`mfac_core` but the ground-floor ``_errors`` module. Timings on an H200 are in
``benchmarks/RESULTS.md`` (none yet for the passes).

Testing without a GPU: ``_host.py`` compiles the same ``.cu`` files with g++ and
``host/cuda_host.h`` and runs them on NumPy arrays through the same launch plans (``_plan.py``)
and array-level operations (``_ops.py``) as the CuPy launcher (``_launch.py``).
"""

from __future__ import annotations

from typing import Any

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

_LAUNCHERS = tuple(__all__)


def __getattr__(name: str) -> Any:
    # The launchers import CuPy: load them on first use only.
    if name in _LAUNCHERS:
        from . import _launch

        return getattr(_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
