"""A dynamic window's row writes and float16 casts through the C extension.

:func:`store_row` writes a gradient into a window's row (rounded to the row's storage),
saves the row as it was and widens it, in one read of the gradient; :func:`cast16` converts
between float32 and float16 with F16C. Both leave the work to the caller (and say so)
where the extension or the CPU cannot do it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._ext import STORAGES, best_isa, isa_code, passes

__all__ = ["cast16", "store_row", "stores"]


def cast16(src: np.ndarray, dst: np.ndarray, /) -> bool:
    """``dst[...] = src`` between float32 and float16 with F16C; whether it was done.

    The values are those of NumPy's cast (float16 to float32 exactly, float32 to float16
    rounded to nearest even, overflow to infinity), NaNs stay NaNs (a signalling one comes
    back quiet). NumPy converts float16 one item at a time in software, 10-20 times slower.
    False, with ``dst`` untouched, unless both are 1-D, C-ordered, aligned NumPy arrays of
    one length, one float32 and the other float16, the extension built and the CPU with
    F16C (or an extension built before it had this kernel): the caller then assigns.
    """
    kernel = getattr(passes, "cast16", None)
    if kernel is None or not (
        isinstance(src, np.ndarray)
        and isinstance(dst, np.ndarray)
        and src.ndim == dst.ndim == 1
        and src.shape == dst.shape
        and {src.dtype, dst.dtype} == {np.dtype(np.float32), np.dtype(np.float16)}
        and src.flags.c_contiguous
        and src.flags.aligned
        and dst.flags.c_contiguous
        and dst.flags.aligned
        and dst.flags.writeable
    ):
        return False
    narrow = dst.dtype == np.float16
    out = dst.view(np.uint16) if narrow else dst
    source = src if narrow else src.view(np.uint16)
    return bool(kernel(source, out, src.shape[0], narrow))


def _checked_row(A: Any, name: str, n: int, dtypes: tuple[np.dtype, ...]) -> np.ndarray:
    """``A`` checked as a 1-D, C-ordered, aligned, writable NumPy array of ``n`` items."""
    if not isinstance(A, np.ndarray) or A.dtype not in dtypes:
        raise TypeError(
            f"{name} must be a NumPy array of {' or '.join(str(d) for d in dtypes)}, got "
            f"{getattr(A, 'dtype', type(A).__name__)}"
        )
    if A.shape != (n,) or not (A.flags.c_contiguous and A.flags.aligned and A.flags.writeable):
        raise ValueError(
            f"{name} must be 1-D of length {n}, C-ordered, aligned and writable, got shape "
            f"{A.shape}"
        )
    return A


def stores(storage: str | None) -> bool:
    """Whether :func:`store_row` writes rows of ``storage`` (None: float32) here, fastest ISA."""
    if passes is None or not hasattr(passes, "store_row"):
        return False
    return storage != "float16" or best_isa() != "base"


def store_row(
    src: np.ndarray,
    dst: np.ndarray | None = None,
    /,
    *,
    old: np.ndarray | None = None,
    wide: np.ndarray | None = None,
    copy: np.ndarray | None = None,
    storage: str | None = None,
    isa: str | None = None,
) -> float | None:
    """A window's row write in one read of ``src``; returns ``max |src|`` (NaN if it holds one).

    In one loop over the float32 vector ``src``, each optional: ``old[...] = dst`` (the row as
    it was), ``dst[...] = src`` rounded to the row's storage (float32 copied; bfloat16 to
    nearest even, as PyTorch rounds; float16 with F16C, as NumPy rounds), ``wide[...] = dst``
    widened to float32, ``copy[...] = src``. The largest magnitude is exact (from the items'
    bits), the value :func:`numpy.max` of ``abs(src)`` gives, +0.0 for zeros.

    Parameters
    ----------
    src : numpy.ndarray
        1-D float32, C-ordered and aligned.
    dst : numpy.ndarray, optional
        The row: float32, float16, or uint16 holding bfloat16 or float16 bits (``storage``
        names which; float16 may be named or not).
    old : numpy.ndarray, optional
        A dtype of the row's item size; gets the row's bits as they were (needs ``dst``).
    wide, copy : numpy.ndarray, optional
        float32; get the row written, widened, and ``src``.
    storage : {"float32", "float16", "bfloat16"}, optional
        The row's storage; None: from ``dst``'s dtype.
    isa : str, optional
        An instruction set of :data:`ISAS` (tests); None: the fastest.

    Returns
    -------
    float or None
        ``max |src|``; None, with nothing written, where the extension is missing or a
        float16 row would need F16C that this CPU (or ``isa="base"``) lacks.
    """
    if passes is None or not hasattr(passes, "store_row"):
        return None
    if not isinstance(src, np.ndarray) or src.dtype != np.float32 or src.ndim != 1:
        raise TypeError(
            f"src must be a 1-D NumPy float32 array, got {getattr(src, 'dtype', src)!r}"
        )
    if not (src.flags.c_contiguous and src.flags.aligned):
        raise ValueError("src must be C-ordered and aligned")
    n = src.shape[0]
    names = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
    if dst is None:
        if old is not None:
            raise ValueError("old needs dst")
        name = "float32"
    else:
        row_dtypes = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))
        _checked_row(dst, "dst", n, row_dtypes)
        own = names.get(dst.dtype)
        if storage is not None and storage not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"storage must be 'float32', 'float16', 'bfloat16' or None, got {storage!r}"
            )
        if own is None and storage not in ("float16", "bfloat16"):
            raise TypeError("a uint16 dst needs storage='float16' or 'bfloat16'")
        if own is not None and storage not in (None, own):
            raise TypeError(f"dst's dtype {dst.dtype} does not match storage={storage!r}")
        name = str(own if storage is None else storage)  # own is None only with storage
        if old is not None:  # any dtype of the row's item size: its bits are copied
            _checked_row(old, "old", n, tuple(d for d in row_dtypes if d.itemsize == dst.itemsize))
    for buf, label in ((wide, "wide"), (copy, "copy")):
        if buf is not None:
            _checked_row(buf, label, n, (np.dtype(np.float32),))
    value = passes.store_row(src, dst, old, wide, copy, n, STORAGES[name], isa_code(isa))
    return None if value is None else float(value)
