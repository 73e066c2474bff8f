"""A Fortran-ordered G (``Gt.T``, a .npy file saved from one, ``np.asfortranarray``): the C
extension reads it in place, as its transpose. With several vectors (or rows of coefficients)
every result is the C-ordered G's, bit for bit (the kernels sum the same terms in the same
order); with one, the kernels read Gt's rows directly and sum in another order, in float64:
within the float64 bound of the C-ordered sums, and the same whatever the threads
(mfac_core._fused)."""

from __future__ import annotations

import numpy as np
import pytest

from mfac_core import SpectralIHVP, StaticIHVP, _engine, _fused
from mfac_core.testing import condition_number

pytestmark = pytest.mark.skipif(
    not _fused.available(), reason="the C extension mfac_core._fused._passes was not built"
)

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None  # type: ignore[assignment]


def _isas() -> list[str | None]:
    if not _fused.available():
        return []
    best = _fused.ISAS[_fused.best_isa()]
    return [None] + [name for name, code in _fused.ISAS.items() if code <= best]


def _storages() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [
        ("float32", np.float32),
        ("float64", np.float64),
        ("float16", np.float16),
    ]
    if ml_dtypes is not None:
        out.append(("bfloat16", ml_dtypes.bfloat16))
    return out


# (m, ld, col0, n): m not a multiple of the panels' 8 rows, widths below one tile and across
# a chunk of project64 (4096 columns) with a last piece of single columns, odd offsets. One
# vector reads Gt in place at m = 32 and 48 (every storage and ISA; project64: 2 and 3 vf-wide
# pieces of sums in registers with AVX-512, 4 or more, in L1, with the others) and 70 (64 + 6
# one by one; project64 over float32 and float64 only: 4 pieces with AVX-512, more with AVX2
# and base); m = 9 and 13 take the tiles (too few bytes of whole vectors a row).
SHAPES = [
    (1, 40, 0, 40),
    (5, 97, 3, 90),
    (13, 300, 37, 201),
    (9, 4_200, 5, 4_190),
    (70, 45, 2, 43),
    (32, 50, 3, 45),
    (48, 21, 0, 21),
]

EPS64 = float(np.finfo(np.float64).eps)


def _gamma(n: int) -> float:
    """The float64 bound of a sum of n terms, relative to the sum of their magnitudes."""
    return n * EPS64 / (1 - n * EPS64)


