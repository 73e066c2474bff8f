"""Products of the static inverse with G in host memory, on a device (``StaticIHVP.streamed``).

For gradients that do not fit in device memory but do fit in (pinned) host
memory: the set-up runs on the host (the float64 Gram and its factor, which go
to the device), G is copied *piece-major* (``(pieces, m, width)``, one
contiguous block per column piece, so that each piece is one host-to-device
copy), and every product streams the pieces to the device through two device
buffers, so that the copy of piece ``k + 1`` overlaps the computation on piece
``k``. The products are the G-form of the pass engine (``_engine``): the first
stream of G sums the float64 projection ``P = G X``, the second the float64
combination ``(X - G^T C^{-1} P) / damp``, rounded once.

The schedule (:class:`DoubleBuffer`) is written against a few stream
operations (:class:`StreamOps`): run a function on a stream, record an event,
make a stream wait for an event. :class:`TorchCudaOps` maps them onto a side
stream for the copies and the current stream for the computations;
:class:`ImmediateOps` runs everything at once in program order (a host
target, and the stand-in that lets the schedule run without a GPU). The tests
drive the same schedule through a simulated pair of streams that runs the
queued operations in random interleavings, and check that every piece is
copied once, into buffer ``k % 2``, and never overwritten before its
computation has finished.

Only PyTorch tensors and the full operator (one block, ``d > m``) are
supported; the set-up itself is not streamed (it runs on the host's BLAS).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _engine, _pieces
from ._attributes import reassign
from ._capacitance import CapacitanceFactor
from ._compat import Array, array_namespace, canonical_device, is_torch_namespace
from ._gform import GFormFactor, whitened_diagonal, whitened_pairs
from ._layout import BlockGroup
from ._setup import factorize_gform_groups

__all__ = [
    "DoubleBuffer",
    "ImmediateOps",
    "StreamOps",
    "StreamedGForm",
    "TorchCudaOps",
    "check_stream_to",
    "double_buffer",
    "make_ops",
    "pin",
    "piece_major",
    "pinned_bytes",
    "piece_width",
]

#: Bytes of one streamed piece: large enough that a copy's fixed cost is small against
#: its transfer (a few microseconds against ~1 ms at PCIe speeds), small enough that the
#: two device buffers stay small.
PIECE_BYTES = 2**25


class StreamOps(Protocol):
    """The stream operations the double-buffered schedule needs."""

    @property
    def copy_stream(self) -> Any:
        """The stream of the host-to-device copies."""

    @property
    def compute_stream(self) -> Any:
        """The stream of the computations (the caller's)."""

    def event(self) -> Any:
        """A new event."""

    def record(self, event: Any, stream: Any) -> None:
        """Mark the point, in ``stream``, that later waits on ``event`` wait for."""

    def wait(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait for the last point recorded in ``event`` so far."""

    def run(self, stream: Any, fn: Callable[[], None]) -> None:
        """Queue ``fn``'s work on ``stream``."""

    def drain(self) -> None:
        """End of a pass: what was queued is ordered before later work of the caller."""


class ImmediateOps:
    """Runs every operation at once, in program order (no overlap; always correct)."""

    copy_stream = "copy"
    compute_stream = "compute"

    def event(self) -> Any:
        return None

    def record(self, event: Any, stream: Any) -> None:
        pass

    def wait(self, stream: Any, event: Any) -> None:
        pass

    def run(self, stream: Any, fn: Callable[[], None]) -> None:
        fn()

    def drain(self) -> None:
        pass


class TorchCudaOps:
    """Copies on a side stream, computations on the device's current stream, CUDA events."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self._device = device
        self.copy_stream = torch.cuda.Stream(device)

    @property
    def compute_stream(self) -> Any:
        # Looked up at each use: the caller's inputs and results belong to whichever
        # stream is current when a product is called.
        return self._torch.cuda.current_stream(self._device)

    def event(self) -> Any:
        return self._torch.cuda.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def run(self, stream: Any, fn: Callable[[], None]) -> None:
        with self._torch.cuda.stream(stream):
            fn()

    def drain(self) -> None:
        # The results were computed on the current stream, so the caller's later work is
        # ordered after them; copies are ordered before the computations that read them.
        pass


def make_ops(device: Any) -> StreamOps:
    """The stream operations for a target device (CUDA streams, or immediate on the host)."""
    if getattr(device, "type", None) == "cuda":
        return TorchCudaOps(device)
    return ImmediateOps()


@dataclass
class DoubleBuffer:
    """Two device buffers and their events; :meth:`run` streams pieces through them.

    The events and buffers persist across passes, so that the first copy of a
    pass waits for the last computation of the previous one on that buffer.
    """

    ops: StreamOps
    buffers: list[Any]
    ready: list[Any] = field(default_factory=list)
    done: list[Any] = field(default_factory=list)
    used: list[bool] = field(default_factory=lambda: [False, False])

    def __post_init__(self) -> None:
        self.ready = [self.ops.event(), self.ops.event()]
        self.done = [self.ops.event(), self.ops.event()]

    def _load(self, k: int, load: Callable[[int, Any], None]) -> None:
        """Queue the copy of piece ``k`` into buffer ``k % 2``, once its last reader is done."""
        ops, s = self.ops, k % 2
        if self.used[s]:
            ops.wait(ops.copy_stream, self.done[s])
        ops.run(ops.copy_stream, functools.partial(load, k, self.buffers[s]))
        ops.record(self.ready[s], ops.copy_stream)
        self.used[s] = True

    def run(
        self, count: int, load: Callable[[int, Any], None], kernel: Callable[[int, Any], None]
    ) -> None:
        """``load(k, buffer)`` then ``kernel(k, buffer)`` for pieces ``k = 0 .. count - 1``.

        The copy of piece ``k + 1`` is queued before the computation on piece
        ``k``, so the two overlap where the streams run concurrently.
        """
        ops = self.ops
        if count > 0:
            self._load(0, load)
        for k in range(count):
            s = k % 2
            if k + 1 < count:
                self._load(k + 1, load)
            ops.wait(ops.compute_stream, self.ready[s])
            ops.run(ops.compute_stream, functools.partial(kernel, k, self.buffers[s]))
            ops.record(self.done[s], ops.compute_stream)
        ops.drain()


def piece_width(m: int, d: int, itemsize: int) -> int:
    """Columns of one streamed piece of an ``(m, d)`` G."""
    return max(1, min(d, PIECE_BYTES // max(1, m * itemsize)))


def check_stream_to(
    xp: Any,
    G: Array,
    stream_to: Any,
    *,
    full: bool,
    half: bool,
    overwrite_G: bool,
    out: Any,
    refine: int,
) -> Any:
    """The target device of ``stream_to``, or a clear error; nothing is allocated."""
    if not is_torch_namespace(xp):
        raise TypeError(
            "streaming (StaticIHVP.streamed) needs G as a PyTorch tensor in host memory "
            "(pinned or not: the operator pins its own copy); this G is not a PyTorch tensor"
        )
    import torch

    if G.device.type != "cpu":
        raise ValueError(
            f"StaticIHVP.streamed streams G from host memory, but G is on {G.device}; pass "
            "a CPU G, or build StaticIHVP(G, ...) on G's device"
        )
    try:
        target = torch.device(stream_to)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a PyTorch device, got {stream_to!r}") from exc
    if target.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be a CUDA device (or 'cpu'), got {target}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={stream_to!r}, but PyTorch sees no CUDA device")
    if half:
        raise ValueError("streaming supports float32 and float64 gradients, not 2-byte ones")
    if not full:
        raise ValueError(
            "streaming supports the full operator with more coordinates than gradients "
            "(d > m, no block_size) only"
        )
    for flag, name in ((overwrite_G, "overwrite_G"), (out is not None, "out"), (refine, "refine")):
        if flag:
            raise ValueError(
                f"streaming keeps a piece-major copy of G in a pinned host array of its own; "
                f"{name} is not supported with it"
            )
    # As the tensors on it report it: "cuda" is "cuda:<current>", and so stays the
    # device the operator's buffers were made on if the current device changes later.
    return canonical_device(target)


def pinned_bytes(m: int, d: int, itemsize: int) -> int:
    """Bytes of the piece-major host copy of an ``(m, d)`` G, all of them pinned for CUDA.

    Whole pieces of :func:`piece_width` columns, the last one padded with zeros:
    ``m * d * itemsize`` plus less than one piece (:data:`PIECE_BYTES`). The
    memory is page-locked as allocated (:func:`pin`), not rounded up to a
    power of two as PyTorch's pinned allocator would round it.
    """
    width = piece_width(m, d, itemsize)
    return -(-d // width) * m * width * itemsize


def pin(host: Any, device: Any) -> None:
    """Page-lock the CPU tensor ``host`` in place for exactly its bytes, until it is freed.

    ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host
    allocator, which rounds every allocation up to a power of two (256 GB
    pinned for 205 GB) and keeps it cached after it is freed. Registering an
    ordinary allocation with ``cudaHostRegister`` pins what is used and no
    more. When ``host`` is collected, ``device`` is synchronised (a copy from
    it may still be in flight) and the range unregistered before it is freed.
    """
    import torch

    if host.is_pinned():
        return
    cudart = torch.cuda.cudart()
    ptr, nbytes = host.data_ptr(), host.untyped_storage().nbytes()
    # cudaHostRegisterPortable (1): pinned for every CUDA context, not only the current one.
    code = int(cudart.cudaHostRegister(ptr, nbytes, 1))
    if code != 0:
        raise RuntimeError(
            f"streaming could not page-lock the {nbytes} bytes of its host copy of G "
            f"(cudaHostRegister returned CUDA error {code}); free host memory, or build "
            "StaticIHVP(G) on G's device"
        )
    release = weakref.finalize(host, _unpin, cudart, torch.cuda.synchronize, ptr, device)
    release.atexit = False  # at exit the process's memory goes anyway, CUDA may be gone


def _unpin(cudart: Any, synchronize: Callable[[Any], None], ptr: int, device: Any) -> None:
    synchronize(device)
    cudart.cudaHostUnregister(ptr)


def piece_major(G: Array, target: Any, width: int) -> Any:
    """G copied into a ``(pieces, m, width)`` host tensor, pinned (:func:`pin`) for CUDA."""
    import torch

    m, d = G.shape
    pieces = -(-d // width)
    host = torch.zeros((pieces, m, width), dtype=G.dtype, device="cpu")
    for p in range(pieces):
        lo, hi = p * width, min((p + 1) * width, d)
        host[p, :, : hi - lo] = G[:, lo:hi]
    if target.type == "cuda":
        pin(host, target)
    return host


def double_buffer(host: Any, device: Any) -> DoubleBuffer:
    """Two device buffers of one piece of ``host``, and the stream operations for ``device``."""
    import torch

    _, m, w = host.shape
    buffers = [torch.empty((m, w), dtype=host.dtype, device=device) for _ in range(2)]
    return DoubleBuffer(make_ops(device), buffers)


@dataclass
class StreamedGForm:
    """The full operator's G in piece-major host memory, applied on ``device`` piece by piece.

    Offers the group-factor interface of ``_group_factors`` (``apply``,
    ``apply_vector``, ``diagonal``, ``entries``); inputs and results are on
    ``device``, where the float64 capacitance factor lives.
    """

    group: BlockGroup
    host: Any
    factor: CapacitanceFactor
    damp: float
    device: Any
    buffer: DoubleBuffer

    @classmethod
    def build(
        cls, group: BlockGroup, host: Any, factor: CapacitanceFactor, damp: float, device: Any
    ) -> StreamedGForm:
        on_device = CapacitanceFactor(factor.U.to(device), factor.shift, factor.scale, factor.kappa)
        return cls(group, host, on_device, damp, device, double_buffer(host, device))

    # Pickling and copying: CUDA streams and events cannot be pickled and belong to
    # this process, and the two device buffers are scratch; they are made afresh on
    # load, and the host copy is page-locked again (a copy or an unpickled tensor is
    # not pinned).

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["buffer"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.device.type == "cuda":
            pin(self.host, self.device)
        self.buffer = double_buffer(self.host, self.device)

    @property
    def _width(self) -> int:
        return int(self.host.shape[2])

    def _cols(self, k: int) -> tuple[int, int]:
        w = self._width
        return k * w, min((k + 1) * w, self.group.size)

    def _load(self, k: int, buf: Any) -> None:
        buf.copy_(self.host[k], non_blocking=True)

    def _pass(self, kernel: Callable[[int, Any], None]) -> None:
        self.buffer.run(int(self.host.shape[0]), self._load, kernel)

    def apply(self, X: Array, /) -> Array:
        import torch

        xp = array_namespace(X)
        m = self.host.shape[1]
        P = torch.zeros((m, X.shape[1]), dtype=torch.float64, device=self.device)

        def project_pass(k: int, buf: Any) -> None:
            c0, c1 = self._cols(k)
            P.add_(_engine.project(xp, buf[:, : c1 - c0], X[c0:c1, :]))

        self._pass(project_pass)
        A = self.factor.solve(P[None, ...])[0, ...]
        Y = torch.empty_like(X)

        def combine_pass(k: int, buf: Any) -> None:
            c0, c1 = self._cols(k)
            Y[c0:c1, :] = _engine.combine(
                xp, buf[:, : c1 - c0], X[c0:c1, :], A, alpha=1.0 / self.damp, dtype=X.dtype
            )

        self._pass(combine_pass)
        return Y

    def apply_vector(self, x: Array, /) -> Array:
        return self.apply(x[:, None])[:, 0]

    def diagonal(self) -> Array:
        # (1 - ||L^{-1} g_j||^2) / damp, each streamed piece whitened in float64.
        import torch

        xp = self.factor.xp
        Linv = self.factor.lower_inverse()[0, ...]
        out = torch.empty((self.group.size,), dtype=self.host.dtype, device=self.device)

        def kernel(k: int, buf: Any) -> None:
            c0, c1 = self._cols(k)
            out[c0:c1] = whitened_diagonal(xp, Linv, buf[:, : c1 - c0].double(), self.damp)

        self._pass(kernel)
        return out

    def entries(self, rows: Array, cols: Array, /) -> Array:
        # Single entries gather their columns of G on the host: the indices go there
        # (an explicit, small transfer), and only the gathered columns come back, to be
        # whitened in float64 on the device.
        import torch

        xp = self.factor.xp
        Linv = self.factor.lower_inverse()[0, ...]
        m, w = self.host.shape[1], self._width
        n = rows.shape[0]
        # Whitened on the target: a device piece there, 32 MiB pieces on the host.
        step = _pieces.piece_width(xp, Linv, m, host=_pieces.LARGE_PIECE_ENTRIES)
        parts = []
        for lo in range(0, n, step):
            r, c = rows[lo : lo + step].cpu(), cols[lo : lo + step].cpu()
            Wr = Linv @ self.host[r // w, :, r % w].to(self.device, torch.float64).T
            Wc = Linv @ self.host[c // w, :, c % w].to(self.device, torch.float64).T
            pair_rows, pair_cols = rows[lo : lo + step], cols[lo : lo + step]
            pairs = whitened_pairs(xp, Wr, Wc, pair_rows, pair_cols, self.damp)
            parts.append(pairs.to(self.host.dtype))
        if not parts:
            return torch.zeros((0,), dtype=self.host.dtype, device=self.device)
        return torch.cat(parts)


def init_streamed(
    op: Any,
    G: Array,
    stream_to: Any,
    *,
    overwrite_G: bool,
    out: Any,
    progress: Callable[[int, int], None] | None,
) -> None:
    """:meth:`StaticIHVP.streamed`'s set-up of ``op`` (its layout and options checked).

    The set-up runs on the host, G is copied piece-major into host memory, and
    products run on ``stream_to``.
    """
    xp = op._xp
    full = len(op._groups) == 1 and op._groups[0].count == 1
    target = check_stream_to(
        xp,
        G,
        stream_to,
        full=full and op.dim > op.num_grads,
        half=op.storage_dtype is not None,
        overwrite_G=overwrite_G,
        out=out,
        refine=op.refine,
    )
    (group,) = op._groups
    result = factorize_gform_groups(
        xp,
        G,
        op._groups,
        damp=op.damp,
        dtype=op.dtype,
        check_finite=op.check_finite,
        progress=progress,
    )
    (gform,) = result.factors
    assert isinstance(gform, GFormFactor)  # the full operator with d > m
    width = piece_width(op.num_grads, op.dim, G.element_size())
    host = piece_major(G, target, width)
    op._factors = (StreamedGForm.build(group, host, gform.factor, op.damp, target),)
    op._G = None  # the streamed pieces are a copy; G itself is not kept
    op.kappa_bound = result.kappa_hi
    # The constructor set G's device (the host); the products run on the target's.
    reassign(op, "device", target)
    op._warn_if_hopeless(result.woodbury_lo, result.dense_lo)
