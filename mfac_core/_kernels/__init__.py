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
    with the semantics of ``mfac_core._cholesky.replace``.

Every size works (no multiple of 32, no upper bound but memory and CUDA's grid limit); a stack
of small systems (e.g. 8192 blocks of m = 64) is one launch per step.

Functions (each imports CuPy on first use; importing this package does not):

- ``cholesky(a, *, dtype=None)``, ``potrf(a, *, dtype=None)`` (no raise; returns ``info``)
- ``solve_triangular(t, b, *, lower=True, trans=False, dtype=None)``
- ``triangular_inverse(t, *, lower=True, dtype=None)``
- ``replace(xp, U, p, b, c, out, /, *, block=None)``: drop-in for ``_cholesky.replace``.

Choosing the implementation
---------------------------
``mfac_core._linalg`` sends CuPy arrays to these kernels by default. The environment variable
``MFAC_CUPY_LINALG`` selects the implementation at every call:

- ``auto`` (default): each operation where it measured faster on an H200 (see below): the
  kernels for stacks of matrices (the block-wise operator) and for the row replace of a factor
  up to m = 1024; cuSOLVER/cuBLAS for a single matrix's factorisation, inverse and solves;
- ``kernels``: the kernels of this package for everything;
- ``cusolver``: CuPy's own routines, ``cupy.linalg.cholesky`` (cuSOLVER) and
  ``cupyx.scipy.linalg.solve_triangular`` (cuBLAS), for comparison.

:func:`set_cupy_linalg` overrides the variable in-process (``set_cupy_linalg(None)`` hands
the choice back to it); :func:`get_cupy_linalg` says what is in force.

Debugging: with ``MFAC_CUPY_SYNC_LAUNCHES=1`` every launch is followed by a synchronisation of
the stream, so that an error in a kernel is raised at that launch, not at a later call.

Measured (H200, ``benchmarks/gpu.py``; cuSOLVER/cuBLAS path in brackets): factorisation +
inverse 0.41 ms at m = 256 (0.34), 1.9 ms at m = 1024 (1.5), 17.6 ms at m = 4096 (9.6), 5.1 ms
for 8192 blocks of m = 64 (5.8); row replace 0.63 ms at m = 256 (1.2 for ``_cholesky.replace``),
equal at m = 1024. Known limit: a solve with one right-hand side is one block walking the
triangle, 1.6 ms at m = 1024 against 0.12 ms for cuBLAS; the barrier-per-row loops run at one
block per SM and are latency bound (Nsight Compute: 2 warps per scheduler, 0.3 instructions
issued per cycle).

Testing without a GPU: ``_host.py`` compiles the same ``.cu`` files with g++ and
``host/cuda_host.h`` and runs them on NumPy arrays through the same launch plans (``_plan.py``)
and array-level operations (``_ops.py``) as the CuPy launcher (``_launch.py``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CUPY_LINALG_CHOICES",
    "cholesky",
    "get_cupy_linalg",
    "potrf",
    "replace",
    "set_cupy_linalg",
    "solve_triangular",
    "triangular_inverse",
]

#: The implementations of the small dense linear algebra on CuPy arrays.
CUPY_LINALG_CHOICES = ("auto", "kernels", "cusolver")
#: The environment variable read at every call unless :func:`set_cupy_linalg` overrides it.
ENVIRONMENT_VARIABLE = "MFAC_CUPY_LINALG"

_override: str | None = None
_LAUNCHERS = ("cholesky", "potrf", "replace", "solve_triangular", "triangular_inverse")


def _check_choice(name: Any, source: str) -> str:
    if name not in CUPY_LINALG_CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CUPY_LINALG_CHOICES)}; "
                         f"got {name!r}")
    return name


def set_cupy_linalg(name: str | None) -> str | None:
    """Choose the implementation for CuPy arrays: ``"auto"``, ``"kernels"`` or ``"cusolver"``.

    ``None`` removes the override, so that ``MFAC_CUPY_LINALG`` (or the default,
    ``"auto"``) decides again. Returns the previous override, to restore it::

        previous = set_cupy_linalg("cusolver")
        try:
            ...
        finally:
            set_cupy_linalg(previous)
    """
    global _override
    previous = _override
    _override = None if name is None else _check_choice(name, "set_cupy_linalg's name")
    return previous


def get_cupy_linalg() -> str:
    """The implementation in force: the override, else ``MFAC_CUPY_LINALG``, else auto."""
    if _override is not None:
        return _override
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    return _check_choice(value, ENVIRONMENT_VARIABLE) if value else "auto"


def __getattr__(name: str) -> Any:
    # The launchers import CuPy: load them on first use only.
    if name in _LAUNCHERS:
        from . import _launch

        return getattr(_launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
