"""Tests of the fused CPU passes (mfac_core._fused) against float64 NumPy, on every
instruction set this CPU runs, and of SpectralIHVP with and without them."""

from __future__ import annotations

import numpy as np
import pytest

from mfac_core import SpectralIHVP, _fused
from mfac_core.testing import SpectralOracle, assert_close

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

# (m, ld, col0, n): one row; fewer rows than a panel; a panel and a ragged one; column
# blocks that start inside V and end before its last column; widths below one vector tile,
# between tiles, and across the chunks of both kernels (16384 float32 columns in apply,
# 4096 in the diagonal).
SHAPES = [
    (1, 40, 0, 40),
    (5, 97, 3, 90),
    (8, 64, 0, 64),
    (13, 300, 37, 201),
    (9, 17_000, 5, 16_990),
]


def _problem(rng, m, ld, dtype):
    V = rng.standard_normal((m, ld)).astype(dtype)
    # Rows of very different size, as the rows of V = U^T G are (their norms are the
    # square roots of the Gram's eigenvalues).
    V *= np.logspace(0, -3, m, dtype=dtype)[:, None]
    return V


def _apply_bound(C, V, alpha, x, dtype):
    """The rounding bound of ``alpha x + C V`` summed in ``dtype``: (m + 2) eps |terms|."""
    eps = np.finfo(dtype).eps
    m = V.shape[0]
    mag = np.abs(C.astype(np.float64)) @ np.abs(V.astype(np.float64))
    mag += np.abs(alpha.astype(np.float64))[:, None] * np.abs(x.astype(np.float64))
    return (m + 2) * eps * mag


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("K", [1, 8, 11])
def test_apply_against_numpy(isa, dtype, shape, K, rng):
    m, ld, col0, n = shape
    V = _problem(rng, m, ld, dtype)
    C = rng.standard_normal((K, m)).astype(dtype)
    alpha = rng.standard_normal(K).astype(dtype)
    x = rng.standard_normal(n).astype(dtype)
    Y = _fused.apply(V, C, alpha, x, start=col0, stop=col0 + n, isa=isa)
    assert Y.dtype == dtype and Y.shape == (K, n)
    Vb = V[:, col0 : col0 + n].astype(np.float64)
    ref = C.astype(np.float64) @ Vb + alpha.astype(np.float64)[:, None] * x
    err = np.abs(Y - ref)
    assert np.all(err <= _apply_bound(C, V[:, col0 : col0 + n], alpha, x, dtype)), err.max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("K", [1, 8, 11])
