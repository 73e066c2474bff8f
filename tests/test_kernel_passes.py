"""The pass kernels of ``mfac_core._kernels`` (``passes.cu``), verified without a GPU.

Through the CPU harness (g++ and ``host/cuda_host.h``, one fiber per CUDA thread, the launch
plans and array code of the CuPy launcher; skipped without g++):

* ``project64``, ``combine64`` and their block-wise forms, for every storage dtype of G and
  dtype of X and of the result, against long-double oracles, within the bounds of float64 sums;
* the widening of every float16 and bfloat16 (all 65,536 bit patterns) and of float32 across
  its exponents, exact;
* the same bits at every run, whatever the order of the threads; no write out of bounds;
* the argument checks, and the plans (launches per call independent of the number of columns).

nvcc and ptxas (sm_80, sm_90, no spills) are covered by ``test_kernels.py``, which compiles every
``.cu`` file. With CuPy and a GPU, the same operations run on the device too.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import _build_cache
import numpy as np
import pytest
from conftest import cupy_with_a_device

from mfac_core import _kernels
from mfac_core._kernels import _plan

EPS = float(np.finfo(np.float64).eps)
#: The unit roundoff of the long-double oracles (x87 extended: 64-bit significands).
EPS_ORACLE = float(np.finfo(np.longdouble).eps)
STORAGES = ("float32", "float64", "float16", "bfloat16")
#: (m, n, start, k): m rows of G, n columns from `start` on, k vectors. Sizes that are not
#: multiples of any tile, k past 8 (two launches), and column slices (test_cases_cover_...).
CASES = (
    (1, 1, 0, 1),
    (1, 3001, 11, 9),
    (5, 257, 3, 2),
    (8, 1024, 0, 8),
    (13, 2049, 17, 3),
    (64, 4099, 5, 9),
    (5, 40000, 1, 1),
)
#: (m, count, size, start, k) for the block-wise forms: tiles that straddle blocks, blocks of
#: one column, blocks wider than a tile.
BLOCK_CASES = (
    (5, 3, 100, 7, 3),
    (13, 4, 2500, 1, 9),
    (1, 7, 1, 0, 2),
    (64, 3, 3000, 2, 8),
)


# -- data and oracles --------------------------------------------------------------------------


def bf16_bits_to_float64(bits: np.ndarray) -> np.ndarray:
    """The values of bfloat16 bit patterns: the top half of a float32's bits."""
    with np.errstate(invalid="ignore"):  # signalling NaNs stay NaNs, with a warning
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def stored_gradients(
    rng: np.random.Generator, m: int, d: int, storage: str
) -> tuple[np.ndarray, str | None, np.ndarray]:
    """G as the kernels take it, the ``storage`` argument, and G's values in float64.

    Values over a few binades (and some exact zeros), so that the sums mix magnitudes; bfloat16
    as its uint16 bits (``storage="bfloat16"``), the others in their own dtype.
    """
    values = rng.standard_normal((m, d)) * np.exp2(rng.integers(-6, 7, size=(m, d)))
    values[rng.random((m, d)) < 0.05] = 0.0
    if storage == "bfloat16":
        bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits, "bfloat16", bf16_bits_to_float64(bits)
    G = values.astype(storage)
    return G, None, G.astype(np.float64)


