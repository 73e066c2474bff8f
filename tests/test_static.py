"""Tests of StaticIHVP and EmpiricalFisher (mfac_core._static) against the float64 oracles."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import check_space, rounded
from hypothesis import given, settings
from hypothesis import strategies as st

import mfac_core._group_factors
import mfac_core._pieces
import mfac_core._setup
from mfac_core import (
    EmpiricalFisher,
    FactorizationError,
    IllConditionedWarning,
    ShardedStaticIHVP,
    SpectralIHVP,
    StaticIHVP,
)
from mfac_core.distributed import SingleProcessComm
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    empirical_fisher_dense,
    extended_precision_inverse,
    problems,
    to_numpy,
)

# (m, d, block_size): the layouts of the block-diagonal operator.
LAYOUTS = {
    "full-woodbury": (5, 23, None),
    "full-d<m": (6, 4, None),
    "full-d=m": (4, 4, None),
    "m=1-d=1": (1, 1, None),
    "woodbury-blocks+dense-ragged": (3, 23, 7),
    "dense-blocks+ragged": (6, 23, 4),
    "woodbury-blocks+woodbury-ragged": (3, 14, 5),
    "woodbury-blocks-no-ragged": (2, 12, 4),
    "dense-blocks-no-ragged": (4, 12, 3),
    "block>d": (3, 10, 15),
    "block=d": (3, 10, 10),
    "block=1": (1, 5, 1),
}


def _eps(dtype: str) -> float:
    return float(np.finfo(dtype).eps)


def _data(rng, m, d, dtype, damp_rel=1e-2):
    """Gaussian gradients and a damping giving kappa ~ 1e2 - 1e3."""
    G = rounded(rng.standard_normal((m, d)), dtype)
    damp = damp_rel * float(np.linalg.norm(G, 2)) ** 2 / m
    return G, damp


# -- deterministic layouts on every backend and dtype ----------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_static_ihvp_against_oracle(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = StaticIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    kappa = oracle.kappa
    assert op.shape == (d, d)
    assert (op.num_grads, op.dim, op.damp) == (m, d, damp)
    assert op.block_size == (d if bs is None else min(bs, d))
    assert op.kappa_bound >= kappa * (1 - 1e-10)

    X = rounded(rng.standard_normal((d, 3)), dtype)
    Y = op.matmat(be.asarray(X, dtype))
    check_space(Y, be, dtype)
    for j in range(3):
        assert_close(Y[:, j], oracle.matvec(X[:, j]), kappa=kappa, err_msg=f"column {j}")

    diag = op.diagonal()
    check_space(diag, be, dtype)
    assert_close(diag, oracle.diagonal(), kappa=kappa)

    dense = op.todense()
    check_space(dense, be, dtype)
    assert_close(dense, oracle.todense(), kappa=kappa)

    # Every entry, as 2-D index arrays: the shape is kept and cross-block entries are 0.
    rows, cols = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    ent = op.entries(be.asarray(rows, "int64"), be.asarray(cols, "int64"))
    check_space(ent, be, dtype)
    assert tuple(ent.shape) == (d, d)
    ref = oracle.todense()
    assert_close(ent, ref, kappa=kappa)
    b = op.block_size
    cross = rows // b != cols // b
    assert np.all(to_numpy(ent)[cross] == 0)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_static_ihvp_matvec(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = StaticIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    x = rounded(rng.standard_normal(d), dtype)
    y = op.matvec(be.asarray(x, dtype))
    check_space(y, be, dtype)
    assert tuple(y.shape) == (d,)
    assert_close(y, oracle.matvec(x), kappa=oracle.kappa)
    y2 = op.matvec(be.asarray(x[:, None], dtype))
    assert tuple(y2.shape) == (d, 1)
    assert_close(y2[:, 0], oracle.matvec(x), kappa=oracle.kappa)


def test_matvec_single_woodbury_group():
    # Regression: the one-group Woodbury shortcut of _matvec was also taken for a group of
    # several blocks (block_size > m dividing d), applying the full instead of the
    # block-diagonal inverse.
    rng = np.random.default_rng(0)
    G, x = rng.standard_normal((1, 6)), rng.standard_normal(6)
    op = StaticIHVP(G, damp=0.5, block_size=2)
    assert_close(op.matvec(x), SpectralOracle(G, 0.5, block_size=2).matvec(x))


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_empirical_fisher_against_dense(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    F = EmpiricalFisher(be.asarray(G, dtype), damp=damp, block_size=bs)
    Fd = empirical_fisher_dense(G, damp, block_size=bs)
    kappa = condition_number(G, damp, block_size=bs)
    assert F.shape == (d, d) and F.dtype == be.dtype(dtype)
    x = rounded(rng.standard_normal(d), dtype)
    X = rounded(rng.standard_normal((d, 2)), dtype)
    y = F.matvec(be.asarray(x, dtype))
    check_space(y, be, dtype)
    assert_close(y, Fd @ x, kappa=kappa)
    Y = F.matmat(be.asarray(X, dtype))
    for j in range(2):
        assert_close(Y[:, j], Fd @ X[:, j], kappa=kappa)
    diag = F.diagonal()
    check_space(diag, be, dtype)
    assert_close(diag, np.diag(Fd))
    assert_close(F.todense(), Fd, kappa=kappa)
    # F (F^{-1} x) = x, kappa-scaled.
    Finv = StaticIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    assert_close(F.matmat(Finv.matmat(be.asarray(X, dtype))), X, kappa=kappa)


def test_zero_gradients(xp_device, dtype):
    G = np.zeros((3, 8))
    x = np.arange(8.0)
    op = StaticIHVP(xp_device.asarray(G, dtype), damp=0.5)
    assert_close(op.matvec(xp_device.asarray(x, dtype)), 2 * x)
    assert_close(op.diagonal(), np.full(8, 2.0))
    assert op.kappa_bound == 1.0
    F = EmpiricalFisher(xp_device.asarray(G, dtype), damp=0.5)
    assert_close(F.matvec(xp_device.asarray(x, dtype)), x / 2)


def _absorbed_squares(m: int, d: int) -> np.ndarray:
    # One gradient of 1, then m - 1 of 2**-13 whose squares (2**-26) each fall below
    # half a float32 ulp of 1: summed in float32 one row after another they all vanish
    # (an error of (m - 1) 2**-26, 128 eps32 at m = 1025); in float64 the sum is exact.
    G = np.full((m, d), 2.0**-13)
    G[0] = 1.0
    return G


def test_fisher_diagonal_is_summed_in_float64(xp_device):
    m, d, damp = 1025, 4, 2.0**-20
    G = _absorbed_squares(m, d)
    F = EmpiricalFisher(xp_device.asarray(G, "float32"), damp=damp)
    want = damp + np.sum(G * G, axis=0) / m  # exact in float64 (powers of two)
    got = to_numpy(F.diagonal()).astype(np.float64)
    assert F.diagonal().dtype == xp_device.dtype("float32")
    np.testing.assert_allclose(got, want, rtol=8 * float(np.finfo(np.float32).eps), atol=0)


def test_entries_subsets(xp_device, dtype, rng):
    m, d, bs = 3, 17, 5
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = StaticIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    rows = rng.integers(0, d, size=(4, 5))
    cols = rng.integers(0, d, size=(4, 5))
    ent = op.entries(be.asarray(rows, "int64"), be.asarray(cols, "int64"))
    assert tuple(ent.shape) == (4, 5)
    ref = oracle.entries(rows, cols)
    tol = 100 * _eps(dtype) * oracle.kappa * np.linalg.norm(oracle.todense(), 2) * np.sqrt(20)
    assert_close(ent, ref, kappa=oracle.kappa, atol=tol)
    # int32 indices, a 0-d pair and no pair at all.
    ent32 = op.entries(be.asarray(rows, "int32"), be.asarray(cols, "int32"))
    assert_close(ent32, to_numpy(ent), factor=1)
    one = op.entries(be.asarray(np.asarray(2), "int64"), be.asarray(np.asarray(3), "int64"))
    assert tuple(one.shape) == ()
    assert_close(one, oracle.entries(np.asarray(2), np.asarray(3)), kappa=oracle.kappa)


def test_entries_empty(xp_device):
    be = xp_device
    op = StaticIHVP(be.asarray(np.ones((2, 6)), "float64"), damp=0.5, block_size=4)
    empty = be.asarray(np.zeros(0), "int64")
    none = op.entries(empty, empty)
    assert tuple(none.shape) == (0,)
    assert none.dtype == be.dtype("float64")
    none2 = op.entries(be.asarray(np.zeros((2, 0)), "int64"), be.asarray(np.zeros((2, 0)), "int64"))
    assert tuple(none2.shape) == (2, 0)


# -- Hypothesis property tests ------------------------------------------------------------------


def _check_inverse_properties(p, backend, dtype: str, extra: np.ndarray) -> None:
    """All the properties of StaticIHVP on one drawn problem."""
    be = backend
    G, x = p.as_arrays(be.xp, dtype, device=be.device)
    op = StaticIHVP(G, damp=p.damp, block_size=p.block_size)
    oracle = p.oracle()
    k = oracle.kappa
    msg = p.description
    eps = _eps(dtype)
    # matmat, column by column (the columns' norms may differ a lot).
    X = np.stack([p.x, extra], axis=1)
    Y = op.matmat(be.asarray(X, dtype))
    check_space(Y, be, dtype)
    Yn = to_numpy(Y).astype(np.float64)
    for j in range(2):
        assert_close(
            Yn[:, j],
            oracle.matvec(X[:, j]),
            kappa=k,
            dtype=dtype,
            err_msg=f"{msg}: matmat column {j}",
        )
    # matvec, and matvec == matmat columns.
    y = op.matvec(x)
    check_space(y, be, dtype)
    assert_close(y, oracle.matvec(p.x), kappa=k, err_msg=f"{msg}: matvec")
    assert_close(y, Yn[:, 0], kappa=k, err_msg=f"{msg}: matvec vs matmat")
    # Symmetry <F^-1 a, b> = <a, F^-1 b>.
    lhs, rhs = Yn[:, 0] @ X[:, 1], X[:, 0] @ Yn[:, 1]
    scale = np.linalg.norm(Yn[:, 0]) * np.linalg.norm(X[:, 1]) + np.linalg.norm(
        X[:, 0]
    ) * np.linalg.norm(Yn[:, 1])
    assert abs(lhs - rhs) <= 100 * eps * k * scale, (msg, lhs, rhs)
    # The diagonal.
    assert_close(op.diagonal(), oracle.diagonal(), kappa=k, err_msg=f"{msg}: diagonal")
    # F (F^{-1} x) = x with the forward operator.
    F = EmpiricalFisher(G, damp=p.damp, block_size=p.block_size)
    assert_close(F.matmat(Y), X, kappa=k, err_msg=f"{msg}: F F^-1 X")
    Fd = empirical_fisher_dense(p.G, p.damp, block_size=p.block_size)
    assert_close(
        F.matmat(be.asarray(X[:, :1], dtype)), Fd @ X[:, :1], kappa=k, err_msg=f"{msg}: F x"
    )


def _entries_check(p, backend, dtype: str, rows: list[int], cols: list[int]) -> None:
    be = backend
    G, _ = p.as_arrays(be.xp, dtype, device=be.device)
    op = StaticIHVP(G, damp=p.damp, block_size=p.block_size)
    oracle = p.oracle()
    r, c = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    got = op.entries(be.asarray(r, "int64"), be.asarray(c, "int64"))
    # Entries are elements of F^{-1}: their error is relative to ||F^{-1}||, not to their own
    # size (an off-diagonal entry may be small by cancellation).
    tol = 100 * _eps(dtype) * oracle.kappa * np.linalg.norm(oracle.todense(), 2) * np.sqrt(len(r))
    assert_close(got, oracle.entries(r, c), kappa=oracle.kappa, atol=tol, err_msg=p.description)


def _extra(data, p, dtype):
    seed = data.draw(st.integers(0, 2**32 - 1), label="extra seed")
    return rounded(np.random.default_rng(seed).standard_normal(p.d), dtype)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@given(data=st.data())
def test_properties_numpy(numpy_backend, dtype_name, data):
    p = data.draw(problems(dtype=dtype_name), label="problem")
    _check_inverse_properties(p, numpy_backend, dtype_name, _extra(data, p, dtype_name))
    idx = st.lists(st.integers(0, p.d - 1), min_size=1, max_size=8)
    rows = data.draw(idx, label="rows")
    cols = data.draw(
        st.lists(st.integers(0, p.d - 1), min_size=len(rows), max_size=len(rows)), label="cols"
    )
    _entries_check(p, numpy_backend, dtype_name, rows, cols)


# Other backends run the same properties on fewer examples (they are slower per call and
# share the NumPy-independent code paths).
@pytest.mark.parametrize("backend_name", ["strict-cpu", "strict-device1", "torch"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(data=st.data())
def test_properties_other_backends(make_backend, backend_name, dtype_name, data):
    backend = make_backend(backend_name)
    p = data.draw(problems(dtype=dtype_name, max_m=6, max_d=24), label="problem")
    _check_inverse_properties(p, backend, dtype_name, _extra(data, p, dtype_name))


# -- small pieces: the column-chunked set-up paths ---------------------------------------------


@pytest.mark.parametrize("piece_entries", [1, 5, 12, 40])
@pytest.mark.parametrize(
    "layout",
    [
        "full-woodbury",
        "woodbury-blocks+dense-ragged",
        "dense-blocks+ragged",
        "woodbury-blocks+woodbury-ragged",
        "block>d",
    ],
)
@pytest.mark.parametrize("backend_name", ["numpy", "strict-device1"])
def test_column_pieces(monkeypatch, make_backend, backend_name, layout, piece_entries, rng):
    # Shrink the set-up's column pieces so that small problems split blocks into pieces
    # and group several blocks per piece.
    monkeypatch.setattr(mfac_core._pieces, "LARGE_PIECE_ENTRIES", piece_entries)
    monkeypatch.setattr(mfac_core._pieces, "PIECE_ENTRIES", piece_entries)
    be = make_backend(backend_name)
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, "float64")
    calls = []
    op = StaticIHVP(
        be.asarray(G, "float64"),
        damp=damp,
        block_size=bs,
        progress=lambda done, total: calls.append((done, total)),
    )
    oracle = SpectralOracle(G, damp, block_size=bs)
    X = rng.standard_normal((d, 2))
    assert_close(op.matmat(be.asarray(X, "float64")), oracle.matmat(X), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    # The set-up is one pass over the columns (the Gram): no W is written.
    assert calls[-1] == (d, d)
    assert all(t == d for _, t in calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_dense_block_wider_than_a_piece(monkeypatch):
    # Regression: the dense path (block_size <= m) added up X^T X over column pieces of a
    # block, which is not its Gram matrix; with the real piece size this hit blocks wider
    # than 2**22 // m columns (e.g. m = 2100, d = 4096, block_size = 2048).
    monkeypatch.setattr(mfac_core._pieces, "LARGE_PIECE_ENTRIES", 12)
    rng = np.random.default_rng(0)
    G, x = rng.standard_normal((6, 8)), rng.standard_normal(8)
    assert mfac_core._pieces.gram_piece_width(np, G) < 4  # the premise: a block is wider
    op = StaticIHVP(G, damp=0.5, block_size=4)
    oracle = SpectralOracle(G, 0.5, block_size=4)
    assert_close(op.matmat(x[:, None])[:, 0], oracle.matvec(x), kappa=oracle.kappa)


# -- overwrite_G and progress --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        "full-woodbury",
        "woodbury-blocks+dense-ragged",
        "dense-blocks+ragged",
        "woodbury-blocks+woodbury-ragged",
    ],
)
def test_overwrite_G_and_out_are_deprecated_no_ops(xp_device, layout, rng):
    # The operator stores no W (it reads G in every product): overwrite_G and out warn,
    # and leave G, and the array given as out, as they were.
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, "float64")
    be = xp_device
    ref = StaticIHVP(be.asarray(G, "float64"), damp=damp, block_size=bs)
    Gw = be.asarray(G, "float64")
    with pytest.warns(DeprecationWarning, match="no W"):
        op = StaticIHVP(Gw, damp=damp, block_size=bs, overwrite_G=True)
    out = be.asarray(np.zeros((m, d)), "float64")
    with pytest.warns(DeprecationWarning, match="no W"):
        op_out = StaticIHVP(be.asarray(G, "float64"), damp=damp, block_size=bs, out=out)
    X = rng.standard_normal((d, 2))
    want = to_numpy(ref.matmat(be.asarray(X, "float64")))
    for o in (op, op_out):
        np.testing.assert_array_equal(to_numpy(o.matmat(be.asarray(X, "float64"))), want)
    np.testing.assert_array_equal(to_numpy(Gw), G)
    assert not np.any(to_numpy(out))


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_progress(layout, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, "float64")
    calls = []
    StaticIHVP(
        G, damp=damp, block_size=bs, progress=lambda done, total: calls.append((done, total))
    )
    assert len(calls) >= 1
    assert calls[-1] == (d, d)
    assert all(t == d for _, t in calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [StaticIHVP, EmpiricalFisher])
def test_bad_gradients(xp_device, cls):
    be = xp_device
    for shape in [(5,), (2, 3, 4), (0, 5), (3, 0), ()]:
        with pytest.raises(ValueError, match="G must"):
            cls(be.asarray(np.ones(shape), "float64"), damp=1.0)
    G = np.ones((3, 5))
    G[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        cls(be.asarray(G, "float64"), damp=1.0)
    G[1, 2] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        cls(be.asarray(G, "float64"), damp=1.0)
    for dt in ("int64", "int32", "bool"):
        with pytest.raises(TypeError, match="real floating"):
            cls(be.asarray(np.ones((3, 5)), dt), damp=1.0)
    if be.name in ("numpy", "torch"):
        with pytest.raises(TypeError, match="real floating"):
            cls(be.asarray(np.ones((3, 5)), "complex128"), damp=1.0)
    with pytest.raises(TypeError, match="array"):
        cls([[1.0, 2.0]], damp=1.0)


@pytest.mark.parametrize("cls", [StaticIHVP, EmpiricalFisher])
def test_bad_damp(cls):
    G = np.ones((2, 4))
    for damp in (0, 0.0, -1e-3, np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="damp"):
            cls(G, damp=damp)
    for damp in ("abc", None, [1.0], object()):
        with pytest.raises(TypeError, match="damp"):
            cls(G, damp=damp)
    with pytest.raises(TypeError):
        cls(G, 0.1)  # damp is keyword-only
    with pytest.raises(TypeError):
        cls(G=G, damp=0.1)  # G is positional-only
    assert cls(G, damp=np.float32(0.5)).damp == 0.5


@pytest.mark.parametrize(
    "damp",
    ["0.1", True, np.array(True), np.array([0.5])],
    ids=["numeric-string", "bool", "0-d-bool-array", "1-d-array"],
)
def test_damp_refuses_strings_and_bools(damp):
    # A 0-d real array is one damping (test_validation); a 0-d bool array is not.
    with pytest.raises(TypeError, match="damp"):
        StaticIHVP(np.ones((2, 4)), damp=damp)


@pytest.mark.parametrize("cls", [StaticIHVP, EmpiricalFisher])
def test_bad_block_size(cls):
    G = np.ones((2, 4))
    for bs in (0, -1):
        with pytest.raises(ValueError, match="block_size"):
            cls(G, damp=1.0, block_size=bs)
    for bs in (2.5, 2.0, "2", [2], True):
        with pytest.raises(TypeError, match="block_size"):
            cls(G, damp=1.0, block_size=bs)
    assert cls(G, damp=1.0, block_size=np.int64(3)).block_size == 3
    assert cls(G, damp=1.0, block_size=100).block_size == 4


def test_bad_entries_indices(xp_device, numpy_backend, strict_device1):
    be = xp_device
    op = StaticIHVP(
        be.asarray(np.random.default_rng(0).standard_normal((3, 10)), "float64"),
        damp=0.5,
        block_size=4,
    )
    ok = be.asarray(np.array([0, 1]), "int64")
    with pytest.raises(ValueError, match="same shape"):
        op.entries(ok, be.asarray(np.array([[0, 1]]), "int64"))
    with pytest.raises(TypeError, match="integer"):
        op.entries(be.asarray(np.array([0.0, 1.0]), "float64"), ok)
    with pytest.raises(TypeError, match="integer"):
        op.entries(ok, be.asarray(np.array([0.0, 1.0]), "float32"))
    other_library = strict_device1 if be.name == "numpy" else numpy_backend
    with pytest.raises(TypeError, match="array"):
        op.entries(other_library.asarray(np.array([0, 1]), "int64"), ok)
    if be.name == "strict-cpu":
        with pytest.raises(ValueError, match="device"):
            op.entries(strict_device1.asarray(np.array([0, 1]), "int64"), ok)
    with pytest.raises(TypeError, match="array"):
        op.entries([0, 1], ok)


@pytest.mark.parametrize("bad", [[0, 10], [-1, 0], [3, 99]], ids=["d", "negative", "far"])
def test_entries_out_of_range(xp_device, bad):
    be = xp_device
    op = StaticIHVP(
        be.asarray(np.random.default_rng(0).standard_normal((3, 10)), "float64"),
        damp=0.5,
        block_size=4,
    )
    ok = be.asarray(np.array([0, 1]), "int64")
    with pytest.raises(IndexError, match="out of range"):
        op.entries(be.asarray(np.array(bad), "int64"), ok)
    with pytest.raises(IndexError, match="out of range"):
        op.entries(ok, be.asarray(np.array(bad), "int64"))


# -- ill-conditioning --------------------------------------------------------------------------


def _identical(m, d, norm):
    g = np.random.default_rng(5).standard_normal(d)
    return np.repeat((g * norm / np.linalg.norm(g))[None], m, axis=0)


@pytest.mark.parametrize("block_size", [None, 2], ids=["full", "dense-blocks"])
def test_duplicated_gradients_tiny_damp_never_silent(xp_device, dtype, block_size):
    # kappa = 1 + 1e16 / 1e-12 = 1e28: no precision can represent this F^{-1}. Either the
    # factorisation fails with an error naming damp and kappa, or a warning says so.
    be = xp_device
    G = _identical(3, 5, 1e8)
    if dtype == "float32":
        G = rounded(G, "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            StaticIHVP(be.asarray(G, dtype), damp=1e-12, block_size=block_size)
        except FactorizationError as exc:
            msg = str(exc)
            assert "damp=1e-12" in msg and "kappa" in msg
            assert isinstance(exc, np.linalg.LinAlgError) and isinstance(exc, ValueError)
            return
    assert any(issubclass(w.category, IllConditionedWarning) for w in caught), (
        "a kappa = 1e28 problem gave neither a FactorizationError nor a warning"
    )


def test_factorization_error_full_operator(xp_device):
    with pytest.raises(FactorizationError, match=r"damp=1e-12.*kappa"):
        StaticIHVP(xp_device.asarray(_identical(3, 5, 1e8), "float64"), damp=1e-12)


def test_hopeless_float64_warns():
    # kappa = 1e16 in float64 (eps * kappa = 2.2): no correct digits along the span, so
    # either a warning or (by luck) an accurate result; never silent garbage.
    G = _identical(3, 5, 1e8)
    g = G[0]
    x = g / np.linalg.norm(g)  # F^{-1} x = x / (damp + ||g||^2) exactly: the span direction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = StaticIHVP(G, damp=1.0)
    assert condition_number(G, 1.0) > 0.9 / np.finfo(np.float64).eps
    exact = x / (1.0 + g @ g)
    rel = np.linalg.norm(op.matvec(x) - exact) / np.linalg.norm(exact)
    assert rel < 1e-3 or any(issubclass(w.category, IllConditionedWarning) for w in caught), rel


def test_ill_conditioned_warning_float32(xp_device):
    # The passes and the factor are float64 for float32 storage too: the warning comes
    # where float64 runs out (eps64 * kappa >= 1), not at float32's eps * kappa = 1
    # (kappa = 1e9 here, which the exact passes handle; tests/test_exact.py).
    G = rounded(_identical(2, 6, 1.0), "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        StaticIHVP(xp_device.asarray(G, "float32"), damp=1e-9)
    with pytest.warns(IllConditionedWarning, match="damp"):
        StaticIHVP(xp_device.asarray(G, "float32"), damp=1e-16)


def test_no_warning_when_well_conditioned(xp_device, dtype):
    # kappa = 1e9 is fine in float64 (and accurate); float32 with kappa = 1e3 too.
    damp = 1e-9 if dtype == "float64" else 1e-3
    G = rounded(_identical(2, 6, 1.0), dtype)
    x = rounded(np.arange(6.0), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        op = StaticIHVP(xp_device.asarray(G, dtype), damp=damp)
    oracle = SpectralOracle(G, damp)
    Y = op.matmat(xp_device.asarray(x[:, None], dtype))
    assert_close(Y[:, 0], oracle.matvec(x), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)


# -- index arithmetic cannot overflow -------------------------------------------------------


@pytest.mark.parametrize("index_dtype", ["int8", "uint8", "int16", "uint16", "int32", "int64"])
@pytest.mark.parametrize("layout", ["dense-blocks", "woodbury"])
def test_entries_with_any_integer_index_dtype(xp_device, index_dtype, layout, rng):
    # Regression: flat offsets into the dense block inverses were computed in the dtype of
    # the indices, so int8 indices wrapped around (here offsets reach 9 * 16 * 16) and
    # gave other entries without an error.
    be = xp_device
    if be.name == "torch" and index_dtype in ("uint16",):
        pytest.skip("torch has no uint16 indexing")
    m, d, bs = (20, 160, 16) if layout == "dense-blocks" else (4, 160, 60)
    G = rng.standard_normal((m, d))
    op = StaticIHVP(be.asarray(G, "float64"), damp=0.5, block_size=bs)
    top = 127 if index_dtype == "int8" else d - 1
    rows = np.array([top, top - 1, 0, top, 5])
    cols = np.array([top, top - 2, 0, top - 15, 9])
    got = op.entries(be.asarray(rows, index_dtype), be.asarray(cols, index_dtype))
    want = op.entries(be.asarray(rows, "int64"), be.asarray(cols, "int64"))
    assert bool(be.xp.all(got == want))
    Gb = G[:, top - top % bs :][:, :bs]
    dense = np.linalg.inv(0.5 * np.eye(Gb.shape[1]) + Gb.T @ Gb / m)
    assert abs(float(to_numpy(got)[0]) - dense[top % bs, top % bs]) <= 1e-10 * np.abs(dense).max()


def test_entries_temporaries_are_bounded(monkeypatch, rng):
    # Regression: entries() allocated several (m, n) float64 arrays at once.
    import tracemalloc

    m, d, n = 64, 3000, 40_000
    op = StaticIHVP(rng.standard_normal((m, d)), damp=1.0)
    rows = rng.integers(0, d, n)
    cols = rng.integers(0, d, n)
    want = op.entries(rows, cols)
    monkeypatch.setattr(mfac_core._pieces, "LARGE_PIECE_ENTRIES", 2**16)
    tracemalloc.start()
    got = op.entries(rows, cols)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # The pieces change the BLAS calls' sizes, and with them the order of the sums.
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * m * np.finfo(np.float64).eps * scale)
    chunk_bytes = 2**16 * 8
    # The output and int64 copies of the indices (3 n entries), plus a few chunk temporaries;
    # unchunked, the temporaries alone would be 3 m n float64 entries (61 MiB).
    assert peak < 3 * n * 8 + 12 * chunk_bytes, peak


# -- iterative refinement -------------------------------------------------------------------


@pytest.mark.skipif(np.finfo(np.longdouble).eps >= 1e-17, reason="no extended precision")
@pytest.mark.parametrize("kappa", [1e5, 1e7, 1e9])
@pytest.mark.parametrize("block_size", [None, 200])
def test_refinement_brings_the_mean_gradient_to_eps_kappa(kappa, block_size):
    # Gradients with a strong common mean: F^{-1} of their mean is the hard case (the
    # product nearly cancels). Without refinement the error exceeds eps * kappa by orders
    # of magnitude; one step brings it to eps * ||x|| / (damp ||y||) <= eps * kappa.
    rng = np.random.default_rng(7)
    m, d = 24, 400
    G = 0.1 * rng.standard_normal((m, d)) * np.exp(-np.arange(d) / 60) + rng.standard_normal(d)
    damp = float(np.linalg.norm(G, 2)) ** 2 / (m * (kappa - 1))
    x = G.mean(axis=0)
    if block_size is None:
        want = extended_precision_inverse(G, damp, x)
    else:
        want = np.concatenate(
            [
                extended_precision_inverse(
                    G[:, lo : lo + block_size], damp, x[lo : lo + block_size]
                )
                for lo in range(0, d, block_size)
            ]
        )
    eps = float(np.finfo(np.float64).eps)
    ratio = float(np.linalg.norm(x) / (damp * np.linalg.norm(want)))

    def error(steps):
        y = StaticIHVP(G, damp=damp, block_size=block_size, refine=steps).matvec(x)
        return float(np.linalg.norm(y - want) / np.linalg.norm(want))

    plain, refined = error(0), error(1)
    assert refined <= 10 * eps * ratio <= 10 * eps * kappa
    assert plain > 10 * refined  # the step did something


@pytest.mark.parametrize("kappa", [1e3, 1e5])
def test_refinement_with_float32_storage(kappa):
    # float32 storage, float64 residuals: each step gains digits while eps32 * kappa < 1.
    rng = np.random.default_rng(8)
    m, d = 16, 300
    G = (0.1 * rng.standard_normal((m, d)) + rng.standard_normal(d)).astype(np.float32)
    G64 = G.astype(np.float64)
    damp = float(np.linalg.norm(G64, 2)) ** 2 / (m * (kappa - 1))
    x = G.mean(axis=0)
    want = SpectralOracle(G64, damp).matvec(x.astype(np.float64))
    errs = [
        float(
            np.linalg.norm(StaticIHVP(G, damp=damp, refine=k).matvec(x) - want)
            / np.linalg.norm(want)
        )
        for k in (0, 1, 2)
    ]
    eps32 = float(np.finfo(np.float32).eps)
    assert errs[1] <= 10 * eps32 * kappa
    assert errs[2] <= errs[1] and errs[2] <= 100 * eps32 + 1e-3 * errs[0]


def test_refinement_options(rng):
    G = rng.standard_normal((4, 30))
    with pytest.raises(TypeError, match="refine must be an int"):
        StaticIHVP(G, damp=1.0, refine=0.5)
    op = StaticIHVP(G, damp=1.0, refine=2)
    assert op._G is G  # kept by reference, not copied
    assert StaticIHVP(G, damp=1.0)._G is G  # every product reads it
    X = rng.standard_normal((30, 3))
    assert_close(op.matmat(X), SpectralOracle(G, 1.0).matmat(X))
    assert_close(op.matvec(X[:, 0]), op.matmat(X)[:, 0])


@pytest.mark.parametrize("kind", ["static", "fisher", "spectral"])
def test_torch_g_that_requires_grad_keeps_no_graph(kind):
    # An operator built from per-sample gradients still attached to autograd (e.g. made
    # with torch.func) must not keep the graph, and with it the model's activations,
    # alive: it detaches G, as DynamicIHVP does.
    import gc
    import weakref

    torch = pytest.importorskip("torch")
    from mfac_core import EmpiricalFisher, SpectralIHVP

    W = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    G = W * 2.0  # its graph holds W
    alive = weakref.ref(W)
    del W
    cls = {"static": StaticIHVP, "fisher": EmpiricalFisher, "spectral": SpectralIHVP}[kind]
    op = cls(G, damp=0.1)
    x = torch.ones(24, dtype=torch.float64)
    want = cls(G.detach().clone(), damp=0.1).matvec(x)
    y = op.matvec(x)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    del G
    gc.collect()
    assert alive() is None, "the operator keeps G's autograd graph alive"


@pytest.mark.parametrize(
    "kind", ["static", "fisher", "spectral", "sharded", "window", "update", "stream", "load"]
)
def test_torch_func_reverse_mode_through_g_is_refused_not_zero(kind):
    # Regression: the operators store G detached, so torch.func.grad (jacrev, vjp) of a
    # function that builds one from its input returned zeros for that input, silently
    # (eager autograd says it: the result does not require grad). Refused now, by name;
    # G.detach() holds G constant, and derivatives in x are as before.
    torch = pytest.importorskip("torch")
    from mfac_core import DynamicIHVP, EmpiricalFisher, SpectralIHVP

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(10, generator=gen, dtype=torch.float64)
    window = DynamicIHVP(4, 10, damp=0.5, dtype="float64", xp=torch)
    window.update(G[0])
    before = window @ x

    def build(G):
        if kind == "sharded":
            return ShardedStaticIHVP(G, damp=0.5, comm=SingleProcessComm())
        if kind == "window":
            return DynamicIHVP.from_window(G, damp=0.5)
        if kind == "update":
            window.update(G[1])
            return window
        if kind == "stream":  # rows written into a store made at the same level
            out = torch.empty(4, 10, dtype=torch.float64) + 0 * G
            return StaticIHVP.from_gradients(list(G), num_grads=4, dim=10, damp=0.5, grads_out=out)
        if kind == "load":
            loaded = DynamicIHVP(4, 10, damp=0.5, dtype="float64", xp=torch)
            loaded.load_state_dict({**state, "grads": G})
            return loaded
        cls = {"static": StaticIHVP, "fisher": EmpiricalFisher, "spectral": SpectralIHVP}[kind]
        return cls(G, damp=0.5)

    state = DynamicIHVP.from_window(G, damp=0.5).state_dict()
    name = {"update": "g", "stream": "gradient 0", "load": 'state_dict\\["grads"\\]'}.get(kind, "G")
    fix = "its " if kind == "stream" else name
    match = rf"^{name} requires grad under a torch\.func transform.*{fix}\.detach\(\)"
    for transform in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(TypeError, match=match):
            transform(lambda G: (build(G) @ x).sum())(G)
    with pytest.raises(TypeError, match=match):
        torch.func.vjp(lambda G: build(G) @ x, G)
    assert len(window) == 1 and torch.equal(window @ x, before)  # the refusals changed nothing
    if kind in ("sharded", "update", "stream", "load"):
        return  # under torch.func: a window's writes are PyTorch's to refuse, as collectives
    # Held constant: the derivative in G is zero by the user's choice, and the one in x,
    # taken at the same level, is the dense inverse's (F^{-1} symmetric: grad = F^{-1} 1).
    zero = torch.func.grad(lambda G: (build(G.detach()) @ x).sum())(G)
    assert torch.equal(zero, torch.zeros_like(G))
    want = build(G) @ torch.ones(10, dtype=torch.float64)
    got = torch.func.grad(lambda v: (build(G) @ v).sum())(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize(
    "kind",
    [
        "static",
        "block-wise",
        "diagonal",
        "entries",
        "spectral",
        "spectral diagonal",
        "with_damp",
        "fisher",
        "from_window",
        "updates",
        "row edits",
        "set_damp",
    ],
)
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_forward_mode_through_g_is_the_dense_inverses_derivative(kind, dtype):
    # Forward mode (torch.func.jvp, jacfwd, forward_ad dual tensors) differentiates
    # through G: a G with a tangent is stored with it, and every computation from it
    # carries the tangent. The derivative is the dense inverse's, -F^{-1} dF F^{-1} x.
    # Regression: the set-up's Gram kernel read a float32 or 2-byte dual tensor's values
    # alone, so its tangent missed the Gram's (65 % off, eager forward_ad only). A full
    # window's O(m^2) row edit read the new row's pivot as a float: 26x-166x off ("row
    # edits": a window of two slots takes four gradients).
    torch = pytest.importorskip("torch")
    from mfac_core import DynamicIHVP, EmpiricalFisher, SpectralIHVP

    gen = torch.Generator().manual_seed(1)
    G, T = (torch.randn(4, 10, generator=gen, dtype=torch.float64) for _ in range(2))
    x = torch.randn(10, generator=gen, dtype=torch.float64)
    rows, cols = torch.tensor([0, 3, 9, 3]), torch.tensor([1, 3, 2, 3])
    eye = torch.eye(10, dtype=torch.float64)

    def dense(G):
        F = 0.5 * eye + (G[2:].T @ G[2:] / 2 if kind == "row edits" else G.T @ G / 4)
        if kind == "block-wise":
            F = F * torch.block_diag(torch.ones(5, 5), torch.ones(5, 5))
        if kind == "fisher":
            return F @ x
        if kind in ("diagonal", "spectral diagonal"):
            return torch.diagonal(torch.linalg.inv(F))
        return torch.linalg.inv(F)[rows, cols] if kind == "entries" else torch.linalg.solve(F, x)

    def window(G):
        if kind == "from_window":
            return DynamicIHVP.from_window(G, damp=0.5)
        size = 2 if kind == "row edits" else 4
        damp = 2.0 if kind == "set_damp" else 0.5
        op = DynamicIHVP(size, 10, damp=damp, dtype=G.dtype, xp=torch)
        for g in G:
            op.update(g)
        if kind == "set_damp":
            op.set_damp(0.5)
        return op

    def ours(G):
        v = x.to(torch.float32 if G.dtype == torch.bfloat16 else G.dtype)
        if kind in ("static", "float32", "block-wise", "diagonal", "entries"):
            op = StaticIHVP(G, damp=0.5, block_size=5 if kind == "block-wise" else None)
            if kind == "diagonal":
                return op.diagonal()
            return op.entries(rows, cols) if kind == "entries" else op @ v
        if kind.startswith("spectral") or kind == "with_damp":
            op = SpectralIHVP(G, damp=0.5 if kind != "with_damp" else 3.0)
            op = op.with_damp(0.5) if kind == "with_damp" else op
            return op.diagonal() if kind == "spectral diagonal" else op @ v
        if kind == "fisher":
            return EmpiricalFisher(G, damp=0.5) @ v
        return window(G) @ v

    if dtype == "bfloat16" and kind in ("from_window", "updates", "row edits", "set_damp"):
        pytest.skip("a window stores 2-byte gradients only from float32 ones")
    G, T = (A.to(getattr(torch, dtype)) for A in (G, T))  # the stored values: exact below
    want = torch.func.jvp(dense, (G.double(),), (T.double(),))[1]
    got = torch.func.jvp(ours, (G,), (T,))[1]
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(G, T)
        eager = torch.autograd.forward_ad.unpack_dual(ours(dual)).tangent
    kappa = SpectralOracle(G.double().numpy()[2 if kind == "row edits" else 0 :], 0.5).kappa
    result = torch.float32 if dtype == "bfloat16" else G.dtype  # 2-byte G: float32 results
    for tangent in (got, eager):
        assert tangent is not None and tangent.dtype == result
        assert_close(tangent.numpy(), want.numpy(), kappa=kappa**2)  # eps of its dtype


def test_forward_mode_through_a_loaded_state_is_refused():
    # A state loads as saved: its Gram matrix and factor are not recomputed from its
    # gradients, so a tangent of state_dict["grads"] reached the product alone, as if
    # they were constants (26 % off the derivative). Refused, the window unchanged.
    torch = pytest.importorskip("torch")
    from mfac_core import DynamicIHVP

    gen = torch.Generator().manual_seed(2)
    G = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(10, generator=gen, dtype=torch.float64)
    state = DynamicIHVP.from_window(G, damp=0.5).state_dict()
    window = DynamicIHVP.from_window(G[:2], damp=0.5, num_grads=4)
    before = window @ x

    def load(key, value):
        window.load_state_dict({**state, key: value})
        return window @ x

    for key in ("grads", "gram", "factor"):
        match = rf'^state_dict\["{key}"\] carries derivatives.*loads as saved'
        with pytest.raises(TypeError, match=match):
            torch.func.jvp(lambda v, key=key: load(key, v), (state[key],), (state[key],))
        with pytest.raises(TypeError, match=match), torch.autograd.forward_ad.dual_level():
            load(key, torch.autograd.forward_ad.make_dual(state[key], state[key]))
    assert len(window) == 2 and torch.equal(window @ x, before)


@pytest.mark.parametrize("kind", ["static", "spectral", "sharded"])
@pytest.mark.parametrize("block_size", [None, 2])
def test_gram_overflow_is_the_error_that_says_so_not_numpys_warning(kind, block_size):
    # The float64 Gram of finite G overflowed with NumPy's RuntimeWarning first: where
    # warnings are errors (as here) the user got "overflow encountered in matmul".
    G = np.full((3, 4), 1e200)
    with pytest.raises(ValueError, match="overflow float64"):
        if kind == "sharded":
            ShardedStaticIHVP(G, damp=1.0, block_size=block_size, comm=SingleProcessComm())
        else:
            {"static": StaticIHVP, "spectral": SpectralIHVP}[kind](
                G, damp=1.0, block_size=block_size
            )


@pytest.mark.parametrize(
    ("dtype", "scale", "damp"),
    [("float64", 1e5, 1e-300), ("float64", 1.0, 2.3e-308), ("float32", 1e15, 1e-300)],
)
@pytest.mark.parametrize("block_size", [None, 3])
def test_fisher_products_at_the_smallest_dampings(rng, dtype, scale, damp, block_size):
    # Regression: EmpiricalFisher summed damp (x - G^T A) with A = -G x / (m damp), whose
    # G^T A is the result over the damping: inf (numpy's overflow warning) for float64
    # gradients of 1e5 at damp 1e-300, where F x is about 1e10.
    G = (rng.standard_normal((4, 10)) * scale).astype(dtype)
    x = rng.standard_normal(10).astype(dtype)
    Gl, xl = G.astype(np.longdouble), x.astype(np.longdouble)
    step = block_size or 10
    blocks = [slice(lo, lo + step) for lo in range(0, 10, step)]
    want = np.concatenate(
        [damp * xl[s] + Gl[:, s].T @ (Gl[:, s] @ xl[s]) / 4 for s in blocks]
    ).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow
        got = EmpiricalFisher(G, damp=damp, block_size=block_size) @ x
    err = np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
    assert err <= 8 * np.finfo(dtype).eps