@pytest.mark.parametrize("block_size", [None, 1, 7, 16, 50, 4_099])
def test_diagonal_against_numpy(isa, dtype, shape, K, block_size, rng):
    """Sums in float64 whatever V's dtype: the error is one rounding to the output dtype
    plus (m + 2) eps64 of the sum of the terms' magnitudes, even where the sum cancels.
    With ``block_size``, every block has its own coefficients (ragged last block too)."""
    m, ld, col0, n = shape
    V = _problem(rng, m, ld, dtype)
    Vb = V[:, col0 : col0 + n].astype(np.float64)
    S = Vb * Vb
    if block_size is None:
        H = rng.standard_normal((K, m))
        terms = H @ S
        mag = np.abs(H) @ S
        kwargs = {}
    else:
        blocks = -(-n // block_size)
        H = rng.standard_normal((K, blocks, m))
        col_block = np.arange(n) // block_size
        # terms[k, j] = sum_i H[k, block(j), i] S[i, j]
        terms = np.einsum("kji,ij->kj", H[:, col_block, :], S)
        mag = np.einsum("kji,ij->kj", np.abs(H[:, col_block, :]), S)
        kwargs = {"block_size": block_size}
    # alpha cancels most of the sum in the first column, as 1/damp does in diag(F^{-1}).
    alpha = -terms[:, 0] * (1 + 1e-3 * rng.standard_normal(K))
    D = _fused.diagonal(V, H, alpha, start=col0, stop=col0 + n, isa=isa, **kwargs)
    assert D.dtype == dtype and D.shape == (K, n)
    ref = alpha[:, None] + terms
    mag = mag + np.abs(alpha)[:, None]
    bound = np.finfo(dtype).eps / 2 * np.abs(ref) + (m + 2) * np.finfo(np.float64).eps * mag
    # float32 outputs: the float64 sum is rounded once more, to float32.
    assert np.all(np.abs(D - ref) <= bound * 1.01 + np.finfo(dtype).tiny), np.abs(D - ref).max()


def test_diagonal_block_arguments(rng):
    V = rng.standard_normal((3, 20))
    with pytest.raises(ValueError, match=r"H must be \(K, 3, m\)"):
        _fused.diagonal(V, np.ones((2, 2, 3)), np.ones(2), start=0, stop=20, block_size=7)
    with pytest.raises(ValueError, match=r"H must be \(K, m\) without block_size"):
        _fused.diagonal(V, np.ones((2, 3, 3)), np.ones(2), start=0, stop=20)
    with pytest.raises(ValueError, match="block_size=0"):
        _fused.diagonal(V, np.ones((2, 3, 3)), np.ones(2), start=0, stop=20, block_size=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_project_against_numpy(isa, dtype, shape, rng):
    m, ld, col0, n = shape
    V = _problem(rng, m, ld, dtype)
    x = rng.standard_normal(n).astype(dtype)
    y = _fused.project(V, x, start=col0, stop=col0 + n, isa=isa)
    assert y.dtype == np.float64 and y.shape == (m,)
    Vb = V[:, col0 : col0 + n].astype(np.float64)
    ref = Vb @ x.astype(np.float64)
    # Sums in V's dtype within a chunk, across chunks in float64: at most the n-term bound.
    bound = (n + 2) * np.finfo(dtype).eps * (np.abs(Vb) @ np.abs(x.astype(np.float64)))
    assert np.all(np.abs(y - ref) <= bound)


def test_pieces_do_not_depend_on_threads(monkeypatch, rng):
    """Results are bit-identical for any thread count (the pieces depend on the shape)."""
    monkeypatch.setattr(_fused, "_PIECE_WORK", 2**10)
    monkeypatch.setattr(_fused, "_MIN_THREAD_WORK", 1)
    V = rng.standard_normal((12, 5_000)).astype(np.float32)
    x = rng.standard_normal(4_990).astype(np.float32)
    C = rng.standard_normal((9, 12)).astype(np.float32)
    H = rng.standard_normal((9, 12))
    assert len(_fused._pieces(12, 4_990)) > 10
    out = {}
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("MFAC_CORE_NUM_THREADS", threads)
        out[threads] = (
            _fused.project(V, x, start=7, stop=4_997),
            _fused.apply(V, C, np.ones(9), x, start=7, stop=4_997),
            _fused.diagonal(V, H, np.ones(9), start=7, stop=4_997),
        )
    for threads in ("2", "5"):
        for a, b in zip(out["1"], out[threads], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MFAC_CORE_NUM_THREADS": "3", "OMP_NUM_THREADS": "7"}, 3),
        ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "7"}, 2),
        ({"OMP_NUM_THREADS": "4,2"}, 4),
    ],
)
def test_max_threads_follows_the_variables(monkeypatch, env, expected):
    for name in ("MFAC_CORE_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _fused.max_threads() == expected


@pytest.mark.parametrize("value", ["0", "x", "", "-2", "\u00b2"])
def test_max_threads_ignores_bad_values(monkeypatch, value):
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", value)
    assert _fused.max_threads() >= 1


def test_supports(rng):
    V = rng.standard_normal((4, 10))
    assert _fused.supports(V) and _fused.supports(V.astype(np.float32))
    assert not _fused.supports(np.asfortranarray(V))
    assert not _fused.supports(V[:, ::2])
    assert not _fused.supports(V.astype(np.float16))
    assert not _fused.supports(V[0])
    assert not _fused.supports(V.tolist())
    # A float64 array at an odd address: not aligned, not read in place.
    raw = np.zeros(4 * 10 * 8 + 1, dtype=np.uint8)
    odd = raw[1:].view(np.float64).reshape(4, 10)
    assert not odd.flags.aligned and not _fused.supports(odd)


def test_wrapper_rejects_bad_arguments(rng):
    V = rng.standard_normal((4, 10)).astype(np.float32)
    with pytest.raises(TypeError, match="C-ordered"):
        _fused.apply(
            np.asfortranarray(V), np.ones((1, 4)), np.ones(1), np.ones(10), start=0, stop=10
        )
    with pytest.raises(ValueError, match="not inside"):
        _fused.project(V, np.ones(5), start=8, stop=13)
    with pytest.raises(ValueError, match="match V's 4 rows"):
        _fused.apply(V, np.ones((2, 3)), np.ones(2), np.ones(10), start=0, stop=10)
    with pytest.raises(ValueError, match="match V's 4 rows"):
        _fused.diagonal(V, np.ones((2, 4)), np.ones(3), start=0, stop=10)
    with pytest.raises(ValueError, match=r"x must have shape \(6,\)"):
        _fused.apply(V, np.ones((2, 4)), np.ones(2), np.ones(10), start=0, stop=6)
    with pytest.raises(ValueError, match="isa must be one of"):
        _fused.project(V, np.ones(10), start=0, stop=10, isa="sse9")


def test_extension_checks_its_buffers(rng):
    """A wrong call into the extension is an exception, never an out-of-bounds access."""
    P = _fused._passes
    V = np.zeros((4, 10), np.float32)
    Ct, a, x, Y = (
        np.zeros((4, 8), np.float32),
        np.zeros(8, np.float32),
        np.zeros(10, np.float32),
        np.zeros((2, 10), np.float32),
    )
    P.apply(V, 10, 0, 4, Ct, 2, a, x, Y, 10, 0, 10, 0, False)  # the valid call
    with pytest.raises(ValueError, match="V holds"):
        P.apply(V, 10, 0, 5, Ct, 2, a, x, Y, 10, 0, 10, 0, False)
    with pytest.raises(ValueError, match="bad shape"):
        P.apply(V, 10, 3, 4, Ct, 2, a, x, Y, 10, 0, 10, 0, False)
    with pytest.raises(ValueError, match="bad shape"):
        P.apply(V, 10, 0, 4, Ct, 2, a, x, Y, 10, 5, 11, 0, False)
    with pytest.raises(ValueError, match="Y holds"):
        P.apply(V, 10, 0, 4, Ct, 3, a, x, Y, 10, 0, 10, 0, False)
    with pytest.raises(ValueError, match="kk must be 1 to 8"):
        P.apply(V, 10, 0, 4, Ct, 9, a, x, Y, 10, 0, 10, 0, False)
    with pytest.raises(ValueError, match="V holds"):
        P.apply(V, 10, 0, 4, Ct, 2, a, x, Y, 10, 0, 10, 0, True)  # float32 read as float64
    with pytest.raises(ValueError, match="isa must be"):
        P.project(V, 10, 0, 4, x, np.zeros(4), 10, 0, 10, 7, False)
    with pytest.raises(ValueError, match="y holds"):
        P.project(V, 10, 0, 4, x, np.zeros(3), 10, 0, 10, 0, False)
    with pytest.raises(ValueError, match="Ht holds"):
        P.diagonal(V, 10, 0, 4, np.zeros((3, 8)), 2, np.zeros(8), Y, 10, 10, 0, 10, 0, False)
    with pytest.raises(ValueError, match="Ht holds"):  # 2 blocks of 5 need 2 x 4 x 8
        P.diagonal(V, 10, 0, 4, np.zeros((4, 8)), 2, np.zeros(8), Y, 10, 5, 0, 10, 0, False)
    with pytest.raises(ValueError, match="bsize must be"):
        P.diagonal(V, 10, 0, 4, np.zeros((4, 8)), 2, np.zeros(8), Y, 10, 0, 0, 10, 0, False)
    with pytest.raises(TypeError):
        P.apply(V, 10, 0, 4, Ct, 2, a, x, Y.copy()[None].repeat(1, 0).T, 10, 0, 10, 0, False)
    Y.flags.writeable = False
    with pytest.raises((TypeError, BufferError)):
        P.apply(V, 10, 0, 4, Ct, 2, a, x, Y, 10, 0, 10, 0, False)
    if _fused.best_isa() != "avx512":
        with pytest.raises(ValueError, match="not supported by this CPU"):
            P.project(V, 10, 0, 4, x, np.zeros(4), 10, 0, 10, 3, False)


def test_a_failing_piece_raises_on_the_caller(monkeypatch, rng):
    monkeypatch.setattr(_fused, "_PIECE_WORK", 2**8)
    monkeypatch.setattr(_fused, "_MIN_THREAD_WORK", 1)
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "3")
    real = _fused._passes

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def project(self, *args):
            if args[7] > 0:  # every piece but the first
                raise MemoryError("piece failed")
            return real.project(*args)

    monkeypatch.setattr(_fused, "_passes", Failing())
    V = rng.standard_normal((4, 1_000)).astype(np.float32)
    with pytest.raises(MemoryError, match="piece failed"):
        _fused.project(V, np.ones(1_000, np.float32), start=0, stop=1_000)