def oracle(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a @ b`` and ``|a| @ |b|`` in long double: error below (terms + 1) EPS_ORACLE |a||b|."""
    a, b = a.astype(np.longdouble), b.astype(np.longdouble)
    return a @ b, np.abs(a) @ np.abs(b)


def assert_within(result: np.ndarray, exact: np.ndarray, bound: np.ndarray) -> None:
    """``|result - exact| <= bound`` entrywise (NaN fails), with the worst ratio in the message."""
    err = np.abs(result.astype(np.longdouble) - exact)
    ok = err <= bound
    if not np.all(ok):
        ratio = np.where(ok, 0, err / np.maximum(bound, 1e-300))
        worst = np.unravel_index(np.argmax(ratio), ok.shape)
        raise AssertionError(
            f"{np.count_nonzero(~ok)} entries out of bounds; at {worst}: result "
            f"{result[worst]!r}, exact {float(exact[worst])!r}, bound {float(bound[worst])!r}"
        )


def assert_same_to_rounding(result: np.ndarray, reference: np.ndarray) -> None:
    """Two float32 results of the same float64 sums in different orders: within a few
    float32 roundings of the larger one's magnitude. Normwise, since an entry far below the
    norm (one that cancels) may take a different rounding in each order."""
    scale = float(np.max(np.abs(reference.astype(np.float64)), initial=0.0))
    diff = np.abs(result.astype(np.float64) - reference.astype(np.float64))
    np.testing.assert_array_less(diff, 4 * np.finfo(np.float32).eps * scale + 2.0**-149)


def check_projection(P: np.ndarray, Gv: np.ndarray, X: np.ndarray) -> None:
    """``P = X Gv^T``: each entry a sum of n products, in float64 in any order (FMAs or not),
    so within (n + 2) eps64 sum |g x| of the exact value (gamma_n with u = eps / 2, and room)."""
    n = Gv.shape[1]
    exact, size = oracle(X, Gv.T)
    bound = (n + 2) * EPS * size + (n + 2) * EPS_ORACLE * size
    assert_within(P, exact, bound)


def check_combination(
    Y: np.ndarray, Gv: np.ndarray, C: np.ndarray, a: np.ndarray, X: np.ndarray
) -> None:
    """``Y = a X + C Gv``: m + 1 terms summed in float64, then rounded once to Y's dtype.

    Before the rounding within (m + 2) eps64 (|a x| + |C| |G|) of the exact value; a float32
    result is then within one float32 rounding (half an ulp: 2^-24 |Y|, or 2^-150 below the
    normal range) of that.
    """
    m = Gv.shape[0]
    cg, size = oracle(C, Gv)
    ax = a[:, None].astype(np.longdouble) * X.astype(np.longdouble)
    exact = cg + ax
    size = size + np.abs(ax)
    bound = (m + 2) * EPS * size * (1 + 2.0**-23) + (m + 3) * EPS_ORACLE * size
    if Y.dtype == np.float32:
        bound = bound + 2.0**-24 * np.abs(Y.astype(np.longdouble)) + 2.0**-150
    assert_within(Y, exact, bound)


# -- the harness ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_library(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_cache.host_library(request.config, tmp_path_factory.mktemp("host"))


@pytest.fixture(scope="module")
def host(host_library: Path):
    from mfac_core._kernels._host import HostKernels

    # A shuffled thread order (seed) and two OS threads for the blocks, as in test_kernels.py.
    return HostKernels(host_library, seed=20211206, workers=2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def test_cases_cover_the_slices_and_both_paths_of_combine64() -> None:
    # project64's second launch (column slices) and combine64's tiles that straddle blocks are
    # exercised by the cases below, not only in principle.
    def sums(m: int, n: int, start: int, k: int) -> bool:
        plan = _plan.project64(m, k, 1, n, start, start + n, "float32", "float64")
        return any(launch.kernel == "project64_sum" for launch in plan.launches)

    def straddles(count: int, size: int, k: int) -> list[bool]:
        # For each tile of combine64's columns: does it hold columns of two blocks?
        total, tile = count * size, _plan.THREADS * _plan.combine_columns(_plan.pass_width(k))
        return [
            first // size != (min(first + tile, total) - 1) // size
            for first in range(0, total, tile)
        ]

    assert sum(sums(*case) for case in CASES) >= 2
    tiles = [t for _, count, size, _, k in BLOCK_CASES for t in straddles(count, size, min(k, 8))]
    assert any(tiles) and not all(tiles)


@pytest.mark.parametrize("x_dtype", ["float32", "float64"])
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("m", "n", "start", "k"), CASES)
def test_project_within_the_float64_bound(
    host, rng, storage: str, x_dtype: str, m: int, n: int, start: int, k: int
) -> None:
    G, st, Gv = stored_gradients(rng, m, start + n + 3, storage)
    X = rng.standard_normal((k, n)).astype(x_dtype)
    host.launches.clear()
    P = host.project64(G, X, start=start, stop=start + n, storage=st)
    assert P.shape == (k, m) and P.dtype == np.float64
    check_projection(P, Gv[:, start : start + n], X)
    # The harness ran the plan's launches, a number that depends on k alone (test_plans).
    plan = _plan.project64(m, k, 1, n, start, G.shape[1], storage, x_dtype)
    assert host.launches == [(launch.kernel, launch.grid) for launch in plan.launches]


@pytest.mark.parametrize("y_dtype", ["float32", "float64"])
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("m", "n", "start", "k"), CASES)
def test_combine_within_the_float64_bound(
    host, rng, storage: str, y_dtype: str, m: int, n: int, start: int, k: int
) -> None:
    G, st, Gv = stored_gradients(rng, m, start + n + 3, storage)
    x_dtype = "float64" if y_dtype == "float32" else "float32"  # both pairings, across the cases
    X = rng.standard_normal((k, n)).astype(x_dtype)
    C = rng.standard_normal((k, m))
    a = rng.uniform(0.5, 2.0, k)
    Y = host.combine64(G, C, a, X, start=start, stop=start + n, dtype=y_dtype, storage=st)
    assert Y.shape == (k, n) and Y.dtype == np.dtype(y_dtype)
    check_combination(Y, Gv[:, start : start + n], C, a, X)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("m", "n", "start", "k"), [(13, 2049, 17, 3), (1, 3001, 0, 9)])
def test_combine_with_a_shared_x_and_a_scalar_alpha(
    host, rng, storage: str, m: int, n: int, start: int, k: int
) -> None:
    G, st, Gv = stored_gradients(rng, m, start + n, storage)
    x = rng.standard_normal(n)
    C = rng.standard_normal((k, m))
    alphas = rng.uniform(0.5, 2.0, k)
    Y = host.combine64(G, C, alphas, x, start=start, stop=start + n, dtype="float64", storage=st)
    check_combination(Y, Gv[:, start:], C, alphas, np.broadcast_to(x, (k, n)))
    Y = host.combine64(G, C, -0.75, x, start=start, stop=start + n, dtype="float32", storage=st)
    check_combination(Y, Gv[:, start:], C, np.full(k, -0.75), np.broadcast_to(x, (k, n)))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("m", "count", "size", "start", "k"), BLOCK_CASES)
def test_blocks_within_the_float64_bound(
    host, rng, storage: str, m: int, count: int, size: int, start: int, k: int
) -> None:
    G, st, Gv = stored_gradients(rng, m, start + count * size + 1, storage)
    X = rng.standard_normal((count, k, size))
    P = host.project64_blocks(G, X, start=start, block_size=size, storage=st)
    assert P.shape == (count, k, m) and P.dtype == np.float64
    C = rng.standard_normal((count, k, m))
    a = rng.uniform(0.5, 2.0, k)
    Y = host.combine64_blocks(
        G, C, a, X.astype(np.float32), start=start, block_size=size, dtype="float32", storage=st
    )
    assert Y.shape == (count, k, size) and Y.dtype == np.float32
    for b in range(count):
        Gb = Gv[:, start + b * size : start + (b + 1) * size]
        check_projection(P[b], Gb, X[b])
        check_combination(Y[b], Gb, C[b], a, X[b].astype(np.float32))


def test_blocks_equal_one_call_per_block(host, rng) -> None:
    # combine64 sums each column's m terms in row order, whichever path serves its tile: a
    # group's blocks are, bit for bit, the calls on each block alone.
    m, count, size, k = 13, 5, 700, 3
    G, _, _ = stored_gradients(rng, m, count * size, "float16")
    C = rng.standard_normal((count, k, m))
    X = rng.standard_normal((count, k, size))
    Y = host.combine64_blocks(G, C, 1.5, X, start=0, block_size=size, dtype="float64")
    for b in range(count):
        cols = {"start": b * size, "stop": (b + 1) * size}
        one = host.combine64(G, C[b], 1.5, X[b], dtype="float64", **cols)
        np.testing.assert_array_equal(Y[b], one)


# -- exact widening ------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_every_16_bit_pattern_widens_exactly(host, storage: str) -> None:
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    if storage == "float16":
        values = bits.view(np.float16).astype(np.float64)
    else:
        values = bf16_bits_to_float64(bits)
    finite = np.isfinite(values)

    def same(result: np.ndarray) -> None:
        # Equal values (signed zeros compare equal: a sum starting at +0 gives +0 for -0), NaN
        # where NaN, infinities with their sign.
        np.testing.assert_array_equal(np.isnan(result), np.isnan(values))
        np.testing.assert_array_equal(result[~np.isnan(values)], values[~np.isnan(values)])

    # combine64 over a single row: Y[0, j] = 0 x + 1 G[0, j], each column one pattern.
    row = bits.reshape(1, -1)
    zero = np.zeros((1, bits.size))
    Y = host.combine64(row, np.ones((1, 1)), 0.0, zero, start=0, stop=bits.size, dtype="float64",
                       storage=storage)  # fmt: skip
    same(Y[0])
    # float16 and bfloat16 values are float32 values too: rounding to float32 changes nothing.
    Y32 = host.combine64(row, np.ones((1, 1)), 0.0, zero, start=0, stop=bits.size,
                         dtype="float32", storage=storage)  # fmt: skip
    same(Y32[0].astype(np.float64))
    # project64 with X = 1 over a single column: P[0, i] = G[i, 0], each row one pattern. The
    # finite ones only: P sums the lanes' partial sums, and NaN + ... is any NaN.
    P = host.project64(bits[finite].reshape(-1, 1), np.ones((1, 1)), start=0, stop=1,
                       storage=storage)  # fmt: skip
    np.testing.assert_array_equal(P[0], values[finite])


def test_float32_widens_exactly_across_its_exponents(host, rng) -> None:
    # Every sign, exponent (subnormals, infinities and NaNs included) and top mantissa bits,
    # with random low bits.
    high = np.arange(2**16, dtype=np.uint32) << 16
    bits = high | rng.integers(0, 2**16, size=high.size, dtype=np.uint32)
    G = bits.view(np.float32).reshape(1, -1)
    with np.errstate(invalid="ignore"):  # signalling NaNs stay NaNs, with a warning
        values = G[0].astype(np.float64)
    Y = host.combine64(G, np.ones((1, 1)), 0.0, np.zeros(G.shape[1]), start=0, stop=G.shape[1],
                       dtype="float64")  # fmt: skip
    np.testing.assert_array_equal(np.isnan(Y[0]), np.isnan(values))
    keep = ~np.isnan(values)
    np.testing.assert_array_equal(Y[0][keep], values[keep])


def test_x_in_two_bytes_is_widened_exactly(host, rng) -> None:
    G, _, Gv = stored_gradients(rng, 5, 300, "float32")
    X16 = rng.standard_normal((2, 300)).astype(np.float16)
    P = host.project64(G, X16, start=0, stop=300)
    check_projection(P, Gv, X16.astype(np.float64))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    Xb = rng.standard_normal((2, 300)).astype(ml_dtypes.bfloat16)
    Gb = rng.standard_normal((5, 300)).astype(ml_dtypes.bfloat16)  # bfloat16 G by its dtype
    P = host.project64(Gb, Xb, start=0, stop=300)
    check_projection(P, Gb.astype(np.float64), Xb.astype(np.float64))


# -- edge cases, determinism, bounds ---------------------------------------------------------------


def test_empty_dimensions(host, rng) -> None:
    G, _, _ = stored_gradients(rng, 4, 50, "float32")
    X = rng.standard_normal((3, 50))
    np.testing.assert_array_equal(host.project64(G, X[:, :0], start=7, stop=7), np.zeros((3, 4)))
    assert host.project64(G, X[:0], start=0, stop=50).shape == (0, 4)
    assert host.project64(G[:0], X, start=0, stop=50).shape == (3, 0)
    assert host.project64(G, X[0], start=0, stop=50).shape == (4,)
    C = rng.standard_normal((3, 4))
    assert host.combine64(G, C, 1.0, X[:, :0], start=9, stop=9, dtype="float64").shape == (3, 0)
    assert host.combine64(G, C[:0], 1.0, X[:0], start=0, stop=50, dtype="float64").shape == (0, 50)
    # No rows: alpha x alone, rounded once.
    a = np.array([0.1, -3.0, 7.0])
    Y = host.combine64(G[:0], C[:, :0], a, X, start=0, stop=50, dtype="float32")
    np.testing.assert_array_equal(Y, (a[:, None] * X).astype(np.float32))
    assert host.project64_blocks(G, X.reshape(3, 1, 50)[:0], start=0, block_size=50).shape == (
        0,
        1,
        4,
    )


def test_the_same_bits_at_every_run(host_library: Path, rng) -> None:
    from mfac_core._kernels._host import HostKernels

    m, count, size, k = 64, 3, 3000, 9
    G, st, _ = stored_gradients(rng, m, 40001, "bfloat16")
    X = rng.standard_normal((count, k, size))
    C = rng.standard_normal((count, k, m))
    a = rng.standard_normal(k)
    x = rng.standard_normal(40000)
    results = []
    for seed, workers in ((0, 1), (977, 2)):
        h = HostKernels(host_library, seed=seed, workers=workers)
        results.append(
            (
                h.project64_blocks(G, X, start=2, block_size=size, storage=st),
                h.combine64_blocks(
                    G, C, a, X, start=2, block_size=size, dtype="float32", storage=st
                ),
                h.project64(G[:5], x.reshape(1, -1), start=1, stop=40001, storage=st),
            )
        )
    for first, second in zip(*results, strict=True):
        assert first.tobytes() == second.tobytes()


def test_writes_out_of_bounds_are_caught(host, rng) -> None:
    # A plan for more rows (project64) or columns (combine64) than the arrays have: the kernels
    # write past the end of P or Y, into the guard zone, and the harness says so.
    from mfac_core._kernels._host import HostError, _HostExecutor

    m, n, k = 5, 100, 2
    ex = _HostExecutor(host)
    G = ex.copy(rng.standard_normal((m + 1, n + 4)), "float64")
    X = ex.copy(rng.standard_normal((1, k, n + 4)), "float64")
    arrays = {"G": G, "X": X, "P": ex.empty((1, k, m), "float64")}
    _plan.execute(_plan.project64(m + 1, k, 1, n, 0, n + 4, "float64", "float64"), ex, arrays)
    with pytest.raises(HostError, match="out of the bounds"):
        ex.guarded.check()

    ex = _HostExecutor(host)
    arrays = {
        "G": ex.copy(rng.standard_normal((m, n + 4)), "float64"),
        "C": ex.copy(rng.standard_normal((1, k, m)), "float64"),
        "a": ex.full((k,), 1.0, "float64"),
        "X": ex.copy(rng.standard_normal((1, k, n + 4)), "float64"),
        "Y": ex.empty((1, k, n), "float64"),
    }
    plan = _plan.combine64(m, k, 1, n + 3, 0, n + 4, "float64", "float64", "float64")
    _plan.execute(plan, ex, arrays)
    with pytest.raises(HostError, match="out of the bounds"):
        ex.guarded.check()


def test_arguments_are_checked(host, rng) -> None:
    G = rng.standard_normal((4, 30)).astype(np.float32)
    X = np.ones((2, 30))
    C, a = np.ones((2, 4)), np.ones(2)

    def combine(**changes):
        args = {"G": G, "C": C, "alpha": a, "X": X, "start": 0, "stop": 30, "dtype": "float64"}
        args.update(changes)
        return host.combine64(
            args.pop("G"), args.pop("C"), args.pop("alpha"), args.pop("X"), **args
        )

    with pytest.raises(ValueError, match=r"G must be a matrix \(m, d\)"):
        host.project64(G[0], X, start=0, stop=30)
    with pytest.raises(ValueError, match="C-contiguous"):
        host.project64(np.asfortranarray(G), X, start=0, stop=30)
    with pytest.raises(TypeError, match="not a storage dtype"):
        host.project64(G.astype(np.int32), X, start=0, stop=30)
    with pytest.raises(TypeError, match="not a storage dtype"):
        host.project64(G.view(np.uint16), X, start=0, stop=30)  # bits, but of what?
    with pytest.raises(TypeError, match="does not match storage='float16'"):
        host.project64(G, X, start=0, stop=30, storage="float16")
    with pytest.raises(ValueError, match="storage must be one of"):
        host.project64(G, X, start=0, stop=30, storage="float8")
    with pytest.raises(ValueError, match="need 0 <= start <= stop <= 30"):
        host.project64(G, X, start=5, stop=31)
    with pytest.raises(ValueError, match="need 0 <= start <= stop"):
        host.project64(G, X, start=6, stop=5)
    with pytest.raises(TypeError, match="start must be an integer"):
        host.project64(G, X, start=0.5, stop=30)
    with pytest.raises(ValueError, match=r"X must have shape \(k, 30\) or \(30,\)"):
        host.project64(G, X[:, 1:], start=0, stop=30)
    with pytest.raises(TypeError, match="X must be float32 or float64"):
        host.project64(G, X.astype(np.int64), start=0, stop=30)
    with pytest.raises(ValueError, match=r"C must have shape \(2, 4\)"):
        combine(C=np.ones((2, 5)))
    with pytest.raises(TypeError, match="C must be a real floating array"):
        combine(C=np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"X must have shape \(2, 30\) or \(30,\)"):
        combine(X=np.ones((3, 30)))
    with pytest.raises(ValueError, match=r"alpha must be a number or have shape \(2,\)"):
        combine(alpha=np.ones(3))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        combine(alpha=np.ones(2, dtype=np.int64))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        combine(alpha=None)
    # A number, a 0-d array and a vector of that number are the same alpha.
    assert combine(alpha=np.array(2.5)).tobytes() == combine(alpha=2.5).tobytes()
    assert combine(alpha=np.full(2, 2.5)).tobytes() == combine(alpha=2.5).tobytes()
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        combine(dtype=np.float16)
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        host.project64_blocks(G, np.ones((1, 2, 0)), start=0, block_size=0)
    with pytest.raises(ValueError, match="3 blocks of 10 columns from start=1 are not all in"):
        host.project64_blocks(G, np.ones((3, 2, 10)), start=1, block_size=10)
    with pytest.raises(ValueError, match=r"X must have shape \(count, k, 10\)"):
        host.project64_blocks(G, np.ones((3, 2, 9)), start=0, block_size=10)
    with pytest.raises(ValueError, match=r"C must have shape \(3, 2, 4\)"):
        host.combine64_blocks(G, np.ones((3, 2, 5)), 1.0, np.ones((3, 2, 10)), start=0,
                              block_size=10, dtype="float32")  # fmt: skip


# -- the plans -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("m", [1, 13, 64, 1024])
def test_launches_per_call_do_not_grow_with_the_columns(m: int, k: int) -> None:
    groups = -(-k // _plan.PASS_MAX_K)
    counts = set()
    for n in (10**6, 10**7, 10**9, 10**11):
        plan = _plan.project64(m, k, 1, n, 3, n + 3, "bfloat16", "float32")
        counts.add(len(plan.launches))
        assert len(plan.launches) == 2 * groups  # the slices' sums, then their total
        for first in plan.launches[::2]:
            lay = _plan.project_layout(m, first.args[6], 1, n)
            assert first.grid == lay.slices * lay.row_tiles
            # Enough blocks to fill a GPU, and no more as the columns grow.
            assert first.grid <= _plan.PASS_TARGET_BLOCKS + lay.row_tiles
        plan = _plan.combine64(m, k, 1, n, 3, n + 3, "float16", "float32", "float64")
        assert len(plan.launches) == groups
    assert len(counts) == 1
    for n in (1, 100, 5000):  # few columns: no slices, one launch per group
        plan = _plan.project64(m, k, 1, n, 0, n, "float32", "float64")
        assert len(plan.launches) <= 2 * groups
    assert all(
        launch.kernel == "project64_f32_x64"
        for launch in _plan.project64(m, k, 1, 100, 0, 100, "float32", "float64").launches
    )


def test_plans() -> None:
    plan = _plan.combine64(64, 9, 1, 10**6, 0, 10**6, "float32", "float64", "float32")
    assert [(launch.kernel, launch.grid) for launch in plan.launches] == [
        ("combine64_f32_x64_y32", -(-(10**6) // (4 * _plan.THREADS))),
        ("combine64_f32_x64_y32", -(-(10**6) // (8 * _plan.THREADS))),
    ]
    shared = _plan.combine64(8, 3, 1, 50, 0, 50, "float16", "float32", "float64", shared=True)
    (launch,) = shared.launches
    assert launch.args[8:10] == (50, 0)  # xb, xk: one x for the three rows
    # A group of blocks: one launch for all; the first stage's grid is blocks x slices x tiles.
    plan = _plan.project64(64, 8, 1000, 64, 0, 64000, "float64", "float64")
    assert [(launch.kernel, launch.grid) for launch in plan.launches] == [
        ("project64_f64_x64", 1000 * 2)
    ]
    lay = _plan.project_layout(1024, 8, 1, 10**6)
    assert (lay.groups, lay.lanes, lay.row_tiles) == (8, 32, 32)
    assert lay.slices * lay.width >= 10**6 > (lay.slices - 1) * lay.width
    assert _plan.project_layout(5, 1, 1, 10**6).groups == 1
    assert _plan.function_names("project64_sum") == ("project64_sum",)
    assert _plan.function_names("trsm") == ("trsm_f64", "trsm_f32")
    with pytest.raises(ValueError, match="limit"):
        _plan.combine64(1, 1, 1, 2**31 * 2048, 0, 2**31 * 2048, "float32", "float32", "float32")
    with pytest.raises(ValueError, match="32-bit"):
        _plan.project64(2**31, 1, 1, 10, 0, 10, "float32", "float32")
    with pytest.raises(ValueError, match="not all in G's"):
        _plan.project64(3, 1, 2, 10, 5, 20, "float32", "float32")
    with pytest.raises(ValueError, match="storage must be one of"):
        _plan.project64(3, 1, 1, 10, 0, 10, "int8", "float32")
    with pytest.raises(ValueError, match="the result dtype must be one of"):
        _plan.combine64(3, 1, 1, 10, 0, 10, "float32", "float32", "float16")


def test_the_package_lists_the_passes() -> None:
    for name in ("project64", "combine64", "project64_blocks", "combine64_blocks"):
        assert name in _kernels.__all__


# -- on a GPU: the CuPy launchers (skipped without CuPy and a device) ---------------------------


@pytest.fixture(scope="module")
def cupy():
    return cupy_with_a_device()


@pytest.mark.parametrize("storage", STORAGES)
def test_cupy_passes_within_the_float64_bound(cupy, rng, storage: str) -> None:
    m, n, start, k = 64, 100003, 5, 9
    G, st, Gv = stored_gradients(rng, m, start + n, storage)
    X = rng.standard_normal((k, n))
    C = rng.standard_normal((k, m))
    a = rng.uniform(0.5, 2.0, k)
    dG = cupy.asarray(G)
    P = _kernels.project64(dG, cupy.asarray(X), start=start, stop=start + n, storage=st)
    check_projection(cupy.asnumpy(P), Gv[:, start:], X)
    Y = _kernels.combine64(dG, cupy.asarray(C), cupy.asarray(a), cupy.asarray(X), start=start,
                           stop=start + n, dtype=cupy.float32, storage=st)  # fmt: skip
    check_combination(cupy.asnumpy(Y), Gv[:, start:], C, a, X)
    Xb = X[:, : 9 * 1111].reshape(k, 9, 1111).transpose(1, 0, 2).copy()
    Cb = rng.standard_normal((9, k, m))
    Pb = _kernels.project64_blocks(dG, cupy.asarray(Xb), start=start, block_size=1111, storage=st)
    Yb = _kernels.combine64_blocks(dG, cupy.asarray(Cb), 0.5, cupy.asarray(Xb), start=start,
                                   block_size=1111, dtype=cupy.float64, storage=st)  # fmt: skip
    for b in range(9):
        Gb = Gv[:, start + b * 1111 : start + (b + 1) * 1111]
        check_projection(cupy.asnumpy(Pb)[b], Gb, Xb[b])
        check_combination(cupy.asnumpy(Yb)[b], Gb, Cb[b], np.full(k, 0.5), Xb[b])
    # The same bits at every call.
    again = _kernels.project64(dG, cupy.asarray(X), start=start, stop=start + n, storage=st)
    assert cupy.asnumpy(again).tobytes() == cupy.asnumpy(P).tobytes()


# -- the pass engine through these kernels --------------------------------------------------------


@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("block_size", [None, 300, 16])
def test_the_engine_through_the_cuda_passes(host, rng, monkeypatch, storage, block_size) -> None:
    """The operators' products with the engine routed to these kernels (run on the host, as
    the CUDA route runs them for CuPy arrays): the same results as through the CPU kernels,
    to the rounding of the result, for products, block-wise products, matrices and sweeps."""
    from mfac_core import SpectralIHVP, StaticIHVP, _engine

    m, d = 12, 1000
    G = (rng.standard_normal(d) + rng.standard_normal((m, d))).astype(storage)
    damp = float(np.linalg.norm(G.astype(np.float64), 2) ** 2 / (m * 1e5))
    X = rng.standard_normal((d, 3)).astype(np.float32)
    x = np.ascontiguousarray(G.astype(np.float32).mean(axis=0))
    damps = [damp, 4.0 * damp]

    def results() -> list[np.ndarray]:
        static = StaticIHVP(G, damp=damp, block_size=block_size)
        spectral = SpectralIHVP(G, damp=damp, block_size=block_size)
        return [static @ x, static @ X, spectral @ x, spectral.sweep(x, damps=damps)]

    want = results()
    routed = []
    real = _engine._device_route

    def through_host(xp, G_, arrays):
        if isinstance(G_, np.ndarray) and G_.dtype in (np.float32, np.float16):
            views = [np.asarray(A) for A in arrays]
            routed.append(len(views))
            return _engine._Route(np, host, G_, None, views)
        return real(xp, G_, arrays)

    monkeypatch.setattr(_engine, "_device_route", through_host)
    got = results()
    assert routed  # the kernels did serve
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == np.float32
        assert_same_to_rounding(a, b)


# -- PyTorch CUDA tensors through these kernels (zero-copy DLPack, PyTorch's stream) -------------
#
# No GPU and no CuPy here. The engine's route for PyTorch CUDA tensors is run on CPU tensors
# (``_pieces.simulate_device``) with a stand-in ``cupy`` module over NumPy: ``from_dlpack`` is
# NumPy's (zero-copy for CPU tensors, as CuPy's is for CUDA ones) and records the current stream
# at each exchange; ``cuda.Device`` and ``cuda.ExternalStream`` keep the current device and
# stream the way CuPy's context managers do; the passes are this harness's, which records the
# current stream at every kernel launch. ``torch.cuda.current_stream`` is replaced by a stream
# with a recognisable pointer. What this proves: the route is taken for float32, float16 and
# bfloat16 storage, G reaches the kernels in place (the same address, bfloat16 as its uint16
# bits), every exchange and launch happens on PyTorch's stream, and the results are those of
# the kernels (float64 sums, one rounding). What it cannot prove: that CuPy's and PyTorch's
# DLPack and stream objects behave as the stand-ins do (their documented behaviour).

#: The pointer of the stand-in for PyTorch's current stream.
TORCH_STREAM = 0x5EED


class _StandInCupy:
    """The stand-in ``cupy`` module and what it saw (see above)."""

    def __init__(self) -> None:
        self.device: list[object] = ["cupy's"]
        self.stream: list[int] = [0]  # CuPy's own current stream until PyTorch's is entered
        self.exchanges: list[tuple[int, int, int]] = []  # (tensor, array address, stream)
        module = types.ModuleType("cupy")
        for name in ("float32", "float64", "uint16", "ascontiguousarray", "transpose", "reshape",
                     "full"):  # fmt: skip
            setattr(module, name, getattr(np, name))
        module.ndarray = type("ndarray", (), {})  # no array here is a cupy.ndarray
        module.from_dlpack = self._from_dlpack
        cuda = types.ModuleType("cupy.cuda")
        cuda.Device = lambda index: self._current(self.device, index)
        cuda.ExternalStream = lambda ptr: self._current(self.stream, ptr)
        module.cuda = cuda
        self.module, self.cuda = module, cuda

    @contextlib.contextmanager
    def _current(self, stack: list, value: object):
        stack.append(value)
        try:
            yield
        finally:
            stack.pop()

    def _from_dlpack(self, tensor) -> np.ndarray:
        array = np.from_dlpack(tensor)
        self.exchanges.append((tensor.data_ptr(), array.ctypes.data, self.stream[-1]))
        return array


class _RecordingPasses:
    """The harness's passes, recording what each call was given."""

    def __init__(self, host) -> None:
        self.host = host
        self.calls: list[tuple[str, int, str, str | None]] = []  # (pass, G's address, dtype, st)

    def __getattr__(self, name: str):
        function = getattr(self.host, name)

        def call(G, *args, **kwargs):
            self.calls.append((name, G.ctypes.data, G.dtype.name, kwargs.get("storage")))
            return function(G, *args, **kwargs)

        return call


