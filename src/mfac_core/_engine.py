"""The pass engine: the O(d m) passes over the stored gradients, summed in float64.

Every product of the operators that keep their gradients (the *G-form*) is

    P = G X                   (float64, m x k: the projection)
    Y = alpha (X - G^T A)     (A = C^{-1} P in float64; Y rounded once to the result dtype)

and both passes read G in its storage dtype (float32, float64, float16, bfloat16) and
accumulate in float64 (docs/mathematics.rst, "Exact passes"). Products of float32 (or
2-byte) values are exact in float64, so the sums lose nothing to the cancellation in
``X - G^T A`` that a float32 sum suffers for vectors near the gradients' span.

Where the data allow, the passes run in kernels that read G once, in place: the
optional C extension (``_fused``), at the speed of a single-precision GEMV, for C-ordered
NumPy arrays and PyTorch CPU tensors (through a NumPy view, no copy) of float32 or 2-byte
storage, and Fortran-ordered ones (``Gt.T``: ``Gt``'s rows read in place for one vector,
transposed in cache-sized tiles for several, the same bits as C-ordered there); and the
CUDA kernels of ``_kernels`` (``passes.cu``) for C-ordered CuPy arrays of float32 or
float16 storage and PyTorch CUDA tensors of float32, float16 or bfloat16
storage (through zero-copy DLPack views, on PyTorch's current stream; where CuPy is
installed), a launch or two per pass whatever d. Both kernel sets take the same
arguments, so each pass is written once over a *route* (``_Route``).
Everything else (float64 storage, which BLAS already sums in float64, and the other
libraries) runs through the library's own float64 products over column pieces of G,
cache-sized on the host and one bounded piece on a GPU (``_pieces``, which sizes every
float64 pass over G). Where the extension was not built, that fallback serves NumPy and
PyTorch too; it is as exact and slower, and says so once.

Every result rounded to float32 that leaves float32's range (infinity) is reported
(``_finite.note_float32_overflow``, said once per public call): by the C kernels' overflow
flag, by ``_finite.narrowed`` on the fallback; not on a GPU (docs/mathematics.rst,
"Results beyond float32's range"). A float64 result beyond float64's range is said by
the public call that returns it, from one sum of the result (``_finite``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from . import _fused, _pieces
from ._compat import (
    Array,
    device,
    forward_ad_active,
    has_tangent,
    is_cupy_namespace,
    is_legacy_batched,
    is_numpy_namespace,
    is_torch_namespace,
    is_writeable_array,
    tracks_derivatives,
)
from ._dtypes import is_numpy_bfloat16
from ._errors import user_stacklevel
from ._finite import (
    float32_overflow_once,
    narrowed,
    note_intermediate,
)
from ._gram import contract_columns
from ._layout import BlockGroup, piece_stack, pieces
from ._pass_derivatives import pass_functions

__all__ = [
    "as_library",
    "combine",
    "combine_blocks",
    "from_numpy",
    "gram_kernel",
    "host_view",
    "kernels_under_derivatives",
    "lift",
    "project",
    "project_blocks",
    "project_rows",
    "square_sums",
    "take_columns",
    "uses_kernels",
    "vector_view",
    "widened_for_derivatives",
]


#: The most rows (m) whose set-up Gram the C extension sums (:func:`gram_kernel`). Its
#: tiles add a chunk of a few hundred columns at a time into the m x m sums, which stay in
#: the core's cache up to about this m; past it BLAS's ``dsyrk`` on float64 pieces is the
#: faster, and the pieces' widening is a small part of its time (m/2 multiply-adds per
#: entry widened).
GRAM_KERNEL_MAX_ROWS = 256


def gram_kernel(xp: Any, G: Array) -> Callable[[int, int], Any] | None:
    """``gram(lo, hi)``: ``X @ X^T`` of ``X = G[:, lo:hi]`` in float64, in ``xp``; or None.

    The set-up's Gram pieces (``_layout.chunk_gram``), summed by the C extension
    (:func:`mfac_core._fused.rows_gram64`) from G in its storage dtype, with no float64 copy
    of G: the products are exact, the sums in float64, as ``xp.astype`` and ``@`` give them
    in another order. Serves float32 and 2-byte NumPy arrays and PyTorch CPU tensors that
    the kernels read in place, up to :data:`GRAM_KERNEL_MAX_ROWS` rows; float64 G (BLAS sums
    it in place), other arrays, and a build without the extension keep ``xp.astype`` and
    ``@`` (None).
    """
    if G.shape[0] > GRAM_KERNEL_MAX_ROWS or not _fused.available():
        return None
    host = host_view(xp, G)
    if host is None:
        return None
    view, storage = host
    m = view.shape[0]

    def gram(lo: int, hi: int) -> Any:
        out = np.empty((m, m))
        _fused.rows_gram64(view, out, start=lo, stop=hi, storage=storage)
        return as_library(xp, out)

    return gram


_warned_slow = False


def _warn_slow_once() -> None:
    global _warned_slow
    if not _warned_slow:
        _warned_slow = True
        warnings.warn(
            "mfac_core's C extension was not built (no C compiler at install time): the "
            "float64-accumulated passes over single-precision gradients run through "
            "float64 copies of column pieces instead, which is exact but about 2-3 times "
            "slower; reinstall with a C compiler for full speed",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def host_view(xp: Any, A: Array) -> tuple[np.ndarray, str | None] | None:
    """A NumPy view of ``A`` that the kernels can read, and its storage name, or None.

    Only single-precision and 2-byte storage go to the kernels: BLAS already sums
    float64 storage in float64, at full speed.
    """
    if _pieces.simulating():
        return None
    if isinstance(A, np.ndarray):
        if A.dtype == np.float64:
            return None
        view, storage = A, None
        # ml_dtypes' bfloat16: its bits, with the storage named, as PyTorch's bfloat16
        # goes (one in the other byte order stays as it is, which no kernel reads).
        if is_numpy_bfloat16(A.dtype):
            view, storage = A.view(np.uint16), "bfloat16"
    elif is_torch_namespace(xp):
        import torch

        # A tangent of forward mode rides without requires_grad; NumPy would drop it.
        if A.device.type != "cpu" or A.requires_grad or has_tangent(A):
            return None
        if A.dtype == torch.float64:
            return None
        if A.dtype not in (torch.bfloat16, torch.float32, torch.float16):
            return None
        try:
            # Tensors without plain storage (torch.func's wrappers, views with the
            # negative or conjugate bit) cannot be viewed: the library's own path.
            if A.dtype == torch.bfloat16:
                view, storage = A.view(torch.uint16).numpy(), "bfloat16"
            else:
                view, storage = A.numpy(), None
        except RuntimeError:
            return None
    else:
        return None
    if not _fused.available():
        _warn_slow_once()
        return None
    # C- or Fortran-ordered (``Gt.T``, a .npy file saved from one: read as its transpose).
    if not _fused.supports64(view, storage=storage):
        return None
    return view, storage


def vector_view(xp: Any, X: Array) -> np.ndarray | None:
    """``X`` (n, k) as a NumPy array of its values, or None (autograd, another device).

    Autograd includes forward mode: inside a dual level (``torch.autograd.forward_ad``)
    a tensor may carry a tangent without ``requires_grad``, which NumPy would drop.
    """
    if isinstance(X, np.ndarray):
        return X
    if (
        is_torch_namespace(xp)
        and X.device.type == "cpu"
        and not X.requires_grad
        and not forward_ad_active()
    ):
        if str(X.dtype) in ("torch.float32", "torch.float64"):
            try:
                return X.numpy()
            except RuntimeError:  # no plain storage (see host_view)
                return None
    return None


def _same(Y: Any) -> Any:
    return Y


class _Route(NamedTuple):
    """Where the passes run: the kernels' array module and functions, and the operands.

    ``mod`` is NumPy for the CPU kernels (``_fused``, over NumPy views) and CuPy for the
    CUDA ones (``_kernels``, over CuPy arrays: the caller's, or zero-copy views of
    PyTorch CUDA tensors); both kernel sets take the same arguments, so one body of
    code per pass serves both. The body runs inside ``scope()`` (for PyTorch tensors:
    their device and PyTorch's current stream, made CuPy's) and hands each result to
    ``back`` (the caller's library, no copy).
    """

    mod: Any
    passes: Any
    G: Any
    storage: str | None
    views: list[Any]
    scope: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    back: Callable[[Any], Any] = _same


def _kernel_operands(xp: Any, G: Array, *arrays: Array) -> _Route | None:
    """The route of the kernels for ``G`` and ``arrays``, or None where none can serve."""
    device_route = _device_route(xp, G, arrays)
    if device_route is not None:
        return device_route
    host = host_view(xp, G)
    if host is None:
        return None
    views = []
    for A in arrays:
        view = vector_view(xp, A)
        if view is None:
            return None
        views.append(view)
    torch_out = is_torch_namespace(xp) and not isinstance(arrays[0], np.ndarray)
    return _Route(np, _fused, host[0], host[1], views, back=from_numpy if torch_out else _same)


def from_numpy(Y: np.ndarray) -> Any:
    """A host kernel's result as a PyTorch CPU tensor (no copy)."""
    import torch

    return torch.from_numpy(Y)


_cuda_passes_state: dict[str, Any] = {}


def _cuda_passes(
    scope: Callable[[Any], contextlib.AbstractContextManager[Any]] | None = None,
) -> Any:
    """The CUDA passes of ``_kernels`` where they compile here, else None (said once).

    ``scope(cupy)``: where the first call's probe runs (the device and stream of the
    tensors it serves); by default CuPy's current device and stream.
    """
    if "passes" not in _cuda_passes_state:
        try:
            import cupy

            from . import _kernels

            # NVRTC compiles the module on the first launch: a tiny one, once per process,
            # so that a machine without NVRTC (a driver-only install) falls back at once.
            with contextlib.nullcontext() if scope is None else scope(cupy):
                probe = cupy.ones((1, 1), dtype=cupy.float32)
                _kernels.project64(probe, probe, start=0, stop=1)
            _cuda_passes_state["passes"] = _kernels
        except Exception as exc:  # no CuPy, no NVRTC, no device: the float64 pieces serve
            _cuda_passes_state["passes"] = None
            warnings.warn(
                "mfac_core's CUDA passes could not be compiled here "
                f"({type(exc).__name__}: {exc}); the float64-accumulated passes over CuPy "
                "arrays and PyTorch CUDA tensors run as float64 products over column pieces "
                "instead (exact, slower; PyTorch users get the kernels by installing CuPy, "
                "e.g. cupy-cuda12x[ctk])",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    return _cuda_passes_state["passes"]


def _device_route(xp: Any, G: Array, arrays: tuple[Array, ...]) -> _Route | None:
    """The CUDA route for CuPy arrays and PyTorch CUDA tensors of single-precision or
    2-byte storage, or None.

    float64 storage stays with cuBLAS, which sums float64 in float64 at full speed.
    """
    if is_torch_namespace(xp):
        return _torch_device_route(G, arrays)
    if not is_cupy_namespace(xp):
        return None
    if G.dtype not in (xp.float32, xp.float16) or not G.flags.c_contiguous:
        return None
    if any(A.dtype not in (xp.float32, xp.float64) for A in arrays):
        return None
    passes = _cuda_passes()
    if passes is None:
        return None
    import cupy

    return _Route(cupy, passes, G, None, list(arrays))


def _on_cuda(A: Any) -> bool:
    """Whether the PyTorch tensor ``A`` is a CUDA one (or stands for one in a test)."""
    return bool(A.device.type == "cuda") or _pieces.simulating()


def _torch_device_route(G: Array, arrays: tuple[Array, ...]) -> _Route | None:
    """The CUDA passes for PyTorch CUDA tensors, through zero-copy CuPy views, or None.

    G of float32, float16 or bfloat16 storage (CuPy has no bfloat16: its 16 bits go as
    uint16, ``storage="bfloat16"``), C-contiguous; the other operands float32 or
    float64, on G's device. Tensors that require grad keep the library's own
    (differentiable) route; so do tensors without plain storage, which DLPack refuses,
    and views with the negative bit, which it would export without their sign.
    The passes run on the tensors' device and on PyTorch's current stream, made CuPy's
    current one (``cupy.cuda.ExternalStream``): DLPack's exchange within one stream
    waits for nothing, and the launches queue behind the work that made the operands.
    Without CuPy (or NVRTC) the float64 pieces serve, as ``_cuda_passes`` says once.
    """
    import torch

    storages = {torch.float32: None, torch.float16: None, torch.bfloat16: "bfloat16"}
    if not all(isinstance(A, torch.Tensor) for A in (G, *arrays)):
        return None
    if not _on_cuda(G) or G.dtype not in storages or not G.is_contiguous():
        return None
    if any(A.dtype not in (torch.float32, torch.float64) for A in arrays):
        return None
    if any(A.requires_grad or A.device != G.device for A in (G, *arrays)):
        return None
    if any(A.is_neg() for A in (G, *arrays)):
        return None  # DLPack exports the stored values without the negative bit's sign
    if _pieces.simulating() and _pieces.simulated_passes() is None:
        return None  # a test of the route without CuPy
    stream = torch.cuda.current_stream(G.device).cuda_stream
    index = G.device.index

    def scope(cupy: Any) -> contextlib.AbstractContextManager[Any]:
        return _cupy_on(cupy, index, stream)

    passes = _pieces.simulated_passes() if _pieces.simulating() else _cuda_passes(scope)
    if passes is None:
        return None
    import cupy

    storage = storages[G.dtype]
    try:
        with scope(cupy):
            if storage is None:
                Gc = cupy.from_dlpack(G)
            else:  # a reinterpretation of the same bytes, in both libraries
                Gc = cupy.from_dlpack(G.view(torch.int16)).view(cupy.uint16)
            views = [cupy.from_dlpack(A) for A in arrays]
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None  # no plain storage (torch.func's wrappers)
    return _Route(
        cupy, passes, Gc, storage, views, scope=lambda: scope(cupy), back=torch.from_dlpack
    )


@contextlib.contextmanager
def _cupy_on(cupy: Any, index: int | None, stream: int) -> Iterator[None]:
    """CuPy's current device and stream: PyTorch's device ``index`` and its ``stream``."""
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream):
        yield


def assign_row(xp: Any, A: Array, index: int, values: Array) -> None:
    """``A[index, ...] = values``: through F16C where NumPy would cast float32 and float16.

    A 2-byte window writes each float32 gradient into a float16 row, and widens the row
    again for its pass; NumPy's casts, item by item in software, took a fifth of the step.
    """
    if is_numpy_namespace(xp) and isinstance(A, np.ndarray) and _fused.cast16(values, A[index]):
        return
    A[index, ...] = values


def take_columns(xp: Any, G: Array, idx: Array) -> Array:
    """``G[:, idx]``, reading only those columns of G.

    :func:`numpy.take` first makes a C-ordered copy of its whole input when that is not
    C-contiguous (a Fortran-ordered or sliced memmap: all of G read into memory for a
    few columns); NumPy's integer indexing gathers the columns in place.
    """
    if isinstance(G, np.ndarray):
        return G[:, idx]
    return xp.take(G, idx, axis=1)


def as_library(xp: Any, A: np.ndarray) -> Any:
    """A NumPy array as an array of ``xp`` (PyTorch: a CPU tensor over the same memory)."""
    return from_numpy(A) if is_torch_namespace(xp) else A


def uses_kernels(xp: Any, G: Array) -> bool:
    """Whether the passes over ``G`` run in the kernels (for benchmarks and tests)."""
    return _device_route(xp, G, ()) is not None or host_view(xp, G) is not None


def _alphas(mod: Any, alpha: float, k: int, dev: Any = None) -> Any:
    """``alpha`` for each of ``k`` columns, a float64 array of ``mod``."""
    if dev is None:
        return mod.full((k,), float(alpha), dtype=mod.float64)
    return mod.full((k,), float(alpha), dtype=mod.float64, device=dev)


def _f64(xp: Any, A: Array) -> Array:
    return A if A.dtype == xp.float64 else xp.astype(A, xp.float64)


def widened_for_derivatives(xp: Any, X: Array, /) -> Array:
    """``X`` in float64 where PyTorch takes derivatives through it, else ``X`` itself.

    Both passes widen ``X``, and autograd rounds each widening's float64 gradient to X's
    dtype on its own; for a vector near the gradients' span the two cancel (float32 G,
    kappa = 1e4: a gradient 4774 eps(float32) off, 0.3 where they meet in float64 and are
    rounded once). So the caller of both passes widens ``X`` once. Where no derivative is
    taken the kernels read ``X`` as it is (no float64 copy).
    """
    return _f64(xp, X) if tracks_derivatives(X) else X


def _over_rows(xp: Any, A: Array, B: Array) -> Array:
    """``A @ B`` summed over G's m rows (``G^T A``, ``C G``); where PyTorch takes
    derivatives, through ``contract_columns``: their derivatives (``G @ cotangent``) sum
    over the columns, which torch's ``matmul`` does in one running sum (10122 eps(float64)
    of the terms for gradients with a shared mean, against BLAS's 54)."""
    if tracks_derivatives(A) or tracks_derivatives(B):
        return contract_columns(xp, A, B)
    return A @ B


def _spans(xp: Any, G: Array, start: int, stop: int) -> Iterator[tuple[int, int]]:
    width = _pieces.piece_width(xp, G, G.shape[0])
    for c0 in range(start, stop, width):
        yield c0, min(c0 + width, stop)


def square_sums(xp: Any, G: Array, /) -> Array:
    """``sum_k G_kj^2`` of every column j of G, summed in float64: float64, shape ``(d,)``.

    A piece of columns at a time (:func:`_pieces.piece_width`), so that the float64
    temporary stays bounded; the squares of single-precision and 2-byte values are
    exact in float64, so only the sums round, in float64.
    """
    parts = []
    for c0, c1 in _spans(xp, G, 0, G.shape[1]):
        P = _f64(xp, G[:, c0:c1])
        parts.append(xp.sum(P * P, axis=0))
    if not parts:
        return xp.zeros((0,), dtype=xp.float64, device=device(G))
    return parts[0] if len(parts) == 1 else xp.concat(parts)


def project(
    xp: Any,
    G: Array,
    X: Array,
    *,
    start: int = 0,
    stop: int | None = None,
    constant_G: bool = True,
) -> Array:
    """``G[:, start:stop] @ X`` summed in float64: float64, shape ``(m, k)``.

    ``X`` is ``(stop - start, k)`` of any floating dtype (its values are exact in
    float64 when they come from float32 or a 2-byte dtype). ``constant_G``: as for
    :func:`kernels_under_derivatives`.
    """
    route = _kernel_operands(xp, G, X)
    if route is not None:
        with route.scope():
            (Xh,) = route.views
            P = _project_routed(route, route.mod.ascontiguousarray(Xh.T), start, stop)
            return route.back(route.mod.ascontiguousarray(P.T))
    if kernels_under_derivatives(xp, G, X, constant_G=constant_G):
        stop = G.shape[1] if stop is None else stop
        return pass_functions(project, combine)[0].apply(X, G, start, stop)
    return _project_pieces(xp, G, X, start, stop)


def kernels_under_derivatives(xp: Any, G: Array, *arrays: Array, constant_G: bool = True) -> bool:
    """Whether PyTorch takes derivatives through ``arrays`` (not through ``G``, a constant)
    of a pass that the host kernels can read G for: then an autograd Function of
    ``_pass_derivatives`` runs the kernels and states the derivatives as passes.

    Not for a G whose rows change while a graph may still hold it (``constant_G=False``: a
    window's, written through NumPy, which PyTorch's version counter does not see): the
    Functions read G when the gradient is taken, the pieces' route keeps float64 copies.
    Not for autograd's legacy batches either (no storage, no slicing rule)."""
    return (
        constant_G
        and is_torch_namespace(xp)
        and any(tracks_derivatives(A) for A in arrays)
        and not any(is_legacy_batched(A) for A in arrays)
        and not tracks_derivatives(G)
        and host_view(xp, G) is not None
    )


def project_rows(xp: Any, G: Array, rows: Array) -> Array:
    """``G @ rows^T`` summed in float64 for a few vectors in the rows of ``rows`` (``(k, d)``).

    The form the kernels read (one contiguous row per vector), so that a caller with
    separate vectors (the window's stored gradient and the new one) stacks them along
    a new first axis, not into the strided columns of a ``(d, k)`` array.
    """
    route = _kernel_operands(xp, G, rows)
    if route is not None:
        with route.scope():
            (Rh,) = route.views
            P = _project_routed(route, Rh, 0, G.shape[1])
            return route.back(route.mod.ascontiguousarray(P.T))
    return _project_pieces(xp, G, xp.matrix_transpose(rows), 0, G.shape[1])


def _project_routed(route: _Route, rows: Any, start: int, stop: Any) -> Any:
    stop = route.G.shape[1] if stop is None else stop
    return route.passes.project64(route.G, rows, start=start, stop=stop, storage=route.storage)


def _project_pieces(xp: Any, G: Array, X: Array, start: int, stop: int | None) -> Array:
    m = G.shape[0]
    stop = G.shape[1] if stop is None else stop
    k = X.shape[1]
    if G.dtype == xp.float64:  # no float64 copy to bound: one contraction
        return contract_columns(xp, G[:, start:stop], _f64(xp, X))
    P = xp.zeros((m, k), dtype=xp.float64, device=device(G))
    for c0, c1 in _spans(xp, G, start, stop):
        Gp, Xp = _f64(xp, G[:, c0:c1]), _f64(xp, X[c0 - start : c1 - start, ...])
        P = P + contract_columns(xp, Gp, Xp)
    return P


@float32_overflow_once
def combine(
    xp: Any,
    G: Array,
    X: Array,
    A: Array,
    *,
    alpha: float,
    dtype: Any,
    start: int = 0,
    stop: int | None = None,
    constant_G: bool = True,
) -> Array:
    """``alpha * (X - G[:, start:stop]^T A)``, every sum in float64, rounded once to ``dtype``.

    ``X`` is ``(n, k)`` (``n = stop - start``), ``A`` ``(m, k)`` float64. ``constant_G``:
    as for :func:`kernels_under_derivatives`.
    """
    stop = G.shape[1] if stop is None else stop
    note_intermediate(A)  # an overflowed solve raised no flag: the result is tested
    route = _kernel_operands(xp, G, X, A)
    if route is not None:
        with route.scope():
            mod, (Xh, Ah) = route.mod, route.views
            a = _alphas(mod, alpha, X.shape[1])
            C = mod.ascontiguousarray(Ah.T * -a[:, None], dtype=mod.float64)
            out_dtype = mod.float64 if dtype == xp.float64 else mod.float32
            Y = route.passes.combine64(
                route.G, C, a, mod.ascontiguousarray(Xh.T), start=start, stop=stop,
                dtype=out_dtype, storage=route.storage,
            )  # fmt: skip
            return route.back(mod.ascontiguousarray(Y.T))
    if kernels_under_derivatives(xp, G, X, A, constant_G=constant_G):
        return pass_functions(project, combine)[1].apply(X, A, G, alpha, dtype, start, stop)
    X64 = _f64(xp, X)
    a = _alphas(xp, alpha, X.shape[1], device(G))
    if G.dtype == xp.float64:
        return narrowed(
            xp, a * (X64 - _over_rows(xp, xp.matrix_transpose(G[:, start:stop]), A)), dtype
        )
    out = xp.empty(X.shape, dtype=dtype, device=device(X))
    writable = is_writeable_array(out)
    parts = []
    for c0, c1 in _spans(xp, G, start, stop):
        lo, hi = c0 - start, c1 - start
        Gp = _f64(xp, G[:, c0:c1])
        Y = narrowed(xp, a * (X64[lo:hi, ...] - _over_rows(xp, xp.matrix_transpose(Gp), A)), dtype)
        if writable:
            out[lo:hi, ...] = Y
        else:
            parts.append(Y)
    if writable or not parts:
        return out
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


@float32_overflow_once
def lift(
    xp: Any,
    G: Array,
    x: Array,
    C: Array,
    *,
    alphas: Array,
    dtype: Any,
    start: int = 0,
    stop: int | None = None,
) -> Array:
    """``alphas[:, None] * x + C @ G[:, start:stop]``: K results of one vector, rounded once.

    ``x`` is ``(n,)`` (``n = stop - start``), ``C`` ``(K, m)`` and ``alphas`` ``(K,)``
    float64; the result is ``(K, n)`` of ``dtype``. One read of G serves all K (the
    kernels take 8 rows of C per read): a sweep over K dampings costs about one product.
    The m terms are summed first and ``alpha x`` added last, every sum in float64.
    """
    stop = G.shape[1] if stop is None else stop
    note_intermediate(C)  # an overflowed solve raised no flag: the result is tested
    route = _kernel_operands(xp, G, x, C, alphas)
    if route is not None:
        with route.scope():
            mod, (xh, Ch, ah) = route.mod, route.views
            out_dtype = mod.float64 if dtype == xp.float64 else mod.float32
            Y = route.passes.combine64(
                route.G, Ch, ah, xh, start=start, stop=stop, dtype=out_dtype,
                storage=route.storage,
            )  # fmt: skip
            return route.back(Y)
    a = xp.reshape(_f64(xp, alphas), (-1, 1))
    x64 = _f64(xp, x)
    if G.dtype == xp.float64:
        return narrowed(xp, _over_rows(xp, C, G[:, start:stop]) + a * x64[None, :], dtype)
    out = xp.empty((C.shape[0], stop - start), dtype=dtype, device=device(x))
    writable = is_writeable_array(out)
    parts = []
    for c0, c1 in _spans(xp, G, start, stop):
        lo, hi = c0 - start, c1 - start
        Y = narrowed(xp, _over_rows(xp, C, _f64(xp, G[:, c0:c1])) + a * x64[None, lo:hi], dtype)
        if writable:
            out[:, lo:hi] = Y
        else:
            parts.append(Y)
    if writable or not parts:
        return out
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


def _block_rows(xp: Any, Y: Array, group: BlockGroup, piece: tuple[int, int, int, int]) -> Array:
    """The rows of ``Y`` (the group's rows, ``(count * size, k)``) in a piece, as a stack."""
    b0, b1, c0, c1 = piece
    s = group.size
    Yb = xp.reshape(Y, (group.count, s, Y.shape[1]))
    return Yb[b0:b1, c0:c1, :]


def project_blocks(xp: Any, G: Array, group: BlockGroup, X: Array) -> Array:
    """``G_b X_b`` for each block b of ``group``: float64, shape ``(count, m, k)``.

    ``X`` holds the group's rows, ``(count * size, k)``. A single block goes through
    :func:`project`; stacks of blocks through one block-wise call of the kernels where
    they read G, else through float64 pieces of whole blocks (or of one block, summed,
    where a block is wider than a piece).
    """
    if group.count == 1:
        return project(xp, G, X, start=group.start, stop=group.end)[None, ...]
    m, s = G.shape[0], group.size
    route = _kernel_operands(xp, G, X)
    if route is not None:
        # One call for the group: the kernels read each block's columns in place.
        with route.scope():
            mod, (Xh,) = route.mod, route.views
            k = X.shape[1]
            Xb = mod.reshape(Xh, (group.count, s, k))
            Xb = mod.ascontiguousarray(mod.transpose(Xb, (0, 2, 1)))
            P = route.passes.project64_blocks(
                route.G, Xb, start=group.start, block_size=s, storage=route.storage
            )
            return route.back(mod.ascontiguousarray(mod.transpose(P, (0, 2, 1))))
    parts = []
    acc, blocks = None, None
    for piece in pieces(group, _pieces.piece_width(xp, G, m)):
        Gp = _f64(xp, piece_stack(xp, G, group, piece))
        term = Gp @ _f64(xp, _block_rows(xp, X, group, piece))
        if piece[:2] == blocks:
            acc = acc + term  # another piece of the same block
        else:
            if acc is not None:
                parts.append(acc)
            acc, blocks = term, piece[:2]
    parts.append(acc)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


@float32_overflow_once
def combine_blocks(
    xp: Any,
    G: Array,
    group: BlockGroup,
    X: Array,
    A: Array,
    *,
    alpha: float,
    dtype: Any,
) -> Array:
    """``alpha * (X_b - G_b^T A_b)`` for each block b, summed in float64, rounded to ``dtype``.

    ``X`` holds the group's rows ``(count * size, k)``, ``A`` is ``(count, m, k)``
    float64; the result has ``X``'s shape.
    """
    if group.count == 1:
        return combine(
            xp, G, X, A[0, ...], alpha=alpha, dtype=dtype, start=group.start, stop=group.end
        )
    m, k = G.shape[0], X.shape[1]
    note_intermediate(A)  # an overflowed solve raised no flag: the result is tested
    route = _kernel_operands(xp, G, X, A)
    if route is not None:
        with route.scope():
            mod, (Xh, Ah) = route.mod, route.views
            s = group.size
            out_dtype = mod.float64 if dtype == xp.float64 else mod.float32
            a = _alphas(mod, alpha, k)
            C = mod.ascontiguousarray(mod.transpose(Ah, (0, 2, 1)) * -a[None, :, None])  # (c, k, m)
            Xb = mod.reshape(Xh, (group.count, s, k))
            Xb = mod.ascontiguousarray(mod.transpose(Xb, (0, 2, 1)))
            Yb = route.passes.combine64_blocks(
                route.G, C, a, Xb, start=group.start,
                block_size=s, dtype=out_dtype, storage=route.storage,
            )  # fmt: skip
            Y = mod.reshape(mod.transpose(Yb, (0, 2, 1)), (group.count * s, k))
            return route.back(mod.ascontiguousarray(Y))
    a = _alphas(xp, alpha, k, device(G))
    parts = []
    # Pieces come block by block and, within a block, column range by column range, so
    # their rows, one after the other, are the group's rows in order.
    for piece in pieces(group, _pieces.piece_width(xp, G, m)):
        b0, b1 = piece[0], piece[1]
        Gp = _f64(xp, piece_stack(xp, G, group, piece))
        Xp = _f64(xp, _block_rows(xp, X, group, piece))
        Y = narrowed(xp, a * (Xp - _over_rows(xp, xp.matrix_transpose(Gp), A[b0:b1, ...])), dtype)
        parts.append(xp.reshape(Y, (Y.shape[0] * Y.shape[1], k)))  # not -1: k may be 0
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