# -- SpectralIHVP with and without the kernels ---------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "block_size", [None, 5_000, 50], ids=["full", "blocks+ragged", "small-blocks+ragged"]
)
def test_spectral_same_with_and_without_kernels(monkeypatch, dtype, block_size, rng):
    """sweep and diagonal through the kernels agree with the BLAS path and the oracle."""
    m, d = 12, 17_003
    G = rng.standard_normal((m, d)) * np.logspace(0, -2, m)[:, None]
    # kappa = 1 + ||G||^2 / (m damp) from 101 (the smallest damping) down to about 1.
    damp = float(np.linalg.norm(G, 2)) ** 2 / m / 100
    op = SpectralIHVP(G.astype(dtype), damp=damp, block_size=block_size)
    x = rng.standard_normal(d).astype(dtype)
    damps = [damp * 10.0 ** (j / 2) for j in range(10)]
    fused = (op.sweep(x, damps=damps), op.diagonal(damps=damps), op.diagonal())
    monkeypatch.setattr(_fused, "supports", lambda V: False)
    blas = (op.sweep(x, damps=damps), op.diagonal(damps=damps), op.diagonal())
    G64 = G.astype(dtype).astype(np.float64)
    for j, dp in enumerate(damps):
        ref = SpectralOracle(G64, dp, block_size=block_size)
        close = {"kappa": ref.kappa, "dtype": dtype}
        assert_close(fused[0][j], ref.matvec(x.astype(np.float64)), **close)
        assert_close(fused[0][j], blas[0][j], **close)
        assert_close(fused[1][j], ref.diagonal(), **close)
        assert_close(fused[1][j], blas[1][j], **close)
    assert_close(fused[2], blas[2], kappa=SpectralOracle(G64, damp).kappa, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sweep_within_the_documented_bound_at_large_m(dtype, rng):
    """At m = 512 the sweep keeps SpectralIHVP's bound, eps * error_scale (its docstring).

    The m terms of ``C V`` are summed before ``alpha x`` is added: summing them onto
    ``alpha x`` (about ``x / damp``, much larger than the sum) rounded every partial sum at
    that size and gave 4-7 eps here, above the bound (error_scale is 1.2)."""
    m, d, damp = 512, 6_000, 100.0
    G = rng.standard_normal((m, d)).astype(dtype)
    x = rng.standard_normal(d).astype(dtype)
    op = SpectralIHVP(G, damp=damp)
    ref = SpectralIHVP(G.astype(np.float64), damp=damp)
    eps = float(np.finfo(dtype).eps)
    Y = op.sweep(x, damps=[damp, 3 * damp])
    for j, dp in enumerate([damp, 3 * damp]):
        r = ref.with_damp(dp) @ x.astype(np.float64)
        err = float(np.linalg.norm(Y[j] - r) / np.linalg.norm(r))
        assert err <= eps * op.with_damp(dp).error_scale, (dp, err / eps)


def test_empty_shapes(rng):
    V = np.zeros((0, 10), np.float32)
    assert _fused.project(V, np.ones(10), start=0, stop=10).shape == (0,)
    np.testing.assert_array_equal(
        _fused.apply(V, np.ones((2, 0)), [1.0, 2.0], np.ones(10), start=0, stop=10),
        [[1.0] * 10, [2.0] * 10],
    )
    np.testing.assert_array_equal(
        _fused.diagonal(V, np.ones((2, 0)), [1.0, 2.0], start=0, stop=10), [[1.0] * 10, [2.0] * 10]
    )
    W = np.ones((3, 0), np.float32)
    np.testing.assert_array_equal(_fused.project(W, np.ones(0), start=0, stop=0), np.zeros(3))
    assert _fused.apply(W, np.ones((2, 3)), [1.0, 2.0], np.ones(0), start=0, stop=0).shape == (2, 0)
    assert _fused.diagonal(W, np.ones((2, 3)), [1.0, 2.0], start=0, stop=0).shape == (2, 0)


def test_extension_rejects_sizes_that_overflow():
    """Sizes whose products overflow are refused before any access (this call read about
    1 GiB before V, and crashed, when the checks multiplied without overflow checks)."""
    P = _fused._passes
    with pytest.raises(ValueError, match=r"V: size .* out of range"):
        P.project(
            np.ones(1, np.float32),
            2**62 - 2**28,
            0,
            2,
            np.ones(1, np.float32),
            np.zeros(2),
            1,
            0,
            1,
            0,
            False,
        )
    with pytest.raises(ValueError, match="bad shape"):
        P.project(
            np.ones(4, np.float32),
            2**62,
            0,
            2**29,
            np.ones(1, np.float32),
            np.zeros(2),
            1,
            0,
            1,
            0,
            False,
        )
    with pytest.raises(ValueError, match=r"V: size .* out of range"):  # 2**61 x 4 bytes
        P.apply(
            np.ones(4, np.float32),
            2**61,
            0,
            1,
            np.ones(8, np.float32),
            8,
            np.ones(8, np.float32),
            np.ones(4, np.float32),
            np.ones(4, np.float32),
            2**61,
            0,
            0,
            0,
            False,
        )


def test_unaligned_x_is_copied_before_the_kernels(rng):
    """The kernels load whole vectors of x: an unaligned x is copied, and the extension
    refuses an unaligned buffer itself."""
    V = rng.standard_normal((3, 50))
    raw = np.zeros(8 * 50 + 1, np.uint8)
    x = raw[1:].view(np.float64)
    x[:] = rng.standard_normal(50)
    assert not x.flags.aligned
    np.testing.assert_allclose(_fused.project(V, x, start=0, stop=50), V @ x, rtol=1e-13)
    Y = _fused.apply(V, np.ones((2, 3)), [1.0, 2.0], x, start=0, stop=50)
    np.testing.assert_allclose(Y, np.ones((2, 3)) @ V + np.array([[1.0], [2.0]]) * x, rtol=1e-13)
    with pytest.raises(ValueError, match="x is not aligned"):
        _fused._passes.project(V, 50, 0, 3, x, np.zeros(3), 50, 0, 50, 0, True)


@pytest.mark.parametrize(("K", "kernels"), [(1, False), (2, True), (8, True), (9, False)])
def test_sweep_uses_the_kernels_for_2_to_8_dampings(monkeypatch, rng, K, kernels):
    """One damping is a GEMV pass and more than eight one GEMM: BLAS does those faster."""
    op = SpectralIHVP(rng.standard_normal((4, 300)), damp=0.5)
    x = rng.standard_normal(300)
    calls = []
    real = _fused.apply
    monkeypatch.setattr(_fused, "apply", lambda *a, **k: calls.append(1) or real(*a, **k))
    damps = [0.5 * 2.0**j for j in range(K)]
    Y = op.sweep(x, damps=damps)
    assert bool(calls) == kernels
    for j, dp in enumerate(damps):
        np.testing.assert_allclose(Y[j], op.with_damp(dp) @ x, rtol=1e-12)


@pytest.mark.parametrize(("block_size", "kernels"), [(32, False), (64, True), (None, True)])
def test_diagonal_uses_the_kernels_for_blocks_of_64_or_more(monkeypatch, rng, block_size, kernels):
    """Smaller blocks would make the padded coefficients as large as V (and slower)."""
    op = SpectralIHVP(rng.standard_normal((4, 640)), damp=0.5, block_size=block_size)
    calls = []
    real = _fused.diagonal
    monkeypatch.setattr(_fused, "diagonal", lambda *a, **k: calls.append(1) or real(*a, **k))
    D = op.diagonal(damps=[0.5, 2.0])
    assert bool(calls) == kernels
    np.testing.assert_allclose(D[1], op.with_damp(2.0).diagonal(), rtol=1e-12)
