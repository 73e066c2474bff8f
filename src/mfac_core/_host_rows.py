"""A host window's row through the C extension: one read of the gradient, on this thread.

DynamicIHVP's step writes a gradient into a row of its window (rounded, for 2-byte
storage), keeps the row it replaces for the undo, widens the row for the pass and
checks the gradient's values; PyTorch's copies and reductions did this over d on its
intra-op threads, which then spun on the cores the passes' threads wanted. Here the
extension's ``store_row`` does it in one loop on the calling thread, for NumPy arrays and
PyTorch CPU tensors that the kernels read in place (``_engine.host_view``); elsewhere
the callers keep their array-library path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _engine, _fused
from ._compat import Array

__all__ = ["all_finite", "host_row_views", "store_row"]


def host_row_views(xp: Any, G: Array, g: Array) -> tuple[np.ndarray, np.ndarray, str] | None:
    """NumPy views of a host window's buffer ``G`` and float32 gradient ``g``, and G's storage.

    For ``_fused.store_row``, which writes a row and reads the gradient in one loop on the
    calling thread: where the kernels read ``G`` (float32 or 2-byte, NumPy or PyTorch CPU)
    and ``g`` is a contiguous float32 vector; None elsewhere. PyTorch's own copies and
    reductions over ``g`` run on its intra-op threads, which then spin on the cores the
    passes' threads want.
    """
    host = _engine.host_view(xp, G)
    if host is None:
        return None
    view, storage = host
    name = storage or view.dtype.name
    gv = _engine.vector_view(xp, g)
    if (
        gv is None
        or gv.dtype != np.float32
        or gv.ndim != 1
        or not (gv.flags.c_contiguous and gv.flags.aligned)
        or view.ndim != 2
        or not view.flags.writeable
        or not _fused.stores(name)
    ):
        return None
    return view, gv, name


def store_row(src: np.ndarray, dst: np.ndarray, /, **buffers: Any) -> float | None:
    """``_fused.store_row``: a row written, saved and widened in one read of ``src``."""
    return _fused.store_row(src, dst, **buffers)


def all_finite(xp: Any, s: Array) -> Array:
    """Whether ``s`` holds no NaN or infinity, as a 0-d array of ``xp`` (bool).

    A float32 host vector is read once by the extension on this thread (``max |s|`` is
    finite exactly when every item is), not by PyTorch's intra-op threads.
    """
    view = None if _engine.is_accelerator(xp, s) else _engine.vector_view(xp, s)
    if view is not None and view.dtype == np.float32 and view.ndim == 1:
        if view.flags.c_contiguous and view.flags.aligned and _fused.stores(None):
            biggest = _fused.store_row(view)
            if biggest is not None:
                return xp.asarray(bool(np.isfinite(biggest)))
    return xp.all(xp.isfinite(s))