@pytest.fixture
def torch_cuda(host, monkeypatch):
    """(torch, the stand-in CuPy, the recording passes, the streams of the kernel launches)."""
    torch = pytest.importorskip("torch")
    cupy = _StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy.module)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(
            cuda_stream=TORCH_STREAM)
    )  # fmt: skip
    launched: list[tuple[str, object, int]] = []
    call = host.call

    def recorded_call(name, grid, args):
        launched.append((name, cupy.device[-1], cupy.stream[-1]))
        return call(name, grid, args)

    monkeypatch.setattr(host, "call", recorded_call)
    return torch, cupy, _RecordingPasses(host), launched


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_torch_cuda_tensors_take_the_cuda_passes_in_place_on_torchs_stream(
    torch_cuda, rng, storage: str
) -> None:
    from mfac_core import SpectralIHVP, StaticIHVP, _engine, _pieces
    from mfac_core.testing import extended_precision_inverse

    torch, cupy, passes, launched = torch_cuda
    m, d = 12, 500
    values = rng.standard_normal(d) + rng.standard_normal((m, d))  # a shared direction
    G = torch.from_numpy(values).to(getattr(torch, storage))
    Gv = G.double().numpy()  # the stored values, exactly
    damp = float(np.linalg.norm(Gv, 2) ** 2 / (m * 1e3))
    x = torch.from_numpy(Gv.mean(axis=0)).float()  # near the gradients' span
    X = torch.from_numpy(rng.standard_normal((d, 3))).float()
    damps = [damp, 4.0 * damp]
    with _pieces.simulate_device(cuda_passes=passes):
        assert _engine.uses_kernels(torch, G)
        static = StaticIHVP(G, damp=damp)
        got = [static @ x, static @ X, StaticIHVP(G, damp=damp, block_size=200) @ x]
        got += list(SpectralIHVP(G, damp=damp).sweep(x, damps=damps))
    # Every pass ran in the kernels, on G itself: the tensor's memory, bfloat16 as its bits.
    names = {name for name, *_ in passes.calls}
    assert names == {"project64", "combine64", "project64_blocks", "combine64_blocks"}, names
    bits = ("uint16", "bfloat16") if storage == "bfloat16" else (storage, None)
    assert {(address, dtype, st) for _, address, dtype, st in passes.calls} == {
        (G.data_ptr(), *bits)
    }
    # Every DLPack exchange was zero-copy and on PyTorch's stream; so was every launch.
    assert cupy.exchanges and all(t == a for t, a, _ in cupy.exchanges)
    assert {stream for *_, stream in cupy.exchanges} == {TORCH_STREAM}
    assert launched and {(device, stream) for _, device, stream in launched} == {
        (G.device.index, TORCH_STREAM)
    }
    assert (cupy.device, cupy.stream) == (["cupy's"], [0])  # CuPy's own restored after each
    # The float64 inverse of the stored gradients, within 8 eps(float32) relative.
    x64, X64 = x.double().numpy(), X.double().numpy()

    def solve(lam: float, b: np.ndarray, block_size: int = d) -> np.ndarray:
        """``F^{-1} b`` in extended precision, block by block."""
        return np.concatenate([
            extended_precision_inverse(Gv[:, c : c + block_size], lam, b[c : c + block_size])
            for c in range(0, d, block_size)
        ])  # fmt: skip

    want = [solve(damp, x64), np.column_stack([solve(damp, X64[:, j]) for j in range(3)])]
    want += [solve(damp, x64, 200)] + [solve(lam, x64) for lam in damps]
    for y, ref in zip(got, want, strict=True):
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        err = np.linalg.norm(y.double().numpy() - ref)
        assert err <= 8 * np.finfo(np.float32).eps * np.linalg.norm(ref), (storage, err)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_the_torch_window_steps_through_the_cuda_passes(torch_cuda, rng, storage: str) -> None:
    """DynamicIHVP's steps and products (its Gram rows, ``project_rows``) on the CUDA route: the
    results of the route without CuPy (float64 pieces) to the rounding of the result."""
    from mfac_core import DynamicIHVP, _pieces

    torch, cupy, passes, launched = torch_cuda
    m, d = 6, 300
    dtype = getattr(torch, storage)
    G = torch.from_numpy(rng.standard_normal(d) + rng.standard_normal((m, d))).to(dtype)
    grads = torch.from_numpy(rng.standard_normal((3, d))).float()

    def run(**options) -> list:
        with _pieces.simulate_device(**options):
            op = DynamicIHVP.from_window(G, damp=0.1)
            out = [op.update_and_matvec(g) for g in grads]
            return [*out, op @ grads[0]]

    want = run()
    assert passes.calls == []
    got = run(cuda_passes=passes)
    assert {name for name, *_ in passes.calls} >= {"project64", "combine64"}
    assert {dtype for _, _, dtype, _ in passes.calls} == {
        "uint16" if storage == "bfloat16" else storage
    }
    assert {stream for *_, stream in launched} == {TORCH_STREAM}
    assert all(t == a for t, a, _ in cupy.exchanges)
    for y, z in zip(got, want, strict=True):
        assert y.dtype == z.dtype == torch.float32
        assert_same_to_rounding(y.numpy(), z.numpy())


