"""Tests of StaticIHVP over Dask arrays (mfac_core._dask) on a dask.distributed cluster.

Every test runs on one local cluster of two worker processes (started once for the
module), against the NumPy operator and the float64 oracles of mfac_core.testing.
"""

from __future__ import annotations

import gc
import time
import warnings

import numpy as np
import pytest
from conftest import rounded
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac_core import (
    DaskStaticIHVP,
    FactorizationError,
    IllConditionedWarning,
    SpectralIHVP,
    StaticIHVP,
)
from mfac_core.pruning import (
    damping_sweep,
    gradual_prune,
    obs_saliency,
    obs_update,
    prune,
    select_damping,
)
from mfac_core.testing import SpectralOracle, assert_close, extended_precision_inverse, problems

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module", autouse=True)
def client():
    """A local cluster of 2 worker processes, the default scheduler of every test here."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


# (m, d, block_size, chunk width): every path of the Dask operator.
LAYOUTS = {
    "full-woodbury": (5, 23, None, 7),  # one Woodbury block over 4 chunks (ragged last)
    "full-one-chunk": (5, 23, None, 23),
    "full-d<m": (6, 4, None, 4),  # one dense block, one chunk
    "block>d": (3, 10, 15, 4),  # the full operator again
    "woodbury-blocks+dense-ragged": (3, 23, 7, 14),
    "dense-blocks+ragged": (6, 23, 4, 8),
    "woodbury-blocks+woodbury-ragged": (3, 14, 5, 5),
    "block=1": (1, 5, 1, 2),
}


def _data(rng, m, d, dtype):
    """Gaussian gradients and a damping giving kappa ~ 1e2."""
    G = rounded(rng.standard_normal((m, d)), dtype)
    return G, 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m


def _check_dask(y, dtype, chunks=None):
    assert isinstance(y, da.Array)
    assert y.dtype == np.dtype(dtype)
    if chunks is not None:
        assert y.chunks[0] == chunks


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_against_numpy_and_oracle(layout, dtype, rng):
    m, d, bs, width = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    op = DaskStaticIHVP(da.from_array(G.astype(dtype), chunks=(m, width)), damp=damp, block_size=bs)
    ref = StaticIHVP(G.astype(dtype), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    kappa = oracle.kappa
    assert isinstance(op, StaticIHVP)
    assert op.shape == (d, d) and op.dtype == np.dtype(dtype)
    assert (op.num_grads, op.dim, op.damp, op.block_size) == (m, d, damp, ref.block_size)
    assert op.kappa_bound >= kappa * (1 - 1e-6)
    assert op.chunks == da.from_array(G, chunks=(m, width)).chunks[1]

    # Vectors chunked otherwise than G: results come back in G's column chunks.
    X = rounded(rng.standard_normal((d, 3)), dtype)
    Y = op.matmat(da.from_array(X.astype(dtype), chunks=(3, 2)))
    _check_dask(Y, dtype, op.chunks)
    Yn = Y.compute()
    assert_close(Yn, ref.matmat(X.astype(dtype)), kappa=kappa)
    for j in range(3):
        assert_close(Yn[:, j], oracle.matvec(X[:, j]), kappa=kappa, err_msg=f"column {j}")
    x = X[:, 0].astype(dtype)
    y = op.matvec(da.from_array(x, chunks=6))
    _check_dask(y, dtype, op.chunks)
    assert_close(y.compute(), oracle.matvec(X[:, 0]), kappa=kappa)
    y2 = op @ da.from_array(x[:, None], chunks=6)
    assert y2.shape == (d, 1)
    assert_close(y2.compute()[:, 0], oracle.matvec(X[:, 0]), kappa=kappa)

    diag = op.diagonal()
    _check_dask(diag, dtype, op.chunks)
    assert_close(diag.compute(), oracle.diagonal(), kappa=kappa)
    assert_close(diag.compute(), ref.diagonal(), kappa=kappa)
    assert_close(op.todense().compute(), oracle.todense(), kappa=kappa)

    # Every entry, as 2-D index arrays: the shape is kept and cross-block entries are 0.
    rows, cols = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    ent = op.entries(da.from_array(rows, chunks=5), da.from_array(cols, chunks=5))
    _check_dask(ent, dtype)
    assert ent.shape == (d, d)
    assert_close(ent.compute(), oracle.todense(), kappa=kappa)
    cross = rows // op.block_size != cols // op.block_size
    assert np.all(ent.compute()[cross] == 0)


@pytest.mark.parametrize("bs", [None, 4])
def test_entries_shapes(bs, rng):
    G, damp = _data(rng, 3, 12, "float64")
    op = DaskStaticIHVP(da.from_array(G, chunks=(3, 4)), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    one = op.entries(da.from_array(np.asarray(2)), da.from_array(np.asarray(3)))
    assert one.shape == ()
    assert_close(one.compute(), oracle.entries(np.asarray(2), np.asarray(3)), kappa=oracle.kappa)
    empty = da.from_array(np.zeros((2, 0), dtype=np.int32))
    none = op.entries(empty, empty)
    assert none.shape == (2, 0) and none.compute().shape == (2, 0)
    # int32 indices, repeated and unsorted.
    r = np.array([11, 0, 5, 5, 3], dtype=np.int32)
    c = np.array([10, 0, 6, 5, 3], dtype=np.int32)
    got = op.entries(da.from_array(r, chunks=2), da.from_array(c, chunks=3)).compute()
    assert_close(got, oracle.entries(r, c), kappa=oracle.kappa)
    # Indices of unknown length (boolean indexing, as a pruning step picks weights).
    idx = da.from_array(r, chunks=2)
    picked = idx[idx > 3]
    assert np.isnan(picked.shape[0])
    got = op.entries(picked, picked).compute()
    assert got.shape == (3,)
    assert_close(got, oracle.entries(r[r > 3], r[r > 3]), kappa=oracle.kappa)
    with pytest.raises(ValueError, match="same shape, got \\(3,\\) and \\(5,\\)"):
        op.entries(picked, da.from_array(c, chunks=3))


@st.composite
def _chunked_problems(draw, dtype):
    """A problem and a chunk width the operator accepts for it (any for one Woodbury block)."""
    p = draw(problems(dtype=dtype, max_m=6, max_d=30), label="problem")
    B = p.d if p.block_size is None else min(p.block_size, p.d)
    if B == p.d and p.d <= p.m:
        return p, p.d
    if B == p.d:
        return p, draw(st.integers(1, p.d), label="chunk width")
    return p, B * draw(st.integers(1, -(-p.d // B)), label="blocks per chunk")


# The scheduler's thread (in this process) uses the random module while Hypothesis draws,
# which Hypothesis takes for a strategy's doing; the strategies here use none.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_properties(dtype):
    @settings(max_examples=12)
    @given(case=_chunked_problems(dtype))
    def check(case):
        p, width = case
        with warnings.catch_warnings():
            # Drawn problems may be ill-conditioned enough to warn (tested below).
            warnings.simplefilter("ignore", IllConditionedWarning)
            op = DaskStaticIHVP(
                da.from_array(p.G.astype(dtype), chunks=(p.m, width)),
                damp=p.damp,
                block_size=p.block_size,
            )
            ref = StaticIHVP(p.G.astype(dtype), damp=p.damp, block_size=p.block_size)
        oracle = p.oracle()
        k, msg = oracle.kappa, f"{p.description}, chunk width {width}"
        y = op.matvec(da.from_array(p.x.astype(dtype), chunks=max(1, p.d // 3))).compute()
        assert_close(y, oracle.matvec(p.x), kappa=k, err_msg=f"{msg}: matvec")
        assert_close(y, ref.matvec(p.x.astype(dtype)), kappa=k, err_msg=f"{msg}: against NumPy")
        diag = op.diagonal().compute()
        assert_close(diag, oracle.diagonal(), kappa=k, err_msg=f"{msg}: diagonal")

    check()


def test_float32_gradients_are_exact_for_vectors_in_the_span(rng):
    # Gradients in a 3-dimensional subspace with a tiny damping (where a float32 Gram
    # fails, and earlier versions recomputed it), and gradients with a shared mean at
    # kappa = 1e7 with x = their mean: the float64 Gram and the float64-summed passes on
    # the workers keep float32's rounding, as the NumPy operator does.
    m, d, damp = 8, 3000, 1e-7
    B = rng.standard_normal((3, d)) / np.sqrt(d)
    G = rounded(rng.standard_normal((m, 3)) @ B, "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        op = DaskStaticIHVP(da.from_array(G.astype(np.float32), chunks=(m, 1000)), damp=damp)
    x = rounded(rng.standard_normal(d), "float32")
    oracle = SpectralOracle(G, damp)
    y = op.matvec(da.from_array(x.astype(np.float32), chunks=1000)).compute()
    # float64 work (eps(float64) kappa), then one rounding to float32: 100 eps(float32)
    # kappa would be 111 here, a bound a zero result passes.
    eps32 = float(np.finfo(np.float32).eps)
    want = oracle.matvec(x)
    assert_close(
        y, want, kappa=oracle.kappa, dtype="float64", atol=eps32 * float(np.linalg.norm(want))
    )
    G = rng.standard_normal(d) + rng.standard_normal((m, d))
    G = rounded(G / (np.linalg.norm(G, 2) / np.sqrt(m)), "float32")
    damp = float(np.linalg.norm(G, 2) ** 2 / (m * (1e7 - 1.0)))
    op = DaskStaticIHVP(da.from_array(G.astype(np.float32), chunks=(m, 700)), damp=damp)
    for x in (rounded(G.mean(axis=0), "float32"), G[3]):
        want = extended_precision_inverse(G, damp, x)
        y = op.matvec(da.from_array(x.astype(np.float32), chunks=1000)).compute()
        assert np.linalg.norm(y - want) <= 8 * eps32 * np.linalg.norm(want)
    cols = np.array([0, 699, 700, d - 1])
    diag = op.diagonal().compute()[cols]
    want_d = np.array([extended_precision_inverse(G, damp, np.eye(d)[:, j])[j] for j in cols])
    assert np.all(np.abs(diag - want_d) <= 8 * eps32 * want_d)
    ent = op.entries(da.from_array(cols), da.from_array(cols)).compute()
    assert np.all(np.abs(ent - want_d) <= 8 * eps32 * want_d)


# -- pruning --------------------------------------------------------------------------------


@pytest.mark.parametrize("bs", [None, 10])
def test_pruning_saliencies_and_update(bs, rng):
    m, d = 8, 60
    G, damp = _data(rng, m, d, "float64")
    theta = rng.standard_normal(d)
    op = DaskStaticIHVP(da.from_array(G, chunks=(m, 20)), damp=damp, block_size=bs)
    ref = StaticIHVP(G, damp=damp, block_size=bs)
    t = da.from_array(theta, chunks=15)
    kappa = SpectralOracle(G, damp, block_size=bs).kappa

    scores = obs_saliency(t, op)
    assert isinstance(scores, da.Array)
    want = obs_saliency(theta, ref)
    assert_close(scores.compute(), want, kappa=kappa)
    Finv = SpectralOracle(G, damp, block_size=bs)
    assert_close(scores.compute(), theta**2 / (2 * Finv.diagonal()), kappa=kappa)

    selected = rng.random(d) < 0.3
    new = obs_update(t, op, da.from_array(selected, chunks=15))
    assert isinstance(new, da.Array)
    assert_close(new.compute(), obs_update(theta, ref, selected), kappa=kappa)
    with pytest.raises(ValueError, match="joint=True is not available for Dask"):
        obs_update(t, op, da.from_array(selected, chunks=15), joint=True)

    # One whole pruning step from Dask gradients, as from NumPy ones.
    res = prune(t, da.from_array(G, chunks=(m, 20)), sparsity=0.5, damp=damp, block_size=bs)
    res_np = prune(theta, G, sparsity=0.5, damp=damp, block_size=bs)
    assert np.array_equal(res.mask.compute(), res_np.mask)
    assert_close(res.theta.compute(), res_np.theta, kappa=kappa)


def _never_computed(block):
    raise AssertionError("a chunk of G was computed")


def test_spectral_operator_and_damping_selection_refuse_dask_before_reading_g(rng):
    # The spectral set-up's eigh has no Dask version: it failed as an AttributeError of
    # array_api_compat's namespace, after the Gram's pass over G (and, for gradual_prune,
    # after grad_fn's gradients).
    m, d = 4, 30
    G = da.from_array(rng.standard_normal((m, d)), chunks=(m, 10))
    G = G.map_blocks(_never_computed, dtype=G.dtype, meta=np.empty((0, 0)))
    theta = da.from_array(rng.standard_normal(d), chunks=10)
    match = "SpectralIHVP takes no Dask arrays"
    with pytest.raises(TypeError, match=match):
        SpectralIHVP(G, damp=1e-2)
    with pytest.raises(TypeError, match=match):
        damping_sweep(theta, G, [1e-2, 1.0], sparsity=0.5)
    with pytest.raises(TypeError, match=match):
        select_damping(theta, G, [1e-2, 1.0], sparsity=0.5, loss=lambda dp, res: 0.0)
    calls = []

    def grad_fn(t, mask):
        calls.append(1)
        return G

    with pytest.raises(TypeError, match=match):
        gradual_prune(
            theta, grad_fn, sparsity=0.5, steps=2, damp=[1e-2, 1.0], select_damp=lambda *a: 0.0
        )
    assert calls == []


# -- set-up checks and errors ------------------------------------------------------------------


def test_overwrite_G_leaves_G(rng):
    G, damp = _data(rng, 4, 20, "float64")
    Gd = da.from_array(G.copy(), chunks=(4, 5))
    with pytest.warns(DeprecationWarning, match="overwrite_G=True"):
        op = DaskStaticIHVP(Gd, damp=damp, overwrite_G=True)
    assert np.array_equal(Gd.compute(), G)
    assert_close(op.diagonal().compute(), SpectralOracle(G, damp).diagonal(), kappa=1e3)


def test_layout_errors(rng):
    G, damp = _data(rng, 8, 100, "float64")
    with pytest.raises(ValueError, match=r"chunked along its 8 rows.*G\.rechunk\(\{0: -1\}\)"):
        DaskStaticIHVP(da.from_array(G, chunks=(4, 25)), damp=damp)
    with pytest.raises(ValueError, match=r"cut blocks of block_size=10.*G\.rechunk\(\{1: 20\}\)"):
        DaskStaticIHVP(da.from_array(G, chunks=(8, 25)), damp=damp, block_size=10)
    with pytest.raises(ValueError, match=r"one dense d x d block.*G\.rechunk\(\{1: -1\}\)"):
        DaskStaticIHVP(da.from_array(G[:, :6], chunks=(8, 3)), damp=damp)
    # The suggested chunking works.
    op = DaskStaticIHVP(da.from_array(G, chunks=(8, 25)).rechunk({1: 20}), damp=damp, block_size=10)
    assert op.chunks == (20,) * 5
    unknown = da.from_array(G, chunks=(8, 25))[:, da.from_array(np.arange(100)) >= 0]
    with pytest.raises(ValueError, match=r"unknown chunk sizes.*compute_chunk_sizes"):
        DaskStaticIHVP(unknown, damp=damp)


def test_option_and_dtype_errors(rng):
    G, damp = _data(rng, 4, 20, "float64")
    Gd = da.from_array(G, chunks=(4, 5))
    with pytest.raises(ValueError, match="refine is not available for Dask"):
        DaskStaticIHVP(Gd, damp=damp, refine=1)
    with pytest.raises(ValueError, match="progress is not available for Dask"):
        DaskStaticIHVP(Gd, damp=damp, progress=lambda done, total: None)
    with pytest.raises(TypeError, match="overwrite_G must be True or False"):
        DaskStaticIHVP(Gd, damp=damp, overwrite_G="no")
    with pytest.raises(ValueError, match="damp must be finite and > 0"):
        DaskStaticIHVP(Gd, damp=0.0)
    for bad in (Gd.astype(np.float16), Gd.astype(np.int64), Gd.astype(np.complex128)):
        with pytest.raises(TypeError, match="real floating dtype"):
            DaskStaticIHVP(bad, damp=damp)
    # As docs/dask.rst says: 2-byte storage is named, and the cast that works.
    with pytest.raises(TypeError, match=r"2-byte storage .* cast G to float32"):
        DaskStaticIHVP(Gd.astype(np.float16), damp=damp)
    with pytest.raises(ValueError, match="2-D array"):
        DaskStaticIHVP(Gd[0], damp=damp)


def test_2_byte_vectors_are_widened_as_numpys(rng):
    # Regression: Dask's namespace names no 2-byte dtype, so a float16 or bfloat16 vector
    # was refused ("float32 or float64"), which the NumPy operator widens exactly.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    G = rng.standard_normal((5, 30)).astype(np.float32)
    numpy_op = StaticIHVP(G, damp=0.1)
    dask_op = DaskStaticIHVP(da.from_array(G, chunks=(5, 7)), damp=0.1)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        x = rng.standard_normal(30).astype(dtype)
        got = dask_op.matvec(da.from_array(x, chunks=10)).compute()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, numpy_op.matvec(x))
    unknown = da.from_array(x.astype(np.float32), chunks=9)
    unknown = unknown[unknown == unknown]  # boolean indexing: length unknown
    with pytest.raises(ValueError, match=r"compute_chunk_sizes\(\)"):
        dask_op.matvec(unknown)


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_failed_construction_holds_no_chunk_of_G_in_the_cluster(client, check_finite, rng):
    # G is persisted before its Gram is summed; a failure's traceback (which a notebook
    # keeps as the last error) held the frames' locals, and with them G's chunks on the
    # workers, for as long as the error was kept.
    G, damp = _data(rng, 4, 20, "float64")
    G[1, 3] = np.nan
    gc.collect()
    before = set(client.refcount)
    with pytest.raises(ValueError if check_finite else FactorizationError) as kept:
        DaskStaticIHVP(da.from_array(G, chunks=(4, 5)), damp=damp, check_finite=check_finite)
    gc.collect()
    assert _keys_held_after(client, before) == set()
    assert r"G[1, 3] is nan" in str(kept.value)  # kept until here, with its traceback


def _keys_held_after(client, before, *, timeout=20.0):
    """The client's keys not in ``before``, once the releases already made have landed.

    A released future's count drops on the client's event loop, not in the releasing
    thread, so a key let go just before may still be counted for a moment on a loaded
    machine; a key still held is held after the timeout too.
    """
    deadline = time.monotonic() + timeout
    while (held := set(client.refcount) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_failed_block_wise_construction_holds_no_chunk_set_up_in_the_cluster(
    client, check_finite, rng
):
    # Block-wise, each chunk's set-up is persisted on its worker, then summarised; a chunk
    # that failed left every chunk's persisted set-up on the half-built operator, which
    # the kept error's traceback held (and, with a FactorizationError, beyond it).
    G, damp = _data(rng, 4, 20, "float64")
    G[1, 3] = np.nan
    gc.collect()
    before = set(client.refcount)
    with pytest.raises(ValueError if check_finite else FactorizationError) as kept:
        DaskStaticIHVP(
            da.from_array(G, chunks=(4, 5)), damp=damp, block_size=5, check_finite=check_finite
        )
    gc.collect()
    assert _keys_held_after(client, before) == set()
    assert "G[1, 3]" in str(kept.value)  # kept until here, with its traceback


@pytest.mark.parametrize("check_finite", [True, False])
def test_the_nan_named_is_the_first_in_row_major_order_as_numpy_names_it(check_finite, rng):
    # Each chunk names its own first NaN; the first chunk's answer was taken, G[3, 2]
    # here, where the NumPy operator (and the docs) name the first in row-major order.
    G, damp = _data(rng, 4, 30, "float64")
    G[3, 2] = G[0, 20] = np.nan
    G[1, 12] = np.inf
    error = ValueError if check_finite else FactorizationError
    with pytest.raises(error) as expected:
        StaticIHVP(G, damp=damp, check_finite=check_finite)
    assert "G[0, 20] is nan" in str(expected.value)
    with pytest.raises(error, match=r"G\[0, 20\] is nan"):
        DaskStaticIHVP(da.from_array(G, chunks=(4, 7)), damp=damp, check_finite=check_finite)


@pytest.mark.parametrize("bs", [None, 5])
def test_non_finite_and_singular_G(bs, rng):
    G, damp = _data(rng, 4, 20, "float64")
    bad = G.copy()
    bad[2, 17] = np.inf
    with pytest.raises(ValueError, match=r"G\[2, 17\] is inf"):
        DaskStaticIHVP(da.from_array(bad, chunks=(4, 5)), damp=damp, block_size=bs)
    # Unchecked, the FactorizationError names it too, in G's columns (not its chunk's).
    with pytest.raises(FactorizationError, match=r"NaN or infinity: G\[2, 17\] is inf$"):
        DaskStaticIHVP(
            da.from_array(bad, chunks=(4, 5)), damp=damp, block_size=bs, check_finite=False
        )
    huge = np.full((4, 20), 1e300)
    with pytest.raises(ValueError, match="overflow float64"):
        DaskStaticIHVP(da.from_array(huge, chunks=(4, 5)), damp=1.0, block_size=bs)
    with pytest.raises(FactorizationError, match="the gradients are finite"):
        DaskStaticIHVP(
            da.from_array(huge, chunks=(4, 5)), damp=1.0, block_size=bs, check_finite=False
        )
    same = np.repeat(G[:1], 4, axis=0)
    with pytest.raises(FactorizationError, match=r"damp=1e-300.*kappa"):
        DaskStaticIHVP(da.from_array(same, chunks=(4, 5)), damp=1e-300, block_size=bs)
    # The float64 work is what runs out (eps(float64) kappa >= 1), whatever G's dtype.
    with pytest.warns(IllConditionedWarning, match="float64"):
        DaskStaticIHVP(
            da.from_array(G.astype(np.float32), chunks=(4, 5)), damp=1e-18, block_size=bs
        )


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_gram_whose_chunk_sum_overflows_raises_its_error_not_a_runtime_warning(check_finite):
    # Each chunk's Gram is finite (squared row norms 1e308 per chunk of two columns), and so
    # are the +inf and -inf that two chunks of G hold in one row: the sum over the chunks
    # overflowed, or made inf - inf, in NumPy's sum, whose RuntimeWarning came before the
    # error, and was the error where warnings are errors (this suite's setting). Run here
    # (synchronous scheduler): a worker process's warning does not reach the client.
    import dask

    big = np.full((2, 6), np.sqrt(0.5e308))
    big[1, 1::2] *= -1  # rows neither equal nor opposite
    opposite = np.ones((2, 6))
    opposite[0, 1], opposite[0, 4] = np.inf, -np.inf
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError if check_finite else FactorizationError, match=r"overflow|finite"
        ):
            DaskStaticIHVP(da.from_array(big, chunks=(2, 2)), damp=1.0, check_finite=check_finite)
        with pytest.raises(
            ValueError if check_finite else FactorizationError, match=r"G\[0, 1\] is inf"
        ):
            DaskStaticIHVP(
                da.from_array(opposite, chunks=(2, 3)), damp=1.0, check_finite=check_finite
            )


def test_operand_errors(rng):
    G, damp = _data(rng, 4, 20, "float64")
    op = DaskStaticIHVP(da.from_array(G, chunks=(4, 5)), damp=damp)
    op32 = DaskStaticIHVP(da.from_array(G.astype(np.float32), chunks=(4, 5)), damp=damp)
    x = rng.standard_normal(20)
    with pytest.raises(TypeError, match=r"numpy array but .* works on dask arrays"):
        op.matvec(x)
    with pytest.raises(TypeError, match="no silent loss of precision"):
        op32.matvec(da.from_array(x))
    # float32 is promoted to a float64 operator's dtype.
    y = op.matvec(da.from_array(x.astype(np.float32)))
    assert y.dtype == np.float64
    with pytest.raises(ValueError, match="must not contain NaN"):
        op.matvec(da.from_array(np.full(20, np.nan)))
    with pytest.raises(ValueError, match=r"shape \(20,\)"):
        op.matvec(da.from_array(x[:5]))
    # A vector of unknown length (boolean indexing) is told how to know it.
    xd = da.from_array(np.concatenate([x, x]), chunks=5)
    with pytest.raises(ValueError, match=r"got \(nan,\) \(unknown: call x\.compute_chunk_sizes"):
        op.matvec(xd[xd == xd])
    idx = np.array([1, 2])
    with pytest.raises(TypeError, match="rows is a numpy array"):
        op.entries(idx, idx)
    with pytest.raises(TypeError, match="integer dtype"):
        op.entries(da.from_array(idx * 1.0), da.from_array(idx))
    with pytest.raises(IndexError, match=r"cols holds an index out of range \[0, 20\): 20"):
        op.entries(da.from_array(idx), da.from_array(idx + 18))
    with pytest.raises(ValueError, match="same shape"):
        op.entries(da.from_array(idx), da.from_array(idx[:1]))


@pytest.mark.parametrize("option", ["out", "stream_to"])
def test_out_and_stream_to_are_refused(option: str) -> None:
    G = da.ones((2, 8), chunks=(2, 4))
    with pytest.raises(ValueError, match="not available for Dask"):
        value = {"out": np.zeros((2, 8)), "stream_to": "cpu"}[option]
        DaskStaticIHVP(G, damp=1.0, **{option: value})


def test_a_communicator_is_refused_as_no_keyword_of_the_dask_operator() -> None:
    # Regression: a ValueError whose advice ("pass each rank's NumPy shard for comm=")
    # did not name the class that takes one.
    from mfac_core.distributed import SingleProcessComm

    G = da.ones((2, 8), chunks=(2, 4))
    match = r"DaskStaticIHVP takes no communicator.*ShardedStaticIHVP\(G_local, comm=comm"
    with pytest.raises(TypeError, match=match):
        DaskStaticIHVP(G, damp=1.0, comm=SingleProcessComm())
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match=match):
        StaticIHVP(G, damp=1.0, comm=SingleProcessComm())


@pytest.mark.parametrize(
    ("m", "d", "block_size", "col_chunks"),
    [(5, 23, None, (1, 0, 22)), (6, 4, None, (0, 4, 0)), (3, 23, 5, (5, 0, 10, 8, 0))],
)
def test_empty_column_chunks_are_dropped(m, d, block_size, col_chunks):
    # Slicing or concatenating Dask arrays can leave empty chunks; the Woodbury
    # set-up used to divide by their width (ZeroDivisionError in a worker).
    rng = np.random.default_rng(5)
    G, damp = _data(rng, m, d, np.float64)
    x = rng.standard_normal(d)
    op = DaskStaticIHVP(da.from_array(G, chunks=(m, col_chunks)), damp=damp, block_size=block_size)
    ref = StaticIHVP(G, damp=damp, block_size=block_size)
    assert op.chunks == tuple(c for c in col_chunks if c)
    assert_close(op.matvec(da.from_array(x, chunks=4)).compute(), ref.matvec(x), kappa=1e3)
    assert_close(op.diagonal().compute(), ref.diagonal(), kappa=1e3)


def test_chunks_that_are_not_numpy_are_refused_at_construction():
    # Dask tells the chunk type by G._meta; a CuPy-chunked G (here its meta a stand-in of
    # cupy.ndarray, no CuPy being installed) would fail in a worker's task, obscurely.
    class ndarray:  # the name users would see: cupy.ndarray
        shape, ndim, dtype = (0, 0), 2, np.dtype("float64")

    ndarray.__module__ = "cupy"
    G = da.ones((4, 20), chunks=(4, 10))
    G._meta = ndarray()
    with pytest.raises(TypeError, match=r"cupy\.ndarray.*NumPy chunks.*cupy\.asnumpy"):
        DaskStaticIHVP(G, damp=1.0)


def test_from_gradients_is_refused_before_the_gradients_are_consumed():
    consumed = []

    def gradients():
        for i in range(3):
            consumed.append(i)
            yield np.ones(4)

    with pytest.raises(TypeError, match=r"StaticIHVP\.from_gradients.*dask\.array\.from_array"):
        DaskStaticIHVP.from_gradients(gradients(), num_grads=3, dim=4, damp=1e-2)
    assert consumed == []


@pytest.mark.parametrize("bs", [None, 5])
def test_the_set_up_evaluates_the_graph_of_G_once(bs, tmp_path, rng):
    # G's graph stands for a read from disk or the gradients' computation: each chunk's
    # evaluation is logged to a file (the workers are other processes). The full
    # operator once evaluated it for the Gram and again to persist G.
    G, damp = _data(rng, 4, 20, "float64")
    log = tmp_path / "reads"

    def read(block, block_info=None):
        with open(log, "a") as f:
            f.write(f"{block_info[None]['array-location'][1][0]}\n")
        return block

    Gd = da.from_array(G, chunks=(4, 5)).map_blocks(read, dtype=G.dtype)
    op = DaskStaticIHVP(Gd, damp=damp, block_size=bs)
    x = da.from_array(rng.standard_normal(20), chunks=5)
    y = (op @ x).compute()
    op.diagonal().compute()
    op.entries(da.arange(3), da.arange(3)).compute()
    assert sorted(log.read_text().split()) == ["0", "10", "15", "5"]
    want = StaticIHVP(G, damp=damp, block_size=bs).matvec(x.compute())
    assert_close(y, want, kappa=1e3)


def _released(client):
    """Return once the scheduler has let go of what this client released so far.

    The client's releases reach the scheduler in order: a sentinel released last is
    forgotten after the others.
    """
    sentinel = client.submit(int, 1, pure=False)
    sentinel.result()
    key = sentinel.key
    del sentinel
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not client.run_on_scheduler(lambda dask_scheduler: key in dask_scheduler.tasks):
            return
        time.sleep(0.01)


@pytest.mark.parametrize("what", ["matvec", "persisted-vector", "diagonal", "entries"])
@pytest.mark.parametrize("bs", [None, 5])
def test_lazy_results_outlive_the_operator(bs, what, client, rng):
    # The full operator's products referred to G's persisted chunks by key only (the
    # optimised to_delayed of a persisted array holds no futures): once the operator
    # was collected, the cluster dropped them and computing a product that was still
    # lazy failed with "lost dependencies"; so did any product of a vector persisted
    # for the call (op @ x.persist()), for every layout.
    G, damp = _data(rng, 4, 20, "float64")
    x = rng.standard_normal(20)
    want = StaticIHVP(G, damp=damp, block_size=bs)
    op = DaskStaticIHVP(da.from_array(G, chunks=(4, 5)), damp=damp, block_size=bs)
    if what == "matvec":
        lazy, expected = op @ da.from_array(x, chunks=5), want.matvec(x)
    elif what == "persisted-vector":
        lazy, expected = op @ da.from_array(x, chunks=5).persist(), want.matvec(x)
    elif what == "diagonal":
        lazy, expected = op.diagonal(), want.diagonal()
    else:
        idx = np.array([0, 7, 19])
        lazy = op.entries(da.from_array(idx), da.from_array(idx[::-1]))
        expected = want.entries(idx, idx[::-1])
    del op
    gc.collect()
    _released(client)
    assert_close(lazy.compute(), expected, kappa=1e3)


def test_naming_a_nan_brings_no_column_mask_to_the_client():
    # The search for G's NaN computed any(~isfinite(G), axis=0) on the client: d booleans
    # (10 GB at d = 1e10) for a G that is on the cluster because it is too large. Each
    # chunk is now searched where it is, and only the entry's name comes back. Run here
    # (synchronous scheduler) so that tracemalloc sees what the client holds.
    import tracemalloc

    import dask

    d, width = 2**24, 2**20
    G = da.concatenate(
        [
            da.zeros((1, d - 1), chunks=(1, width), dtype=np.float32),
            da.full((1, 1), np.nan, dtype=np.float32),
        ],
        axis=1,
    )
    with dask.config.set(scheduler="synchronous"):
        # Once on a small G first: what the first computation imports is not measured.
        with pytest.raises(ValueError, match=r"G\[0, 1\] is nan"):
            DaskStaticIHVP._raise_non_finite(G[:, d - 2 :])
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=rf"G\[0, {d - 1}\] is nan"):
                DaskStaticIHVP._raise_non_finite(G)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # The mask was d bytes (its float reduction more); a chunk and its mask are 5 * width.
    assert peak < 0.5 * d
