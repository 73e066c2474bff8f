"""The host set-up of dense blocks: each block's float64 Gram, Cholesky factor and its inverse.

For a NumPy G whose blocks are no wider than m, every block ``b`` of a group needs
``Linv_b = L_b^{-1}``, where ``F_b = damp I + G_b^T G_b / m = L_b L_b^T`` (float64). The
general set-up (``_setup``) builds these through batched array operations on float64
copies of column pieces: a full product for each Gram, a separate factorisation, an
inverse matrix by matrix, and copies between them. Here each block goes through LAPACK
in place, in the row of ``out`` that keeps its result:

1. the block's columns are copied to a float64 buffer of m x size (the products of
   float32 or 2-byte values are exact in float64, docs/mathematics.rst "Exact passes");
2. ``dsyrk`` writes one triangle of ``G_b^T G_b / m`` (half the flops of a full product);
3. ``dpotrf`` factorises ``F_b`` and ``dtrtri`` inverts the factor, both in place.

A row of ``out`` is read by LAPACK as the column-major transpose of itself: the upper
factor ``U_b`` LAPACK computes there reads row-major as ``U_b^T = L_b``, its inverse as
``L_b^{-1}``. The bounds of the condition number are the trace of each Gram (above)
and, below, a lower bound of ``lambda_max(F_b)`` (the largest diagonal entry, sharpened
by ``_capacitance``'s power iterations on a chunk of factors while they are still in
cache, through ``F_b v = L_b (L_b^T v)``, only where the warning it decides could be
due) over the upper bound ``1 / max_j (F_b^{-1})_jj`` of ``lambda_min(F_b)`` that the
inverse factors give (``_capacitance.dense_kappa_lower``).

The chunks run on the calling thread, one after the other; BLAS and LAPACK spread each
call over their own threads. Python threads that each call a threaded BLAS oversubscribe
the cores: at m = 256, B = 128, d = 1e6 on 2 cores, two such threads took 4.1 s against
3.8 s for one (OpenBLAS's default), 26.7 s where OpenBLAS's idle threads sleep at once
(``OPENBLAS_THREAD_TIMEOUT=4``), and did not finish in minutes on a loaded machine
(benchmarks/RESULTS.md). A chunk that meets a non-finite Gram or a failed factorisation
stops the work, and the caller repeats the group through the general set-up, which
words the error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import _capacitance
from ._compat import is_numpy_namespace
from ._dtypes import is_numpy_bfloat16
from ._layout import BlockGroup

__all__ = ["fill_block_inverses", "serves"]

#: float64 bytes of the factors of one chunk: its power iterations read them ten times,
#: so they should stay in a core's cache.
_CHUNK_BYTES = 2**20

_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def serves(xp: Any, G: Any, group: BlockGroup) -> bool:
    """Whether :func:`fill_block_inverses` serves this group of ``G``."""
    return (
        is_numpy_namespace(xp)
        and isinstance(G, np.ndarray)
        and (G.dtype in _DTYPES or is_numpy_bfloat16(G.dtype))
        and 1 <= group.size <= G.shape[0]
    )


class _Failed(Exception):
    """A chunk whose Gram is not finite or whose factor failed: the general path words it."""


def fill_block_inverses(
    G: np.ndarray,
    group: BlockGroup,
    out: np.ndarray,
    /,
    *,
    damp: float,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, float] | None:
    """Write ``L_b^{-1}`` of each block's ``F_b`` into ``out[b]``; the bounds of kappa.

    ``out`` is a C-contiguous float64 ``(count, size, size)`` array. Returns bounds
    ``(lo, hi)`` of the largest condition number over the group's blocks, or ``None``
    where some block's Gram is not finite or its factorisation failed (``out`` then
    holds partial results, and the caller takes the general path, which raises the
    error that says why). ``progress(columns)`` is called after each chunk.
    """
    from scipy.linalg import blas, lapack

    m, s, count = G.shape[0], group.size, group.count
    per = max(1, _CHUNK_BYTES // (8 * s * s))
    spans = [(b0, min(b0 + per, count)) for b0 in range(0, count, per)]
    scale = 1.0 / m

    def chunk(b0: int, b1: int, buf: np.ndarray) -> tuple[float, float]:
        for b in range(b0, b1):
            c0 = group.start + b * s
            np.copyto(buf, G[:, c0 : c0 + s])
            blas.dsyrk(scale, buf.T, beta=0.0, c=out[b].T, overwrite_c=1, lower=0)
        F = out[b0:b1]
        diag = np.reshape(F, (b1 - b0, s * s))[:, :: s + 1]  # a view of the diagonals
        S_diag = diag.copy()  # of G_b^T G_b / m, before the shift
        # Squared norms beyond float64 make inf (NaN from NaN); NumPy's RuntimeWarnings
        # would come before the error the general path words (np.errstate is local).
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.all(np.isfinite(S_diag)):
                raise _Failed
            diag += damp
            for b in range(b0, b1):
                if lapack.dpotrf(out[b].T, lower=0, clean=1, overwrite_a=1)[1] != 0:
                    raise _Failed
            if not np.all(np.isfinite(diag)) or not np.all(diag > 0):
                raise _Failed
            hi = 1.0 + float(np.max(np.sum(S_diag, axis=-1))) / damp
            lam_lo = np.max(S_diag, axis=-1)
            if _capacitance.is_imprecise(hi, eps=_capacitance.EPS64):
                # The lower bound decides the operator's only use of it, the warning that
                # float64 has no digit left: sharpened by power iterations only where the
                # upper bound leaves that open (they cost a third of the factorisation).
                L, Lt = F, np.swapaxes(F, -1, -2)
                power, _ = _capacitance.power_bounds(np, S_diag, lambda v: L @ (Lt @ v) - damp * v)
                lam_lo = np.maximum(lam_lo, power)
        for b in range(b0, b1):
            if lapack.dtrtri(out[b].T, lower=0, overwrite_c=1)[1] != 0:
                raise _Failed
        return _capacitance.dense_kappa_lower(np, damp + lam_lo, F), hi

    buf = np.empty((m, s), dtype=np.float64)
    kappa_lo, kappa_hi = 1.0, 1.0
    for b0, b1 in spans:
        try:
            lo, hi = chunk(b0, b1, buf)
        except _Failed:
            return None
        kappa_lo, kappa_hi = max(kappa_lo, lo), max(kappa_hi, hi)
        if progress is not None:
            progress((b1 - b0) * s)
    return kappa_lo, kappa_hi