def test_torch_tensors_the_kernels_cannot_take_keep_the_float64_pieces(torch_cuda, rng) -> None:
    from mfac_core import _engine, _pieces
    from mfac_core._compat import array_namespace

    torch, _, passes, _ = torch_cuda
    G = torch.from_numpy(rng.standard_normal((5, 40))).float()
    X = torch.from_numpy(rng.standard_normal((40, 2))).float()
    xp = array_namespace(G)
    with _pieces.simulate_device(cuda_passes=passes):
        routed = _engine.project(xp, G, X)
        assert passes.calls
        passes.calls.clear()
        # Autograd, float64 storage, a strided G, views with the negative bit (which DLPack
        # would export without their sign), and X in a 2-byte dtype: the library's own
        # products, the same sums in float64.
        Xg = X.clone().requires_grad_(True)
        unrouted = [
            _engine.project(xp, G, Xg),
            _engine.project(xp, G.double(), X),
            _engine.project(xp, G.T.contiguous().T, X),
            -_engine.project(xp, torch._neg_view(G), X),
            -_engine.project(xp, G, torch._neg_view(X)),
            _engine.project(xp, G, X.half()),
        ]
        assert not _engine.uses_kernels(xp, G.double())
    assert passes.calls == []
    for P in unrouted[:5]:
        np.testing.assert_allclose(P.detach().numpy(), routed.numpy(), rtol=1e-15, atol=0)
    assert routed.dtype == torch.float64 and unrouted[0].requires_grad


