"""The pass engine's CPU kernels: the optional C extension and its threads.

:func:`project64` and :func:`combine64` (and their block-wise forms) are the passes of
exact products: they read ``G`` in its storage dtype (float32, float64, float16 or
bfloat16, the last also as the uint16 bits of a PyTorch tensor) and do every product and
sum in float64, at about the speed of a GEMV in the storage dtype; up to eight vectors (or
rows of coefficients, as for the K dampings of a sweep) share one read of ``G``. NumPy's own
routes to the same sums need a float64 copy of ``G``. ``G`` is C-ordered, or Fortran-ordered
(read as its transpose: with one vector its rows in place, float64 sums in another order; with
several in tiles, the same sums in the same order, the same bits). This
module checks the arguments and splits the columns over threads; ``_engine`` decides when
the kernels serve. Where the extension was not built (:func:`available` is false) the
engine uses float64 products over column pieces instead; both are tested against each other
and against exact oracles.

:func:`block_factors` and :func:`block_inverses` are the host set-up of dense blocks
(``_dense_blocks``): each block's float64 Gram from G in its storage dtype, its Cholesky
factor and the factor's inverse, on the calling thread alone (the caller runs chunks of
blocks on threads of its own).

The extension is loaded in :mod:`._ext` (with the instruction sets' and storages' codes);
a dynamic window's row writes and the float16 casts (:func:`store_row`, :func:`cast16`)
live in :mod:`._rows`; both are re-exported here, the one name the rest of the package
imports.

Threads: the kernels release the GIL, and a call on more than ``_MIN_THREAD_WORK``
entries of ``V`` shares its column pieces among up to :func:`max_threads` threads
(:mod:`._threads`: started per call, their count from ``MFAC_CORE_NUM_THREADS``, else the
variables OpenBLAS reads, else the CPUs this process may run on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._summation import sum_in_pairs
from ._ext import ISAS, STORAGES, available, best_isa
from ._ext import isa_code as _isa_code
from ._ext import passes as _passes
from ._rows import cast16, store_row, stores
from ._threads import max_threads, share

__all__ = [
    "ISAS",
    "STORAGES",
    "available",
    "best_isa",
    "block_factors",
    "block_inverses",
    "cast16",
    "combine64",
    "combine64_blocks",
    "max_threads",
    "project64",
    "project64_blocks",
    "rows_gram64",
    "share",
    "store_row",
    "stores",
    "supports64",
    "supports_blocks",
]

#: Entries of V per thread below which fewer threads are used (starting a thread costs about
#: 50 us; a pass over 2**20 float32 entries takes about 100 us).
_MIN_THREAD_WORK = 2**20

#: Entries of V in one piece of work that a thread takes (8 MiB of float32).
_PIECE_WORK = 2**21

#: Pieces start at multiples of this many columns (whole vector tiles).
_ALIGN = 64

#: Multiply-adds (m * m a column) of one piece of :func:`rows_gram64`'s work: 2**24 take
#: about 1 ms on one core, and starting a thread about 50 us.
_MIN_GRAM_WORK = 2**24

#: The most pieces of one :func:`rows_gram64` call: each sums into an m x m buffer of its
#: own (32 of them: 16 MiB at m = 256), and they are added up in order.
_GRAM_MAX_PIECES = 32

#: Whether this CPU runs AVX-512 as two 256-bit halves (AMD Zen 4): see :func:`_auto_isa`.
#: False with an extension built before it had the test (the widest ISA then serves, as
#: before): such a build imports, as for cast16 and store_row.
_AVX512_HALVES = bool(getattr(_passes, "avx512_halves", lambda: False)())


def _auto_isa(code: int, code_st: int, kk: int, *, combine: bool) -> int:
    """The instruction set of one kernel call: ``code``, or for ``isa=None`` (0) the fastest.

    That is the widest the CPU has, except on a core that runs AVX-512 as two 256-bit halves
    (:data:`_AVX512_HALVES`). There the 512-bit registers add no FMAs, and the AVX2 kernels
    are faster where FMAs rather than memory set the pace: :func:`combine64` with more than
    four rows of coefficients over float32 rows (1.04-1.1x faster at eight) and
    :func:`project64` over 2-byte rows with one vector (bfloat16 1.07-1.1x, float16 1.0-1.03x),
    three (1.04-1.1x) or more (1.13-1.22x); with two, the AVX-512 kernel is 1.2x the faster.
    One Zen 4 core: benchmarks/results/isa_choice-cpu-zen4-2026-12-06.txt and
    combine_prefetch-cpu-zen4-2026-12-06.txt. Since combine64 fetches rows it reads in place
    into L2, fewer rows over float32 rows, and float64 rows, run as fast in either ISA
    (within 0.93-1.07x).
    Either ISA sums in float64; they may round differently.
    """
    if code != 0 or not _AVX512_HALVES:
        return code
    fma_bound = kk > 4 and code_st == 0 if combine else kk != 2 and code_st >= 2
    return ISAS["avx2"] if fma_bound else code


def _pieces(m: int, n: int) -> list[tuple[int, int]]:
    """Column ranges of ``[0, n)`` of about ``_PIECE_WORK`` entries of V each, smaller last.

    They depend on the shape only, so that sums over pieces are the same whatever the
    thread count and the timing. The last two pieces' columns go in quarters: the thread
    that finishes first then waits for at most a quarter piece at the end of the call, where
    it waited 0.13-0.39 ms for a whole one (two threads, m = 64, d = 1e6, float32: a pass
    takes 8-11 ms); on one thread the six more calls cost about 15 us.
    """
    width = max(_ALIGN, -(-_PIECE_WORK // (m * _ALIGN)) * _ALIGN)
    tail = max(_ALIGN, width // 4 // _ALIGN * _ALIGN)
    pieces, lo = [], 0
    while n - lo > 2 * width:
        pieces.append((lo, lo + width))
        lo += width
    pieces.extend((j, min(j + tail, n)) for j in range(lo, n, tail))
    return pieces or [(0, 0)]


def _run(call: Callable[[int, int, int], None], m: int, n: int) -> int:
    """``call(j0, j1, p)`` for every piece ``p`` (``_pieces``); the number of pieces."""
    pieces = _pieces(m, n)
    if len(pieces) == 1:  # no other thread could take work: no team, no closure per piece
        call(*pieces[0], 0)
        return 1
    # The environment is read only where a second thread could take work.
    most = min(len(pieces), (m * n) // _MIN_THREAD_WORK)
    _share(call, pieces, max(1, min(max_threads(), most)) if most > 1 else 1)
    return len(pieces)


def _share(
    call: Callable[[int, int, int], None], pieces: list[tuple[int, int]], threads: int
) -> None:
    """``call(j0, j1, p)`` for every piece ``p``, on ``threads`` threads (``_threads.share``)."""
    share(lambda p, _: call(*pieces[p], p), len(pieces), threads)


def _check_out(out: Any, name: str, shape: tuple[int, ...] | int) -> None:
    """Refuse ``out`` unless it is a C-ordered, aligned, writeable float64 array of ``shape``.

    ``shape`` is the exact shape, or (an int) the number of dimensions.
    """
    fits = isinstance(out, np.ndarray) and (
        out.shape == shape if isinstance(shape, tuple) else out.ndim == shape
    )
    if not (
        fits
        and out.dtype == np.float64
        and out.flags.c_contiguous
        and out.flags.aligned
        and out.flags.writeable
    ):
        want = str(shape) if isinstance(shape, tuple) else f"{shape}-D"
        raise TypeError(
            f"{name} must be a C-ordered, aligned, writeable {want} float64 NumPy array, got "
            f"{getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}"
        )


def rows_gram64(
    G: Any,
    out: np.ndarray,
    /,
    *,
    start: int,
    stop: int,
    storage: str | None = None,
    isa: str | None = None,
    threads: int | None = None,
) -> None:
    """``out[...] = X @ X.T`` for ``X = G[:, start:stop]``, every product and sum in float64.

    Parameters
    ----------
    G : numpy.ndarray
        (m, ld), as for :func:`project64`.
    out : numpy.ndarray
        (m, m) float64, C-ordered, aligned and writeable.
    start, stop : int
        The columns of G, ``0 <= start <= stop <= ld``.
    storage, isa : str, optional
        As for :func:`project64`.
    threads : int, optional
        The most threads (this one included); None: :func:`max_threads`.

    Notes
    -----
    The set-up's Gram, with no float64 copy of G: the kernel widens a few hundred columns
    at a time into the core's cache and sums their products in register tiles (a float64
    piece written to memory for ``dsyrk`` cost 20-25 % over it; benchmarks/RESULTS.md).
    The products of float32 and 2-byte items are exact in float64; the sums run in another
    order than BLAS's. The columns go in pieces that depend on the shape only (up to 32,
    of about 2**24 multiply-adds each), each its own Gram, summed in order: the bits are
    the same on any number of threads. ``out`` is exactly
    symmetric.
    """
    G, m, ld, code_st, trans = _check64(G, start, stop, storage)
    _check_out(out, "out", (m, m))
    most = _check_threads(threads)
    n = stop - start
    if m == 0 or n == 0:
        out[...] = 0.0
        return
    code = _isa_code(isa)
    pieces = _gram_pieces(m, n)
    parts = [out] + [np.empty((m, m)) for _ in pieces[1:]]
    threads = max(1, min(most, len(pieces)))

    def call(j0: int, j1: int, p: int) -> None:
        _passes.rows_gram64(G, ld, start, m, parts[p], j0, j1, code, code_st, trans)

    _share(call, pieces, threads)
    for part in parts[1:]:
        out += part


def _gram_pieces(m: int, n: int) -> list[tuple[int, int]]:
    """:func:`rows_gram64`'s column ranges of ``[0, n)``: about ``_MIN_GRAM_WORK``
    multiply-adds each (``m * m`` a column), at most ``_GRAM_MAX_PIECES`` (each has an
    m x m sum of its own), whole vector tiles; they depend on the shape only."""
    count = min(_GRAM_MAX_PIECES, max(1, (m * m * n) // _MIN_GRAM_WORK))
    width = -(-n // (count * _ALIGN)) * _ALIGN
    return [(lo, min(lo + width, n)) for lo in range(0, n, width)]


def _check_threads(threads: Any) -> int:
    """The most threads of a call: ``threads``, or :func:`max_threads` for None."""
    if threads is not None and (
        isinstance(threads, bool) or int(threads) != threads or threads < 1
    ):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return max_threads() if threads is None else int(threads)


# -- float64 sums over G in its storage dtype ----------------------------------------------


def _storage_of(dtype: np.dtype) -> str | None:
    """The storage name of a dtype that the float64 kernels read, else ``None``.

    bfloat16 is recognised by name (ml_dtypes' dtype), so that ml_dtypes is not needed; in
    the machine's byte order only (a byte-swapped bfloat16 has the name too).
    """
    native = _NATIVE_STORAGES.get(dtype)
    if native is not None:
        return native  # the common dtypes without ``dtype.name`` (a few microseconds)
    name = dtype.name
    if name == "bfloat16":
        return name if dtype.isnative else None
    if name in STORAGES and dtype == np.dtype(name):
        return name
    return None


#: The storage names of NumPy's own storage dtypes, in this machine's byte order.
_NATIVE_STORAGES = {np.dtype(name): name for name in ("float32", "float64", "float16")}


def supports64(G: Any, /, *, storage: str | None = None) -> bool:
    """Whether :func:`project64` and :func:`combine64` can read ``G`` in place.

    That is: the extension built, and ``G`` a 2-D C-ordered or Fortran-ordered (read as its
    transpose: :func:`_in_order`), aligned NumPy array of
    float32, float64, float16, or bfloat16 (ml_dtypes' bfloat16 dtype, i.e.
    ``G.dtype.name == "bfloat16"``). The uint16 bits of bfloat16 or float16 data are read
    too, but only with ``storage=`` named (their dtype does not say which).
    """
    if not _in_order(G):
        return False
    bits = storage in ("float16", "bfloat16") and G.dtype == np.uint16
    return bits or (storage in (None, _storage_of(G.dtype)) and _storage_of(G.dtype) is not None)


def _in_order(G: Any) -> bool:
    """Whether ``G`` is a 2-D NumPy array, C- or Fortran-ordered and aligned, in a build
    whose kernels read either order.

    A Fortran-ordered G (``Gt.T`` of a C-ordered (d, m) array, a ``.npy`` file saved from
    one) goes to the kernels as its transpose (C-ordered), with ``trans``: they read its rows
    (G's columns, one run of memory) in place for one vector, else a block of them into a tile
    transposed.
    """
    if _passes is None or not isinstance(G, np.ndarray) or G.ndim != 2 or not G.flags.aligned:
        return False
    return bool(G.flags.c_contiguous or (G.flags.f_contiguous and _TRANSPOSED))


#: Whether the extension reads Fortran-ordered G (False with an extension built before it
#: did: such a build imports, and a Fortran-ordered G keeps the engine's other route).
_TRANSPOSED = bool(getattr(_passes, "transposed", lambda: False)())


def _check64(G: Any, start: int, stop: int, storage: str | None) -> tuple[Any, int, int, int, bool]:
    """``(G's items as the kernels take them, m, ld, storage code, trans)`` after checking G.

    2-byte storage goes to the extension as uint16 (a buffer of ml_dtypes' bfloat16 may not
    export through the buffer protocol; its bits are the same). A Fortran-ordered G goes as
    its transpose, ``trans`` true (:func:`_in_order`).
    """
    if storage is not None and storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES)} or None, got {storage!r}")
    if not _in_order(G):
        raise TypeError(
            "G must be a 2-D C-ordered (or Fortran-ordered), aligned NumPy array, and the "
            f"extension built, got {type(G).__name__}"
        )
    own = _storage_of(G.dtype)
    bits = G.dtype == np.uint16 and storage in ("float16", "bfloat16")
    name = own if storage is None else storage
    if name is None or (own is None and not bits):
        raise TypeError(
            f"G's dtype {G.dtype} is not a storage dtype: float32, float64, float16, bfloat16, "
            "or uint16 with storage='float16' or 'bfloat16'"
        )
    if name != own and not bits:
        raise TypeError(f"G's dtype {G.dtype} does not match storage={storage!r}")
    m, ld = G.shape
    if not 0 <= start <= stop <= ld:
        raise ValueError(f"columns [{start}, {stop}) are not inside G's {ld}")
    trans = not G.flags.c_contiguous
    if trans:
        G = G.T
    if G.dtype.itemsize == 2:
        G = G.view(np.uint16)
    return G, m, ld, STORAGES[name], trans


def _result_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as float32 or float64 (None, which NumPy reads as float64, is refused)."""
    out_dt = None if dtype is None else np.dtype(dtype)
    if out_dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return out_dt


def _float_array(A: Any, name: str) -> np.ndarray:
    """``A`` as a NumPy array of a real floating dtype (bfloat16 included), else TypeError."""
    A = np.asarray(A)
    if A.dtype.kind != "f" and A.dtype.name != "bfloat16":
        raise TypeError(f"{name} must hold real floating-point numbers, got dtype {A.dtype}")
    return A


def _x_for_kernels(X: np.ndarray) -> np.ndarray:
    """X as the kernels read it: float32 or float64, C-ordered and aligned.

    float32 and float64 stay as they are; float16 and bfloat16 become float32 (exactly),
    longer floats float64.
    """
    if X.dtype in (np.float32, np.float64):
        if X.flags.c_contiguous and X.flags.aligned:
            return X  # what np.require returns for it, without its argument handling
        dt = X.dtype
    else:
        dt = np.dtype(np.float32) if X.dtype.itemsize < 4 else np.dtype(np.float64)
    return np.require(X, dt, ["C", "A"])


def project64(
    G: Any,
    X: Any,
    /,
    *,
    start: int,
    stop: int,
    storage: str | None = None,
    isa: str | None = None,
) -> np.ndarray:
    """``X @ G[:, start:stop].T`` accumulated in float64: (K, m) float64.

    Parameters
    ----------
    G : numpy.ndarray
        (m, ld), C- or Fortran-ordered and aligned, of float32, float64, float16 or
        bfloat16; or uint16 holding float16 or bfloat16 bits, with ``storage`` naming which.
    X : array_like
        (K, stop - start), any real floating dtype; its values are taken as float64 (exact
        for float32, float16 and bfloat16). A 1-D ``x`` is K = 1, and the result is then
        (m,).
    start, stop : int
        The columns of G, ``0 <= start <= stop <= ld``.
    storage : {"float32", "float64", "float16", "bfloat16"}, optional
        How G's items are stored; None: from ``G.dtype``.
    isa : str, optional
        An instruction set of :data:`ISAS` (tests); None: the fastest for the call (the
        widest, or AVX2 where a core runs AVX-512 as two halves and FMAs set the pace).

    Returns
    -------
    numpy.ndarray
        (K, m) float64, or (m,) for a 1-D ``x``.

    Notes
    -----
    G's items are converted to float64 as they are loaded; every product and sum is in
    float64, in levels: runs of 128 terms a lane from zero, chunks of 4096 columns, levels
    of 64 chunks, and the column pieces' partial sums added in pairs (the order fixed by
    the shape), so that sums of one sign and size do not round one way step after step.
    One read of G serves up to 8 vectors (groups of 8 past that). The result does not
    depend on the threads or their timing. It may depend, in the last bits, on how many vectors
    share the call where :func:`_auto_isa` picks the instruction set by the group's size
    (2-byte rows on a core with split AVX-512 units): both sum in float64.
    """
    G, m, ld, code_st, trans = _check64(G, start, stop, storage)
    n = stop - start
    X = _float_array(X, "X")
    one = X.ndim == 1
    X2 = X[None] if one else X
    if X2.ndim != 2 or X2.shape[1] != n:
        raise ValueError(f"X must have shape (K, {n}) or ({n},), got {X.shape}")
    K = X2.shape[0]
    out = np.zeros((K, m))
    if K > 0 and m > 0 and n > 0:
        Xk = _x_for_kernels(X2)
        code, x64 = _isa_code(isa), Xk.dtype == np.float64
        for k0 in range(0, K, 8):
            kk = min(8, K - k0)
            Xg = Xk[k0 : k0 + kk]
            partial = np.empty((len(_pieces(m, n)), kk, m))
            isa_k = _auto_isa(code, code_st, kk, combine=False)

            def call(
                j0: int,
                j1: int,
                p: int,
                Xg: Any = Xg,
                partial: Any = partial,
                kk: int = kk,
                isa_k: int = isa_k,
            ) -> None:
                _passes.project64(
                    G, ld, start, m, Xg, kk, x64, partial[p], n, j0, j1, isa_k, code_st, trans
                )

            _run(call, m, n)
            # The pieces in pairs: a few thousand pieces of 2**15 columns at m = 64,
            # d = 1e8, of one sign and size, added in order would lean one way.
            out[k0 : k0 + kk] = sum_in_pairs(partial)
    return out[0] if one else out


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
    isa: str | None = None,
) -> np.ndarray:
    """``alpha[:, None] * X + C @ G[:, start:stop]`` in float64, rounded once to ``dtype``.

    Parameters
    ----------
    G : numpy.ndarray
        (m, ld), as for :func:`project64`.
    C : array_like
        (K, m), real floating (taken as float64).
    alpha : array_like
        (K,), real floating (taken as float64).
    X : array_like
        (K, stop - start) float32 or float64 (float16 and bfloat16 are widened exactly), or
        (stop - start,): one row shared by all K.
    start, stop : int
        The columns of G, ``0 <= start <= stop <= ld``.
    dtype : numpy.float32 or numpy.float64
        The result's dtype.
    storage, isa : str, optional
        As for :func:`project64`.

    Returns
    -------
    numpy.ndarray
        (K, stop - start) of ``dtype``.

    Notes
    -----
    G's items are converted to float64 as they are loaded; every product and sum is in
    float64, and each result is rounded once, to ``dtype``. The m terms are summed first
    and ``alpha x`` added last, as ``apply`` does (starting from ``alpha x``, in a sweep
    much larger than the sum, would round every partial sum at its size). One read of G
    serves up to 8 rows of C (groups of 8, zero-padded, past that). Each result is summed
    in the same order whatever the threads. A float32 result beyond float32's range is
    infinity, and reported (``_finite.note_float32_overflow``: a ``RuntimeWarning``, once
    per call) from the flag the kernels' rounding raises, at no cost to the passes.
    """
    G, m, ld, code_st, trans = _check64(G, start, stop, storage)
    n = stop - start
    out_dt = _result_dtype(dtype)
    C = _float_array(C, "C").astype(np.float64, copy=False)
    alpha = _float_array(alpha, "alpha").astype(np.float64, copy=False)
    X = _float_array(X, "X")
    if C.ndim != 2 or C.shape[1] != m:
        raise ValueError(f"C must have shape (K, {m}), got {C.shape}")
    K = C.shape[0]
    if alpha.shape != (K,):
        raise ValueError(f"alpha must have shape ({K},), got {alpha.shape}")
    shared = X.ndim == 1
    if X.shape != ((n,) if shared else (K, n)):
        raise ValueError(f"X must have shape ({K}, {n}) or ({n},), got {X.shape}")
    Y = np.empty((K, n), dtype=out_dt)
    if K == 0 or n == 0:
        return Y
    if m == 0:
        Y[...] = _narrowed(alpha[:, None] * X.astype(np.float64), out_dt)
        return Y
    Xk = _x_for_kernels(X)
    code, x64, out64 = _isa_code(isa), Xk.dtype == np.float64, out_dt == np.float64
    overflowed = [False]  # any piece's; written by the threads, read after them
    for k0 in range(0, K, 8):
        kk = min(8, K - k0)
        Ct = np.zeros((m, 8))
        Ct[:, :kk] = C[k0 : k0 + kk].T
        a8 = np.zeros(8)
        a8[:kk] = alpha[k0 : k0 + kk]
        Xg = Xk if shared else Xk[k0 : k0 + kk]
        Yk = Y[k0 : k0 + kk]
        isa_k = _auto_isa(code, code_st, kk, combine=True)

        def call(
            j0: int,
            j1: int,
            p: int,
            Ct: Any = Ct,
            a8: Any = a8,
            Xg: Any = Xg,
            Yk: Any = Yk,
            kk: int = kk,
            isa_k: int = isa_k,
        ) -> None:
            if _passes.combine64(
                G, ld, start, m, Ct, kk, a8, Xg, shared, x64, Yk, out64, n, j0, j1, isa_k,
                code_st, trans,
            ):  # fmt: skip
                overflowed[0] = True

        _run(call, m, n)
    _report_overflow(overflowed[0], out64)
    return Y


def _report_overflow(overflowed: bool, out64: bool) -> None:
    """Report a float32 result beyond float32's range, on the calling thread.

    ``overflowed``: a kernel raised the overflow flag (``_passes.c``, combine64). For
    float32 results that is a result stored as infinity; float64 results overflow only
    where their float64 sums do, which is not this report's (NumPy's float64 products
    do not say it either).
    """
    if overflowed and not out64:
        from .._finite import note_float32_overflow  # here: the module also loads alone

        note_float32_overflow()


def _narrowed(Y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``Y`` rounded to ``dtype``, a float32 result beyond float32's range reported."""
    from .._finite import narrowed

    return np.asarray(narrowed(np, Y, dtype))


def project64_blocks(
    G: Any,
    X: Any,
    /,
    *,
    start: int,
    block_size: int,
    storage: str | None = None,
    isa: str | None = None,
) -> np.ndarray:
    """:func:`project64` of each of ``count`` consecutive blocks of ``block_size`` columns.

    ``X`` is (count, K, block_size); returns (count, K, m) float64, block b's
    ``X[b] @ G[:, start + b s : start + (b + 1) s].T``. One call for all the blocks:
    a block-wise operator with many narrow blocks pays the wrapper's checks once, and
    the blocks are shared among the threads (each block's sums are the same whatever the
    threads).
    """
    X = _float_array(X, "X")
    s = int(block_size)
    if X.ndim != 3 or X.shape[2] != s or s < 1:
        raise ValueError(f"X must have shape (count, K, {block_size}), got {X.shape}")
    count, K = X.shape[0], X.shape[1]
    G, m, ld, code_st, trans = _check64(G, start, start + count * s, storage)
    out = np.zeros((count, K, m))
    if count == 0 or K == 0 or m == 0:
        return out
    Xk = _x_for_kernels(X)
    code, x64 = _isa_code(isa), Xk.dtype == np.float64

    def call(b0: int, b1: int, p: int) -> None:
        for b in range(b0, b1):
            for k0 in range(0, K, 8):
                kk = min(8, K - k0)
                _passes.project64(
                    G, ld, start + b * s, m, Xk[b, k0 : k0 + kk], kk, x64,
                    out[b, k0 : k0 + kk], s, 0, s,
                    _auto_isa(code, code_st, kk, combine=False), code_st, trans,
                )  # fmt: skip

    _run(call, m * s, count)
    return out


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
    isa: str | None = None,
) -> np.ndarray:
    """:func:`combine64` of each of ``count`` consecutive blocks of ``block_size`` columns.

    ``C`` is (count, K, m) float64 (each block's coefficients), ``alpha`` (K,), ``X``
    (count, K, block_size); returns (count, K, block_size) of ``dtype``: block b's
    ``alpha[:, None] * X[b] + C[b] @ G[:, start + b s : start + (b + 1) s]``, every sum in
    float64 and rounded once. One call for all the blocks, as :func:`project64_blocks`.
    """
    out_dt = _result_dtype(dtype)
    X = _float_array(X, "X")
    C = _float_array(C, "C").astype(np.float64, copy=False)
    alpha = _float_array(alpha, "alpha").astype(np.float64, copy=False)
    s = int(block_size)
    if X.ndim != 3 or X.shape[2] != s or s < 1:
        raise ValueError(f"X must have shape (count, K, {block_size}), got {X.shape}")
    count, K = X.shape[0], X.shape[1]
    G, m, ld, code_st, trans = _check64(G, start, start + count * s, storage)
    if C.shape != (count, K, m):
        raise ValueError(f"C must have shape ({count}, {K}, {m}), got {C.shape}")
    if alpha.shape != (K,):
        raise ValueError(f"alpha must have shape ({K},), got {alpha.shape}")
    Y = np.empty((count, K, s), dtype=out_dt)
    if count == 0 or K == 0:
        return Y
    if m == 0:
        Y[...] = _narrowed(alpha[:, None] * X.astype(np.float64), out_dt)
        return Y
    Xk = _x_for_kernels(X)
    code, x64, out64 = _isa_code(isa), Xk.dtype == np.float64, out_dt == np.float64
    groups = []
    for k0 in range(0, K, 8):
        kk = min(8, K - k0)
        Ct = np.zeros((count, m, 8))
        Ct[:, :, :kk] = np.transpose(C[:, k0 : k0 + kk, :], (0, 2, 1))
        a8 = np.zeros(8)
        a8[:kk] = alpha[k0 : k0 + kk]
        groups.append((k0, kk, Ct, a8, _auto_isa(code, code_st, kk, combine=True)))

    overflowed = [False]

    def call(b0: int, b1: int, p: int) -> None:
        for b in range(b0, b1):
            for k0, kk, Ct, a8, isa_k in groups:
                if _passes.combine64(
                    G, ld, start + b * s, m, Ct[b], kk, a8, Xk[b, k0 : k0 + kk], False, x64,
                    Y[b, k0 : k0 + kk], out64, s, 0, s, isa_k, code_st, trans,
                ):  # fmt: skip
                    overflowed[0] = True

    _run(call, m * s, count)
    _report_overflow(overflowed[0], out64)
    return Y


# -- dense blocks: Gram, Cholesky factor and its inverse, one thread -------------------------


#: Whether the extension has the dense blocks' kernels (False with one built before it did:
#: such a build imports, and the dense blocks keep LAPACK).
_BLOCKS = hasattr(_passes, "block_factors")


def supports_blocks(G: Any, /) -> bool:
    """Whether :func:`block_factors` reads ``G`` (as :func:`supports64`, with its kernels built)."""
    return _BLOCKS and supports64(G)


def block_factors(
    G: Any,
    out: np.ndarray,
    diag: np.ndarray,
    /,
    *,
    start: int,
    scale: float,
    damp: float,
    isa: str | None = None,
) -> int:
    """The lower Cholesky factor of ``damp I + scale G_b^T G_b`` of each block into ``out[b]``.

    Parameters
    ----------
    G : numpy.ndarray
        (m, ld), as for :func:`project64`.
    out : numpy.ndarray
        (count, s, s) float64, C-ordered: block ``b``'s factor ``L_b`` (row-major, zeros above
        the diagonal), for the columns ``start + b s`` to ``start + (b + 1) s`` of G
        (``1 <= s <= m``).
    diag : numpy.ndarray
        (count, s) float64, C-ordered: the diagonal of each ``scale G_b^T G_b``.
    start : int
        G's first column.
    scale, damp : float
        The Gram's factor and the shift.
    isa : str, optional
        As for :func:`project64`.

    Returns
    -------
    int
        The number of blocks done: ``count``, or the first block whose Gram has a diagonal
        entry that is not finite or whose factorisation met a pivot that is not positive
        (later blocks untouched).

    Notes
    -----
    G's items are converted to float64 (exactly); every product and sum is in float64. The
    Gram's upper triangle is summed in register tiles (narrow blocks, up to 15 columns with
    AVX2 or AVX-512 and 7 otherwise: 64 columns at a time, by column offset), the factor
    computed right-looking (``_blocks_impl.h``). Runs on the calling thread, without the GIL.
    """
    _check_out(out, "out", 3)
    _check_out(diag, "diag", 2)
    count, s = out.shape[0], out.shape[1]
    if out.shape[2] != s or diag.shape != (count, s) or s < 1:
        raise ValueError(
            f"out must be (count, s, s) and diag (count, s), got {out.shape} and {diag.shape}"
        )
    G, m, ld, code_st, trans = _check64(G, start, start + count * s, None)
    if s > m:
        raise ValueError(f"blocks of {s} columns are wider than G's {m} rows")
    code = _isa_code(isa)
    done = _passes.block_factors(
        G, ld, start, m, s, count, out, diag, float(scale), float(damp), code, code_st, trans
    )
    return int(done)


def block_inverses(out: np.ndarray, /, *, isa: str | None = None) -> None:
    """Each lower triangular ``out[b]`` (zeros above the diagonal) replaced by its inverse.

    ``out`` is (count, s, s) float64, C-ordered, as :func:`block_factors` writes it; sums in
    float64, row by row (``_blocks_impl.h``), on the calling thread, without the GIL.
    """
    _check_out(out, "out", 3)
    count, s = out.shape[0], out.shape[1]
    if out.shape[2] != s:
        raise ValueError(f"out must be (count, s, s), got {out.shape}")
    if count and s:
        _passes.block_inverses(out, s, count, _isa_code(isa))
