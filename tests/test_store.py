"""Gradients larger than memory: read-only memmaps of G, the deprecated ``out=`` and
``overwrite_G=`` (the operator stores no W), and ``StaticIHVP.from_gradients``
(mfac_core._store), against the float64 oracles."""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
from conftest import rounded

import mfac_core._fused._ext
import mfac_core._gform
import mfac_core._pieces
from mfac_core import StaticIHVP
from mfac_core._gform import DenseBlockFactors, GFormFactor
from mfac_core._store import TextProgress
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    dense_inverse,
    to_numpy,
)

# (m, d, block_size): layouts with a group of blocks wider than m (the G-form) and without.
LAYOUTS = {
    "full": (5, 40, None),
    "gform-blocks+dense-ragged": (3, 23, 7),
    "gform-blocks+gform-ragged": (3, 14, 5),
    "dense-blocks": (6, 23, 4),
}


def _data(rng, m, d, dtype):
    G = rounded(rng.standard_normal((m, d)), dtype)
    return G, 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m


def _memmap(path, G, dtype, *, read_only=True):
    """G written to a .npy file, reopened as a memmap (read-only by default)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=G.shape)
    mm[...] = G
    mm.flush()
    del mm
    return np.load(path, mmap_mode="r" if read_only else "r+")


def _warm_up():
    # Lazy imports (SciPy's LAPACK, numpy.ma) must not count as the set-up's memory.
    for dt in (np.float32, np.float16):
        op = StaticIHVP(np.ones((2, 40), dt), damp=1.0, refine=1)
        op.matvec(np.ones(40, np.float32))
        op.matmat(np.ones((40, 2), np.float32))
        op.diagonal()


def _peak(call):
    """``call()`` and the peak of the memory NumPy allocated during it (tracemalloc)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _assert_gform(op, G):
    """The operator reads G itself (by reference) and holds no W: its factors are the
    G-form's (over G) and float64 inverse Cholesky factors of blocks no wider than m."""
    m = G.shape[0]
    assert op._factors
    for f in op._factors:
        assert isinstance(f, (GFormFactor, DenseBlockFactors)), type(f)
        if isinstance(f, GFormFactor):
            assert f.G is G
            assert f.group.size > m
        else:
            assert f.group.size <= m
            assert to_numpy(f.Linv).dtype == np.float64