def _assert_sums_close(got, want, terms, n, dtype):
    """got and want: float64 sums of n terms (magnitudes summed: ``terms``) in two orders, each
    rounded once to ``dtype``; they differ by at most both sums' bound and the roundings."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    ulp = np.spacing(np.maximum(np.abs(got), np.abs(want)).astype(dtype)).astype(np.float64)
    tol = 2 * _gamma(n) * terms + (ulp if dtype != np.float64 else 0.0)
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


def _single(K: int) -> np.ndarray:
    """The rows of K vectors that the kernels take alone (groups of 8: a last group of one)."""
    rows = np.zeros(K, bool)
    rows[K - 1] = K % 8 == 1
    return rows


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("storage", _storages(), ids=lambda s: s[0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fortran_ordered_passes_are_the_c_ordered_bits(isa, storage, shape, rng):
    m, ld, col0, n = shape
    G = rng.standard_normal((m, ld)).astype(storage[1])
    F = np.asfortranarray(G)
    assert F.flags.f_contiguous and (m == 1 or not F.flags.c_contiguous)
    assert _fused.supports64(F)
    cols = {"start": col0, "stop": col0 + n, "isa": isa}
    Gn = np.abs(G[:, col0 : col0 + n].astype(np.float64))
    for K in (1, 3, 9):
        X = rng.standard_normal((K, n)).astype(np.float32)
        one = _single(K)
        got, want = _fused.project64(F, X, **cols), _fused.project64(G, X, **cols)
        np.testing.assert_array_equal(got[~one], want[~one])
        _assert_sums_close(got[one], want[one], np.abs(X[one]) @ Gn.T, n, np.float64)
        C, a = rng.standard_normal((K, m)), rng.standard_normal(K)
        for x, dt in ((X, np.float32), (X.astype(np.float64), np.float64), (X[0], np.float32)):
            got = _fused.combine64(F, C, a, x, dtype=dt, **cols)
            want = _fused.combine64(G, C, a, x, dtype=dt, **cols)
            np.testing.assert_array_equal(got[~one], want[~one])
            terms = np.abs(C[one]) @ Gn + np.abs(a[one, None] * np.atleast_2d(x)[-1:])
            _assert_sums_close(got[one], want[one], terms, m + 1, dt)
    gram_f, gram_c = np.full((m, m), np.nan), np.full((m, m), np.nan)
    _fused.rows_gram64(F, gram_f, **cols)
    _fused.rows_gram64(G, gram_c, **cols)
    np.testing.assert_array_equal(gram_f, gram_c)
    # Block-wise calls: 3 blocks of n // 3 columns, two vectors a block (the tiles' bits) and
    # one (the direct kernels').
    s = n // 3
    if s >= 1:
        X1 = rng.standard_normal((3, 1, s)).astype(np.float32)
        blk = {"start": col0, "block_size": s, "isa": isa}
        Gb = Gn[:, : 3 * s].reshape(m, 3, s).transpose(1, 0, 2)
        _assert_sums_close(
            _fused.project64_blocks(F, X1, **blk),
            _fused.project64_blocks(G, X1, **blk),
            np.abs(X1) @ np.swapaxes(Gb, 1, 2),
            s,
            np.float64,
        )
        C1 = rng.standard_normal((3, 1, m))
        _assert_sums_close(
            _fused.combine64_blocks(F, C1, [0.5], X1, dtype=np.float32, **blk),
            _fused.combine64_blocks(G, C1, [0.5], X1, dtype=np.float32, **blk),
            np.abs(C1) @ Gb + 0.5 * np.abs(X1),
            m + 1,
            np.float32,
        )
        Xb = rng.standard_normal((3, 2, s)).astype(np.float32)
        blk = {"start": col0, "block_size": s, "isa": isa}
        np.testing.assert_array_equal(
            _fused.project64_blocks(F, Xb, **blk), _fused.project64_blocks(G, Xb, **blk)
        )
        Cb = rng.standard_normal((3, 2, m))
        np.testing.assert_array_equal(
            _fused.combine64_blocks(F, Cb, [1.0, -2.0], Xb, dtype=np.float32, **blk),
            _fused.combine64_blocks(G, Cb, [1.0, -2.0], Xb, dtype=np.float32, **blk),
        )


def test_fortran_ordered_pieces_on_threads_are_the_same_bits(rng, monkeypatch):
    # Pieces on two threads (each transposing, or reading, its own columns) sum as one thread
    # does: two vectors as the C-ordered G's kernels, one vector as the direct kernels.
    G = rng.standard_normal((16, 300_000)).astype(np.float32)
    F = np.asfortranarray(G)
    X = rng.standard_normal((2, 300_000)).astype(np.float32)
    C, a = rng.standard_normal((1, 16)), np.array([0.5])
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "2")
    two = _fused.project64(F, X, start=0, stop=300_000)
    two1 = _fused.project64(F, X[:1], start=0, stop=300_000)
    two_c = _fused.combine64(F, C, a, X[0], dtype=np.float32, start=0, stop=300_000)
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "1")
    np.testing.assert_array_equal(two, _fused.project64(G, X, start=0, stop=300_000))
    np.testing.assert_array_equal(two1, _fused.project64(F, X[:1], start=0, stop=300_000))
    np.testing.assert_array_equal(
        two_c, _fused.combine64(F, C, a, X[0], dtype=np.float32, start=0, stop=300_000)
    )


@pytest.mark.parametrize("isa", _isas())
def test_one_vector_rows_do_not_depend_on_the_rows_around_them(isa, rng):
    # combine64 over Gt with one row of C takes its rows 8 at a time; a last group of fewer
    # repeats its last row. A column's result is the same whichever group it falls in.
    m, n = 36, 37
    F = np.asfortranarray(rng.standard_normal((m, n)).astype(np.float32))
    C, a = rng.standard_normal((1, m)), np.array([-1.5])
    x = rng.standard_normal(n).astype(np.float32)
    whole = _fused.combine64(F, C, a, x, dtype=np.float64, start=0, stop=n, isa=isa)
    for j0, j1 in ((0, 5), (3, 11), (13, 37), (36, 37)):
        piece = _fused.combine64(F, C, a, x[j0:j1], dtype=np.float64, start=j0, stop=j1, isa=isa)
        np.testing.assert_array_equal(piece, whole[:, j0:j1])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("m", [17, 33])
def test_one_vector_short_rows_with_a_tail_take_the_tiles(isa, m, rng):
    # One vector over Gt reads the rows in place only where no item is left past the row's
    # whole vectors, or these make 256 bytes (project64) or 128 (combine64): the items past
    # them go one by one, which made project64 at m = 17 and 33 (float32) 1.2-2.5x slower than
    # the tiles, and combine64 at m = 17 (bfloat16) 1.4x. Those take the tiles, whose sums are
    # the C-ordered G's, bit for bit.
    n = 300
    G = rng.standard_normal((m, n)).astype(np.float32)
    F = np.asfortranarray(G)
    cols = {"start": 0, "stop": n, "isa": isa}
    C, a = rng.standard_normal((1, m)), np.array([0.5])
    for st in (np.float32, np.float16):
        x = rng.standard_normal(n).astype(np.float32)
        Fs, Gs = F.astype(st), G.astype(st)
        np.testing.assert_array_equal(
            _fused.project64(Fs, x, **cols), _fused.project64(Gs, x, **cols)
        )
        if m == 17 or st == np.float16:
            np.testing.assert_array_equal(
                _fused.combine64(Fs, C, a, x, dtype=np.float64, **cols),
                _fused.combine64(Gs, C, a, x, dtype=np.float64, **cols),
            )


def test_strided_g_is_still_refused(rng):
    F = np.asfortranarray(rng.standard_normal((4, 20)).astype(np.float32))
    assert not _fused.supports64(F[:, ::2])
    assert not _fused.supports64(F[::2])
    with pytest.raises(TypeError, match="C-ordered \\(or Fortran-ordered\\)"):
        _fused.project64(F[:, ::2], np.ones(10), start=0, stop=10)


def test_extension_checks_a_transposed_buffer():
    """With ``trans``, V is ld rows of m items: a short buffer is an exception."""
    P = _fused._passes
    X, Y = np.zeros((1, 10)), np.zeros((1, 4))
    V = np.zeros((10, 4), np.float32)
    P.project64(V, 10, 0, 4, X, 1, True, Y, 10, 0, 10, 0, 0, True)  # the valid call
    with pytest.raises(ValueError, match="V holds"):
        P.project64(V[:9], 10, 0, 4, X, 1, True, Y, 10, 0, 10, 0, 0, True)
    with pytest.raises(ValueError, match="V holds"):
        P.project64(V, 10, 0, 5, X, 1, True, np.zeros((1, 5)), 10, 0, 10, 0, 0, True)
    Ct, a, y = np.zeros((4, 8)), np.zeros(8), np.zeros((1, 10), np.float32)
    with pytest.raises(ValueError, match="V holds"):
        P.combine64(V[:9], 10, 0, 4, Ct, 1, a, y, True, False, y, False, 10, 0, 10, 0, 0, True)
    with pytest.raises(ValueError, match="V holds"):
        P.rows_gram64(V[:9], 10, 0, 4, np.zeros((4, 4)), 0, 10, 0, 0, True)


def _assert_product_close(got, want, G, damp, **kw):
    """One vector's product over a Fortran-ordered G against the C-ordered G's: float64 sums
    in two orders (2 gamma_d of |G||x| each pass, amplified by up to kappa) and one rounding to
    float32 each."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    kappa = condition_number(np.asarray(G, np.float64), damp, **kw)
    rel = 2 * np.finfo(np.float32).eps + 4 * _gamma(G.shape[1]) * kappa
    assert np.linalg.norm(got - want) <= rel * np.linalg.norm(want)


