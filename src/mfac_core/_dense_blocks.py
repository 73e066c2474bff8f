"""The host set-up of dense blocks: each block's float64 Gram, Cholesky factor and its inverse.

For a NumPy G whose blocks are no wider than m, every block ``b`` of a group needs
``Linv_b = L_b^{-1}``, where ``F_b = damp I + G_b^T G_b / m = L_b L_b^T`` (float64). The
general set-up (``_setup``) builds these through batched array operations on float64
copies of column pieces: a full product for each Gram, a separate factorisation, an
inverse matrix by matrix, and copies between them. Here each block is done in place, in
the row of ``out`` that keeps its result, by the C extension's kernels
(:func:`_fused.block_factors`, :func:`_fused.block_inverses`):

1. the block's columns are widened to a float64 buffer of m x size (the products of
   float32 or 2-byte values are exact in float64, docs/mathematics.rst "Exact passes");
2. the upper triangle of ``G_b^T G_b / m`` is summed in register tiles (half the flops
   of a full product), and ``F_b`` factorised, right-looking; narrow blocks (up to 15
   columns with AVX2 or AVX-512, 7 otherwise) go a group of 64 columns at a time, widened
   together and summed a vector of columns by each column offset within a block (the tile
   of 8 x 16 did 128 multiply-adds a row for one useful at s = 1, and each block read a
   cache line of G a row for its s items: the groups take 0.06-0.93x the tiles' time);
3. the factor ``L_b`` is written row-major and then replaced by its inverse.

The bounds of the condition number are the trace of each Gram (above) and, below, a
lower bound of ``lambda_max(F_b)`` (the largest diagonal entry, sharpened by
``_capacitance``'s power iterations on a chunk of factors while they are still in cache,
through ``F_b v = L_b (L_b^T v)``, only where the warning it decides could be due) over
the upper bound ``1 / max_j (F_b^{-1})_jj`` of ``lambda_min(F_b)`` that the inverse
factors give (``_capacitance.dense_kappa_lower``).

Threads: chunks of blocks (1 MiB of factors) are taken in turn by up to
:func:`_fused.max_threads` threads (the C extension's rule: ``MFAC_CORE_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, else the CPUs this process may run on),
the calling thread one of them; the kernels release the GIL and call no BLAS, so each
thread keeps one core. Through SciPy's LAPACK per block (``dsyrk``, ``dpotrf``,
``dtrtri``), as before, each of the 7812 calls of m = 256, B = 128, d = 1e6 woke
OpenBLAS's other thread: 5.2x the float64 floor on two threads (3.3-3.6 s with
``OPENBLAS_NUM_THREADS=1``, 6.4 s without); and Python threads that each call a threaded
BLAS oversubscribe the cores (26.7 s where OpenBLAS's idle threads sleep at once,
``OPENBLAS_THREAD_TIMEOUT=4``; benchmarks/RESULTS.md). One BLAS thread per call cannot be
asked for without a process-wide setting: OpenBLAS's ``openblas_set_num_threads_local``
(0.3.27 on) sets the global count and a plain global in its pthreads build (SciPy's
wheels), so it would change every other thread's BLAS calls too. The kernels run in one
pass about 1.5x faster than the three LAPACK calls on one thread (a 128 x 128 block
from 256 rows: 0.21 against 0.32 ms on a Zen 4 core). Where the extension, or its dense
blocks' kernels, was not built (or G is neither C- nor Fortran-ordered), and for blocks
wider than ``_KERNEL_MAX_SIZE`` (256 columns: there the unblocked kernels fall behind
LAPACK's blocked calls), the blocks go through LAPACK on the calling thread as before.

A chunk that meets a non-finite Gram or a failed factorisation stops the work (the
other threads stop at their next chunk), and the caller repeats the group through the
general set-up, which words the error; any other error of a thread is raised on the
calling thread once every thread has stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _capacitance, _fused
from ._compat import is_numpy_namespace
from ._dtypes import is_numpy_bfloat16
from ._layout import BlockGroup

__all__ = ["fill_block_inverses", "serves"]

#: float64 bytes of the factors of one chunk: its power iterations read them ten times,
#: so they should stay in a core's cache.
_CHUNK_BYTES = 2**20

#: The Gram's multiply-adds per thread below which fewer threads are used (a thread costs
#: about 50 us to start; one block of 128 x 128 from 256 rows, 4.2 M, takes about 0.2 ms).
_MIN_THREAD_WORK = 2**22

#: The widest blocks the C extension's kernels take; wider ones go through LAPACK. The
#: kernels' factorisation and inverse are unblocked (their time grows as s^3 out of
#: cache): per block on one Zen 4 core, float32 G, kernels over LAPACK took 0.45-0.96x up
#: to s = 256 (m = 256, s = 128: 0.74x; 16384 x 32: 0.45x; 8192 x 128: 0.89x; 2048 x 256:
#: 0.96x) and 1.0-4.1x past it (384 x 384: 1.00x; 512 x 512: 1.28x; 4096 x 384: 1.37x;
#: 2048 x 2048: 4.1x), where a LAPACK call takes milliseconds, long enough for BLAS's own
#: threads to pay (benchmarks/setup_blocks_width.py, benchmarks/RESULTS.md).
_KERNEL_MAX_SIZE = 256

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
    error that says why). ``progress(columns)`` is called on the calling thread after
    each chunk it finishes, with the columns of the chunks finished since its last call.
    """
    m, s, count = G.shape[0], group.size, group.count
    per = max(1, _CHUNK_BYTES // (8 * s * s))
    spans = [(b0, min(b0 + per, count)) for b0 in range(0, count, per)]
    if s <= _KERNEL_MAX_SIZE and _fused.supports_blocks(G):
        blocks: _KernelBlocks | _LapackBlocks = _KernelBlocks(G, group, out, damp)
        threads = _threads(m, s, count, len(spans))
    else:
        blocks, threads = _LapackBlocks(G, group, out, damp), 1
    bounds = [(1.0, 1.0)]

    def chunk(b0: int, b1: int) -> None:
        L = out[b0:b1]
        S_diag = blocks.factor(b0, b1)  # of G_b^T G_b / m, before the shift; L_b in L
        # Squared norms beyond float64 make inf (NaN from NaN); NumPy's RuntimeWarnings
        # would come before the error the general path words (np.errstate is local).
        with np.errstate(over="ignore", invalid="ignore"):
            hi = 1.0 + float(np.max(np.sum(S_diag, axis=-1))) / damp
            lam_lo = np.max(S_diag, axis=-1)
            if _capacitance.is_imprecise(hi, eps=_capacitance.EPS64, dense=True):
                # The lower bound decides the operator's only use of it, the warning that
                # float64 has no digit left: sharpened by power iterations only where the
                # upper bound leaves that open (from two starting vectors, they cost about as
                # much as the factorisation).
                # NumPy's products here are the threads' only BLAS calls: at damp 1e-15,
                # m = 256, B = 128, d = 1e6 on two threads, 10-30 % more CPU, no stall.
                # Without S_b's columns (a product of factors, O(s^3) a block: 12x the
                # set-up at m = 256, B = 128, d = 131072 on two threads) the second start is
                # _capacitance's fixed pseudo-random signs.
                Lt = np.swapaxes(L, -1, -2)
                power, _ = _capacitance.power_bounds(np, S_diag, lambda v: L @ (Lt @ v) - damp * v)
                lam_lo = np.maximum(lam_lo, power)
        blocks.invert(b0, b1)
        bounds.append((_capacitance.dense_kappa_lower(np, damp + lam_lo, L), hi))

    try:
        _run(chunk, spans, threads, s, progress)
    except _Failed:
        return None
    return max(lo for lo, _ in bounds), max(hi for _, hi in bounds)


def _threads(m: int, s: int, count: int, chunks: int) -> int:
    """Threads for ``count`` blocks: :func:`_fused.max_threads`, fewer for little work."""
    work = m * s * s * count  # the Gram's multiply-adds
    most = min(chunks, work // max(1, _MIN_THREAD_WORK))
    return max(1, min(_fused.max_threads(), most)) if most > 1 else 1


class _KernelBlocks:
    """Factors through the C extension (:func:`_fused.block_factors`), on any thread.

    ``factor(b0, b1)`` writes the factors of blocks ``b0 <= b < b1`` and returns their Grams'
    diagonals (``_Failed`` where one is not finite or a factorisation failed);
    ``invert(b0, b1)`` replaces the factors by their inverses.
    """

    def __init__(self, G: np.ndarray, group: BlockGroup, out: np.ndarray, damp: float) -> None:
        self.G, self.group, self.out, self.damp = G, group, out, damp

    def factor(self, b0: int, b1: int) -> np.ndarray:
        s = self.group.size
        S_diag = np.empty((b1 - b0, s))
        start = self.group.start + b0 * s
        scale = 1.0 / self.G.shape[0]
        done = _fused.block_factors(
            self.G, self.out[b0:b1], S_diag, start=start, scale=scale, damp=self.damp
        )
        if done < b1 - b0:
            raise _Failed
        return S_diag

    def invert(self, b0: int, b1: int) -> None:
        _fused.block_inverses(self.out[b0:b1])


class _LapackBlocks:
    """:class:`_KernelBlocks` through SciPy's LAPACK, block by block, on the calling thread."""

    def __init__(self, G: np.ndarray, group: BlockGroup, out: np.ndarray, damp: float) -> None:
        self.G, self.group, self.out, self.damp = G, group, out, damp
        self.buf = np.empty((G.shape[0], group.size), dtype=np.float64)

    def factor(self, b0: int, b1: int) -> np.ndarray:
        from scipy.linalg import blas, lapack

        G, s, out, buf = self.G, self.group.size, self.out, self.buf
        for b in range(b0, b1):
            c0 = self.group.start + b * s
            np.copyto(buf, G[:, c0 : c0 + s])
            blas.dsyrk(1.0 / G.shape[0], buf.T, beta=0.0, c=out[b].T, overwrite_c=1, lower=0)
        diag = np.reshape(out[b0:b1], (b1 - b0, s * s))[:, :: s + 1]  # a view of the diagonals
        S_diag = diag.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.all(np.isfinite(S_diag)):
                raise _Failed
            diag += self.damp
            for b in range(b0, b1):
                if lapack.dpotrf(out[b].T, lower=0, clean=1, overwrite_a=1)[1] != 0:
                    raise _Failed
            if not np.all(np.isfinite(diag)) or not np.all(diag > 0):
                raise _Failed
        return S_diag

    def invert(self, b0: int, b1: int) -> None:
        from scipy.linalg import lapack

        for b in range(b0, b1):
            if lapack.dtrtri(self.out[b].T, lower=0, overwrite_c=1)[1] != 0:
                raise _Failed


def _run(
    chunk: Callable[[int, int], None],
    spans: list[tuple[int, int]],
    threads: int,
    size: int,
    progress: Callable[[int], None] | None,
) -> None:
    """``chunk(b0, b1)`` for every span, on ``threads`` threads (this one included).

    Threads take the next span when they finish one (:func:`_fused.share`). ``progress`` is
    called on this thread only, after each of its chunks, with the columns of every chunk
    finished since its last call (and once at the end for the rest). The first error of any
    thread stops the others at their next span and is raised here, after they have stopped;
    any error other than ``_Failed`` comes first (a ``KeyboardInterrupt`` or a ``progress``
    error that one thread met after another thread's failed chunk must not send the group
    on to the general path, as a failed chunk does).
    """
    lock = threading.Lock()
    finished = [0]  # columns not yet reported

    def work(i: int, on_caller: bool) -> None:
        b0, b1 = spans[i]
        chunk(b0, b1)
        with lock:
            finished[0] += (b1 - b0) * size
            n, finished[0] = (finished[0], 0) if on_caller else (0, finished[0])
        if on_caller and progress is not None:
            progress(n)

    _fused.share(work, len(spans), threads, minor=(_Failed,))
    if finished[0] and progress is not None:
        progress(finished[0])
