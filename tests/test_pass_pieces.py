"""Every pass over G cuts its float64 column pieces by the engine's one rule.

On the host the pieces stay what they were: ``_pieces.LARGE_PIECE_ENTRIES`` (32 MiB),
and the set-up's Gram at most 1/64 of G (``gram_piece_width``). On an accelerator (here:
arrays that ``_pieces.simulate_device`` routes as GPU ones) every pass takes the one
device piece (``DEVICE_PIECE_ENTRIES``), so that its launches do not grow with d.

Each test counts the pieces a pass actually reads, through the progress callback or
a spy on the function it calls once per piece, with sizes for which the host rule gives
several pieces and the device rule one. Where the host piece is 32 MiB, it is made
small here (``M * 128`` entries), as the real size would need m d >= 2**24.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from mfac_core import ShardedStaticIHVP, SpectralIHVP, StaticIHVP, _engine, _layout, _pieces
from mfac_core.distributed import SingleProcessComm

M = 8
SMALL_HOST = M * 128  # host piece of the 32 MiB passes in these tests: 128 columns


def _gradients(m: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)


@contextlib.contextmanager
def _routed(device: bool) -> Iterator[None]:
    """Arrays routed as accelerator ones (``device``) or left on the host."""
    with _pieces.simulate_device() if device else contextlib.nullcontext():
        yield


def _spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[tuple]:
    """Record the arguments of every call of ``owner.name`` (which still runs)."""
    calls: list[tuple] = []
    real: Callable[..., Any] = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


DEVICE = pytest.mark.parametrize("device", [False, True], ids=["host", "device"])


def test_the_rule() -> None:
    """Host widths are those the passes had; an accelerator gets the device piece."""
    G = np.zeros((M, 4096), np.float32)
    huge = np.broadcast_to(np.float32(0), (M, 2**26))  # no memory: only its shape is read
    assert _pieces.piece_width(np, G, M) == _pieces.PIECE_ENTRIES // M
    assert _pieces.piece_width(np, G, M, host=_pieces.LARGE_PIECE_ENTRIES) == 2**22 // M
    assert _pieces.gram_piece_width(np, G) == 4096 // 64  # at most 1/64 of G
    assert _pieces.gram_piece_width(np, huge) == 2**22 // M  # at most 32 MiB
    with _pieces.simulate_device():
        for width in (
            _pieces.piece_width(np, G, M),
            _pieces.piece_width(np, G, M, host=_pieces.LARGE_PIECE_ENTRIES),
            _pieces.piece_width(np, G, M, min_pieces=64),
            _pieces.gram_piece_width(np, G),
            _pieces.gram_piece_width(np, huge),
        ):
            assert width == _pieces.DEVICE_PIECE_ENTRIES // M


def test_traced_jax_arrays_follow_the_default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traced JAX array has no device: it runs on (and is sized for) the default backend."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    seen = []

    def record(a: Any) -> Any:
        seen.append(_pieces.is_accelerator(jnp, a))
        return a

    jax.jit(record)(jnp.ones((2, 3)))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jax.jit(record)(jnp.ones((2, 4)))  # another shape: traced again
    assert seen == [False, True]
    assert not _pieces.is_accelerator(jnp, jnp.ones(3))  # a concrete CPU array


@DEVICE
def test_static_setup(device: bool) -> None:
    """StaticIHVP's Gram: 64 host pieces (1/64 of G each), one device piece; the C
    extension's Gram takes the host pieces eight at a time (one progress report each)."""
    done: list[int] = []
    G = _gradients(M, 4096)
    host = 64 if _engine.gram_kernel(np, G) is None else 64 // _layout.GRAM_KERNEL_SPAN
    with _routed(device):
        op = StaticIHVP(G, damp=0.1, progress=lambda k, _: done.append(k))
    assert len(done) == (1 if device else host) and done[-1] == 4096
    assert op.dim == 4096


