"""How wide a column piece of a float64 pass over G is, by where its array lives.

The passes that run through the library's own float64 products (``_engine``'s fallback,
where no kernel reads G in place) work on column pieces of G cast to float64. Their
size depends on where the array lives (:func:`piece_entries`): on the host, small
enough to stay in cache (``PIECE_ENTRIES``); on a GPU (PyTorch CUDA tensors and CuPy
arrays without the kernels, JAX arrays on a GPU), where every piece costs a few kernel
launches and cache reuse does not matter, one bounded float64 temporary
(``DEVICE_PIECE_ENTRIES``), so that a product is a fixed handful of launches up to that
size.

The same rule sizes every other pass over G that casts column pieces to float64 (the
set-up's Grams, the dynamic window's Gram and residuals, refinement residuals, the
whitened diagonals and entries, the spectral forms): :func:`piece_width` with their host
size (``LARGE_PIECE_ENTRIES``), and :func:`gram_piece_width` for the set-up's Gram, whose
host pieces are also at most 1/64 of G. On an accelerator all of them take the one
device piece.

:func:`simulate_device` makes host arrays stand for device ones (tests of the GPU
route on a CPU); ``_engine`` reads whether it is in force, and the CUDA passes it
serves, through :func:`simulating` and :func:`simulated_passes`.

Callers read the sizes as attributes of this module (``_pieces.piece_width``,
``_pieces.LARGE_PIECE_ENTRIES``) at call time, so that a test that sets one here
changes every pass.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._compat import Array, is_cupy_namespace, is_torch_namespace
from ._finite import host_results_stand_for_a_device

__all__ = [
    "DEVICE_PIECE_ENTRIES",
    "GRAM_MIN_PIECES",
    "LARGE_PIECE_ENTRIES",
    "PIECE_ENTRIES",
    "gram_piece_width",
    "is_accelerator",
    "piece_entries",
    "piece_width",
    "simulate_device",
    "simulated_passes",
    "simulating",
]

#: float64 entries of one cast column piece of the fallback (8 MiB): small enough to be
#: read back from cache, large enough that the per-piece overhead of a library call stays
#: small.
PIECE_ENTRIES = 2**20

#: float64 entries of one cast column piece on a GPU (256 MiB): one piece per pass up to
#: m d = 2**25 (m = 256, d = 131072) and 8 at m = 256, d = 1e6, where cache-sized pieces
#: were 245, each a few launches. On a GPU a piece is streamed from device memory
#: whatever its size, and its launches (microseconds each) are what small pieces
#: multiply; a piece this size takes over 0.1 ms of an H200's bandwidth, so launches
#: stay a few percent of a product at any d.
DEVICE_PIECE_ENTRIES = 2**25

#: float64 entries of one column piece, on the host, of the passes other than the
#: products' fallback (32 MiB): the set-up's Grams, the window's Gram and residuals,
#: refinement residuals, whitened diagonals and entries, the spectral forms. On an
#: accelerator they take ``DEVICE_PIECE_ENTRIES`` too (:func:`piece_width`).
LARGE_PIECE_ENTRIES = 2**22

#: The fewest pieces of the set-up's Gram pass on the host (:func:`gram_piece_width`):
#: its float64 pieces are at most 1/64 of G's entries (1/32 of a float32 G's bytes), so
#: that the set-up's peak memory stays near size(G).
GRAM_MIN_PIECES = 64

#: Whether host arrays stand for device ones (inside :func:`simulate_device`).
_simulated = [False]
#: The CUDA passes that serve PyTorch tensors inside :func:`simulate_device` (None: none).
_simulated_passes: list[Any] = [None]


@contextlib.contextmanager
def simulate_device(*, cuda_passes: Any = None) -> Iterator[None]:
    """Treat host arrays as device ones (for tests that check the GPU path on a CPU).

    Inside the block, :func:`is_accelerator` is true for every array and the host
    kernels (the C extension) are not used, so that PyTorch CPU tensors take the route
    of CUDA tensors. With ``cuda_passes`` (an object with the functions of
    ``_kernels``' passes, e.g. the host harness), it serves them as the CUDA passes
    serve CUDA tensors where CuPy is installed: through the ``cupy`` module (tests put
    a stand-in in ``sys.modules``), on ``torch.cuda.current_stream()`` (which tests
    replace). Without it, they take the route of CUDA tensors without CuPy: the same
    operations, pieces of ``DEVICE_PIECE_ENTRIES``. Their float32 results are not tested
    for overflow, as a GPU's are not. Not thread-safe; for tests only.
    """
    previous = _simulated[0], _simulated_passes[0]
    _simulated[0], _simulated_passes[0] = True, cuda_passes
    try:
        with host_results_stand_for_a_device():
            yield
    finally:
        _simulated[0], _simulated_passes[0] = previous


def simulating() -> bool:
    """Whether :func:`simulate_device` is in force: host arrays stand for device ones."""
    return _simulated[0]


def simulated_passes() -> Any:
    """The CUDA passes that serve PyTorch tensors inside :func:`simulate_device`, or None."""
    return _simulated_passes[0]


def is_accelerator(xp: Any, A: Array) -> bool:
    """Whether ``A`` lives on an accelerator (a GPU), where launches, not caches, count.

    PyTorch tensors on any device but ``cpu`` (``cuda``, ``xpu``, ``mps``...), CuPy
    arrays, JAX arrays on a non-CPU platform (a traced one, which has no device yet,
    where JAX's default backend is not the CPU); NumPy and other host arrays are not.
    """
    if _simulated[0]:
        return True
    if type(A) is np.ndarray:  # the common host case, before the namespace tests (1-2 us)
        return False
    if is_cupy_namespace(xp):
        return True
    if is_torch_namespace(xp):
        return bool(A.device.type != "cpu")
    dev = getattr(A, "device", None)
    platform = getattr(dev, "platform", None)  # JAX: a Device with a platform name
    if isinstance(platform, str):
        return platform != "cpu"
    return _jax_accelerator(A)


def _jax_accelerator(A: Any) -> bool:
    """Whether a JAX array without one device of its own (sharded, or traced) is on a GPU."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(A, jax.Array):
        return False
    if isinstance(A, jax.core.Tracer):
        # Under jax.jit or jax.vmap the array is placed on the default backend.
        return bool(jax.default_backend() != "cpu")
    return any(d.platform != "cpu" for d in A.devices())


def piece_entries(xp: Any, A: Array, *, host: int | None = None) -> int:
    """float64 entries of one cast column piece of ``A``'s passes: cache- or device-sized.

    ``host`` (by default ``PIECE_ENTRIES``, the products' fallback) where ``A`` is on
    the host, ``DEVICE_PIECE_ENTRIES`` where it is on an accelerator.
    """
    if is_accelerator(xp, A):
        return DEVICE_PIECE_ENTRIES
    return PIECE_ENTRIES if host is None else host


def piece_width(
    xp: Any, A: Array, rows: int, *, host: int | None = None, min_pieces: int = 1
) -> int:
    """Columns of one float64 piece of ``A`` with ``rows`` rows (at least one).

    ``host`` as in :func:`piece_entries`. On the host, pieces are also at most
    ``1 / min_pieces`` of ``A``'s columns; on an accelerator the one device piece
    bounds the temporaries instead, and more pieces would only add launches.
    """
    width = piece_entries(xp, A, host=host) // max(rows, 1)
    if min_pieces > 1 and not is_accelerator(xp, A):
        width = min(width, A.shape[-1] // min_pieces)
    return max(1, width)


def gram_piece_width(xp: Any, G: Array) -> int:
    """Columns of one piece of the set-up's Gram pass over ``G`` (m x d, or a shard of it).

    On the host ``LARGE_PIECE_ENTRIES`` and at most 1/``GRAM_MIN_PIECES`` of the
    columns; on an accelerator the device piece.
    """
    return piece_width(xp, G, G.shape[0], host=LARGE_PIECE_ENTRIES, min_pieces=GRAM_MIN_PIECES)