@contextlib.contextmanager
def _deprecated():
    """``out=``/``overwrite_G=`` warn (DeprecationWarning, "no W") once, at the caller's line."""
    with pytest.warns(DeprecationWarning, match="no W") as record:
        yield
    ours = [w for w in record if w.category is DeprecationWarning and "no W" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert ours[0].filename == __file__, ours[0].filename  # not a line inside mfac_core


@contextlib.contextmanager
def _not_deprecated():
    """The deprecation of ``out=``/``overwrite_G=`` raised as an error (it must not occur)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no W", category=DeprecationWarning)
        yield


# -- out= and overwrite_G=: deprecated, ignored --------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_out_and_overwrite_G_warn_and_change_nothing(xp_device, dtype, layout, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    Gb = be.asarray(G, dtype)
    with _not_deprecated():
        ref = StaticIHVP(Gb, damp=damp, block_size=bs)
    _assert_gform(ref, Gb)
    oracle = SpectralOracle(G, damp, block_size=bs)
    X = rounded(rng.standard_normal((d, 2)), dtype)
    Xb = be.asarray(X, dtype)
    Y, diag = to_numpy(ref.matmat(Xb)), to_numpy(ref.diagonal())
    assert_close(Y, oracle.matmat(X), kappa=oracle.kappa)
    assert_close(diag, oracle.diagonal(), kappa=oracle.kappa)
    # What out= used to receive (W) is not written: out keeps these values, bit for bit.
    before = rounded(rng.standard_normal((m, d)), dtype)
    out = be.asarray(before, dtype)
    cases = {
        "out": {"out": out},
        "overwrite_G": {"overwrite_G": True},
        "out=G, overwrite_G": {"out": Gb, "overwrite_G": True},
        "out=G": {"out": Gb},
    }
    for case, kwargs in cases.items():
        with _deprecated():
            op = StaticIHVP(Gb, damp=damp, block_size=bs, **kwargs)
        np.testing.assert_array_equal(to_numpy(Gb), G, err_msg=case)  # G is kept
        np.testing.assert_array_equal(to_numpy(out), before, err_msg=case)
        _assert_gform(op, Gb)
        # The same operator as without the keywords, bit for bit.
        np.testing.assert_array_equal(to_numpy(op.matmat(Xb)), Y, err_msg=case)
        np.testing.assert_array_equal(to_numpy(op.diagonal()), diag, err_msg=case)


def test_outs_once_refused_now_only_warn(strict_device1, rng):
    # The out= arrays the operator used to refuse (they could not hold W) are ignored now:
    # each one warns, is left as it was, and the operator is the one without it.
    G, damp = _data(rng, 4, 30, "float64")
    with _not_deprecated():
        expected = StaticIHVP(G, damp=damp).todense()
    assert_close(expected, dense_inverse(G, damp), kappa=condition_number(G, damp))
    read_only = np.ones((4, 30))
    read_only.setflags(write=False)
    buf = np.zeros((8, 30))
    Gv = buf[:4]
    Gv[...] = G
    cases = [
        (G, np.full((4, 31), 2.0), {}),  # another shape
        (G, np.full((4, 30), 2.0, np.float32), {}),  # another dtype
        (G, read_only, {}),
        (G, strict_device1.asarray(np.full((4, 30), 2.0), "float64"), {}),  # library, device
        (Gv, buf[2:6], {}),  # overlapping G
        (Gv, Gv, {}),  # G itself, without overwrite_G
        (Gv, np.full((4, 30), 2.0), {"overwrite_G": True}),  # W "twice"
    ]
    for index, (Gi, out, kwargs) in enumerate(cases):
        G_before, out_before = to_numpy(Gi).copy(), to_numpy(out).copy()
        with _deprecated():
            op = StaticIHVP(Gi, damp=damp, out=out, **kwargs)
        np.testing.assert_array_equal(to_numpy(Gi), G_before, err_msg=str(index))
        np.testing.assert_array_equal(to_numpy(out), out_before, err_msg=str(index))
        _assert_gform(op, Gi)
        np.testing.assert_array_equal(op.todense(), expected, err_msg=str(index))
    np.testing.assert_array_equal(buf[4:], 0.0)
    # 2-byte G (which never had a W): warns too, and is the 2-byte operator as before.
    G16 = G.astype(np.float16)
    out16 = np.full((4, 30), 2.0, np.float16)
    with _deprecated():
        op = StaticIHVP(G16, damp=damp, out=out16)
    assert op.storage_dtype == "float16" and op.dtype == np.float32
    _assert_gform(op, G16)
    np.testing.assert_array_equal(out16, 2.0)
    oracle = SpectralOracle(G16.astype(np.float64), damp)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    # The flag itself is still checked: a string is no flag.
    with pytest.raises(TypeError, match="overwrite_G"):
        StaticIHVP(G, damp=damp, overwrite_G="yes")


def test_out_overlapping_G_torch(rng):
    torch = pytest.importorskip("torch")
    G, damp = _data(rng, 3, 20, "float64")
    buf = torch.zeros(6, 20, dtype=torch.float64)
    Gv = buf[:3]
    Gv[...] = torch.tensor(G)
    before = buf.clone()
    with _deprecated():
        op = StaticIHVP(Gv, damp=damp, out=buf[3:])  # one storage: once refused, now ignored
    assert torch.equal(buf, before)
    _assert_gform(op, Gv)
    assert_close(op.diagonal(), np.diag(dense_inverse(G, damp)), kappa=op.kappa_bound)
    with _deprecated():
        op = StaticIHVP(Gv, damp=damp, overwrite_G=True)
    assert torch.equal(buf, before)
    x = rng.standard_normal(20)
    assert_close(op.matvec(torch.tensor(x)), dense_inverse(G, damp) @ x, kappa=op.kappa_bound)


# -- memory maps ---------------------------------------------------------------------------


def test_read_only_memmap_G_keeps_md_out_of_memory(tmp_path, rng, monkeypatch):
    # float64 pieces of 2**14 entries where the passes run without the C extension, so
    # that the bounds below hold on that path too.
    monkeypatch.setattr(mfac_core._pieces, "PIECE_ENTRIES", 2**14)
    m, d, damp = 32, 60_000, 1e-3
    G64 = rounded(rng.standard_normal((m, d)) / np.sqrt(d), "float32")
    G = _memmap(tmp_path / "G.npy", G64, np.float32)
    assert not G.flags.writeable
    size = m * d * 4
    _warm_up()
    # The measure sees an m x d array that NumPy allocates (so the bounds below can fail).
    _, peak = _peak(lambda: G * 1)
    assert peak >= size, (peak, size)
    with _not_deprecated():
        op, peak = _peak(lambda: StaticIHVP(G, damp=damp))
    # No W and no copy of G: only bounded float64 pieces of the Gram and m x m matrices.
    assert peak < size / 8, (peak, size)
    _assert_gform(op, G)
    x = rounded(rng.standard_normal(d), "float32")
    y, peak = _peak(lambda: op.matvec(x.astype(np.float32)))
    assert peak < size / 4, (peak, size)  # a few vectors, no m x d temporary
    assert type(y) is np.ndarray
    oracle = SpectralOracle(G64, damp)
    assert_close(y, oracle.matvec(x), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    X = rounded(rng.standard_normal((d, 2)), "float32")
    assert_close(op.matmat(X.astype(np.float32)), oracle.matmat(X), kappa=oracle.kappa)
    # G is only read, and nothing was written beside it.
    assert os.listdir(tmp_path) == ["G.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "G.npy"), G64.astype(np.float32))


@pytest.mark.filterwarnings("ignore:mfac_core's C extension was not built")
@pytest.mark.parametrize("extension", [True, False])
def test_half_read_only_memmap_end_to_end(tmp_path, rng, monkeypatch, extension):
    # Pieces of 2**14 entries (the engine's float64 pieces where the C extension is not
    # used, and those of the Fisher diagonal), so that G spans many of them.
    monkeypatch.setattr(mfac_core._pieces, "PIECE_ENTRIES", 2**14)
    if not extension:
        # A build without a C compiler: the set-up's float64 pieces come from xp.astype,
        # and the last one was still held while the next was cast (1.07 times the bound).
        monkeypatch.setattr(mfac_core._fused._ext, "passes", None)
    m, d, damp = 12, 50_000, 1e-3
    G = _memmap(tmp_path / "G16.npy", rng.standard_normal((m, d)) / np.sqrt(d), np.float16)
    G64 = np.asarray(G, dtype=np.float64)
    size = m * d * 2
    _warm_up()
    op, peak = _peak(lambda: StaticIHVP(G, damp=damp))
    assert op.storage_dtype == "float16" and op._factors[0].G is G
    assert peak < size / 8, (peak, size)
    x = rounded(rng.standard_normal(d), "float32")
    y, peak = _peak(lambda: op.matvec(x.astype(np.float32)))
    assert peak < size, (peak, size)  # float32 pieces and vectors, no float32 copy of G (2 size)
    oracle = SpectralOracle(G64, damp)
    assert_close(y, oracle.matvec(x), kappa=oracle.kappa)
    refined = StaticIHVP(G, damp=damp, refine=1)
    assert_close(refined.matvec(x.astype(np.float32)), oracle.matvec(x), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)


@pytest.mark.parametrize("layout", ["fortran", "column-slice"])
def test_entries_of_a_non_contiguous_memmap_read_only_their_columns(layout, tmp_path, rng):
    # numpy.take copies the whole of a non-C-contiguous input before it gathers: single
    # entries of a Fortran-ordered or sliced memmap read all of G into memory.
    m, d, damp = 8, 20_000, 1e-3
    G64 = rounded(rng.standard_normal((m, d)) / np.sqrt(d), "float32")
    if layout == "fortran":
        np.save(tmp_path / "G.npy", np.asfortranarray(G64.astype(np.float32)))
        G = np.load(tmp_path / "G.npy", mmap_mode="r")
        assert G.flags.f_contiguous and not G.flags.c_contiguous
    else:
        G = _memmap(tmp_path / "G.npy", G64, np.float32)[:, ::2]
        G64 = G64[:, ::2]
    op = StaticIHVP(G, damp=damp)
    rows, cols = np.array([0, 5, 7, 9]), np.array([0, 5, 3, 9])
    _warm_up()
    op.entries(rows, cols)  # the first call's lower inverse of the factor is kept
    got, peak = _peak(lambda: op.entries(rows, cols))
    assert peak < G.nbytes / 8, (peak, G.nbytes)
    oracle = SpectralOracle(G64, damp)
    assert_close(got, oracle.entries(rows, cols), kappa=oracle.kappa)


# -- from_gradients ------------------------------------------------------------------------


def test_from_gradients_in_memory_single_and_batches(rng):
    m, d = 10, 30
    G, damp = _data(rng, m, d, "float64")
    items = [G[0], G[1:4], G[4], G[5:10]]  # single gradients and batches, mixed
    op = StaticIHVP.from_gradients(iter(items), num_grads=m, dim=d, damp=damp)
    assert op.dtype == np.float64
    assert_close(
        op.todense(), dense_inverse(G, damp), kappa=condition_number(G, damp), err_msg="F^-1"
    )


def test_big_endian_gradients(tmp_path, rng):
    # A big-endian file (written on another machine) is float32 to its reader, but the
    # passes read this machine's byte order only: the operator refuses it by saying so,
    # and from_gradients stores such gradients converted, instead of filling a
    # big-endian store (a whole pass over the loader) that the operator then refuses.
    m, d = 4, 30
    G, damp = _data(rng, m, d, "float32")
    G = G.astype(np.float32)
    big = G.astype(">f4")
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(TypeError, match=r"big-endian byte order.*newbyteorder\('='\)"):
        StaticIHVP(np.load(tmp_path / "big.npy", mmap_mode="r"), damp=damp)
    op = StaticIHVP.from_gradients(
        [big[:1], big[1:2], G[2:]], num_grads=m, dim=d, damp=damp, grads_out=tmp_path / "G.npy"
    )
    stored = np.load(tmp_path / "G.npy")
    assert stored.dtype == np.dtype("=f4")
    np.testing.assert_array_equal(stored, G)
    x = G.mean(axis=0)
    np.testing.assert_array_equal(op.matvec(x), StaticIHVP(G, damp=damp).matvec(x))
    # A big-endian dtype= is the dtype in the machine's order.
    op = StaticIHVP.from_gradients(iter(big), num_grads=m, dim=d, damp=damp, dtype=">f4")
    assert op._factors[0].G.dtype == np.dtype("=f4")
    # A big-endian grads_out (an array the operator would then read) is refused with the
    # same hint as a big-endian G, before the loader is read.
    store = np.zeros((m, d), dtype=">f4")
    with pytest.raises(TypeError, match=r"grads_out.*big-endian byte order.*newbyteorder\('='\)"):
        StaticIHVP.from_gradients(iter(()), num_grads=m, dim=d, damp=damp, grads_out=store)
    np.testing.assert_array_equal(store, 0)


def test_from_gradients_of_ml_dtypes_bfloat16(tmp_path, rng, monkeypatch):
    # JAX's bfloat16 gradients reach NumPy as ml_dtypes' bfloat16 (numpy.isdtype raises
    # TypeError for it): stored as they are, a 2-byte G as PyTorch's bfloat16 is, or
    # converted to the dtype= asked for; float32 ones rounded to nearest even by
    # dtype="bfloat16". They were refused without dtype=, and dtype="bfloat16" too.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    m, d, damp = 4, 30, 0.1
    B = rng.standard_normal((m, d)).astype(bf16)
    G = B.astype(np.float64)
    oracle = SpectralOracle(G, damp)
    x = G.mean(axis=0).astype(np.float32)
    for dtype in (None, "bfloat16", ml_dtypes.bfloat16, bf16):
        op = StaticIHVP.from_gradients(iter(B), num_grads=m, dim=d, damp=damp, dtype=dtype)
        assert op.storage_dtype == "bfloat16" and op._factors[0].G.dtype == bf16
        np.testing.assert_array_equal(op._factors[0].G.view(np.uint16), B.view(np.uint16))
        assert_close(op.matvec(x), oracle.matvec(x), kappa=oracle.kappa)
    op = StaticIHVP.from_gradients(iter(B), num_grads=m, dim=d, damp=damp, dtype="float32")
    np.testing.assert_array_equal(op._factors[0].G, G)  # bfloat16 values are float32 values
    assert_close(op.matvec(x), oracle.matvec(x), kappa=oracle.kappa)
    # float32 gradients rounded to bfloat16 (nearest even; ml_dtypes rounds as PyTorch does).
    F = rng.standard_normal((m, d)).astype(np.float32)
    op = StaticIHVP.from_gradients(iter(F), num_grads=m, dim=d, damp=damp, dtype="bfloat16")
    np.testing.assert_array_equal(op._factors[0].G.view(np.uint16), F.astype(bf16).view(np.uint16))
    # A .npy file: numpy.save's header records raw 2-byte values ("|V2"); the file maps
    # back as bfloat16 through a view, and G given as the raw values says so.
    path = tmp_path / "B.npy"
    op = StaticIHVP.from_gradients(iter(B), num_grads=m, dim=d, damp=damp, grads_out=path)
    raw = np.load(path, mmap_mode="r")
    assert raw.dtype.kind == "V" and raw.dtype.itemsize == 2
    np.testing.assert_array_equal(raw.view(bf16), B)
    mapped = StaticIHVP(raw.view(bf16), damp=damp)
    np.testing.assert_array_equal(mapped.matvec(x), op.matvec(x))
    with pytest.raises(TypeError, match=r"raw 2-byte values.*G\.view\(ml_dtypes\.bfloat16\)"):
        StaticIHVP(raw, damp=damp)
    # Big-endian bfloat16 gradients are stored converted, as big-endian float32 ones are
    # (test_big_endian_gradients); they were refused as "no real floating dtype, got >V2".
    # Raw |V2 gradients (numpy.load of a saved bfloat16 one) are refused naming the view.
    swapped = B.astype(bf16.newbyteorder(">"))
    for dtype in (None, "bfloat16"):
        op = StaticIHVP.from_gradients(iter(swapped), num_grads=m, dim=d, damp=damp, dtype=dtype)
        assert op._factors[0].G.dtype == bf16
        np.testing.assert_array_equal(op._factors[0].G.view(np.uint16), B.view(np.uint16))
    for dtype in (None, "bfloat16"):
        with pytest.raises(TypeError, match=r"gradient 0 .*\|V2.*\.view\(ml_dtypes\.bfloat16\)"):
            StaticIHVP.from_gradients(
                iter(B.view("V2")), num_grads=m, dim=d, damp=damp, dtype=dtype
            )
    # Values: a non-finite gradient, and one beyond bfloat16's range, are refused.
    B[1, 2] = np.inf
    for dtype in (None, "float32"):
        with pytest.raises(ValueError, match="gradient 1 holds NaN or infinity"):
            StaticIHVP.from_gradients(iter(B), num_grads=m, dim=d, damp=damp, dtype=dtype)
    F[2, 3] = 3.4e38
    with pytest.raises(ValueError, match="gradient 2 overflows the store's dtype bfloat16"):
        StaticIHVP.from_gradients(iter(F), num_grads=m, dim=d, damp=damp, dtype="bfloat16")
    # Without ml_dtypes, NumPy has no bfloat16 of its own: the name is refused saying so.
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(TypeError, match=r"dtype='bfloat16' is ml_dtypes'.*not installed"):
        StaticIHVP.from_gradients(iter(F), num_grads=m, dim=d, damp=damp, dtype="bfloat16")


def test_from_gradients_to_files(tmp_path, rng):
    m, d = 8, 500
    G, damp = _data(rng, m, d, "float32")
    calls = []
    with _not_deprecated():
        op = StaticIHVP.from_gradients(
            (g for g in G),
            num_grads=m,
            dim=d,
            damp=damp,
            dtype="float32",
            grads_out=tmp_path / "G.npy",
            progress=lambda *a: calls.append(a),
        )
    stored = np.load(tmp_path / "G.npy", mmap_mode="r")
    np.testing.assert_array_equal(stored, G)  # the gradients, reopenable
    assert os.listdir(tmp_path) == ["G.npy"]  # no file for W: there is none
    # The operator reads the file's memmap itself.
    (Gop,) = {id(f.G): f.G for f in op._factors}.values()
    assert isinstance(Gop, np.memmap) and os.path.samefile(Gop.filename, tmp_path / "G.npy")
    _assert_gform(op, Gop)
    assert [c[1:] for c in calls if c[0] == "gradients"] == [(i, m) for i in range(1, m + 1)]
    setup = [c[1:] for c in calls if c[0] == "set-up"]
    # One pass over the d columns (the Gram; no second pass writing W).
    assert setup and setup[-1] == (d, d) and {t for _, t in setup} == {d}
    assert [s for s, _ in setup] == sorted(s for s, _ in setup)
    assert calls.index(next(c for c in calls if c[0] == "set-up")) == m  # stages in order
    oracle = SpectralOracle(G, damp)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    # out= (a path) and overwrite_G=: warned about, ignored; no W.npy, G's file is G.
    with _deprecated():
        op1 = StaticIHVP.from_gradients(
            iter(G),
            num_grads=m,
            dim=d,
            damp=damp,
            grads_out=tmp_path / "GW.npy",
            out=tmp_path / "W.npy",
            overwrite_G=True,
        )
    assert sorted(os.listdir(tmp_path)) == ["G.npy", "GW.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "GW.npy"), G)
    assert_close(op1.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    # float16 storage: the G-form over the file.
    op2 = StaticIHVP.from_gradients(
        iter(G), num_grads=m, dim=d, damp=damp, dtype=np.float16, grads_out=tmp_path / "H.npy"
    )
    assert op2.storage_dtype == "float16"
    G16 = G.astype(np.float16).astype(np.float64)
    assert_close(op2.diagonal(), np.diag(dense_inverse(G16, damp)), kappa=oracle.kappa)


def test_from_gradients_into_a_torch_tensor(rng):
    torch = pytest.importorskip("torch")
    m, d = 6, 40
    G, damp = _data(rng, m, d, "float64")
    store = torch.empty(m, d, dtype=torch.float32)
    op = StaticIHVP.from_gradients(
        (torch.tensor(g) for g in G), num_grads=m, dim=d, damp=damp, grads_out=store
    )  # float64 gradients into the float32 store the user chose
    assert op.dtype == torch.float32
    np.testing.assert_array_equal(store.numpy(), G.astype(np.float32))
    with pytest.raises(TypeError, match="without grads_out the store is a NumPy array"):
        StaticIHVP.from_gradients(iter(torch.tensor(G)), num_grads=m, dim=d, damp=damp)


def test_torch_gradients_into_a_file_are_refused_naming_the_file(tmp_path, rng):
    # The message said "without grads_out" to a call that had passed a path in grads_out.
    torch = pytest.importorskip("torch")
    G, damp = _data(rng, 3, 10, "float32")
    path = tmp_path / "G.npy"
    with pytest.raises(TypeError, match=r"torch arrays, but grads_out names a \.npy file"):
        StaticIHVP.from_gradients(
            iter(torch.tensor(G)), num_grads=3, dim=10, damp=damp, grads_out=path
        )
    assert not path.exists()


def test_from_gradients_stores_no_autograd_graph(rng):
    # Gradients that require grad (create_graph=True, or a function of the weights):
    # writing them into the user's tensor made it a node of every gradient's graph
    # (requires_grad, grad_fn), keeping all m graphs alive.
    torch = pytest.importorskip("torch")
    m, d = 4, 30
    G, damp = _data(rng, m, d, "float32")
    w = torch.tensor(G, requires_grad=True)
    for wide in (False, True):  # stored as they are, or cast to the store's float32
        store = torch.empty(m, d, dtype=torch.float32)
        gradients = ((w[i].double() if wide else w[i]) * 1.0 for i in range(m))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True"
            op = StaticIHVP.from_gradients(
                gradients, num_grads=m, dim=d, damp=damp, grads_out=store
            )
        assert not store.requires_grad and store.grad_fn is None
        np.testing.assert_array_equal(store.numpy(), G.astype(np.float32))
        assert op.dtype == torch.float32


def test_from_gradients_text_bar():
    stream = io.StringIO()
    bar = TextProgress(stream, width=10)
    for i in range(1, 5):
        bar("gradients", i, 4)
    bar("set-up", 10, 10)
    text = stream.getvalue()
    assert "[##########] 100% (4/4)\n" in text and "set-up" in text
    assert text.count("\r") == 5


def test_from_gradients_text_bar_ends_its_line_on_failure(rng, capsys):
    # Regression: a failed call left the bar unfinished, so that what stderr showed next
    # (the traceback) went on its line: "75% (3/4)Traceback ...".
    G, damp = _data(rng, 4, 20, "float64")
    with pytest.raises(ValueError, match="ended after 3"):
        StaticIHVP.from_gradients(iter(G[:3]), num_grads=4, dim=20, damp=damp, progress=True)
    assert capsys.readouterr().err.endswith("75% (3/4)\n")
    StaticIHVP.from_gradients(iter(G), num_grads=4, dim=20, damp=damp, progress=True)
    assert capsys.readouterr().err.count("\n") == 2  # one line per stage, as before


def _bad_cases(G):
    m, d = G.shape
    nan = G.copy()
    nan[3, 7] = np.nan
    return [
        ("too few", lambda: iter(G[:-1]), {}, ValueError, f"ended after {m - 1} of"),
        # Not "after the 8-th" (nor "1-th", "3-th"): the count asked for.
        ("too many", lambda: iter(np.vstack([G, G[:1]])), {}, ValueError, "after the 8 asked"),
        ("batch too many", lambda: iter([G[:5], G[3:]]), {}, ValueError, "exceed"),
        ("trailing None", lambda: iter([*G, None]), {}, ValueError, "yielded None after the 8"),
        (
            "empty batch",
            lambda: iter([G[:3], G[3:3], G[3:]]),
            {},
            ValueError,
            r"gradient 1 is an empty batch, shape \(0, 20\)",
        ),
        ("wrong shape", lambda: iter([G[0], G[1, :-1]]), {}, ValueError, r"gradient 1 .*shape"),
        ("3-D", lambda: iter([G[None]]), {}, ValueError, "shape"),
        ("non-finite", lambda: iter(nan), {}, ValueError, "gradient 3 holds NaN"),
        ("integers", lambda: iter(np.ones((m, d), int)), {}, TypeError, "floating"),
        (
            "mixed dtypes",
            lambda: iter([G[0]] + [g.astype(np.float32) for g in G[1:]]),
            {},
            TypeError,
            "dtype=",
        ),
        (
            "float16 overflow",
            lambda: iter(G * 1e6),
            {"dtype": "float16"},
            ValueError,
            "overflows",
        ),
        ("not iterable", lambda: 3, {}, TypeError, "iterable"),
        ("bad damp", lambda: iter(G), {"damp": -1.0}, ValueError, "damp"),
        ("bad dtype", lambda: iter(G), {"dtype": "int8"}, TypeError, "dtype"),
        ("bad progress", lambda: iter(G), {"progress": "yes"}, TypeError, "progress"),
        ("bad overwrite_G", lambda: iter(G), {"overwrite_G": "yes"}, TypeError, "overwrite_G"),
        (
            "missing folder",
            lambda: iter(G),
            {"grads_out": os.path.join("missing", "G.npy")},
            FileNotFoundError,
            "folder",
        ),
        # The deprecated out= (a path) makes no file, and G's file is removed as ever.
        ("too few, out=", lambda: iter(G[:-1]), {"out": "W.npy"}, ValueError, "ended after"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_from_gradients_errors_leave_nothing_behind(case, tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    G, damp = _data(rng, 8, 20, "float64")
    name, make, kwargs, exc, match = _bad_cases(G)[case]
    consumed = []

    def gradients():
        for g in make():
            consumed.append(1)
            yield g

    source = make() if name == "not iterable" else gradients()
    opts = {"num_grads": 8, "dim": 20, "damp": damp, "grads_out": tmp_path / "G.npy"}
    opts.update(kwargs)
    warns = _deprecated() if "out" in kwargs else contextlib.nullcontext()
    with warns, pytest.raises(exc, match=match):
        StaticIHVP.from_gradients(source, **opts)
    assert os.listdir(tmp_path) == []  # the files it had created are removed
    if name in ("bad damp", "bad dtype", "bad progress", "bad overwrite_G", "missing folder"):
        assert not consumed  # refused before the data loader was touched
    elif name != "not iterable":
        assert consumed  # the others fail on (or after) the gradients


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_from_gradients_reserves_the_file_on_disk(tmp_path, rng, monkeypatch):
    # The new .npy file is sparse: with the disk full, a write into the memmap killed the
    # process (SIGBUS) half through the loader, and the file stayed. Its blocks are
    # reserved when it is made, so that a full disk is an OSError then.
    m, d = 8, 20_000
    G, damp = _data(rng, m, d, "float32")
    G = G.astype(np.float32)
    path = tmp_path / "G.npy"
    blocks = []

    def gradients():
        for g in G:
            yield g
            if not blocks:  # the file exists, one row written
                blocks.append(os.stat(path).st_blocks * 512)

    StaticIHVP.from_gradients(gradients(), num_grads=m, dim=d, damp=damp, grads_out=path)
    assert blocks[0] >= m * d * 4, (blocks, m * d * 4)

    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(OSError, match=r"grads_out: cannot reserve the \d+ bytes .*No space"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=m, dim=d, damp=damp, grads_out=tmp_path / "G2.npy"
        )
    assert os.listdir(tmp_path) == ["G.npy"]


def test_from_gradients_keeps_the_loaders_own_type_error(rng):
    # A TypeError inside the iterable's __iter__ is the loader's: it is not reported as
    # "gradients must be an iterable".
    class Loader:
        def __iter__(self):
            raise TypeError("collate: cannot stack a list and a dict")

    with pytest.raises(TypeError, match="collate: cannot stack"):
        StaticIHVP.from_gradients(Loader(), num_grads=2, dim=5, damp=1.0)
    with pytest.raises(TypeError, match="gradients must be an iterable of arrays, got int"):
        StaticIHVP.from_gradients(3, num_grads=2, dim=5, damp=1.0)
    for scalar in (np.float64(1.0), np.zeros(())):  # they have __getitem__ and __iter__
        with pytest.raises(TypeError, match="gradients must be an iterable of arrays, got"):
            StaticIHVP.from_gradients(scalar, num_grads=2, dim=5, damp=1.0)


def test_from_gradients_user_arrays_and_existing_files(tmp_path, rng):
    G, damp = _data(rng, 4, 20, "float64")
    (tmp_path / "G.npy").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=tmp_path / "G.npy"
        )
    assert (tmp_path / "G.npy").read_bytes() == b"precious"
    # out= is ignored: an existing file named by it is neither refused nor touched, an
    # array is left as it was, and the same path as grads_out is only grads_out.
    with _deprecated():
        op = StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, out=tmp_path / "G.npy"
        )
    assert (tmp_path / "G.npy").read_bytes() == b"precious"
    assert_close(op.todense(), dense_inverse(G, damp), kappa=condition_number(G, damp))
    W = np.full((4, 20), 2.0)
    with _deprecated():
        StaticIHVP.from_gradients(iter(G), num_grads=4, dim=20, damp=damp, out=W)
    np.testing.assert_array_equal(W, 2.0)
    with _deprecated():
        op = StaticIHVP.from_gradients(
            iter(G),
            num_grads=4,
            dim=20,
            damp=damp,
            grads_out=tmp_path / "a.npy",
            out=tmp_path / "a.npy",
        )
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), G)
    assert sorted(os.listdir(tmp_path)) == ["G.npy", "a.npy"]
    assert_close(op.todense(), dense_inverse(G, damp), kappa=condition_number(G, damp))
    # A store the caller passes: checked first, keeps the rows read before a failure.
    with pytest.raises(ValueError, match="shape"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=np.zeros((4, 21))
        )
    with pytest.raises(TypeError, match="differs"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=np.zeros((4, 20)), dtype="float32"
        )
    store = np.zeros((4, 20))
    with pytest.raises(ValueError, match="ended after 3"):
        StaticIHVP.from_gradients(iter(G[:3]), num_grads=4, dim=20, damp=damp, grads_out=store)
    np.testing.assert_array_equal(store[:3], G[:3])
    # islice takes the first num_grads of a longer (here endless) iterable.
    op = StaticIHVP.from_gradients(
        itertools.islice(itertools.cycle(G), 4), num_grads=4, dim=20, damp=damp
    )
    assert_close(op.todense(), dense_inverse(G, damp), kappa=condition_number(G, damp))


def _guidance_example() -> str:
    """The code block of docs/guidance.rst's section "Gradients larger than memory"."""
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs" / "guidance.rst"
    if not docs.exists():
        pytest.skip("docs/ is not beside the tests")
    text = docs.read_text(encoding="utf-8").split("Gradients larger than memory\n", 1)[1]
    block = text.split(".. code-block:: python\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("   "):
            break  # the block ends at the first line that is not indented
        lines.append(line[3:])
    return "\n".join(lines)


def test_guidance_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with _not_deprecated():  # the example uses no deprecated keyword
        exec(compile(_guidance_example(), "guidance.rst", "exec"), ns)
    assert "100%" in capsys.readouterr().err  # the text bar
    assert os.listdir(tmp_path) == ["G.npy"]  # the gradients' file, and no W
    # Both operators read that file (the second through a read-only map of it).
    assert isinstance(ns["op"]._factors[0].G, np.memmap)
    assert isinstance(ns["G"], np.memmap) and not ns["G"].flags.writeable
    _assert_gform(ns["op2"], ns["G"])
    G = np.load(tmp_path / "G.npy").astype(np.float64)
    theta, damp = ns["theta"].astype(np.float64), ns["damp"]
    oracle = SpectralOracle(G, damp)
    assert_close(ns["rho"], theta**2 / (2 * oracle.diagonal()), kappa=oracle.kappa)
    selected = np.asarray(ns["selected"])
    assert selected.sum() == len(theta) // 2
    assert np.all(ns["theta_new"][selected] == 0)
    assert_close(ns["op2"].diagonal(), SpectralOracle(G, 10 * damp).diagonal(), kappa=oracle.kappa)


def test_from_gradients_dangling_link_folder_and_huge_sizes(tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    G, damp = _data(rng, 4, 20, "float64")
    # A dangling symbolic link is an existing name: followed, it made the file at its
    # target, and a failure removed the link and left that file behind.
    os.symlink(tmp_path / "target.npy", tmp_path / "link.npy")
    with pytest.raises(FileExistsError, match=r"link\.npy' exists"):
        StaticIHVP.from_gradients(iter(G[:3]), num_grads=4, dim=20, damp=damp, grads_out="link.npy")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        StaticIHVP.from_gradients(iter(G), num_grads=4, dim=20, damp=damp, grads_out=tmp_path)
    # Sizes no array can have: said with the sizes, before the loader is read (was NumPy's
    # overflow warning and "[Errno 22] Invalid argument", or "array is too big").
    consumed = []

    def gradients():
        consumed.append(1)
        yield from G

    for out, dtype, match in [
        (None, None, r"num_grads=4 x dim=an int of 401 digits .* at least 2 bytes"),
        ("G.npy", "float64", r"num_grads=4 x dim=an int of 401 digits .* of 8 bytes"),
        ("G.npy", None, r"num_grads=10000000000 x dim=10000000000 .* 2\.000e\+20 bytes"),
    ]:
        big = 10**400 if "401" in match else 10**10
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no overflow warning of NumPy's
            with pytest.raises(ValueError, match=match):
                StaticIHVP.from_gradients(
                    gradients(),
                    num_grads=4 if big == 10**400 else big,
                    dim=big,
                    damp=damp,
                    dtype=dtype,
                    grads_out=out,
                )
    assert not consumed
    assert sorted(os.listdir(tmp_path)) == ["link.npy"]


def test_from_gradients_path_ending_in_a_separator(tmp_path, rng, monkeypatch):
    # "new/" names a folder (and "" the working directory): the system refused to create
    # that file (EISDIR) only when the store was made, after the first gradient, as a bare
    # IsADirectoryError naming no option.
    monkeypatch.chdir(tmp_path)
    G, damp = _data(rng, 4, 20, "float64")
    (tmp_path / "f.npy").write_bytes(b"")
    consumed = []

    def gradients():
        consumed.append(1)
        yield from G

    for out, exc, match in [
        ("new" + os.sep, FileNotFoundError, r"grads_out: .*new.* names a folder .* not exist"),
        (os.path.join(tmp_path, "a", "b", ""), FileNotFoundError, r"not exist: .*b;"),
        ("f.npy" + os.sep, FileExistsError, r"grads_out: .*f\.npy.* exists"),
        (str(tmp_path) + os.sep, IsADirectoryError, "is a folder"),  # as before
        # Inside a file: its folder "does not exist" was untrue (the CLI's -o says so too).
        (os.path.join("f.npy", "G.npy"), NotADirectoryError, r"f\.npy, which is a file, not"),
        ("", ValueError, "grads_out is an empty path"),  # was the working directory's EISDIR
    ]:
        with pytest.raises(exc, match=match):
            StaticIHVP.from_gradients(gradients(), num_grads=4, dim=20, damp=damp, grads_out=out)
    assert not consumed
    assert sorted(os.listdir(tmp_path)) == ["f.npy"]


def test_from_gradients_leaves_a_file_made_after_its_check_alone(tmp_path, rng, monkeypatch):
    # A file made by someone else between the check of the path and the store's creation
    # was truncated by open_memmap's mode "w+" (and removed if the call then failed).
    import mfac_core._store as store

    G, damp = _data(rng, 4, 20, "float64")
    path = tmp_path / "G.npy"
    checked = store.check_new_path
    calls = []

    def check_then_race(target, name):
        out = checked(target, name)
        calls.append(1)
        if len(calls) == 2:  # the check when the store is made (the first: before the loader)
            path.write_bytes(b"precious")
        return out

    monkeypatch.setattr(store, "check_new_path", check_then_race)
    with pytest.raises(FileExistsError, match="exists"):
        StaticIHVP.from_gradients(iter(G), num_grads=4, dim=20, damp=damp, grads_out=path)
    assert path.read_bytes() == b"precious"


def test_from_gradients_names_a_file_the_disk_cannot_hold(tmp_path, rng, monkeypatch):
    def refused(*args, **kwargs):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(np, "memmap", refused)  # what extends the file to its size
    G, damp = _data(rng, 4, 20, "float64")
    with pytest.raises(OSError, match=r"grads_out: cannot make .*G\.npy.*640 bytes .*too large"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=tmp_path / "G.npy"
        )
    assert os.listdir(tmp_path) == []


def test_from_gradients_names_the_entry_of_G_that_is_not_finite_or_overflows(rng):
    # It said only "gradient 1 holds NaN or infinity", of a batch whose items are not
    # rows of G: which of its gradients, which coordinate, was left to find.
    G = rng.standard_normal((8, 20))
    G[6, 17] = np.nan
    with pytest.raises(ValueError, match=r"gradient 1 holds NaN or infinity: G\[6, 17\] is nan"):
        StaticIHVP.from_gradients(iter([G[:4], G[4:]]), num_grads=8, dim=20, damp=1.0)
    with pytest.raises(ValueError, match=r"gradient 6 holds NaN or infinity: G\[6, 17\] is nan"):
        StaticIHVP.from_gradients(iter(G), num_grads=8, dim=20, damp=1.0, dtype="float32")
    G[6, 17] = -1e6
    with pytest.raises(ValueError, match=r"float16 \(largest 65504\): G\[6, 17\] is -1e\+06"):
        StaticIHVP.from_gradients(
            iter([G[:3], G[3:]]), num_grads=8, dim=20, damp=1.0, dtype="float16"
        )


def test_a_file_being_filled_is_not_a_npy_file_until_the_last_gradient(tmp_path, rng):
    # A process killed while it filled the file (SIGKILL, a batch system's time limit)
    # cannot remove it; it was a complete .npy file from the start, its unfilled rows
    # zeros, which numpy.load (and the CLI) then read as gradients without a word.
    G, damp = _data(rng, 4, 10, "float64")
    path = tmp_path / "G.npy"
    seen = []

    def gradients():
        for i, g in enumerate(G):
            if i == 2:  # as a killed process leaves it
                # NumPy's words for it, which docs/guidance.rst quotes.
                with pytest.raises(ValueError, match="pickled"):
                    np.load(path, mmap_mode="r")
                seen.append(i)
            yield g

    op = StaticIHVP.from_gradients(gradients(), num_grads=4, dim=10, damp=damp, grads_out=path)
    assert seen == [2]
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), G)
    assert_close(op.diagonal(), SpectralOracle(G, damp).diagonal(), kappa=condition_number(G, damp))


def test_the_rows_are_written_out_before_the_file_is_marked_complete(tmp_path, rng, monkeypatch):
    # The mark was written at once and the rows whenever the system wrote the map's pages
    # back: after a crash, or read from another machine over a network file system, the
    # file could be complete to numpy.load with rows still missing.
    import mfac_core._store as store

    G, damp = _data(rng, 3, 10, "float64")
    events = []
    flush, mark = np.memmap.flush, store._mark_finished

    def marking(path):
        events.append("mark")
        mark(path)

    monkeypatch.setattr(np.memmap, "flush", lambda self: (events.append("rows"), flush(self)))
    monkeypatch.setattr(store, "_mark_finished", marking)
    StaticIHVP.from_gradients(iter(G), num_grads=3, dim=10, damp=damp, grads_out=tmp_path / "G.npy")
    assert events[-2:] == ["rows", "mark"]


def test_the_unfinished_mark_is_on_the_disk_before_the_first_row(tmp_path, rng, monkeypatch):
    # NumPy's header (a complete .npy file's) could reach the disk before the mark, which
    # then stayed in memory only: a machine that went down while the file was filled
    # left it complete-looking, its unfilled rows zeros.
    G, damp = _data(rng, 3, 10, "float64")
    path = tmp_path / "G.npy"
    synced = []

    def fsync(fd):
        with open(path, "rb") as fh:
            synced.append(fh.read(1))

    monkeypatch.setattr(os, "fsync", fsync)

    def gradients():
        assert synced == []  # nothing made before the first gradient
        yield G[0]
        assert synced == [b"\x00"]
        yield from G[1:]

    StaticIHVP.from_gradients(gradients(), num_grads=3, dim=10, damp=damp, grads_out=path)
    assert synced == [b"\x00"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO])
