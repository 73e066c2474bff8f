"""The double-buffered streaming of G from host memory (``StaticIHVP.streamed``, _streaming).

No GPU here: the schedule runs against a simulated pair of streams that executes the
queued copies and computations in random interleavings (respecting only the events),
so a missing wait shows up as a computation reading a buffer that a later copy has
already overwritten. The operator itself runs on CPU PyTorch, with that simulation in
place of CUDA streams, against the non-streamed operator and the float64 oracle.
"""

from __future__ import annotations

import copy
import gc
import pickle
import random
import threading
import types
from collections import deque

import numpy as np
import pytest

import mfac_core._streaming
from mfac_core import StaticIHVP
from mfac_core._streaming import DoubleBuffer, ImmediateOps
from mfac_core.testing import SpectralOracle, assert_close

torch = pytest.importorskip("torch")


class _Event:
    def __init__(self) -> None:
        self.recorded = 0  # records queued so far
        self.completed = 0  # records executed so far


class SimulatedStreams:
    """Two FIFO streams whose heads run in a random order, as far as the events allow.

    ``wait(stream, event)`` captures the event's latest record at call time (as
    cudaStreamWaitEvent does); the stream blocks until that record has executed.
    """

    copy_stream = "copy"
    compute_stream = "compute"

    def __init__(self, seed: int, *, drop_copy_waits: bool = False) -> None:
        self.rng = random.Random(seed)
        self.queues: dict[str, deque] = {"copy": deque(), "compute": deque()}
        self.drop_copy_waits = drop_copy_waits  # a broken schedule, to see the checks fail

    def event(self) -> _Event:
        return _Event()

    def record(self, event: _Event, stream: str) -> None:
        event.recorded += 1
        self.queues[stream].append(("record", event, event.recorded))

    def wait(self, stream: str, event: _Event) -> None:
        if self.drop_copy_waits and stream == "copy":
            return
        self.queues[stream].append(("wait", event, event.recorded))

    def run(self, stream: str, fn) -> None:
        self.queues[stream].append(("run", fn, None))

    def _runnable(self, stream: str) -> bool:
        q = self.queues[stream]
        if not q:
            return False
        kind, event, version = q[0]
        return kind != "wait" or event.completed >= version

    def drain(self) -> None:
        while any(self.queues.values()):
            ready = [s for s in self.queues if self._runnable(s)]
            assert ready, "deadlock: both streams wait"
            kind, obj, version = self.queues[self.rng.choice(ready)].popleft()
            if kind == "run":
                obj()
            elif kind == "record":
                obj.completed = max(obj.completed, version)


def _schedule_log(ops, count: int, passes: int = 2):
    """Stream ``count`` pieces ``passes`` times; log copies and what each computation read."""
    buffers = [np.full(3, -1.0), np.full(3, -1.0)]
    db = DoubleBuffer(ops, buffers)
    copies, reads = [], []
    for p in range(passes):

        def load(k, buf, p=p):
            copies.append((p, k, next(i for i, b in enumerate(buffers) if b is buf)))
            buf[:] = [p, k, 7.0]

        def kernel(k, buf, p=p):
            reads.append((p, k, tuple(buf)))

        db.run(count, load, kernel)
    return copies, reads


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("count", [1, 2, 5])
def test_schedule_copies_once_into_the_right_buffer_and_never_early(seed, count):
    copies, reads = _schedule_log(SimulatedStreams(seed), count)
    for p in range(2):
        mine = [c for c in copies if c[0] == p]
        assert sorted(k for _, k, _ in mine) == list(range(count))  # each piece once
        assert all(slot == k % 2 for _, k, slot in mine)  # into buffer k % 2
    # Every computation saw its own piece: not yet overwritten by a later copy, and
    # copied before it ran (the buffer starts at -1).
    assert sorted(reads) == sorted((p, k, (p, k, 7.0)) for p in range(2) for k in range(count))


def test_schedule_checks_catch_a_missing_wait():
    # Without the copy stream's wait for the computation on a buffer, some interleaving
    # overwrites a piece before it is read: the checks above must see it.
    caught = 0
    for seed in range(40):
        _, reads = _schedule_log(SimulatedStreams(seed, drop_copy_waits=True), 5)
        caught += any(tuple(r[2][:2]) != r[:2] for r in reads)
    assert caught > 0


def test_schedule_overlaps_copy_and_compute():
    # The copy of piece k + 1 is queued before the computation on piece k.
    order = []

    class Recording(ImmediateOps):
        def run(self, stream, fn):
            order.append(stream)
            fn()

    DoubleBuffer(Recording(), [0, 1]).run(3, lambda k, b: None, lambda k, b: None)
    assert order == ["copy", "copy", "compute", "copy", "compute", "compute"]


