"""A host window's row through the C extension: one read of the gradient, on this thread.

DynamicIHVP's step writes a gradient into a row of its window (rounded, for 2-byte
storage), keeps the row it replaces for the undo, widens the row for the pass and
checks the gradient's values; PyTorch's copies and reductions did this over d on its
intra-op threads, which then spun on the cores the passes' threads wanted. Here the
extension's ``store_row`` does it in one loop on the calling thread, for NumPy arrays and
PyTorch CPU tensors that the kernels read in place (``_engine.host_view``); elsewhere
the callers keep their array-library path.

The window's own buffer is allocated here too (:func:`zeros`): for PyTorch CPU windows
through NumPy, whose allocator asks Linux for transparent huge pages where PyTorch's does
not; the passes stream the whole buffer twice a step, and with 4 KiB pages they ran 4-11 %
slower (float32, d = 1e6, one and two threads). Deep copies and unpickled windows get
their buffers the same way (:func:`copied`, :func:`rehomed`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _engine, _fused, _pieces
from ._compat import Array, is_finite_array, is_torch_namespace

__all__ = ["all_finite", "copied", "host_row_views", "rehomed", "store_row", "zeros"]


def zeros(xp: Any, shape: tuple[int, ...], /, *, dtype: Any, device: Any = None) -> Array:
    """``xp.zeros(shape, dtype=dtype, device=device)``, for a buffer the passes stream over.

    A PyTorch CPU tensor of a dtype NumPy stores (bfloat16 as uint16 bits) is a view of a
    NumPy array (``torch.from_numpy``): NumPy asks the kernel for transparent huge pages for
    large arrays (Linux, where the user has not turned it off), and the two reads of the
    buffer per step then miss the TLB less. Every other library, device and dtype gets
    ``xp.zeros``. The values, dtype and device are the same either way.
    """
    if is_torch_namespace(xp):
        import torch

        probe = torch.empty((0,), dtype=dtype, device=device)
        bits = _numpy_bits(probe)
        if bits is not None:
            host = torch.from_numpy(np.zeros(shape, dtype=bits))
            return host.view(probe.dtype) if probe.dtype == torch.bfloat16 else host
    return xp.zeros(shape, dtype=dtype, device=device)


def _numpy_bits(t: Any) -> type[np.generic] | None:
    """The NumPy dtype of a PyTorch tensor's bits where :func:`zeros` allocates it in NumPy."""
    import torch

    bits: dict[Any, type[np.generic]] = {torch.float32: np.float32, torch.float64: np.float64}
    bits.update({torch.float16: np.float16, torch.bfloat16: np.uint16})
    return bits.get(t.dtype) if t.device.type == "cpu" else None


def copied(xp: Any, A: Array, /) -> Array:
    """A copy of ``A`` in memory allocated as :func:`zeros` allocates a buffer of its kind.

    For the copies of a window's buffer (``copy.deepcopy``): PyTorch's own copy of a
    tensor over NumPy memory is over PyTorch's, without the huge pages.
    """
    out = zeros(xp, tuple(A.shape), dtype=A.dtype, device=getattr(A, "device", None))
    out[...] = A
    return out


def rehomed(xp: Any, A: Array, /) -> Array:
    """``A``, or a copy of it in NumPy memory where :func:`zeros` would put such a buffer.

    For an unpickled window's buffer: pickle rebuilds a PyTorch tensor in PyTorch's
    memory; every other array (NumPy's own, a GPU tensor) is kept as it came.
    """
    if is_torch_namespace(xp) and _numpy_bits(A) is not None:
        return copied(xp, A)
    return A


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
        or not view.flags.c_contiguous  # a row of a Fortran-ordered G is strided
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
    if _pieces.is_accelerator(xp, s):
        return xp.all(xp.isfinite(s))  # no host sync here: the caller's one transfer reads it
    view = _engine.vector_view(xp, s)
    if view is not None and view.dtype == np.float32 and view.ndim == 1:
        if view.flags.c_contiguous and view.flags.aligned and _fused.stores(None):
            biggest = _fused.store_row(view)
            if biggest is not None:
                return xp.asarray(bool(np.isfinite(biggest)))
    # A host array is read now anyway: the shared check (one reduction for a torch tensor).
    return xp.asarray(is_finite_array(xp, s))