def test_a_file_system_that_cannot_sync_the_mark_is_no_error_a_disk_error_is(
    tmp_path, rng, monkeypatch, code
):
    G, damp = _data(rng, 3, 10, "float64")
    path = tmp_path / "G.npy"

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)

    def make():
        return StaticIHVP.from_gradients(iter(G), num_grads=3, dim=10, damp=damp, grads_out=path)

    if code == errno.EIO:
        with pytest.raises(OSError, match=os.strerror(code)):
            make()
        assert not path.exists()
    else:
        make()
        np.testing.assert_array_equal(np.load(path), G)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_the_file_is_never_a_complete_npy_file_before_its_rows(tmp_path, rng, monkeypatch, dtype):
    # NumPy's open_memmap wrote a complete header and the mark came after: a process
    # killed in between left a .npy file of zeros. The header now comes marked; the
    # finished file is what numpy.save writes.
    if dtype == "bfloat16":
        stored = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        stored = np.dtype(dtype)
    G, damp = _data(rng, 3, 10, "float32")
    path = tmp_path / "G.npy"
    first_bytes = []
    memmap = np.memmap

    def mapping(filename, *args, **kwargs):
        with open(filename, "rb") as fh:
            first_bytes.append(fh.read(1))
        return memmap(filename, *args, **kwargs)

    monkeypatch.setattr(np, "memmap", mapping)
    StaticIHVP.from_gradients(
        iter(G), num_grads=3, dim=10, damp=damp, grads_out=path, dtype=dtype, check_finite=False
    )
    monkeypatch.undo()
    assert first_bytes == [b"\x00"]
    saved = tmp_path / "saved.npy"
    np.save(saved, np.load(path).view(stored))  # numpy.load gives bfloat16 as raw |V2
    assert path.read_bytes() == saved.read_bytes()