@pytest.fixture(params=[0, 1, 2])
def simulated(request, monkeypatch):
    """CPU torch with a simulated pair of streams, and pieces of 7 columns."""
    monkeypatch.setattr(mfac_core._streaming, "piece_width", lambda m, d, itemsize: 7)
    monkeypatch.setattr(
        mfac_core._streaming, "make_ops", lambda device: SimulatedStreams(request.param)
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streamed_operator_equals_the_plain_one(simulated, dtype, rng):
    m, d = 8, 100
    G64 = rng.standard_normal((m, d))
    G = torch.tensor(G64, dtype=getattr(torch, dtype))
    G64 = G.double().numpy()
    damp = 1e-2 * float(np.linalg.norm(G64, 2)) ** 2 / m
    op = StaticIHVP.streamed(G, damp=damp, device="cpu")
    ref = StaticIHVP(G, damp=damp)
    assert op._factors[0].host.shape == (15, m, 7)  # 100 columns in pieces of 7
    assert op.device == torch.device("cpu") and op.dtype == G.dtype
    oracle = SpectralOracle(G64, damp)
    X = torch.tensor(rng.standard_normal((d, 3)), dtype=G.dtype)
    for _ in range(2):  # the buffers and events carry over from one product to the next
        assert_close(op @ X, ref @ X, kappa=oracle.kappa)
        assert_close(op @ X[:, 0], oracle.matvec(X[:, 0].double().numpy()), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    rows, cols = torch.tensor([0, 6, 7, 99, 50]), torch.tensor([0, 6, 14, 99, 3])
    assert_close(op.entries(rows, cols), ref.entries(rows, cols), kappa=oracle.kappa)


def test_streamed_refusals(rng):
    G = torch.tensor(rng.standard_normal((4, 30)))
    with pytest.raises(TypeError, match="PyTorch"):
        StaticIHVP.streamed(G.numpy(), damp=1.0, device="cuda")
    with pytest.raises(ValueError, match="PyTorch device"):
        StaticIHVP.streamed(G, damp=1.0, device="gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            StaticIHVP.streamed(G, damp=1.0, device="cuda")
    for kwargs in [{"block_size": 10}, {"refine": 1}, {"out": G}, {"comm": object()}]:
        # Not spellable: streamed() takes no such keyword.
        with pytest.raises(TypeError, match="unexpected keyword"):
            StaticIHVP.streamed(G, damp=1.0, device="cpu", **kwargs)
    for kwargs, match in [({"block_size": 10}, "full operator"), ({"refine": 1}, "refine")]:
        # The deprecated spelling refuses them as before.
        with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=match):
            StaticIHVP(G, damp=1.0, stream_to="cpu", **kwargs)
    with pytest.raises(ValueError, match="full operator"):
        StaticIHVP.streamed(G[:, :3], damp=1.0, device="cpu")  # d <= m: dense, nothing to stream
    with pytest.raises(ValueError, match="2-byte"):
        StaticIHVP.streamed(G.half(), damp=1.0, device="cpu")
    # A meta G (no values) is refused at the door, before anything of streaming.
    with pytest.raises(ValueError, match="G is a PyTorch tensor on the meta device"):
        StaticIHVP.streamed(
            torch.empty(4, 30, dtype=torch.float64, device="meta"), damp=1.0, device="cpu"
        )
    # G (not W, which no operator stores any more) is what streams from host memory.
    off_host = types.SimpleNamespace(device=torch.device("meta"))
    with pytest.raises(
        ValueError, match=r"StaticIHVP\.streamed streams G from host memory, but G is on meta"
    ):
        mfac_core._streaming.check_stream_to(
            mfac_core._compat.array_namespace(G),
            off_host,
            "cpu",
            full=True,
            half=False,
            overwrite_G=False,
            out=None,
            refine=0,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_on_cuda(rng):
    m, d = 16, 3000
    G = torch.tensor(rng.standard_normal((m, d)), dtype=torch.float32).pin_memory()
    op = StaticIHVP.streamed(G, damp=1.0, device="cuda")
    ref = StaticIHVP(G.cuda(), damp=1.0)
    X = torch.randn(d, 4, device="cuda")
    assert (op @ X).device.type == "cuda"
    assert_close(op @ X, ref @ X, kappa=ref.kappa_bound)
    assert_close(op.diagonal(), ref.diagonal(), kappa=ref.kappa_bound)


@pytest.mark.parametrize("kappa", [1e3, 1e7])
def test_streamed_float32_products_are_exact_in_the_span(simulated, kappa, rng):
    # Gradients with a shared mean, x = their mean: both streams sum in float64, so the
    # streamed product keeps float32's rounding where a streamed float32 W lost eps32 kappa.
    from mfac_core.testing import extended_precision_inverse

    m, d = 8, 100
    G64 = rng.standard_normal(d) + rng.standard_normal((m, d))
    G64 /= np.linalg.norm(G64, 2) / np.sqrt(m)
    G = torch.tensor(G64, dtype=torch.float32)
    G64 = G.double().numpy()
    damp = float(np.linalg.norm(G64, 2) ** 2 / (m * (kappa - 1.0)))
    op = StaticIHVP.streamed(G, damp=damp, device="cpu")
    x = G.mean(dim=0)
    want = extended_precision_inverse(G64, damp, x.double().numpy())
    y = (op @ x).double().numpy()
    assert np.linalg.norm(y - want) <= 8 * np.finfo(np.float32).eps * np.linalg.norm(want)
    d_want = np.array([extended_precision_inverse(G64, damp, np.eye(d)[:, j])[j] for j in (0, 50)])
    diag = op.diagonal().double().numpy()[[0, 50]]
    assert np.all(np.abs(diag - d_want) <= 8 * np.finfo(np.float32).eps * d_want)


def test_streamed_indexed_or_unindexed_device_is_the_device_tensors_report(rng):
    # device="cuda" names the current GPU, whose tensors report "cuda:0"; on the CPU
    # the same mismatch is torch.device("cpu", 0) against tensors that report "cpu".
    # Each comparison of devices is canonical: the products, the index checks and the
    # operator algebra.
    from mfac_core._compat import canonical_device, same_device

    m, d = 4, 40
    G = torch.tensor(rng.standard_normal((m, d)))
    op = StaticIHVP.streamed(G, damp=1.0, device=torch.device("cpu", 0))
    ref = StaticIHVP(G, damp=1.0)
    assert op.device == torch.device("cpu") == canonical_device(torch.device("cpu", 0))
    x = torch.tensor(rng.standard_normal(d))
    assert_close(op @ x, ref @ x, kappa=ref.kappa_bound)
    idx = torch.tensor([0, 5])
    assert_close(op.entries(idx, idx), ref.entries(idx, idx), kappa=ref.kappa_bound)
    assert_close((op + ref) @ x, 2 * (ref @ x), kappa=ref.kappa_bound)
    assert same_device(torch.device("cpu", 0), torch.device("cpu"))
    assert not same_device(torch.device("cpu"), torch.device("meta"))
    with pytest.raises(ValueError, match="device"):
        op @ x.to("meta")


class _ProcessBoundOps(ImmediateOps):
    """Stream operations holding what, like CUDA streams and events, cannot be pickled."""

    made = 0

    def __init__(self) -> None:
        self.handle = threading.Lock()
        type(self).made += 1


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_streamed_operator_pickles_and_copies_with_new_streams_and_buffers(how, monkeypatch, rng):
    monkeypatch.setattr(mfac_core._streaming, "make_ops", lambda device: _ProcessBoundOps())
    monkeypatch.setattr(mfac_core._streaming, "piece_width", lambda m, d, itemsize: 7)
    G = torch.tensor(rng.standard_normal((4, 30)))
    op = StaticIHVP.streamed(G, damp=1.0, device="cpu")
    made = _ProcessBoundOps.made
    new = pickle.loads(pickle.dumps(op)) if how == "pickle" else copy.deepcopy(op)
    assert _ProcessBoundOps.made == made + 1  # its own streams and events
    old_part, new_part = op._factors[0], new._factors[0]
    for a, b in zip(old_part.buffer.buffers, new_part.buffer.buffers, strict=True):
        assert a.data_ptr() != b.data_ptr()  # its own device buffers
    assert new_part.host.data_ptr() != old_part.host.data_ptr()
    x = torch.tensor(rng.standard_normal(30))
    assert torch.equal(new @ x, op @ x)


def test_pinned_host_copy_is_registered_for_exactly_its_bytes_and_released(monkeypatch):
    # PyTorch's pinned allocator would round 204.8 GB up to 256 GB; the piece-major copy
    # is registered (cudaHostRegister) for its own size, and unregistered when freed,
    # after the device has finished any copy from it.
    from mfac_core._streaming import PIECE_BYTES, piece_major, pinned_bytes

    m, d = 256, 200_000_000
    assert m * d * 4 <= pinned_bytes(m, d, 4) < m * d * 4 + PIECE_BYTES
    assert pinned_bytes(1000, 12345, 8) < 1000 * 12345 * 8 + PIECE_BYTES
    calls = []

    class Cudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            assert flags == 1  # cudaHostRegisterPortable: for every device's context
            calls.append(("register", ptr, nbytes))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", Cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("sync", device)))
    G = torch.randn(3, 50)
    target = torch.device("cuda", 0)
    host = piece_major(G, target, 7)  # 8 pieces of 3 x 7, the last padded with zeros
    ptr = host.data_ptr()
    assert calls == [("register", ptr, 8 * 3 * 7 * 4)]
    assert torch.equal(host.permute(1, 0, 2).reshape(3, -1)[:, :50], G)
    assert not host[-1, :, 1:].any()
    del host
    gc.collect()
    assert calls[1:] == [("sync", target), ("unregister", ptr)]