@DEVICE
def test_sharded_static_setup(device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfac_core._sharded_static as sharded

    grams = _spy(monkeypatch, sharded, "chunk_gram")
    with _routed(device):
        ShardedStaticIHVP(_gradients(M, 4096), damp=0.1, comm=SingleProcessComm())
    assert [len(chunk) for _, _, _, chunk, *_ in grams] == [1 if device else 64]


@DEVICE
def test_spectral_setup_diagonal_and_forms(device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfac_core._spectral_groups as groups
    import mfac_core._spectral_setup as spectral

    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", SMALL_HOST)
    d = 512
    grams = _spy(monkeypatch, spectral, "checked_gram")
    with _routed(device):
        op = SpectralIHVP(_gradients(M, d), damp=0.1)
    assert sum(len(chunk) for _, _, _, chunk, *_ in grams) == (1 if device else 64)
    stacks = _spy(monkeypatch, groups, "piece_stack")
    with _routed(device):
        op.diagonal()
    assert len(stacks) == (1 if device else 4)  # d / (SMALL_HOST / M) pieces
    # bilinear: rows of R a batch at a time, SMALL_HOST // d = 2 rows on the host.
    projections = _spy(monkeypatch, groups.GramEigen, "project")
    rng = np.random.default_rng(1)
    Q, R = rng.standard_normal((1, d)), rng.standard_normal((8, d))
    with _routed(device):
        op.bilinear(Q.astype(np.float32), R.astype(np.float32))
    assert len(projections) == 1 + (1 if device else 4)  # Q once, then R's batches


@DEVICE
def test_gform_diagonal_and_entries(device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfac_core._gform as gform

    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", SMALL_HOST)
    d = 512
    op = StaticIHVP(_gradients(M, d), damp=0.1)
    diagonals = _spy(monkeypatch, gform, "whitened_diagonal")
    pairs = _spy(monkeypatch, gform, "whitened_pairs")
    idx = np.arange(256)
    with _routed(device):
        op.diagonal()
        op.entries(idx, idx[::-1].copy())
    assert len(diagonals) == (1 if device else 4)  # 512 columns, 128 a piece
    assert len(pairs) == (1 if device else 4)  # 256 pairs, SMALL_HOST // (2 M) a chunk


@DEVICE
def test_dynamic_gram_and_sharded_passes(device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import mfac_core._dynamic_setup as dynamic_setup
    from mfac_core import ShardedDynamicIHVP
    from mfac_core._dynamic_sharded import pieces_of

    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", SMALL_HOST)
    d = 512
    grams = _spy(monkeypatch, dynamic_setup, "chunk_gram")
    op = ShardedDynamicIHVP(M, d, damp=0.1, dtype="float32", comm=SingleProcessComm())
    with _routed(device):
        dynamic_setup.local_gram(np, _gradients(M, d))
        spans = pieces_of(op)
    assert [len(chunk) for _, _, _, chunk, *_ in grams] == [1 if device else 4]
    assert len(spans) == (1 if device else 4)
    assert spans[0][2] == 0 and spans[-1][3] == d


@DEVICE
def test_streamed_entries(device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    import mfac_core._streaming as streaming

    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", SMALL_HOST)
    op = StaticIHVP.streamed(torch.from_numpy(_gradients(M, 512)), damp=0.1, device="cpu")
    pairs = _spy(monkeypatch, streaming, "whitened_pairs")
    idx = torch.arange(512)
    with _routed(device):
        op.entries(idx, idx.flip(0))
    assert len(pairs) == (1 if device else 4)  # 512 pairs, SMALL_HOST // M a chunk


@DEVICE
def test_jax_static_setup_and_diagonal(device: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JAX set-up's Gram and diagonal: on the host the Gram in blocks of 256 columns
    (``_gram.contract_columns``: a loop over the second) and the diagonal in 4 chunks; one
    chunk of each on a device (traced or not)."""
    jax = pytest.importorskip("jax")
    from mfac_core.jax import static_ihvp

    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", SMALL_HOST)
    import mfac_core._jax_static as jax_static

    G = jax.numpy.asarray(_gradients(M, 512))
    setups = _spy(monkeypatch, jax_static, "_static_setup")
    diagonals = _spy(monkeypatch, jax_static, "_static_diagonal")
    with jax.enable_x64(True), _routed(device):
        traced = str(jax.make_jaxpr(lambda G: static_ihvp(G, damp=0.1).diagonal())(G))
        concrete = static_ihvp(G, damp=0.1)
        diag = concrete.diagonal()
    # lax.fori_loop over the chunks after the first (a scan: its trip count is static,
    # which reverse-mode autodiff needs; the first chunk starts the carry, for shard_map);
    # one chunk on a device (the Gram of the whole G and the diagonal's one chunk: no loop).
    assert "while[" not in traced
    lengths = [int(n) for n in re.findall(r"length=(\d+)", traced)]
    assert lengths == ([] if device else [1, 3]), traced
    assert diag.shape == (512,)
    # The chunk widths given to the jitted set-up and diagonal (traced, then concrete).
    width = 512 if device else 128
    assert [a[-1] for a in setups] == [a[-1] for a in diagonals] == [width, width]
