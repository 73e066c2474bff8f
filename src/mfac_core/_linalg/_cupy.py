"""CuPy: this project's CUDA kernels or cuSOLVER/cuBLAS, and the policy that chooses.

The policy is public (:func:`mfac_core.set_cupy_linalg`, :func:`mfac_core.get_cupy_linalg`)
and read at every call, so a change takes effect at once:

- ``"auto"`` (default): each operation where it measured faster (``benchmarks/gpu.py``;
  figures in ``benchmarks/RESULTS.md``): the kernels for stacks of matrices (the block-wise
  operator) and for the row edit of a factor up to m = 1024, cuSOLVER/cuBLAS for a single
  matrix's factorisation, inverse and solves;
- ``"kernels"``: the kernels of ``mfac_core._kernels`` for everything;
- ``"cusolver"``: CuPy's own ``cupy.linalg.cholesky`` (cuSOLVER) and
  ``cupyx.scipy.linalg.solve_triangular`` (cuBLAS).

The environment variable ``MFAC_CUPY_LINALG`` gives the choice unless
:func:`set_cupy_linalg` overrides it in-process.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from .. import _kernels
from .._compat import array_namespace
from ._backend import Backend
from ._rowedit import replace as generic_replace

__all__ = [
    "CUPY_LINALG_CHOICES",
    "ENVIRONMENT_VARIABLE",
    "get_cupy_linalg",
    "kernels_serve",
    "make_backend",
    "set_cupy_linalg",
]

#: What to install when a CUDA library CuPy loads on first use is missing.
CUDA_LIBRARIES_HINT = (
    "a driver-only machine needs the CUDA libraries CuPy loads (NVRTC, cuBLAS, cuSOLVER): "
    'pip install ".[cuda]" from a checkout of mfac_core (or pip install '
    '"cupy-cuda12x[ctk]>=14"; "cupy-cuda13x[ctk]>=14" for CUDA 13), or install a CUDA Toolkit'
)

#: The implementations of the small dense linear algebra on CuPy arrays.
CUPY_LINALG_CHOICES = ("auto", "kernels", "cusolver")
#: The environment variable read at every call unless :func:`set_cupy_linalg` overrides it.
ENVIRONMENT_VARIABLE = "MFAC_CUPY_LINALG"
#: The largest factor whose row edit ``"auto"`` sends to the kernels.
AUTO_KERNEL_REPLACE_MAX = 1024

_override: str | None = None


def _check_choice(name: Any, source: str) -> str:
    if not isinstance(name, str) or name not in CUPY_LINALG_CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CUPY_LINALG_CHOICES)}; got {name!r}")
    return name


def set_cupy_linalg(name: str | None, /) -> str | None:
    """Choose the implementation of small dense linear algebra on CuPy arrays.

    Parameters
    ----------
    name : {"auto", "kernels", "cusolver"} or None
        ``"auto"``: per operation, where it measured faster; ``"kernels"``: this
        package's CUDA kernels; ``"cusolver"``: cuSOLVER/cuBLAS through CuPy.
        ``None`` removes the override, so that the environment variable
        ``MFAC_CUPY_LINALG`` (or the default, ``"auto"``) decides again.

    Returns
    -------
    str or None
        The previous override, to restore it.

    Raises
    ------
    ValueError
        For any other name.

    Examples
    --------
    >>> import mfac_core
    >>> previous = mfac_core.set_cupy_linalg("cusolver")
    >>> mfac_core.get_cupy_linalg()
    'cusolver'
    >>> _ = mfac_core.set_cupy_linalg(previous)
    """
    global _override
    previous = _override
    _override = None if name is None else _check_choice(name, "set_cupy_linalg's name")
    return previous


def get_cupy_linalg() -> str:
    """The implementation in force for CuPy arrays.

    Returns
    -------
    str
        The override of :func:`set_cupy_linalg`, else ``MFAC_CUPY_LINALG``, else
        ``"auto"``.

    Raises
    ------
    ValueError
        If ``MFAC_CUPY_LINALG`` names no implementation.
    """
    if _override is not None:
        return _override
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    return _check_choice(value, ENVIRONMENT_VARIABLE) if value else "auto"


def kernels_serve(mode: str, shape: tuple[int, ...]) -> bool:
    """Whether ``mode`` sends a factorisation, solve or inverse of ``shape`` to the kernels.

    ``"auto"`` sends stacks of two or more matrices (the block-wise operator) to the
    kernels and single matrices, including a stack of one (which the set-up of a
    single-block operator passes), to cuSOLVER/cuBLAS, faster there on the H200.

    Parameters
    ----------
    mode : str
        The policy, one of ``CUPY_LINALG_CHOICES``.
    shape : tuple of int
        The shape of the matrix or stack of matrices.

    Returns
    -------
    bool
        True for the kernels, False for cuSOLVER/cuBLAS.
    """
    if mode == "kernels":
        return True
    return mode == "auto" and len(shape) > 2 and math.prod(shape[:-2]) > 1


def make_backend() -> Backend:
    """Build the CuPy backend, whose every call consults the policy.

    Each function of the backend reads :func:`get_cupy_linalg` when it is
    called, so a later :func:`set_cupy_linalg` (or a change of
    ``MFAC_CUPY_LINALG``) applies to a backend built before it.

    Returns
    -------
    Backend
        The Cholesky factorisation, triangular solve, triangular inverse and
        row edit of a factor on CuPy arrays, each sent to this package's
        kernels or to cuSOLVER/cuBLAS as the policy says.
    """
    import cupy

    try:
        import cupyx.scipy.linalg
    except (ImportError, OSError, RuntimeError) as exc:  # cuBLAS/cuSOLVER failed to load
        raise ImportError(
            f"CuPy is installed but cupyx.scipy.linalg cannot be imported ({exc}); "
            f"{CUDA_LIBRARIES_HINT}"
        ) from exc

    def kernels_for(a: Any) -> bool:
        return kernels_serve(get_cupy_linalg(), tuple(a.shape))

    def chol(a: Any) -> Any:
        if kernels_for(a):
            # Raises NotPositiveDefinite from the kernels' LAPACK-style info.
            return _kernels.cholesky(a)
        # CuPy returns NaN instead of raising; the dispatcher catches that.
        return cupy.linalg.cholesky(a)

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        if kernels_for(t):
            return _kernels.solve_triangular(t, b, lower=lower, trans=trans)
        if t.ndim == 3 and t.shape[0] == 1 and b.ndim == 3:
            # A stack of one (a single-block operator's set-up): cuBLAS's solve.
            return solve(t[0], b[0], lower, trans)[None, ...]
        if t.ndim == 2:
            return cupyx.scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0)
        # cupyx's triangular solve is not batched; a batched LU solve is, and the
        # systems are small.
        return cupy.linalg.solve(cupy.swapaxes(t, -1, -2) if trans else t, b)

    def inverse(t: Any) -> Any:
        if kernels_for(t):
            return _kernels.triangular_inverse(t)
        with t.device:  # CuPy creates on the current device; the identity goes on t's
            eye = cupy.broadcast_to(cupy.eye(t.shape[-1], dtype=t.dtype), t.shape)
        return solve(t, eye, True, False)

    def replace(U: Any, p: int, b: Any, c: float, out: Any) -> Any:
        mode = get_cupy_linalg()
        if mode == "kernels" or (mode == "auto" and U.shape[0] <= AUTO_KERNEL_REPLACE_MAX):
            return _kernels.replace(cupy, U, p, b, c, out)
        return generic_replace(array_namespace(U), solve, U, p, b, c, out)

    return Backend(*map(_explained, (chol, solve, inverse, replace)))


def _explained(fn: Any) -> Any:
    """``fn``, whose failure to load a CUDA library (NVRTC on a kernel's first launch,
    cuBLAS, cuSOLVER) says what to install."""

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except (ImportError, OSError, RuntimeError) as exc:
            text = str(exc)
            if "failed to load" not in text and "cannot open shared object" not in text:
                raise
            raise RuntimeError(
                f"a CUDA library failed to load ({exc}); {CUDA_LIBRARIES_HINT}"
            ) from exc

    return call
