"""Tests of the pass engine's CPU kernels (mfac_core._fused) against exact oracles, on every
instruction set this CPU runs."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import os
import sys
import types

import numpy as np
import pytest

from mfac_core import _fused

pytestmark = pytest.mark.skipif(
    not _fused.available(), reason="the C extension mfac_core._fused._passes was not built"
)


def _isas() -> list[str]:
    if not _fused.available():
        return []
    best = _fused.ISAS[_fused.best_isa()]
    return [name for name, code in _fused.ISAS.items() if code <= best]


ISAS = _isas()
DTYPES = [np.float32, np.float64]


def test_a_failing_piece_raises_on_the_caller(monkeypatch, rng):
    monkeypatch.setattr(_fused, "_PIECE_WORK", 2**8)
    monkeypatch.setattr(_fused, "_MIN_THREAD_WORK", 1)
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "3")
    real = _fused._passes

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def project64(self, *args):
            if args[9] > 0:  # every piece but the first
                raise MemoryError("piece failed")
            return real.project64(*args)

    monkeypatch.setattr(_fused, "_passes", Failing())
    G = rng.standard_normal((4, 1_000)).astype(np.float32)
    with pytest.raises(MemoryError, match="piece failed"):
        _fused.project64(G, np.ones((1, 1_000), np.float32), start=0, stop=1_000)


# -- project64 and combine64: G in its storage dtype, every sum in float64 -------------------

try:
    import ml_dtypes
except ImportError:  # optional: bfloat16 is then tested through its uint16 bits only
    ml_dtypes = None  # type: ignore[assignment]

EPS64 = float(np.finfo(np.float64).eps)


def _bf16_values(bits):
    """The float64 values of bfloat16 bits (uint16): the top halves of float32s."""
    with np.errstate(invalid="ignore"):  # signalling NaNs become quiet ones
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _stored(rng, shape, storage):
    """``(G, storage argument, G's values in float64)`` for one storage case.

    Rows of very different size (as in ``_problem``); "bfloat16-bits" and "float16-bits"
    are uint16 arrays of those types' bits, read with ``storage=``.
    """
    V = rng.standard_normal(shape) * np.logspace(0, -3, shape[0])[:, None]
    if storage in ("float32", "float64", "float16"):
        G = V.astype(storage)
        return G, None, G.astype(np.float64)
    if storage == "float16-bits":
        G = V.astype(np.float16)
        return G.view(np.uint16), "float16", G.astype(np.float64)
    if storage == "bfloat16-bits":
        bits = (V.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits, "bfloat16", _bf16_values(bits)
    G = V.astype(ml_dtypes.bfloat16)  # "bfloat16": ml_dtypes' dtype
    return G, None, G.astype(np.float64)


STORAGES = [
    "float32",
    "float64",
    "float16",
    "float16-bits",
    "bfloat16-bits",
    pytest.param(
        "bfloat16", marks=pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes not installed")
    ),
]

# (m, ld, col0, n): as SHAPES, with m not a multiple of 8 or 4 (the panels' rows), widths
# below one staging (64 columns) and one tile, odd column offsets (2-byte rows at addresses
# not a multiple of 4), and widths across the chunks (4096 columns). The last two: several
# panels of combine64's rows (16 rows), across its chunks (4032 columns) with a last tile of
# one vector, rows read in place (row strides that spread over the L1 cache's sets) and
# staged (rows a multiple of 4 KiB apart).
SHAPES64 = [
    (1, 40, 0, 40),
    (5, 97, 3, 90),
    (8, 64, 0, 64),
    (13, 300, 37, 201),
    (9, 9_000, 5, 8_990),
    (37, 4_136, 2, 4_100),
    (20, 2_048, 0, 2_048),
]


def _ld(A):
    return np.asarray(A, dtype=np.longdouble)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("shape", SHAPES64, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("xdtype", [np.float32, np.float64])
def test_project64_against_longdouble(isa, storage, shape, K, xdtype, rng):
    """The error is that of n float64 products summed in float64: at most (n + 2) eps64
    times the sum of the terms' magnitudes, entry by entry."""
    m, ld, col0, n = shape
    G, st, G64 = _stored(rng, (m, ld), storage)
    X = rng.standard_normal((K, n)).astype(xdtype)
    P = _fused.project64(G, X, start=col0, stop=col0 + n, storage=st, isa=isa)
    assert P.dtype == np.float64 and P.shape == (K, m)
    Gb = G64[:, col0 : col0 + n]
    ref = _ld(X) @ _ld(Gb).T
    mag = np.abs(X.astype(np.float64)) @ np.abs(Gb).T
    err = np.abs(_ld(P) - ref).astype(np.float64)
    assert np.all(err <= (n + 2) * EPS64 * mag), (err / (EPS64 * mag + 1e-300)).max()
    y = _fused.project64(G, X[0], start=col0, stop=col0 + n, storage=st, isa=isa)
    assert y.shape == (m,)
    np.testing.assert_array_equal(y, P[0])  # a 1-D x is the first row's pass


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("shape", SHAPES64, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine64_against_longdouble(isa, storage, shape, K, dtype, rng):
    """One rounding to ``dtype`` plus (m + 2) eps64 of the terms' magnitudes, entry by entry,
    for X of float32 and float64, one row per damping or one row shared."""
    m, ld, col0, n = shape
    G, st, G64 = _stored(rng, (m, ld), storage)
    Gb = G64[:, col0 : col0 + n]
    C = rng.standard_normal((K, m))
    alpha = rng.standard_normal(K)
    for X in (
        rng.standard_normal((K, n)).astype(np.float32),
        rng.standard_normal((K, n)),
        rng.standard_normal(n).astype(np.float32),
    ):
        Y = _fused.combine64(
            G, C, alpha, X, start=col0, stop=col0 + n, dtype=dtype, storage=st, isa=isa
        )
        assert Y.dtype == dtype and Y.shape == (K, n)
        X2 = np.broadcast_to(X.astype(np.float64), (K, n))
        ref = _ld(alpha)[:, None] * _ld(X2) + _ld(C) @ _ld(Gb)
        mag = np.abs(alpha)[:, None] * np.abs(X2) + np.abs(C) @ np.abs(Gb)
        bound = np.finfo(dtype).eps / 2 * np.abs(ref).astype(np.float64) + (m + 2) * EPS64 * mag
        err = np.abs(_ld(Y) - ref).astype(np.float64)
        assert np.all(err <= bound * 1.01 + np.finfo(dtype).tiny), (err / bound).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", ["float32", "float64"])
def test_combine64_rows_in_place_or_staged_give_the_same_bits(isa, storage, rng):
    """Several rows of C: the same columns of G, with rows a multiple of 4 KiB apart (staged
    before the tiles read them) and not (read in place), give bit-identical results: every
    column's m terms are summed in the same order either way."""
    m, n = 35, 1_000
    V = rng.standard_normal((m, n)).astype(storage)
    C = rng.standard_normal((7, m))
    alpha = rng.standard_normal(7)
    x = rng.standard_normal(n).astype(np.float32)
    out = []
    for ld in (1_024, 1_100):
        G = np.zeros((m, ld), dtype=storage)
        G[:, 3 : 3 + n] = V
        Y = _fused.combine64(G, C, alpha, x, start=3, stop=3 + n, dtype=np.float64, isa=isa)
        out.append(Y)
    np.testing.assert_array_equal(out[0], out[1])
    x64, V64 = x.astype(np.float64), V.astype(np.float64)
    ref = alpha[:, None] * _ld(x64) + _ld(C) @ _ld(V64)
    mag = np.abs(alpha)[:, None] * np.abs(x64) + np.abs(C) @ np.abs(V64)
    assert np.all(np.abs(_ld(out[0]) - ref).astype(np.float64) <= (m + 2) * EPS64 * mag)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", ["float16-bits", "bfloat16-bits"])
def test_every_2_byte_value_converts_exactly(isa, storage):
    """All 65536 bit patterns, through the vector conversions (F16C, the bfloat16 shift, and
    the baseline's scalar one) and the last columns': infinities, NaNs, subnormals, -0."""
    bits = np.arange(2**16, dtype=np.uint16)
    if storage == "float16-bits":
        expected = bits.view(np.float16).astype(np.float64)
    else:
        expected = _bf16_values(bits)
    st = storage.split("-")[0]
    for cols in (slice(0, 2**16), slice(3, 2**16 - 2)):  # from aligned and odd addresses
        G = bits[None, cols]
        n = G.shape[1]
        Y = _fused.combine64(
            G, [[1.0]], [0.0], np.zeros(n), start=0, stop=n, dtype=np.float64, storage=st, isa=isa
        )
        np.testing.assert_array_equal(Y[0], expected[cols])
        assert np.array_equal(np.isnan(Y[0]), np.isnan(expected[cols]))
    finite = np.isfinite(expected)
    G = bits[None, finite]
    x = np.ones(G.shape[1])
    y = _fused.project64(G, x, start=0, stop=G.shape[1], storage=st, isa=isa)
    ref = float(np.sum(_ld(expected[finite])))
    assert abs(y[0] - ref) <= (G.shape[1] + 2) * EPS64 * np.sum(np.abs(expected[finite]))


def _special_2_byte(storage):
    """Bit patterns of every class of a 2-byte storage: +-0, the smallest and largest
    subnormals, the smallest normal, one, the largest finite, and their negatives."""
    if storage == "float16":
        pos = [0x0000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF]
    else:
        pos = [0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F]
    return np.array(pos + [p | 0x8000 for p in pos], dtype=np.uint16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
# The largest bfloat16 values times C's large coefficients leave float32's range (said).
@pytest.mark.filterwarnings("ignore:a result exceeds float32's range:RuntimeWarning")
def test_combine64_one_2_byte_columns_equal_the_scalar_path(isa, storage, rng):
    """One row of C over 2-byte rows (the kernel that stages the next columns while its tiles
    run): every column equals, bit for bit, that column alone (the scalar path: the same
    products and sums, in the same order). Rows in two panels (8 + 5), columns across
    stagings of 64 and a last staging of half, at an odd offset, G holding zeros, -0,
    subnormals, the largest finite values and numbers of very different size."""
    m, n, col0 = 13, 64 * 3 + 32 + 7, 3
    V = rng.standard_normal((m, col0 + n)) * np.logspace(0, -30, m)[:, None]
    if storage == "float16":
        bits = V.astype(np.float16).view(np.uint16)
    else:
        bits = (V.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    special = _special_2_byte(storage)
    where = rng.random(bits.shape) < 0.3
    bits[where] = rng.choice(special, size=int(where.sum()))
    values = (
        bits.view(np.float16).astype(np.float64) if storage == "float16" else _bf16_values(bits)
    )
    C = rng.standard_normal((1, m)) * np.logspace(0, 20, m)
    alpha = np.array([0.75])
    x = rng.standard_normal(n).astype(np.float32)
    for dtype in DTYPES:
        Y = _fused.combine64(
            bits, C, alpha, x, start=col0, stop=col0 + n, dtype=dtype, storage=storage, isa=isa
        )
        one = [
            _fused.combine64(
                bits, C, alpha, x[j : j + 1], start=col0 + j, stop=col0 + j + 1, dtype=dtype,
                storage=storage, isa=isa,
            )[0, 0]
            for j in range(n)
        ]  # fmt: skip
        np.testing.assert_array_equal(Y[0], np.array(one, dtype=dtype))
    G64 = values[:, col0 : col0 + n]
    ref = alpha[0] * _ld(x.astype(np.float64)) + (_ld(C) @ _ld(G64))[0]
    mag = abs(alpha[0]) * np.abs(x.astype(np.float64)) + (np.abs(C) @ np.abs(G64))[0]
    err = np.abs(_ld(Y[0]) - ref).astype(np.float64)
    assert np.all(err <= (m + 2) * EPS64 * mag + EPS64 / 2 * np.abs(ref).astype(np.float64))


def test_cast16_equals_numpys_casts(rng):
    """float16 <-> float32 through F16C: every float16 value widened, and float32 values
    narrowed (normal, subnormal and halfway between two float16s, rounding to even; -0;
    past the largest float16, to infinity), bit for bit as NumPy's casts, at aligned and
    odd lengths (the last items one at a time). Other arrays are left to the caller."""
    if not _fused.cast16(np.zeros(1, np.float16), np.zeros(1, np.float32)):
        pytest.skip("no F16C")
    h = np.arange(2**16, dtype=np.uint16).view(np.float16)
    wide = np.full(h.size, -1.0, np.float32)
    assert _fused.cast16(h, wide)
    ref = h.astype(np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(wide.view(np.uint32)[finite], ref.view(np.uint32)[finite])
    np.testing.assert_array_equal(np.isnan(wide), np.isnan(ref))
    np.testing.assert_array_equal(wide[np.isinf(ref)], ref[np.isinf(ref)])
    f16 = h[finite].astype(np.float32)
    halfway = ((f16[:-1].astype(np.float64) + f16[1:]) / 2).astype(np.float32)
    scaled = rng.standard_normal(4_000) * 2.0 ** rng.integers(-30, 18, 4_000)
    big = np.array([65504.0, 65519.0, 65520.0, 7e4, 3e38, -0.0], np.float32)
    f = np.concatenate([f16, halfway, scaled.astype(np.float32), big, -big])
    for n in (f.size, f.size - 3):
        with np.errstate(over="ignore"):
            want = f[:n].astype(np.float16)
        got = np.zeros(n, np.float16)
        assert _fused.cast16(f[:n], got)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    x = np.ones(10, np.float32)
    for src, dst in [
        (x, np.zeros(10, np.float32)),  # no float16
        (x, np.zeros(11, np.float16)),  # lengths differ
        (x[::2], np.zeros(5, np.float16)),  # not contiguous
        (x.reshape(2, 5), np.zeros((2, 5), np.float16)),  # not 1-D
    ]:
        before = dst.copy()
        assert not _fused.cast16(src, dst)
        np.testing.assert_array_equal(dst, before)


def _bf16_bits(f):
    """float32 values rounded to bfloat16 bits, to nearest even (NaN: 0x7fc0), in NumPy."""
    u = f.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), bits)


@pytest.mark.parametrize("isa", ISAS)
def test_store_row_writes_saves_and_widens_the_row(isa, rng):
    """One loop: the old row saved, g rounded into the row (float32 copied, bfloat16 to
    nearest even as PyTorch, float16 as NumPy), the row widened, g copied, and max |g|
    exactly (NaN where g holds one, +0.0 for zeros) -- at odd lengths past the 2048-item
    chunks, with every kind of value: normal, subnormal, halfway, overflowing, infinite."""
    n = 2 * 2048 + 13
    scaled = rng.standard_normal(n) * 2.0 ** rng.integers(-140, 129, n)
    g = np.clip(scaled, -3.4e38, 3.4e38).astype(np.float32)
    g[:8] = [np.inf, -np.inf, 3.4e38, -65520.0, 1e-45, -0.0, 65504.0, 1.0 + 2.0**-8]
    h = np.arange(2**16, dtype=np.uint32)[::37]
    h = h[(h & 0x7F80) != 0x7F80] << 16  # finite bfloat16 values, then halfway above them
    g[8 : 8 + 2 * h.size] = np.concatenate([h | 0x8000, h | 0x18000]).view(np.float32)
    for storage in ["float32", "bfloat16", "float16"]:
        kind = np.float32 if storage == "float32" else np.uint16
        prev = rng.integers(0, 2**16, n * (2 if storage == "float32" else 1), dtype=np.uint16)
        row = prev.view(kind).copy()
        old, wide, copy = np.empty_like(row), np.empty(n, np.float32), np.empty(n, np.float32)
        dst = row.view(np.float16) if storage == "float16" else row
        name = None if storage != "bfloat16" else storage
        got = _fused.store_row(g, dst, old=old, wide=wide, copy=copy, storage=name, isa=isa)
        if storage == "float16" and isa == "base":
            assert got is None  # no F16C: nothing written
            np.testing.assert_array_equal(row.view(np.uint16), prev)
            continue
        assert got == np.max(np.abs(g)) == np.inf
        np.testing.assert_array_equal(old.view(np.uint16), prev)
        np.testing.assert_array_equal(copy.view(np.uint32), g.view(np.uint32))
        if storage == "float32":
            want = g
        elif storage == "bfloat16":
            want = _bf16_bits(g)
            np.testing.assert_array_equal(wide.view(np.uint32), want.astype(np.uint32) << 16)
        else:
            with np.errstate(over="ignore"):
                want = g.astype(np.float16).view(np.uint16)
            np.testing.assert_array_equal(wide, want.view(np.float16).astype(np.float32))
        np.testing.assert_array_equal(row.view(np.uint16), want.view(np.uint16))
    finite = g[np.isfinite(g)]
    assert _fused.store_row(finite, isa=isa) == np.max(np.abs(finite))
    with_nan = g.copy()
    with_nan[n - 1] = np.nan
    assert np.isnan(_fused.store_row(with_nan, isa=isa))
    zero = _fused.store_row(-np.zeros(n - 1, np.float32), isa=isa)
    assert zero == 0.0 and np.copysign(1.0, zero) == 1.0
    assert _fused.store_row(np.zeros(0, np.float32), isa=isa) == 0.0


def test_store_row_agrees_with_torch_bfloat16_rounding(rng):
    torch = pytest.importorskip("torch")
    bits = rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)
    f = bits.view(np.float32)
    row = np.zeros(f.size, np.uint16)
    assert _fused.store_row(f, row, storage="bfloat16") is not None
    want = torch.from_numpy(f).to(torch.bfloat16).view(torch.uint16).numpy()
    finite = np.isfinite(f)
    np.testing.assert_array_equal(row[finite], want[finite])
    nan = np.isnan(f)
    np.testing.assert_array_equal(row[nan], np.full(nan.sum(), 0x7FC0, np.uint16))
    np.testing.assert_array_equal(want[nan] & 0x7F80, np.full(nan.sum(), 0x7F80, np.uint16))


def test_store_row_refuses_bad_buffers():
    g = np.ones(10, np.float32)
    row = np.zeros(10, np.uint16)
    for call, error in [
        (lambda: _fused.store_row(g.astype(np.float64)), TypeError),  # src not float32
        (lambda: _fused.store_row(g.reshape(2, 5)), TypeError),  # src not 1-D
        (lambda: _fused.store_row(g[::2]), ValueError),  # src not contiguous
        (lambda: _fused.store_row(g, row), TypeError),  # uint16 without storage
        (lambda: _fused.store_row(g, np.zeros(10, np.float64)), TypeError),  # no storage dtype
        (lambda: _fused.store_row(g, np.zeros(9, np.float32)), ValueError),  # lengths differ
        (lambda: _fused.store_row(g, np.zeros(20, np.float32)[::2]), ValueError),  # strided
        (lambda: _fused.store_row(g, np.zeros(10, np.float16), storage="bfloat16"), TypeError),
        (lambda: _fused.store_row(g, row, storage="int16"), ValueError),
        (lambda: _fused.store_row(g, old=np.zeros(10, np.float32)), ValueError),  # old, no dst
        (lambda: _fused.store_row(g, np.zeros(10, np.float32), old=row), TypeError),
        (lambda: _fused.store_row(g, row, storage="bfloat16", wide=np.zeros(9, np.float32)),
         ValueError),
        (lambda: _fused.store_row(g, row, storage="bfloat16", copy=np.zeros(10)), TypeError),
        (lambda: _fused.store_row(g, isa="sse9"), ValueError),
    ]:  # fmt: skip
        with pytest.raises(error):
            call()
    frozen = np.zeros(10, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _fused.store_row(g, frozen)
    assert not row.any()


def _exact(A):
    from fractions import Fraction

    return [[Fraction(float(v)) for v in row] for row in np.atleast_2d(A)]


def test_combine64_rounds_a_cancelling_sum_once(rng):
    """alpha x + C G where the terms cancel to about 1e-6 of their size: float64 sums give
    the float32 result within 2 eps32 of the correctly rounded one; float32 sums (BLAS in
    float32) are off by many times that.

    (At 1e-8, the float64 bound, (m + 2) eps64 of the terms, is itself about one float32
    ulp of the result: float64 sums no longer promise 1 ulp there.)
    """
    m, n, K = 16, 48, 3
    # Positive terms (C G is as large as its terms), cancelled by x to 1e-6 - 2e-6 of them.
    G = np.abs(rng.standard_normal((m, n))).astype(np.float32)
    C = np.abs(rng.standard_normal((K, m))).astype(np.float32).astype(np.float64)  # exact
    alpha = np.ones(K)
    s = rng.choice([-1.0, 1.0], (K, n)) * (1 + rng.random((K, n)))
    X = (-(C @ G.astype(np.float64)) * (1 + 1e-6 * s)).astype(np.float32)
    Ge, Ce, Xe = _exact(G), _exact(C), _exact(X)
    exact = np.array(
        [
            [float(Xe[k][j] + sum(Ce[k][i] * Ge[i][j] for i in range(m))) for j in range(n)]
            for k in range(K)
        ]
    )
    mag = np.abs(X) + np.abs(C) @ np.abs(G)
    assert np.all(np.abs(exact) / mag < 3e-6)  # the cancellation is real
    eps32 = float(np.finfo(np.float32).eps)
    # The float64 bound is well inside one float32 ulp of the result here:
    assert np.all((m + 2) * EPS64 * mag <= eps32 / 4 * np.abs(exact))
    rounded = exact.astype(np.float32).astype(np.float64)
    for isa in ISAS:
        Y = _fused.combine64(G, C, alpha, X, start=0, stop=n, dtype=np.float32, isa=isa)
        assert np.all(np.abs(Y - rounded) <= 2 * eps32 * np.abs(exact)), isa
    # The same sums in float32 (BLAS in float32) miss by many ulps of the result.
    Y32 = X + C.astype(np.float32) @ G
    assert np.median(np.abs(Y32 - rounded) / np.abs(exact)) > 100 * eps32


def test_project64_sums_a_cancelling_product_in_float64(rng):
    """G x where each row's terms cancel to about 1e-8 of their size: within the float64
    bound of the exact value, where a float32 GEMV misses by many times the result."""
    m, n = 5, 64
    G = rng.standard_normal((m, n)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    # The last column makes each row's sum nearly cancel (up to its rounding to float32).
    G[:, -1] = (-(G[:, :-1].astype(np.float64) @ x[:-1]) / x[-1]).astype(np.float32)
    Ge, xe = _exact(G), _exact(x)[0]
    exact = np.array([float(sum(g * v for g, v in zip(row, xe, strict=True))) for row in Ge])
    mag = np.abs(G.astype(np.float64)) @ np.abs(x)
    assert np.median(np.abs(exact) / mag) < 1e-6
    for isa in ISAS:
        y = _fused.project64(G, x, start=0, stop=n, isa=isa)
        assert np.all(np.abs(y - exact) <= (n + 2) * EPS64 * mag), isa
        assert np.all(np.abs(y - exact) <= 1e-6 * np.abs(exact)), isa
    assert np.median(np.abs((G @ x).astype(np.float64) - exact) / np.abs(exact)) > 1e-4


def _leaning(m, d, seed=2):
    """m float32 gradients of one sign and nearly one size (a shared mean, sign noise), and
    x their mean: every product of ``G x`` is about one number, which one running sum rounds
    the same way step after step. Also each row's exact ``G x`` (math.fsum of the float64
    products, exact for float32 items) and its terms' magnitudes."""
    rng = np.random.default_rng(seed)
    a = (1.25 + 0.05 * rng.random(m)).astype(np.float32)
    G = (a[:, None] + np.float32(2.0**-9) * rng.choice([-1, 1], size=(m, d))).astype(np.float32)
    x = G.mean(axis=0)
    G64, x64 = G.astype(np.float64), x.astype(np.float64)
    exact = np.array([math.fsum(row * x64) for row in G64])
    return G, x, exact, np.abs(G64) @ np.abs(x64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("m", "d"), [(2, 200_000), (1, 600_000), (64, 100_000)])
def test_project64_rounding_does_not_grow_with_the_columns(isa, m, d):
    """Regression: a lane's sum ran over a whole chunk of 4096 columns (project1t's, a
    Fortran-ordered G's one vector, over 4096 rows): two gradients at d = 2e5 were 53
    (AVX-512), 120 (AVX2) and 225 (SSE2) eps(float64) of their terms' sum off, 64 of them
    through project1t 487. Runs of 128 terms, then levels: under 1 now, for C- and
    Fortran-ordered G and one or two vectors (their bits alike: project64t is project64's
    order). m = 1 takes a piece of 128 chunks (level 0 carried twice)."""
    G, x, exact, terms = _leaning(m, d)
    X = np.stack([x, x])
    for order in "CF":
        Gx = np.asfortranarray(G) if order == "F" else G
        for K in (1, 2):
            P = _fused.project64(Gx, X[:K], start=0, stop=d, isa=isa)
            err = np.max(np.abs(P - exact) / terms) / EPS64
            assert err <= 2, (order, K, err)
    np.testing.assert_array_equal(
        _fused.project64(G, X, start=0, stop=d, isa=isa),
        _fused.project64(np.asfortranarray(G), X, start=0, stop=d, isa=isa),
    )


def test_project64_adds_the_pieces_in_pairs(monkeypatch):
    """The threads' pieces are added as a balanced tree: 200 pieces (as m = 64 gives at
    d = 6.5e6) added one after the other left the pair's product 16 eps(float64) of its
    terms off, against 0.8 in pairs."""
    monkeypatch.setattr(_fused, "_PIECE_WORK", 2**12)
    G, x, exact, terms = _leaning(2, 400_000)
    assert len(_fused._pieces(2, 400_000)) >= 200
    P = _fused.project64(G, x, start=0, stop=400_000)
    assert np.max(np.abs(P - exact) / terms) <= 2 * EPS64


@pytest.mark.parametrize(
    ("m", "n"), [(64, 10**6), (256, 10**6), (64, 10**5), (3, 70_000), (8, 1_000)]
)
def test_pieces_cover_the_columns_and_end_in_quarters(m, n):
    # The last two pieces' worth of columns go in quarter pieces, so that a thread that
    # finishes first waits for a quarter piece at most; the pieces are the shape's alone.
    pieces = _fused._pieces(m, n)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    assert all(lo % _fused._ALIGN == 0 and hi > lo for lo, hi in pieces)
    width = max(hi - lo for lo, hi in pieces[:-1]) if len(pieces) > 1 else pieces[0][1]
    assert width * m <= _fused._PIECE_WORK + m * _fused._ALIGN
    tail = [hi - lo for lo, hi in pieces if lo >= n - 2 * width]
    if n > width:
        assert max(tail) <= max(_fused._ALIGN, width // 4) and len(tail) >= 4
    assert _fused._pieces(m, n) == pieces


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16-bits"])
def test_float64_passes_do_not_depend_on_threads(monkeypatch, rng, storage):
    """Bit-identical results for 1, 2 and 5 threads: the pieces depend on the shape only,
    and project64 adds their sums in piece order."""
    monkeypatch.setattr(_fused, "_PIECE_WORK", 2**10)
    monkeypatch.setattr(_fused, "_MIN_THREAD_WORK", 1)
    G, st, _ = _stored(rng, (12, 5_000), storage)
    X = rng.standard_normal((9, 4_990))
    C = rng.standard_normal((9, 12))
    alpha = rng.standard_normal(9)
    assert len(_fused._pieces(12, 4_990)) > 10
    out = {}
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("MFAC_CORE_NUM_THREADS", threads)
        out[threads] = (
            _fused.project64(G, X, start=7, stop=4_997, storage=st),
            _fused.project64(G, X[:1], start=7, stop=4_997, storage=st),
            _fused.combine64(G, C, alpha, X, start=7, stop=4_997, dtype=np.float32, storage=st),
            _fused.combine64(
                G, C[:1], alpha[:1], X[0], start=7, stop=4_997, dtype=np.float64, storage=st
            ),
        )
    for threads in ("2", "5"):
        for a, b in zip(out["1"], out[threads], strict=True):
            np.testing.assert_array_equal(a, b)


def test_float64_passes_empty_shapes(rng):
    G = rng.standard_normal((3, 10)).astype(np.float32)
    # n == 0
    np.testing.assert_array_equal(
        _fused.project64(G, np.ones((2, 0)), start=4, stop=4), np.zeros((2, 3))
    )
    assert _fused.project64(G, np.ones(0), start=4, stop=4).shape == (3,)
    Y = _fused.combine64(
        G, np.ones((2, 3)), np.ones(2), np.ones(0), start=4, stop=4, dtype=np.float32
    )
    assert Y.shape == (2, 0) and Y.dtype == np.float32
    # m == 0: alpha x alone, rounded once
    E = np.zeros((0, 10), np.float16)
    assert _fused.project64(E, np.ones((2, 10)), start=0, stop=10).shape == (2, 0)
    x = rng.standard_normal(10)
    Y = _fused.combine64(E, np.ones((2, 0)), [1.0, 3.0], x, start=0, stop=10, dtype=np.float32)
    np.testing.assert_array_equal(Y, (np.array([[1.0], [3.0]]) * x).astype(np.float32))
    # K == 0
    assert _fused.project64(G, np.ones((0, 10)), start=0, stop=10).shape == (0, 3)
    Y = _fused.combine64(
        G, np.ones((0, 3)), np.ones(0), np.ones(10), start=0, stop=10, dtype=np.float64
    )
    assert Y.shape == (0, 10)


def test_float64_passes_take_any_layout_of_x(rng):
    """X strided, Fortran-ordered or unaligned is copied, with the same result."""
    G = rng.standard_normal((6, 300)).astype(np.float16)
    X = rng.standard_normal((3, 600))
    Xs = X[:, ::2]
    Xc = np.ascontiguousarray(Xs)
    np.testing.assert_array_equal(
        _fused.project64(G, Xs, start=0, stop=300), _fused.project64(G, Xc, start=0, stop=300)
    )
    np.testing.assert_array_equal(
        _fused.project64(G, np.asfortranarray(Xc), start=0, stop=300),
        _fused.project64(G, Xc, start=0, stop=300),
    )
    C, a = rng.standard_normal((3, 6)), rng.standard_normal(3)
    raw = np.zeros(8 * 300 + 1, np.uint8)
    xu = raw[1:].view(np.float64)
    xu[:] = Xc[0]
    assert not xu.flags.aligned
    for x in (Xs, xu, Xs[0]):
        np.testing.assert_array_equal(
            _fused.combine64(G, C, a, x, start=0, stop=300, dtype=np.float32),
            _fused.combine64(G, C, a, np.ascontiguousarray(x), start=0, stop=300, dtype=np.float32),
        )
    # float16 X is widened exactly, to float32
    Xh = Xc.astype(np.float16)
    np.testing.assert_array_equal(
        _fused.project64(G, Xh, start=0, stop=300),
        _fused.project64(G, Xh.astype(np.float32), start=0, stop=300),
    )


def test_supports64(rng):
    V = rng.standard_normal((4, 10))
    for dt in (np.float64, np.float32, np.float16):
        assert _fused.supports64(V.astype(dt))
    if ml_dtypes is not None:
        assert _fused.supports64(V.astype(ml_dtypes.bfloat16))
        # A bfloat16 in the other byte order is named bfloat16 too; its bits are swapped.
        swapped = np.dtype(ml_dtypes.bfloat16).newbyteorder("S")
        assert not _fused.supports64(V.astype(swapped))
        with pytest.raises(TypeError, match="not a storage dtype"):
            _fused.project64(V.astype(swapped), V[:1], start=0, stop=10)
    assert not _fused.supports64(V.astype(np.uint16))  # bits: only with storage= named
    assert not _fused.supports64(V.astype(np.int32))
    assert not _fused.supports64(V.astype(">f4"))
    assert _fused.supports64(np.asfortranarray(V))  # read as its transpose
    assert not _fused.supports64(V[:, ::2])
    assert not _fused.supports64(V[0])
    assert not _fused.supports64(V.tolist())


def test_float64_passes_reject_bad_arguments(rng):
    G = rng.standard_normal((4, 10)).astype(np.float32)
    C, a, x = np.ones((2, 4)), np.ones(2), np.ones(10)
    kw = {"start": 0, "stop": 10, "dtype": np.float32}
    with pytest.raises(ValueError, match="not inside"):
        _fused.project64(G, np.ones(5), start=8, stop=13)
    with pytest.raises(ValueError, match=r"X must have shape \(K, 6\)"):
        _fused.project64(G, np.ones((2, 10)), start=0, stop=6)
    with pytest.raises(ValueError, match="X must have shape"):
        _fused.project64(G, np.ones((2, 2, 10)), start=0, stop=10)
    with pytest.raises(ValueError, match=r"C must have shape \(K, 4\)"):
        _fused.combine64(G, np.ones((2, 3)), a, x, **kw)
    with pytest.raises(ValueError, match=r"alpha must have shape \(2,\)"):
        _fused.combine64(G, C, np.ones(3), x, **kw)
    with pytest.raises(ValueError, match=r"X must have shape \(2, 10\) or \(10,\)"):
        _fused.combine64(G, C, a, np.ones((3, 10)), **kw)
    with pytest.raises(ValueError, match="storage must be one of"):
        _fused.project64(G, x, start=0, stop=10, storage="int8")
    with pytest.raises(ValueError, match="isa must be one of"):
        _fused.project64(G, x, start=0, stop=10, isa="sse9")
    with pytest.raises(TypeError, match="not a storage dtype"):
        _fused.project64(G.astype(np.int32), x, start=0, stop=10)
    with pytest.raises(TypeError, match="not a storage dtype"):
        _fused.project64(G.view(np.uint32), x, start=0, stop=10)
    with pytest.raises(TypeError, match="not a storage dtype"):
        _fused.project64(G.astype(np.uint16), x, start=0, stop=10)  # bits need storage=
    with pytest.raises(TypeError, match="does not match storage='bfloat16'"):
        _fused.project64(G, x, start=0, stop=10, storage="bfloat16")
    with pytest.raises(TypeError, match="C-ordered"):
        _fused.project64(G[:, ::2], x[:5], start=0, stop=5)
    with pytest.raises(TypeError, match="X must hold real floating"):
        _fused.project64(G, np.ones(10, np.int64), start=0, stop=10)
    with pytest.raises(TypeError, match="C must hold real floating"):
        _fused.combine64(G, C.astype(complex), a, x, **kw)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        _fused.combine64(G, C, a, x, start=0, stop=10, dtype=np.float16)


def test_float64_extension_checks_its_buffers():
    """A wrong call into project64 or combine64 is an exception, never an out-of-bounds
    access."""
    P = _fused._passes
    V = np.zeros((4, 10), np.uint16)  # 2-byte storage
    X, Y = np.zeros((2, 10)), np.zeros((2, 4))
    P.project64(V, 10, 0, 4, X, 2, True, Y, 10, 0, 10, 0, 3)  # the valid call
    with pytest.raises(ValueError, match="V holds"):
        P.project64(V, 10, 0, 4, X, 2, True, Y, 10, 0, 10, 0, 0)  # uint16 read as float32
    with pytest.raises(ValueError, match="V holds"):
        P.project64(V, 10, 0, 5, X, 2, True, Y, 10, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="bad shape"):
        P.project64(V, 10, 3, 4, X, 2, True, Y, 10, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="X holds"):
        P.project64(V, 10, 0, 4, X, 3, True, np.zeros((3, 4)), 10, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="Y holds"):
        P.project64(V, 10, 0, 4, X, 2, True, np.zeros((2, 3)), 10, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="kk must be 1 to 8"):
        P.project64(V, 10, 0, 4, X, 0, True, Y, 10, 0, 10, 0, 3)
    with pytest.raises(ValueError, match="storage must be"):
        P.project64(V, 10, 0, 4, X, 2, True, Y, 10, 0, 10, 0, 4)
    Ct, a, Yc = np.zeros((4, 8)), np.zeros(8), np.zeros((2, 10), np.float32)
    x1 = np.zeros(10, np.float32)
    P.combine64(V, 10, 0, 4, Ct, 2, a, x1, True, False, Yc, False, 10, 0, 10, 0, 2)  # valid
    with pytest.raises(ValueError, match="X holds"):
        P.combine64(V, 10, 0, 4, Ct, 2, a, x1, False, False, Yc, False, 10, 0, 10, 0, 2)
    with pytest.raises(ValueError, match="Y holds"):
        P.combine64(V, 10, 0, 4, Ct, 2, a, x1, True, False, Yc, True, 10, 0, 10, 0, 2)
    with pytest.raises(ValueError, match="Ct holds"):
        P.combine64(V, 10, 0, 4, Ct[:3], 2, a, x1, True, False, Yc, False, 10, 0, 10, 0, 2)
    with pytest.raises(ValueError, match="a holds"):
        P.combine64(V, 10, 0, 4, Ct, 2, a[:7], x1, True, False, Yc, False, 10, 0, 10, 0, 2)
    with pytest.raises(ValueError, match="bad shape"):
        P.combine64(V, 10, 0, 4, Ct, 2, a, x1, True, False, Yc, False, 10, 5, 11, 0, 2)
    with pytest.raises(ValueError, match="storage must be"):
        P.combine64(V, 10, 0, 4, Ct, 2, a, x1, True, False, Yc, False, 10, 0, 10, 0, -1)
    with pytest.raises(ValueError, match=r"V: size .* out of range"):
        P.project64(np.ones(4, np.uint16), 2**62, 0, 2, X, 2, True, Y, 1, 0, 1, 0, 3)


@pytest.mark.parametrize("storage", ["float32", "float64", "float16"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_block_calls_equal_one_call_per_block(storage, threads, monkeypatch):
    # project64_blocks / combine64_blocks: each block's result is bit for bit that of
    # project64 / combine64 on the block's columns, whatever the threads (blocks are
    # shared among them, each summed alone).
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", threads)
    monkeypatch.setattr(_fused, "_MIN_THREAD_WORK", 1)
    rng = np.random.default_rng(7)
    m, s, count, K, start = 11, 37, 150, 3, 5
    G = rng.standard_normal((m, start + count * s + 4)).astype(storage)
    X = rng.standard_normal((count, K, s)).astype(np.float32)
    C = rng.standard_normal((count, K, m))
    alpha = rng.standard_normal(K)
    P = _fused.project64_blocks(G, X, start=start, block_size=s)
    Y = _fused.combine64_blocks(G, C, alpha, X, start=start, block_size=s, dtype=np.float32)
    assert P.shape == (count, K, m) and Y.shape == (count, K, s) and Y.dtype == np.float32
    for b in range(count):
        lo, hi = start + b * s, start + (b + 1) * s
        np.testing.assert_array_equal(P[b], _fused.project64(G, X[b], start=lo, stop=hi))
        want = _fused.combine64(G, C[b], alpha, X[b], start=lo, stop=hi, dtype=np.float32)
        np.testing.assert_array_equal(Y[b], want)


def test_the_automatic_isa_is_the_widest_except_fma_bound_calls_on_split_avx512(monkeypatch):
    # An explicit ISA is never replaced; without split AVX-512 units the automatic choice
    # (0) stays the widest; with them, AVX2 for the FMA-bound calls only.
    F32, F64, F16, BF16 = (
        _fused.STORAGES[n] for n in ("float32", "float64", "float16", "bfloat16")
    )
    avx2 = _fused.ISAS["avx2"]
    monkeypatch.setattr(_fused, "_AVX512_HALVES", False)
    for st in (F32, F64, F16, BF16):
        for kk in (1, 4, 8):
            for combine in (False, True):
                assert _fused._auto_isa(0, st, kk, combine=combine) == 0
    monkeypatch.setattr(_fused, "_AVX512_HALVES", True)
    for combine in (False, True):
        for st in (F32, F64, F16, BF16):
            for kk in range(1, 9):
                for code in _fused.ISAS.values():
                    assert _fused._auto_isa(code, st, kk, combine=combine) == code
    for kk in range(1, 9):
        assert _fused._auto_isa(0, F32, kk, combine=True) == (avx2 if kk > 4 else 0)
        assert _fused._auto_isa(0, F64, kk, combine=True) == 0
        for st in (F32, F64):
            assert _fused._auto_isa(0, st, kk, combine=False) == 0
        for st in (F16, BF16):
            assert _fused._auto_isa(0, st, kk, combine=True) == 0
            assert _fused._auto_isa(0, st, kk, combine=False) == (avx2 if kk != 2 else 0)


def test_split_avx512_is_only_reported_where_avx512_runs():
    halves = _fused._passes.avx512_halves()
    assert isinstance(halves, bool) and halves == _fused._AVX512_HALVES
    assert not halves or _fused.best_isa() == "avx512"


@pytest.mark.skipif("avx2" not in ISAS, reason="the CPU has no AVX2")
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_the_automatic_choice_runs_the_chosen_kernels(monkeypatch, storage):
    # Where AVX-512 is split, isa=None gives the AVX2 kernels' bits on the FMA-bound calls,
    # one call or per block; the other calls keep the widest ISA's.
    monkeypatch.setattr(_fused, "_AVX512_HALVES", True)
    rng = np.random.default_rng(3)
    m, s, count, K = 9, 96, 3, 5
    G = rng.standard_normal((m, count * s)).astype(storage)
    X = rng.standard_normal((K, count * s)).astype(np.float32)
    C = rng.standard_normal((K, m))
    alpha = rng.standard_normal(K)
    n = count * s
    fma = "avx2" if storage == "float16" else _fused.best_isa()
    np.testing.assert_array_equal(
        _fused.project64(G, X, start=0, stop=n), _fused.project64(G, X, start=0, stop=n, isa=fma)
    )
    fma = "avx2" if storage == "float32" else _fused.best_isa()
    np.testing.assert_array_equal(
        _fused.combine64(G, C, alpha, X, start=0, stop=n, dtype=np.float32),
        _fused.combine64(G, C, alpha, X, start=0, stop=n, dtype=np.float32, isa=fma),
    )
    Xb = np.ascontiguousarray(X.reshape(K, count, s).transpose(1, 0, 2))
    Cb = np.stack([C] * count)
    Yb = _fused.combine64_blocks(G, Cb, alpha, Xb, start=0, block_size=s, dtype=np.float32)
    for b in range(count):
        want = _fused.combine64(
            G, C, alpha, Xb[b], start=b * s, stop=(b + 1) * s, dtype=np.float32, isa=fma
        )
        np.testing.assert_array_equal(Yb[b], want)


def test_block_calls_refuse_bad_shapes():
    G = np.ones((4, 100), np.float32)
    with pytest.raises(ValueError, match="X must have shape"):
        _fused.project64_blocks(G, np.ones((3, 2, 10)), start=0, block_size=11)
    with pytest.raises(ValueError, match="not inside"):
        _fused.project64_blocks(G, np.ones((11, 1, 10)), start=0, block_size=10)
    with pytest.raises(ValueError, match="C must have shape"):
        _fused.combine64_blocks(
            G, np.ones((3, 1, 5)), np.ones(1), np.ones((3, 1, 10)), start=0, block_size=10,
            dtype=np.float32,
        )  # fmt: skip
    with pytest.raises(TypeError, match="dtype"):
        _fused.combine64_blocks(
            G, np.ones((3, 1, 4)), np.ones(1), np.ones((3, 1, 10)), start=0, block_size=10,
            dtype=None,
        )  # fmt: skip


# -- rows_gram64: the set-up's float64 Gram ----------------------------------------------------


def _gram_values(storage, m, ld, rng):
    """m x ld of ``storage``: rows of very different size, -0, subnormals (float32 and
    float16: their products are exact in float64 too) and the type's extremes."""
    V = rng.standard_normal((m, ld)) * np.logspace(0, -3, m)[:, None]
    G = V.astype(storage if storage != "bfloat16" else ml_dtypes.bfloat16)
    info = ml_dtypes.finfo(G.dtype) if storage == "bfloat16" else np.finfo(storage)
    G[0, 1], G[1 % m, 2], G[2 % m, 3] = -0.0, info.smallest_subnormal, info.smallest_normal
    G[-1, 5] = 2.0**500 if storage == "float64" else info.max / 4  # its square in float64
    return G


def _gamma(n):
    """The float64 bound of a sum of n terms, relative to the sum of their magnitudes."""
    eps = float(np.finfo(np.float64).eps)
    return n * eps / (1 - n * eps)


def _assert_gram_close(got, X):
    """got: the float64 Gram of X (products exact, sums in float64 in some order) against
    longdouble's, within the float64 bound of sums of n terms (magnitudes: |X| |X|^T)."""
    Xl = X.astype(np.float64).astype(np.longdouble)
    want = Xl @ Xl.T
    terms = np.abs(X.astype(np.float64)) @ np.abs(X.astype(np.float64)).T
    err = np.abs(got.astype(np.longdouble) - want).astype(np.float64)
    assert np.all(err <= _gamma(X.shape[1] + 1) * terms), np.max(err / terms)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("m", [1, 7, 20])
def test_rows_gram64_is_the_float64_gram(monkeypatch, isa, storage, m, rng):
    """The Gram of every column range (odd offsets, fewer columns than a chunk, several
    chunks and a tail) within the float64 bound of longdouble's, exactly symmetric, the same
    bits on one thread and on three (up to 32 pieces, a shorter last), and the same bits from a
    Fortran-ordered G; the uint16 bits of 2-byte G with storage= naming them."""
    if storage == "bfloat16" and ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    monkeypatch.setattr(_fused, "_MIN_GRAM_WORK", 1)  # pieces of 64 columns: up to 32
    ld = 4_000
    G = _gram_values(storage, m, ld, rng)
    for start, stop in [(0, ld), (3, ld - 2), (7, 7 + 37), (1, 2), (4, 4)]:
        one, three = np.full((m, m), np.nan), np.full((m, m), np.nan)
        monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "1")
        _fused.rows_gram64(G, one, start=start, stop=stop, isa=isa)
        monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "3")
        _fused.rows_gram64(G, three, start=start, stop=stop, isa=isa)
        _assert_gram_close(one, G[:, start:stop])
        np.testing.assert_array_equal(one, one.T)
        np.testing.assert_array_equal(one.view(np.uint64), three.view(np.uint64))
        fortran = np.full((m, m), np.nan)
        _fused.rows_gram64(np.asfortranarray(G), fortran, start=start, stop=stop, isa=isa)
        np.testing.assert_array_equal(one.view(np.uint64), fortran.view(np.uint64))
    if G.dtype.itemsize == 2:
        bits = np.empty((m, m))
        _fused.rows_gram64(G.view(np.uint16), bits, start=0, stop=ld, storage=storage, isa=isa)
        _fused.rows_gram64(G, one, start=0, stop=ld, isa=isa)
        np.testing.assert_array_equal(bits.view(np.uint64), one.view(np.uint64))


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_rows_gram64_diagonal_shows_what_is_not_finite(storage):
    """A NaN or infinity of G (or a square beyond float64) leaves its row's diagonal entry
    non-finite, and only those: the set-up's finite check reads the diagonal."""
    G = np.ones((6, 300), storage)
    G[1, 250], G[4, 3] = np.nan, np.inf
    out = np.empty((6, 6))
    _fused.rows_gram64(G, out, start=0, stop=300)
    np.testing.assert_array_equal(np.isfinite(np.diagonal(out)), [1, 0, 1, 1, 0, 1])


def test_rows_gram64_refuses_what_it_cannot_write():
    """A G the kernels cannot read in place, or an out that is not a C-ordered, writeable
    m x m float64 array, is a TypeError; bad columns or threads a ValueError; nothing is
    written. No columns give zeros."""
    G = np.arange(40, dtype=np.float32).reshape(4, 10)
    out = np.zeros((4, 4))
    for bad in (G[:, ::2], G.astype(np.int32), np.asfortranarray(G)[:, ::2]):
        with pytest.raises(TypeError, match="G"):
            _fused.rows_gram64(bad, np.zeros((4, 4)), start=0, stop=5)
    ro = np.zeros((4, 4))
    ro.flags.writeable = False
    for bad_out in (np.zeros((4, 5)), np.zeros((4, 4), np.float32), np.zeros((8, 4))[::2], ro):
        with pytest.raises(TypeError, match="out must be"):
            _fused.rows_gram64(G, bad_out, start=2, stop=8)
    with pytest.raises(ValueError, match="columns"):
        _fused.rows_gram64(G, out, start=6, stop=12)
    for bad_threads in (0, True, 1.5):
        with pytest.raises(ValueError, match="threads"):
            _fused.rows_gram64(G, out, start=2, stop=8, threads=bad_threads)
    np.testing.assert_array_equal(out, 0.0)
    _fused.rows_gram64(G, out, start=2, stop=8, threads=1)
    X = G[:, 2:8].astype(np.float64)
    np.testing.assert_array_equal(out, X @ X.T)
    _fused.rows_gram64(G, out, start=3, stop=3)
    np.testing.assert_array_equal(out, 0.0)


def test_an_extension_built_before_the_isa_choice_still_imports(monkeypatch):
    # Regression: _AVX512_HALVES called _passes.avx512_halves() at import, so an extension
    # built before it (an editable install not rebuilt) failed `import mfac_core` with an
    # AttributeError; older kernels (cast16, store_row) are looked up, not assumed.
    if _fused._passes is None:
        pytest.skip("the C extension is not built")
    older = types.SimpleNamespace(
        **{n: getattr(_fused._passes, n) for n in dir(_fused._passes) if n != "avx512_halves"}
    )
    real = importlib.import_module
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name, package=None: older if name == "._passes" else real(name, package),
    )
    # A second copy of the package (its relative imports, _ext's among them, load anew).
    name = "mfac_core._fused_older_build"
    spec = importlib.util.spec_from_file_location(
        name, _fused.__file__, submodule_search_locations=[os.path.dirname(_fused.__file__)]
    )
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, copy)
    try:
        spec.loader.exec_module(copy)
    finally:
        for sub in [k for k in sys.modules if k.startswith(name + ".")]:
            del sys.modules[sub]
    assert copy._AVX512_HALVES is False
    assert copy._auto_isa(0, 0, 8, combine=True) == 0  # the widest ISA, as before
