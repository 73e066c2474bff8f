"""The column-sharded (SPMD) StaticIHVP (``comm=``): results, traffic and collective errors.

Ranks run as threads (``run_spmd_threads``) for the many cases, and as gloo processes
(``tests/_spmd.spawn``) for a few. Every result is checked against the single-process
operator on the gathered gradients and against the float64 oracle, to a tolerance
scaled by the condition number (the reductions add in another order, so not bitwise).
"""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
from conftest import check_product_overflowing_on_rank_0, check_space
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac_core import FactorizationError, ShardedStaticIHVP, StaticIHVP
from mfac_core.distributed import Communicator, CountingComm, SingleProcessComm
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    extended_precision_inverse,
    problems,
    run_spmd_threads,
    to_numpy,
)

# -- helpers ---------------------------------------------------------------------------------


def _bounds(widths: list[int]) -> list[int]:
    return [int(b) for b in np.cumsum([0, *widths])]


def _rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(a, dtype=dtype).astype(np.float64)


def _sharded(
    G: np.ndarray,
    damp: float,
    widths: list[int],
    *,
    dtype: str = "float64",
    block_size: int | None = None,
    X: np.ndarray | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    refine: int = 0,
) -> list[dict[str, Any]]:
    """Build the sharded operator on ``len(widths)`` thread ranks and apply everything."""
    bounds = _bounds(widths)

    def fn(comm: Any) -> dict[str, Any]:
        counting = CountingComm(comm)
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        op = ShardedStaticIHVP(
            np.array(G[:, lo:hi], dtype=dtype),
            damp=damp,
            block_size=block_size,
            refine=refine,
            comm=counting,
        )
        out: dict[str, Any] = {"op": op, "setup": list(counting.calls)}
        if X is not None:
            counting.reset()
            out["y"] = op.matvec(np.array(X[lo:hi, 0], dtype=dtype))
            out["matvec"] = list(counting.calls)
            counting.reset()
            out["Y"] = op.matmat(np.array(X[lo:hi], dtype=dtype))
            out["matmat"] = list(counting.calls)
        counting.reset()
        out["diag"] = op.diagonal()
        out["diagonal"] = list(counting.calls)
        if pairs is not None:
            counting.reset()
            out["entries_values"] = op.entries(*pairs)
            out["entries"] = list(counting.calls)
        return out

    results = run_spmd_threads(fn, len(widths), timeout=30)
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def _gathered(results: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.concatenate([np.asarray(r[key], dtype=np.float64) for r in results], axis=0)


def _check_against_single(
    G: np.ndarray,
    damp: float,
    widths: list[int],
    *,
    dtype: str,
    block_size: int | None,
    X: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    refine: int = 0,
    msg: str = "",
) -> list[dict[str, Any]]:
    results = _sharded(
        G,
        damp,
        widths,
        dtype=dtype,
        block_size=block_size,
        X=X,
        pairs=(rows, cols),
        refine=refine,
    )
    single = StaticIHVP(np.array(G, dtype=dtype), damp=damp, block_size=block_size, refine=refine)
    oracle = SpectralOracle(G, damp, block_size=block_size)
    kappa = oracle.kappa
    if block_size is None or block_size >= G.shape[1]:
        # The sharded full operator is always in the Woodbury form, whose error follows the
        # capacitance matrix's condition number: kappa(F) when d > m, larger when d <= m.
        kappa = max(kappa, 1.0 + float(np.linalg.norm(G, 2)) ** 2 / (G.shape[0] * damp))
    Xd = np.array(X, dtype=dtype)
    y, Y = _gathered(results, "y"), _gathered(results, "Y")
    d = G.shape[1]
    assert y.shape == (d,) and Y.shape == X.shape
    for j in range(X.shape[1]):
        assert_close(Y[:, j], single.matmat(Xd)[:, j], kappa=kappa, dtype=dtype, err_msg=msg)
        assert_close(Y[:, j], oracle.matvec(X[:, j]), kappa=kappa, dtype=dtype, err_msg=msg)
    assert_close(y, single.matvec(Xd[:, 0]), kappa=kappa, dtype=dtype, err_msg=msg)
    assert_close(_gathered(results, "diag"), oracle.diagonal(), kappa=kappa, dtype=dtype)
    norm = np.linalg.norm(oracle.todense(), 2)
    tol = 100 * float(np.finfo(dtype).eps) * kappa * norm * np.sqrt(max(len(rows), 1))
    for r in results:
        got = np.asarray(r["entries_values"], dtype=np.float64)
        assert got.shape == rows.shape
        assert_close(got, oracle.entries(rows, cols), kappa=kappa, dtype=dtype, atol=tol)
        assert np.array_equal(r["entries_values"], results[0]["entries_values"])  # replicated
        op = r["op"]
        assert op.shape == (d, d) and op.dim == d and op.num_grads == G.shape[0]
        assert op.local_shape == (op.layout.stop - op.layout.start,) * 2
        assert op.layout.widths == tuple(widths)
        assert op.kappa_bound >= oracle.kappa * (1 - 1e4 * float(np.finfo(dtype).eps))
        assert op.kappa_bound == results[0]["op"].kappa_bound
        assert r["y"].dtype == np.dtype(dtype)
    return results


def _factors_bitwise_equal(results: list[dict[str, Any]]) -> None:
    factors = [r["op"]._shard.factor for r in results]
    if factors[0] is None:  # block-wise: nothing replicated
        return
    for f in factors[1:]:
        assert np.array_equal(f.U, factors[0].U)


def _widths(draw: Any, d: int, size: int, block_size: int | None) -> list[int]:
    """Contiguous shards of d columns over ``size`` ranks (some may be empty)."""
    if block_size is None or block_size >= d:
        cuts = sorted(draw(st.lists(st.integers(0, d), min_size=size - 1, max_size=size - 1)))
        return [b - a for a, b in zip([0, *cuts], [*cuts, d], strict=True)]
    blocks = -(-d // block_size)
    cuts = sorted(draw(st.lists(st.integers(0, blocks), min_size=size - 1, max_size=size - 1)))
    bounds = [min(c * block_size, d) for c in [0, *cuts, blocks]]
    return [b - a for a, b in itertools.pairwise(bounds)]


# -- drawn problems on 1 to 4 thread ranks ---------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_drawn_problems_match_the_single_process_operator(dtype: str, data: Any) -> None:
    p = data.draw(problems(dtype=dtype, max_m=6, max_d=30), label="problem")
    size = data.draw(st.integers(1, 4), label="ranks")
    widths = _widths(data.draw, p.d, size, p.block_size)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    X = np.stack([p.x, _rounded(rng.standard_normal(p.d), dtype)], axis=1)
    rows = rng.integers(0, p.d, size=5)
    cols = np.where(rng.random(5) < 0.5, rows, rng.integers(0, p.d, size=5))
    results = _check_against_single(
        p.G,
        p.damp,
        widths,
        dtype=dtype,
        block_size=p.block_size,
        X=X,
        rows=rows,
        cols=cols,
        msg=f"{p.description}, widths {widths}",
    )
    _factors_bitwise_equal(results)


# -- layouts, traffic and refinement ------------------------------------------------------------

# (m, d, block_size, widths): full operators with uneven and empty shards, block-wise ones
# with dense and Woodbury groups and a ragged last block.
LAYOUTS = {
    "full-uneven": (5, 23, None, [8, 0, 12, 3]),
    "full-d<m": (6, 4, None, [1, 3]),
    "full-one-rank-holds-all": (3, 9, None, [0, 9, 0]),
    "woodbury-blocks+dense-ragged": (3, 23, 7, [7, 14, 2]),
    "dense-blocks+ragged": (6, 23, 4, [8, 0, 12, 3]),
    "woodbury-blocks+woodbury-ragged": (3, 14, 5, [10, 4]),
    "block-on-a-rank-alone": (2, 12, 4, [4, 4, 4]),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_and_traffic(layout: str, dtype: str) -> None:
    m, d, bs, widths = LAYOUTS[layout]
    rng = np.random.default_rng(len(layout))
    G = _rounded(rng.standard_normal((m, d)), dtype)
    damp = 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m
    X = _rounded(rng.standard_normal((d, 3)), dtype)
    rows, cols = np.array([0, 3, d - 1, 5 % d, 2]), np.array([0, 2, d - 1, 1, 2])
    results = _check_against_single(
        G, damp, widths, dtype=dtype, block_size=bs, X=X, rows=rows, cols=cols
    )
    _factors_bitwise_equal(results)
    p, k = len(widths), len(rows)
    S = 20  # length of the status word (docs/scaling.rst)
    full = bs is None or bs >= d
    for r in results:
        # Set-up: the exchange of every rank's shape and options, the Gram (full only:
        # m^2 float64 numbers, whatever G's dtype), and the final agreement. Each call
        # carries S extra numbers, the status word of collective errors (a count of
        # failed ranks per exception class, and the digests of the operation and of the
        # arguments that must agree); the agreement is 5 numbers per rank (kappa's bounds,
        # its lower bound per kind of factor, a failure flag). Products reduce the float64
        # projection G X, matmat after the status word alone (X checked, k compared);
        # entries first the status word alone (the indices checked and compared), then
        # the float64 G columns of the pairs.
        shapes = [c.shape for c in r["setup"]]
        if full:
            assert shapes == [(8 * p + S,), (m * m + S,), (5 * p + S,)]
            assert [c.shape for c in r["matvec"]] == [(m + S,)]
            # The status word alone first: X checked and k compared, so that ranks whose
            # k differ raise instead of reducing payloads of different lengths.
            assert [c.shape for c in r["matmat"]] == [(S,), (3 * m + S,)]
            assert r["matvec"][0].nbytes == (m + S) * 8
            assert [c.shape for c in r["entries"]] == [(S,), (2 * m * k + S,)]
            assert all(c.dtype == "float64" for c in r["matvec"] + r["entries"])
        else:
            assert shapes == [(8 * p + S,), (5 * p + S,)]
            assert r["matvec"] == [] and r["matmat"] == []  # whole blocks: no exchange
            assert [c.shape for c in r["entries"]] == [(S,), (k + S,)]
        assert r["diagonal"] == []
        assert all(c.dtype == "float64" for c in r["setup"])


@pytest.mark.parametrize("layout", ["full-uneven", "dense-blocks+ragged"])
def test_refinement(layout: str) -> None:
    m, d, bs, widths = LAYOUTS[layout]
    rng = np.random.default_rng(7)
    # Correlated gradients and a small damping: refinement has work to do in float32.
    G = _rounded(rng.standard_normal((m, 1)) + 0.1 * rng.standard_normal((m, d)), "float32")
    damp = 1e-4 * float(np.linalg.norm(G, 2)) ** 2 / m
    X = np.stack([G.mean(axis=0), rng.standard_normal(d)], axis=1).astype(np.float32)
    X = X.astype(np.float64)
    results = _sharded(G, damp, widths, dtype="float32", block_size=bs, X=X, refine=1)
    oracle = SpectralOracle(G, damp, block_size=bs)
    single = StaticIHVP(np.array(G, dtype="float32"), damp=damp, block_size=bs, refine=1)
    Y = _gathered(results, "Y")
    for j in range(2):
        want = oracle.matvec(X[:, j])
        # Refined: the error is about eps * ||x|| / (damp ||y||), here far below eps * kappa.
        r_x = np.linalg.norm(X[:, j]) / (damp * np.linalg.norm(want))
        assert_close(Y[:, j], want, kappa=r_x, dtype="float32")
        assert_close(Y[:, j], single.matmat(X.astype(np.float32))[:, j], kappa=r_x, dtype="float32")
    if bs is None:
        # One product, and per refinement step the residual's G Y (float64) and a product
        # of two columns (the residual's float32 rounding and that rounding's error).
        for r in results:
            assert [(c.shape, c.dtype) for c in r["matvec"]] == [
                ((m + 20,), "float64"),  # G x summed in float64, with the status word
                ((m,), "float64"),
                ((2 * m,), "float64"),
            ]
    else:
        assert all(r["matmat"] == [] for r in results)


@pytest.mark.parametrize(("dtype", "big"), [("float64", 1e308), ("float32", 3e38)])
@pytest.mark.parametrize("warning", ["ignore", "error"])
def test_refinement_of_a_product_that_overflows_on_one_rank_only(
    dtype: str, big: float, warning: str
) -> None:
    # Rank 0's shard of F^-1 x is beyond the dtype's range, rank 1's is finite. Rank 0
    # stopped before refining (its result tested alone) while rank 1 waited in the
    # residual's reduction for it (a hang; gloo's until its timeout), and with warnings as
    # errors rank 0 raised the overflow's warning in the middle of the call. Now every rank
    # learns it from the residual's reduced G Y and keeps its product, as the
    # single-process operator keeps its finite coordinates, and the warning is said when
    # the call returns.
    G = np.random.default_rng(3).standard_normal((3, 6)) * 0.01
    x = np.array([big] * 3 + [1.0] * 3, dtype=dtype)

    def fn(comm: Communicator) -> np.ndarray:
        s = slice(3 * comm.rank, 3 * comm.rank + 3)
        op = ShardedStaticIHVP(G[:, s].astype(dtype), comm=comm, damp=0.5, refine=1)
        return op.matvec(x[s])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = StaticIHVP(G.astype(dtype), damp=0.5, refine=1).matvec(x)
    check_product_overflowing_on_rank_0(
        fn, want, dtype=dtype, warning=warning, kappa=condition_number(G, 0.5)
    )


def test_a_nan_on_one_rank_is_no_overflow_on_the_others() -> None:
    # Unchecked, rank 0's NaN spreads through the reduction to rank 1's shard. Rank 1,
    # whose x is finite, took it for an overflow of its own: it said so in the middle of
    # the refined call, which, as an error (this suite's setting), stopped it while rank 0
    # waited in the residual's reduction. A rank's result is tested against its inputs
    # only where one of its own operations overflowed.
    G = np.random.default_rng(0).standard_normal((3, 6))

    def fn(comm: Communicator) -> np.ndarray:
        s = slice(3 * comm.rank, 3 * comm.rank + 3)
        op = ShardedStaticIHVP(G[:, s], comm=comm, damp=0.5, check_finite=False, refine=1)
        return op.matvec(np.full(3, np.nan if comm.rank == 0 else 1.0))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert all(isinstance(r, np.ndarray) and np.all(np.isnan(r)) for r in results), results


@pytest.mark.filterwarnings("ignore::mfac_core.IllConditionedWarning")
def test_collinear_float32_gradients_reduce_a_float64_gram(monkeypatch: Any) -> None:
    # test_precision's case on two ranks: gradients of equal norms in a 9-dimensional
    # subspace with a small damping, where a float32 Gram fails (earlier versions reduced
    # one, checked it and reduced a float64 one after). The reduced Gram is float64 from
    # the start, the passes sum in float64, and the product keeps float32's rounding.
    import mfac_core._pieces

    # One piece per rank (and one for the whole G of the single-process operator).
    monkeypatch.setattr(mfac_core._pieces, "gram_piece_width", lambda xp, G: max(G.shape[1], 1))
    rng = np.random.default_rng(12)
    m, d, damp = 16, 4096, 1e-3
    basis = np.linalg.qr(rng.standard_normal((d, 9)))[0].T
    coef = rng.standard_normal((m, 9))
    G = _rounded((coef / np.linalg.norm(coef, axis=1, keepdims=True)) @ basis, "float32")
    X = _rounded(rng.standard_normal((d, 1)), "float32")
    results = _sharded(G, damp, [2048, 2048], dtype="float32", X=X)
    for r in results:
        assert [(c.shape, c.dtype) for c in r["setup"]][1] == ((m * m + 20,), "float64")
    want = SpectralOracle(G, damp).matvec(X[:, 0])
    y = _gathered(results, "y")
    assert np.linalg.norm(y - want) <= 8 * np.finfo(np.float32).eps * np.linalg.norm(want)
    _factors_bitwise_equal(results)


def test_one_rank_is_the_single_process_operator() -> None:
    rng = np.random.default_rng(3)
    G = rng.standard_normal((4, 10))
    x = rng.standard_normal(10)
    comm = CountingComm(SingleProcessComm())
    op = ShardedStaticIHVP(G, damp=0.3, comm=comm)
    single = StaticIHVP(G, damp=0.3)
    assert_close(op.matvec(x), single.matvec(x), kappa=10)
    assert op.matvec(x[:, None]).shape == (10, 1)
    assert op.rmatvec(x).shape == (10,) and op.rmatmat(np.eye(10)[:, :2]).shape == (10, 2)
    assert_close(op @ x, single @ x, kappa=10)
    assert op.T is op and op.H is op
    assert "StaticIHVP" in repr(op)


def test_what_a_sharded_operator_refuses() -> None:
    op = ShardedStaticIHVP(np.ones((2, 5)) + np.eye(2, 5), damp=0.5, comm=SingleProcessComm())
    for make in (
        lambda: 2.0 * op,
        lambda: op * 2.0,
        lambda: op / 2.0,
        lambda: -op,
        lambda: op + op,
        lambda: op - op,
        lambda: op @ op,
        lambda: op.todense(),
        lambda: op.to_scipy(),
    ):
        with pytest.raises(TypeError, match="column-sharded"):
            make()


@pytest.mark.parametrize("joint", [False, True])
def test_pruning_refuses_a_sharded_operator_on_every_rank(joint: bool) -> None:
    # A rank holding every column passed the shape check and waited in the update's
    # product for the rank whose empty shard was refused: a hang under gloo.
    from mfac_core.pruning import obs_saliency, obs_update

    rng = np.random.default_rng(12)
    G, theta = rng.standard_normal((3, 8)), rng.standard_normal(8)
    selected = np.arange(8) % 3 == 0

    def fn(comm: Any) -> list[str]:
        lo, hi = [(0, 8), (8, 8)][comm.rank]
        op = ShardedStaticIHVP(G[:, lo:hi], damp=0.1, comm=comm)
        errors = []
        for call in (
            lambda: obs_update(theta[lo:hi], op, selected[lo:hi], joint=joint),
            lambda: obs_saliency(theta[lo:hi], op),
        ):
            with pytest.raises(TypeError, match="column-sharded") as info:
                call()
            errors.append(str(info.value))
        return errors

    for r in run_spmd_threads(fn, 2, timeout=20):
        assert isinstance(r, list), r


def test_copies_share_the_communicator_and_pickles_restore() -> None:
    rng = np.random.default_rng(4)
    G = rng.standard_normal((3, 8))
    comm = CountingComm(SingleProcessComm())
    op = ShardedStaticIHVP(G, damp=0.2, block_size=3, comm=comm)
    x = rng.standard_normal(8)
    for twin in (copy.copy(op), copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        np.testing.assert_array_equal(twin.matvec(x), op.matvec(x))
        np.testing.assert_array_equal(twin.entries(np.arange(8), np.arange(8)), op.diagonal())
    assert copy.deepcopy(op).comm is comm


# -- collective errors -------------------------------------------------------------------------


def _all_raise(results: list[Any], kind: type[Exception], own: int | None = None) -> None:
    for rank, r in enumerate(results):
        assert isinstance(r, kind), (rank, r)
    if own is not None:
        assert "failed on" not in str(results[own]), results[own]


def _build_on_threads(
    make: Any, widths: list[int], *, block_size: int | None = None, **options: Any
) -> list[Any]:
    """``make(rank, G_local)`` gives each rank's G_local (or other argument) for StaticIHVP."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, sum(widths)))
    bounds = _bounds(widths)

    def fn(comm: Any) -> Any:
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        G_local, damp = make(comm.rank, G[:, lo:hi].copy())
        return ShardedStaticIHVP(G_local, damp=damp, block_size=block_size, comm=comm, **options)

    return run_spmd_threads(fn, len(widths), timeout=20)


@pytest.mark.parametrize("block_size", [None, 3])
def test_nan_in_one_shard(block_size: int | None) -> None:
    def make(rank: int, G: np.ndarray) -> tuple[np.ndarray, float]:
        if rank == 1:
            G[2, 1] = np.nan
        return G, 0.1

    results = _build_on_threads(make, [3, 6, 3], block_size=block_size)
    _all_raise(results, ValueError, own=1)
    # The shard's index and the global column, blocked too (it named G[2, 1], the shard's).
    named = "G_local[2, 1] (global column 4) is nan"
    assert str(results[1]) == f"G_local must not contain NaN or infinity: {named}"
    # Unchecked, every rank raises the FactorizationError; blocked, the rank that holds
    # the NaN names it alike (the full Gram is reduced first: no rank knows whose it is).
    unchecked = _build_on_threads(make, [3, 6, 3], block_size=block_size, check_finite=False)
    _all_raise(unchecked, FactorizationError, own=1)
    if block_size is not None:
        assert str(unchecked[1]).endswith(f"the gradients hold NaN or infinity: {named}")


@pytest.mark.parametrize("block_size", [None, 3])
def test_an_error_of_the_progress_callable_is_its_own(block_size: int | None) -> None:
    # Regression: blocked, the set-up read any ValueError as its finiteness check's
    # and raised "the squared norms of G_local's rows overflow float64" instead.
    def stop(done: int, total: int) -> None:
        raise ValueError("stopped by the caller")

    results = _build_on_threads(
        lambda rank, G: (G, 0.1), [3, 6, 3], block_size=block_size, progress=stop
    )
    _all_raise(results, ValueError)
    assert all(str(r) == "stopped by the caller" for r in results)


def test_a_nan_in_one_ranks_x_is_named_there() -> None:
    # As every operator names it (docs/mathematics.rst): the entry of the rank's own x, and
    # its global coordinate. Regression: "x must not contain NaN or infinity", no more.
    def fn(comm: Any) -> Any:
        G = np.random.default_rng(comm.rank).standard_normal((3, 4))
        op = ShardedStaticIHVP(G, damp=0.1, comm=comm)
        x = np.ones(4)
        x[2] = np.nan if comm.rank == 1 else 1.0
        return op.matvec(x)

    results = run_spmd_threads(fn, 2, timeout=20)
    _all_raise(results, ValueError, own=1)
    assert (
        str(results[1]) == "x must not contain NaN or infinity: x[2] (global coordinate 6) is nan"
    )


# The threads' sum overflows in NumPy, which warns; a real engine sums silently.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_gram_overflow_seen_from_the_reduced_values() -> None:
    # Each rank's squared norms are finite; their sum is not.
    def make(rank: int, G: np.ndarray) -> tuple[np.ndarray, float]:
        return np.full_like(G, 1e154), 0.1

    results = _build_on_threads(make, [1, 1])
    _all_raise(results, ValueError)
    assert all("overflow" in str(r) for r in results)


@pytest.mark.parametrize("block_size", [None, 3])
def test_failed_factorisation_is_a_factorization_error_everywhere(block_size: int | None) -> None:
    # Identical gradients with a tiny damping; block-wise, only rank 0's block is singular.
    def make(rank: int, G: np.ndarray) -> tuple[np.ndarray, float]:
        if rank == 0 or block_size is None:
            G[:] = 1e8 * G[0]
        return G, 1e-300

    results = _build_on_threads(make, [3, 3], block_size=block_size)
    _all_raise(results, FactorizationError)


@pytest.mark.parametrize(
    ("make", "kind", "match"),
    [
        (lambda r, G: (G[: 4 - r], 0.1), ValueError, "number of gradients m"),
        (lambda r, G: (G.astype(np.float32) if r else G, 0.1), TypeError, "dtype"),
        (lambda r, G: (G, 0.1 * (1 + r)), ValueError, "damp"),
        (lambda r, G: (G, -1.0 if r == 2 else 0.1), ValueError, None),
        (lambda r, G: (G.ravel() if r == 1 else G, 0.1), ValueError, None),
        (lambda r, G: (G.astype(np.int64) if r == 1 else G, 0.1), TypeError, None),
        (lambda r, G: (G.astype(np.float16), 0.1), TypeError, None),
        (lambda r, G: (np.zeros((4, 0)), 0.1), ValueError, "0 columns"),
    ],
)
def test_bad_shards_and_options_raise_on_every_rank(
    make: Any, kind: type[Exception], match: str | None
) -> None:
    results = _build_on_threads(make, [2, 3, 2])
    _all_raise(results, kind)
    if match is not None:
        assert all(match in str(r) for r in results), results


def test_numpy_bfloat16_shards_are_refused_as_2_byte_ones() -> None:
    # ml_dtypes' bfloat16 is 2-byte storage, single-process only as float16 is: the
    # refusal says so (and to cast), not that bfloat16 is no floating dtype.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    results = _build_on_threads(lambda r, G: (G.astype(ml_dtypes.bfloat16), 0.1), [2, 3, 2])
    _all_raise(results, TypeError)
    assert all("bfloat16 gradients are not supported with comm=" in str(r) for r in results)


def test_options_must_agree() -> None:
    def fn(comm: Any) -> Any:
        return ShardedStaticIHVP(np.eye(2, 4), damp=0.1, refine=comm.rank, comm=comm)

    _all_raise(run_spmd_threads(fn, 2, timeout=20), ValueError)


def test_dampings_that_differ_past_the_sixth_digit_print_apart() -> None:
    # Regression: the message formatted them with :g, so both read 0.1.
    results = _build_on_threads(lambda r, G: (G, 0.1 + r * 1e-9), [3, 3])
    _all_raise(results, ValueError)
    assert all("got (0.1, 0.100000001)" in str(r) for r in results), results


def test_shards_that_cut_a_block_name_widths_that_work() -> None:
    results = _build_on_threads(lambda r, G: (G, 0.1), [5, 6, 3], block_size=4)
    _all_raise(results, ValueError)
    message = str(results[0])
    assert "(8, 4, 2)" in message, message
    ok = _build_on_threads(lambda r, G: (G, 0.1), [8, 4, 2], block_size=4)
    assert all(isinstance(op, ShardedStaticIHVP) for op in ok)


def test_bad_operands_raise_on_every_rank_and_change_nothing() -> None:
    rng = np.random.default_rng(5)
    G = rng.standard_normal((3, 10))
    widths = [4, 6]
    bounds = _bounds(widths)
    x = rng.standard_normal(10)

    def fn(comm: Any) -> dict[str, Any]:
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        op = ShardedStaticIHVP(G[:, lo:hi].copy(), damp=0.1, comm=comm)
        good = op.matvec(x[lo:hi])
        errors = {}
        bad_inputs = {
            "length": np.concatenate([x[lo:hi], np.zeros(comm.rank)]),
            "dtype": x[lo:hi].astype(np.float32) if comm.rank else x[lo:hi].astype(np.int64),
            "nan": np.where(np.arange(hi - lo) == 0, np.nan, x[lo:hi]) if comm.rank else x[lo:hi],
            "library": list(x[lo:hi]) if comm.rank == 0 else x[lo:hi],
        }
        for name, bad in bad_inputs.items():
            try:
                op.matvec(bad)
            except Exception as exc:  # collected for the test
                errors[name] = exc
        for name, (rows, cols) in {
            "index": (np.array([0, 10 + comm.rank]), np.array([0, 1])),
            "differ": (np.array([comm.rank, 1]), np.array([0, 1])),
            "shape": (np.array([0, 1]), np.array([0, 1, 2][: 2 + comm.rank])),
        }.items():
            try:
                op.entries(rows, cols)
            except Exception as exc:  # collected for the test
                errors[name] = exc
        # Nothing changed: the same product, bit for bit.
        errors["after"] = np.array_equal(op.matvec(x[lo:hi]), good)
        return errors

    results = run_spmd_threads(fn, 2, timeout=20)
    for r in results:
        assert not isinstance(r, Exception), r
        assert r["after"] is True
        assert isinstance(r["length"], ValueError)
        assert isinstance(r["dtype"], TypeError)
        assert isinstance(r["nan"], ValueError)
        assert isinstance(r["library"], TypeError)
        assert isinstance(r["index"], IndexError)
        assert isinstance(r["differ"], ValueError)
        assert isinstance(r["shape"], ValueError)
    assert "every rank must pass the same" in str(results[0]["differ"])


@pytest.mark.parametrize("other", ["k", "1-D"])
def test_matmat_with_another_k_on_one_rank_raises_on_every_rank(other: str) -> None:
    # The payload's length is m k: ranks whose k differed reduced arrays of different
    # lengths, which gloo cannot report (it aborted the process; the others waited).
    G = np.random.default_rng(4).standard_normal((3, 8))
    X = np.random.default_rng(5).standard_normal((8, 2))

    def fn(comm: Any) -> Any:
        lo, hi = 4 * comm.rank, 4 * comm.rank + 4
        op = ShardedStaticIHVP(G[:, lo:hi], damp=0.1, comm=comm)
        bad = np.ones((4, 3)) if other == "k" else np.ones(4)
        try:
            op.matmat(bad if comm.rank == 1 else X[lo:hi])
        except ValueError as exc:
            return str(exc), op.matmat(X[lo:hi])
        return None

    results = run_spmd_threads(fn, 2, timeout=20)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    want = "same number of columns" if other == "k" else "shape (4, k)"
    assert want in results[1][0]
    for message, _ in results:
        assert isinstance(message, str)
    # Nothing changed: the next matmat is the single-process operator's.
    Y = np.concatenate([r[1] for r in results])
    assert_close(Y, StaticIHVP(G, damp=0.1).matmat(X), kappa=SpectralOracle(G, 0.1).kappa)


def test_block_wise_products_fail_only_where_the_shard_is_bad() -> None:
    # No exchange: the bad rank raises, the other returns (no rank waits for the other).
    def fn(comm: Any) -> Any:
        op = ShardedStaticIHVP(
            np.eye(2, 6)[:, 3 * comm.rank : 3 * comm.rank + 3] + 1,
            damp=0.1,
            block_size=3,
            comm=comm,
        )
        return op.matvec(np.ones(3 + comm.rank))

    results = run_spmd_threads(fn, 2, timeout=20)
    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], ValueError)


# -- processes (gloo) --------------------------------------------------------------------------


def _gloo_checks(comm: Any, m: int, d: int, block_sizes: list[int | None]) -> dict[str, Any]:
    """Everything one rank checks in one spawn: results, traffic, pickling, an error."""
    rng = np.random.default_rng(11)
    G = rng.standard_normal((m, d))
    damp = 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m
    X = rng.standard_normal((d, 2))
    rows, cols = np.array([0, 5, d - 1, 9]), np.array([0, 6, d - 1, 3])
    out: dict[str, Any] = {}
    for bs in block_sizes:
        # Shards of whole blocks (4 coordinates): 8 per rank, the last rank the rest.
        lo = min(8 * comm.rank, d)
        hi = d if comm.rank == comm.size - 1 else min(8 * comm.rank + 8, d)
        counting = CountingComm(comm)
        op = ShardedStaticIHVP(G[:, lo:hi].copy(), damp=damp, block_size=bs, comm=counting)
        counting.reset()
        y = op.matvec(X[lo:hi, 0])
        calls = [c.shape for c in counting.calls]
        Y = op.matmat(X[lo:hi])
        twin = pickle.loads(pickle.dumps(op))
        deep = copy.deepcopy(op)
        out[str(bs)] = {
            "y": y,
            "Y": Y,
            "diag": op.diagonal(),
            "entries": op.entries(rows, cols),
            "calls": calls,
            "U": None if op._shard.factor is None else op._shard.factor.U,
            "twin": twin.matvec(X[lo:hi, 0]),
            "deep": deep.matvec(X[lo:hi, 0]),
            "deep_comm": deep.comm is counting,
        }
    G_bad = G[:, :3].copy()
    if comm.rank == 1:
        G_bad[0, 0] = np.inf
    try:
        ShardedStaticIHVP(G_bad, damp=damp, comm=comm)
    except ValueError as exc:
        out["error"] = type(exc).__name__
    # matmat with another k on the last rank: gloo aborted the process on the payloads of
    # different lengths (and the others waited) before k was compared first.
    op = ShardedStaticIHVP(G[:, :3].copy(), damp=damp, comm=comm)
    try:
        op.matmat(np.ones((3, 2 + (comm.rank == comm.size - 1))))
    except ValueError as exc:
        out["columns"] = str(exc)
    return out


@pytest.mark.parametrize("nprocs", [2, 4])
def test_over_gloo(nprocs: int) -> None:
    pytest.importorskip("torch")
    from _spmd import spawn

    m, d = 5, 8 * nprocs - 3
    block_sizes: list[int | None] = [None, 4]
    results = spawn(_gloo_checks, nprocs, m, d, block_sizes, timeout=60, pooled=True)
    for r in results:
        assert isinstance(r, dict), r
        assert r["error"] == "ValueError"
        assert "same number of columns" in r["columns"]
    rng = np.random.default_rng(11)
    G = rng.standard_normal((m, d))
    damp = 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m
    X = rng.standard_normal((d, 2))
    rows, cols = np.array([0, 5, d - 1, 9]), np.array([0, 6, d - 1, 3])
    for bs in block_sizes:
        parts = [r[str(bs)] for r in results]
        oracle = SpectralOracle(G, damp, block_size=bs)
        single = StaticIHVP(G, damp=damp, block_size=bs)
        y = np.concatenate([p["y"] for p in parts])
        assert_close(y, single.matvec(X[:, 0]), kappa=oracle.kappa)
        assert_close(y, oracle.matvec(X[:, 0]), kappa=oracle.kappa)
        assert_close(np.concatenate([p["Y"] for p in parts]), single.matmat(X), kappa=oracle.kappa)
        assert_close(np.concatenate([p["diag"] for p in parts]), oracle.diagonal(), kappa=10)
        for p in parts:
            assert_close(p["entries"], single.entries(rows, cols), kappa=oracle.kappa, atol=1e-12)
            np.testing.assert_array_equal(p["entries"], parts[0]["entries"])
            np.testing.assert_array_equal(p["twin"], p["y"])
            np.testing.assert_array_equal(p["deep"], p["y"])
            assert p["deep_comm"]
            assert p["calls"] == ([(m + 20,)] if bs is None else [])
            if bs is None:
                np.testing.assert_array_equal(p["U"], parts[0]["U"])  # bit for bit


@pytest.mark.parametrize("backend_name", ["torch", "strict-device1"])
@pytest.mark.parametrize("block_size", [None, 3])
def test_other_backends(make_backend: Any, backend_name: str, block_size: int | None) -> None:
    # array-api-strict's second device catches any hidden transfer to the default device.
    be = make_backend(backend_name)
    rng = np.random.default_rng(9)
    G, x = rng.standard_normal((4, 12)), rng.standard_normal(12)
    idx = np.array([0, 7, 11, 4])
    bounds = [0, 6, 12]

    def fn(comm: Any) -> tuple[Any, ...]:
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        op = ShardedStaticIHVP(
            be.asarray(G[:, lo:hi], "float64"), damp=0.1, block_size=block_size, refine=1, comm=comm
        )
        y = op.matvec(be.asarray(x[lo:hi], "float64"))
        Y = op.matmat(be.asarray(np.stack([x[lo:hi]] * 2, axis=1), "float64"))
        e = op.entries(be.asarray(idx, "int64"), be.asarray(idx[::-1].copy(), "int64"))
        for a in (y, Y, op.diagonal(), e):
            check_space(a, be, "float64")
        return tuple(to_numpy(a) for a in (y, Y, op.diagonal(), e))

    results = run_spmd_threads(fn, 2, timeout=30)
    for r in results:
        assert not isinstance(r, Exception), r
    single = StaticIHVP(G, damp=0.1, block_size=block_size)
    kappa = SpectralOracle(G, 0.1, block_size=block_size).kappa * 10
    assert_close(np.concatenate([r[0] for r in results]), single.matvec(x), kappa=kappa)
    assert_close(np.concatenate([r[1][:, 1] for r in results]), single.matvec(x), kappa=kappa)
    assert_close(np.concatenate([r[2] for r in results]), single.diagonal(), kappa=kappa)
    assert_close(results[0][3], single.entries(idx, idx[::-1].copy()), kappa=kappa, atol=1e-13)


def test_entries_of_zero_dimensional_and_empty_indices() -> None:
    G = np.random.default_rng(10).standard_normal((3, 8))
    single = StaticIHVP(G, damp=0.1)

    def fn(comm: Any) -> tuple[Any, ...]:
        op = ShardedStaticIHVP(G[:, 4 * comm.rank : 4 * comm.rank + 4], damp=0.1, comm=comm)
        empty = np.zeros((2, 0), dtype=np.int64)
        return op.entries(np.array(5), np.array(2)), op.entries(empty, empty)

    for r in run_spmd_threads(fn, 2, timeout=20):
        assert not isinstance(r, Exception), r
        assert r[0].shape == () and r[1].shape == (2, 0)
        assert_close(r[0], single.entries(np.array(5), np.array(2)), kappa=10, atol=1e-14)


def test_different_operations_with_one_reduction_length_raise_on_every_rank() -> None:
    # m = 16 on 2 ranks: matvec reduces m = 16 numbers, the first reduction of a new
    # operator's set-up 8 * size = 16: the same length, so only the tag in the status
    # word tells them apart.
    G = np.random.default_rng(3).standard_normal((16, 6))

    def rank(comm: Communicator) -> Any:
        shard = G[:, 3 * comm.rank : 3 * comm.rank + 3]
        op = ShardedStaticIHVP(shard, damp=0.1, comm=comm)
        try:
            if comm.rank == 0:
                op.matvec(np.ones(3))
            else:
                ShardedStaticIHVP(shard, damp=0.2, comm=comm)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    results = run_spmd_threads(rank, 2, timeout=20)
    for r in results:
        assert isinstance(r, str) and "different collective operations" in r, r


def test_two_operators_applied_in_different_orders_raise_on_every_rank() -> None:
    # Two operators of one shape (a set iterated in per-process hash order): their
    # products reduce the same length with the same operation, so only the operators'
    # identity in the tag keeps rank 0's sums of one from adding to rank 1's of the other.
    rng = np.random.default_rng(13)
    Gs = [rng.standard_normal((3, 8)) for _ in range(2)]
    x = rng.standard_normal(8)

    def rank(comm: Communicator) -> Any:
        lo, hi = 4 * comm.rank, 4 * comm.rank + 4
        a, b = (ShardedStaticIHVP(G[:, lo:hi], damp=0.1, comm=comm) for G in Gs)
        first = a if comm.rank == 0 else b
        with pytest.raises(RuntimeError, match="different collective operations") as info:
            first.matvec(x[lo:hi])
        # Nothing changed: in the same order, both give their products.
        return str(info.value), a.matvec(x[lo:hi]), b.matvec(x[lo:hi])

    results = run_spmd_threads(rank, 2, timeout=20)
    for r in results:
        assert isinstance(r, tuple), r
    for j, G in enumerate(Gs):
        y = np.concatenate([r[1 + j] for r in results])
        assert_close(y, StaticIHVP(G, damp=0.1).matvec(x), kappa=100)


def test_dask_shards_are_refused_on_every_rank() -> None:
    # A Dask G_local reached the float64 factorisation as a lazy array and failed
    # there as a FactorizationError of a well-conditioned Gram; it cannot cross a
    # communicator either (no DLPack). Refused in the set-up's first reduction, in NumPy.
    da = pytest.importorskip("dask.array")
    G = np.random.default_rng(15).standard_normal((3, 8))

    def rank(comm: Communicator) -> Any:
        shard = G[:, 4 * comm.rank : 4 * comm.rank + 4]
        with pytest.raises(TypeError) as info:
            ShardedStaticIHVP(
                da.from_array(shard) if comm.rank == 0 else shard, damp=1.0, comm=comm
            )
        return str(info.value)

    results = run_spmd_threads(rank, 2, timeout=20)
    assert "takes no Dask arrays" in results[0], results[0]
    assert "failed on 1 other rank" in results[1], results[1]


@pytest.mark.parametrize("kappa", [1e3, 1e5, 1e7])
@pytest.mark.parametrize("block_size", [None, 300])
def test_float32_shards_are_exact_for_vectors_in_the_span(kappa: float, block_size: Any) -> None:
    # Gradients with a shared mean and x = their mean, a stored gradient: each rank's
    # passes sum in float64 and the reduced projection is float64, so the sharded product,
    # the diagonal and the entries keep float32's rounding (docs/mathematics.rst, "Exact
    # passes"), where a float32 W lost eps32 * kappa.
    rng = np.random.default_rng(int(kappa) % 101)
    m, d, widths = 12, 900, [300, 600]
    G = rng.standard_normal(d) + rng.standard_normal((m, d))
    G = _rounded(G / (np.linalg.norm(G, 2) / np.sqrt(m)), "float32")
    damp = float(np.linalg.norm(G, 2) ** 2 / (m * (kappa - 1.0)))
    X = np.stack([_rounded(G.mean(axis=0), "float32"), G[m // 2]], axis=1)
    pairs = (np.array([0, 5, 299, 300, 899]), np.array([0, 7, 300, 300, 2]))
    results = _sharded(G, damp, widths, dtype="float32", block_size=block_size, X=X, pairs=pairs)
    eps32 = float(np.finfo(np.float32).eps)
    Y = _gathered(results, "Y")
    for j in range(X.shape[1]):
        if block_size is None:
            want = extended_precision_inverse(G, damp, X[:, j])
        else:
            want = np.concatenate(
                [
                    extended_precision_inverse(G[:, lo : lo + 300], damp, X[lo : lo + 300, j])
                    for lo in range(0, d, 300)
                ]
            )
        assert np.linalg.norm(Y[:, j] - want) <= 8 * eps32 * np.linalg.norm(want), j
    cols = [0, 299, 300, 899]
    E = {}
    for c in set(cols) | set(pairs[0].tolist()) | set(pairs[1].tolist()):
        e = np.zeros(d)
        e[c] = 1.0
        if block_size is None:
            E[c] = extended_precision_inverse(G, damp, e)
        else:
            lo = c - c % 300
            E[c] = np.zeros(d)
            E[c][lo : lo + 300] = extended_precision_inverse(
                G[:, lo : lo + 300], damp, e[lo : lo + 300]
            )
    diag = _gathered(results, "diag")
    for c in cols:
        assert abs(diag[c] - E[c][c]) <= 8 * eps32 * E[c][c]
    for r in results:
        got = np.asarray(r["entries_values"], np.float64)
        for i, (a, b) in enumerate(zip(*pairs, strict=True)):
            scale = np.sqrt(E[a][a] * E[b][b])
            assert abs(got[i] - E[b][a]) <= 8 * eps32 * scale, (a, b)


def test_overwrite_g_is_a_deprecated_no_op() -> None:
    # No W is written: G_local stays as given, and the keyword warns at the caller's line.
    rng = np.random.default_rng(5)
    G = rng.standard_normal((4, 10))
    before = G.copy()
    with pytest.warns(DeprecationWarning, match="no W") as record:
        op = ShardedStaticIHVP(G, damp=0.3, comm=SingleProcessComm(), overwrite_G=True)
    assert record[0].filename == __file__
    np.testing.assert_array_equal(G, before)
    assert_close(op.matvec(G[0]), StaticIHVP(before, damp=0.3).matvec(G[0]), kappa=10)


@pytest.mark.parametrize("case", ["swapped", "offset", "length", "dtype"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_entries_with_different_indices_raise_on_every_rank(case: str, block_size: Any) -> None:
    # Regression: the indices were compared through a weak checksum (position weights
    # i % 997 + 1, modulo 2**23 - 15), so two indices 997 positions apart could be
    # swapped on one rank, and a different dtype or number of pairs was not compared at
    # all: ranks returned different wrong values, or failed in the communicator.
    G = np.random.default_rng(4).standard_normal((2, 8))
    rows, cols = np.arange(1000) % 8, (3 * np.arange(1000)) % 8
    assert rows[0] != rows[997]

    def rank(comm: Communicator) -> Any:
        op = ShardedStaticIHVP(
            G[:, 4 * comm.rank : 4 * comm.rank + 4], damp=0.1, block_size=block_size, comm=comm
        )
        r, c = rows.copy(), cols.copy()
        if comm.rank == 1:
            if case == "swapped":
                r[[0, 997]] = r[[997, 0]]
            elif case == "offset":
                r[5] = (r[5] + 1) % 8
            elif case == "length":
                r, c = np.append(r, 0), np.append(c, 0)
            else:
                r = r.astype(np.int32)
        good = op.matvec(np.ones(4))
        try:
            op.entries(r, c)
        except ValueError as exc:
            return str(exc), np.array_equal(op.matvec(np.ones(4)), good)
        return "no error"

    for r in run_spmd_threads(rank, 2, timeout=20):
        assert not isinstance(r, Exception), r
        assert r != "no error"
        assert "every rank must pass the same rows and cols" in r[0] and r[1]


@pytest.mark.parametrize("bad", [None, [[1.0, 2.0]], "G"])
def test_a_shard_that_is_no_array_raises_on_every_rank(bad: Any) -> None:
    # It raised on its rank alone, before the set-up's first reduction, in which the
    # other ranks then waited (until the engine's timeout; threads: a broken barrier).
    results = _build_on_threads(lambda r, G: (bad if r == 1 else G, 0.1), [2, 3, 2])
    _all_raise(results, TypeError)
    assert "G_local must be an array" in str(results[1])


@pytest.mark.parametrize(
    "how", ["requires_grad", "tangent", "torch.func.grad", "G tangent", "G under torch.func.grad"]
)
def test_derivatives_through_the_sums_over_ranks_are_refused_on_every_rank(how: str) -> None:
    # A Communicator sums values only (TorchComm detaches): a gradient in x over two gloo
    # ranks was 5-8 % off, a tangent of G 70-110 % (and a crash under torch.func.jvp),
    # with no error. Now refused, on every rank where one rank's argument carries them.
    torch = pytest.importorskip("torch")
    fwAD = torch.autograd.forward_ad
    rng = np.random.default_rng(3)
    G, x = rng.standard_normal((3, 10)), rng.standard_normal(10)
    bounds = [0, 4, 10]

    def fn(comm: Any) -> Any:
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        G_local, x_local = torch.asarray(G[:, lo:hi]), torch.asarray(x[lo:hi])
        bad = comm.rank == 1
        if how == "G under torch.func.grad":  # refused on that rank before, alone
            with pytest.raises(TypeError) as info:
                if bad:
                    torch.func.grad(
                        lambda G: ShardedStaticIHVP(G, damp=0.1, comm=comm).matvec(x_local).sum()
                    )(G_local)
                else:
                    ShardedStaticIHVP(G_local, damp=0.1, comm=comm)
            return str(info.value), True
        if how == "G tangent":
            with pytest.raises(TypeError) as info:
                if bad:  # one dual level at a time in a process: this rank's
                    with fwAD.dual_level():
                        G_dual = fwAD.make_dual(G_local, torch.ones_like(G_local))
                        ShardedStaticIHVP(G_dual, damp=0.1, comm=comm)
                else:
                    ShardedStaticIHVP(G_local, damp=0.1, comm=comm)
            return str(info.value), True
        op = ShardedStaticIHVP(G_local, damp=0.1, comm=comm)
        before = op.matvec(x_local)
        with torch.no_grad():  # autograd not recording: nothing to refuse
            assert torch.equal(op.matvec(x_local.clone().requires_grad_()), before)
        with pytest.raises(TypeError) as info:
            if not bad:
                op.matvec(x_local)
            elif how == "requires_grad":
                op.matvec(x_local.clone().requires_grad_())
            elif how == "tangent":
                with fwAD.dual_level():
                    op.matvec(fwAD.make_dual(x_local, x_local))
            else:
                torch.func.grad(lambda v: op.matvec(v).sum())(x_local)
        return str(info.value), torch.equal(op.matvec(x_local), before)

    results = run_spmd_threads(fn, 2, timeout=30)
    for r in results:
        assert not isinstance(r, BaseException), r
        assert r[1], "a refused product changed the operator"
    name = "G" if how.startswith("G ") else "x"
    said = "requires grad under a torch.func" if how == "G under torch.func.grad" else "carries"
    assert results[1][0].startswith(f"{name} {said}"), results[1][0]
    assert f"{name}.detach()" in results[1][0]
    assert said != "carries" or "comm.allreduce_sum" in results[1][0]
    assert "failed on 1 other rank" in results[0][0], results[0][0]