def test_fortran_ordered_memmap_operator_is_the_c_ordered_bits(rng, tmp_path):
    """A read-only Fortran-ordered memmap goes to the kernels in place (it went to float64
    copies of column pieces, 3-30x slower); set-up, products of several vectors, diagonal and
    sweep are the C-ordered G's bits, a product of one vector within float64 sums' bound."""
    # m = 16: whole vectors with every ISA, so that one vector takes the direct kernels (m = 12
    # took them with the base ISA only, and the tiles' bits passed the bound on x86).
    m, d = 16, 5_000
    G = rng.standard_normal((m, d)).astype(np.float32)
    np.save(tmp_path / "G.npy", np.asfortranarray(G))
    Gm = np.load(tmp_path / "G.npy", mmap_mode="r")
    assert Gm.flags.f_contiguous and not Gm.flags.c_contiguous and not Gm.flags.writeable
    assert _engine.uses_kernels(np, Gm)
    x = rng.standard_normal(d).astype(np.float32)
    X = rng.standard_normal((d, 4)).astype(np.float32)
    for kw in ({}, {"block_size": 1_000}, {"block_size": 8}):
        a, b = StaticIHVP(G, damp=1e-2, **kw), StaticIHVP(Gm, damp=1e-2, **kw)
        _assert_product_close(b @ x, a @ x, G, 1e-2, **kw)
        np.testing.assert_array_equal(b @ X, a @ X)
        np.testing.assert_array_equal(b.diagonal(), a.diagonal())
    damps = [1e-3, 1e-2, 1.0]
    got = SpectralIHVP(Gm, damp=1e-2).sweep(x, damps=damps)
    want = SpectralIHVP(G, damp=1e-2).sweep(x, damps=damps)
    for k, damp in enumerate(damps):  # G x: one vector, the direct kernel
        _assert_product_close(got[k], want[k], G, damp)


def test_transposed_torch_tensor_is_the_contiguous_product(rng):
    torch = pytest.importorskip("torch")
    # m = 16: the direct kernels with every ISA (m = 6 took the tiles with all of them).
    G = torch.from_numpy(rng.standard_normal((16, 3_000)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal(3_000).astype(np.float32))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        Gc = G.to(dtype)
        Gf = Gc.T.contiguous().T  # torch.stack(grads, dim=1).T
        assert not Gf.is_contiguous() and _engine.uses_kernels(torch, Gf)
        _assert_product_close(
            StaticIHVP(Gf, damp=1e-2) @ x,
            StaticIHVP(Gc, damp=1e-2) @ x,
            Gc.float().numpy(),
            1e-2,
        )