def test_without_cupy_torch_cuda_tensors_fall_back_and_say_so_once(monkeypatch, rng) -> None:
    import warnings

    from mfac_core import StaticIHVP, _engine

    torch = pytest.importorskip("torch")
    G = torch.from_numpy(rng.standard_normal((6, 50))).float()
    x = torch.from_numpy(rng.standard_normal(50)).float()
    want = StaticIHVP(G, damp=0.5) @ x
    # CPU tensors taken for CUDA ones, outside the simulation: the route asks for CuPy.
    monkeypatch.setattr(_engine, "_on_cuda", lambda A: True)
    monkeypatch.setattr(_engine, "_cuda_passes_state", {})
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7)
    )
    op = StaticIHVP(G, damp=0.5)
    with pytest.warns(UserWarning, match=r"PyTorch CUDA tensors run as float64 .*cupy-cuda12x"):
        y = op @ x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = op @ x
    assert _engine._cuda_passes_state == {"passes": None}
    assert_same_to_rounding(y.numpy(), want.numpy())
    assert torch.equal(y, z)


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_torch_cuda_route_budget(torch_cuda, check: bool) -> None:
    """A StaticIHVP product on the CUDA route (tests/test_gpu_budgets.py counts the route
    without CuPy): PyTorch operations, syncs and pass-kernel launches independent of d, no
    host-made tensor, and fewer operations than the float64 pieces need (here 7 or 2 against
    20 or 15, with and without the NaN check). Not counted: CuPy's own small launches around
    the kernels (the coefficients ``-alpha A^T``, alpha's fill, copies of (k, m) arrays)."""
    from _counting import counting

    from mfac_core import StaticIHVP, _pieces

    torch, _, passes, launched = torch_cuda

    def counts(d: int) -> list[tuple[dict, list]]:
        gen = torch.Generator().manual_seed(d)
        op = StaticIHVP(torch.randn(16, d, generator=gen) / d**0.5, damp=1e-2, check_finite=check)
        x = torch.randn(d, generator=gen)
        out = []
        for options in ({"cuda_passes": passes}, {}):
            with _pieces.simulate_device(**options):
                op @ x  # warm-up: lazily made state is set-up, not the product
                launched.clear()
                with counting() as c:
                    y = op @ x
            assert y.shape == (d,) and bool(torch.isfinite(y).all())
            out.append((c.summary(), [name for name, *_ in launched]))
        return out

    ((small, k_small), _), ((large, k_large), (pieces, _)) = counts(256), counts(2048)
    assert small["syncs"] == large["syncs"] == (1 if check else 0), (small, large)
    assert small["host_tensors"] == large["host_tensors"] == 0, (small, large)
    assert small["ops"] == large["ops"] < pieces["ops"], (small, large, pieces)
    assert k_small == k_large and 2 <= len(k_small) <= 3, (k_small, k_large)
