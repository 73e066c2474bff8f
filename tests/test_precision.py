"""The Gram of the stored gradients, summed in float64 (docs/mathematics.rst, "Exact passes").

Every set-up and the dynamic window's rows sum float32 (and 2-byte) gradients in
float64, so nearly collinear windows with tiny dampings factorise wherever the
float64 Gram of the stored data does. Every result is compared with float64 oracles
of the stored gradients.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import close_where_promised, rounded
from hypothesis import given
from hypothesis import strategies as st

from mfac_core import DynamicIHVP, IllConditionedWarning, StaticIHVP, _pieces
from mfac_core.testing import assert_close, condition_number, dense_inverse, to_numpy


def _subspace_grads(rng: np.random.Generator, m: int, d: int, rank: int, top: float) -> np.ndarray:
    """m float32-representable gradients in a ``rank``-dimensional subspace, norms 1..top."""
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
    norms = np.logspace(0.0, np.log10(top), m)
    rng.shuffle(norms)
    coef = rng.standard_normal((m, rank))
    coef /= np.linalg.norm(coef, axis=1, keepdims=True)
    return rounded((coef * norms[:, None]) @ basis, "float32")


def _oracle_apply(G64: np.ndarray, damp: float, x: np.ndarray) -> np.ndarray:
    """``F^{-1} x`` of the float64 Fisher by Woodbury with float64 everything (k = 1 column)."""
    m = G64.shape[0]
    C = G64 @ G64.T + m * damp * np.eye(m)
    return (x - G64.T @ np.linalg.solve(C, G64 @ x)) / damp


# -- static set-up -----------------------------------------------------------------------------


def test_float32_products_are_accurate(xp_device, rng):
    # Well-conditioned gradients: the products agree with the float64 inverse of the
    # stored gradients, full and block-wise.
    m, d, damp = 12, 700, 1e-2
    G = rounded(rng.standard_normal((m, d)), "float32")
    for block_size in (None, 175):
        op = StaticIHVP(xp_device.asarray(G, "float32"), damp=damp, block_size=block_size)
        X = rounded(rng.standard_normal((d, 3)), "float32")
        want = dense_inverse(G, damp, block_size=block_size) @ X
        assert_close(
            op @ xp_device.asarray(X, "float32"),
            want,
            kappa=condition_number(G, damp, block_size=block_size),
        )


def test_float32_storage_matches_float64_storage(rng):
    # The operator of float32 storage against the one of the same gradients in float64
    # storage: both Grams are float64; the difference is float32's final rounding.
    m, d, damp = 16, 900, 1e-3
    G = rounded(rng.standard_normal((m, d)), "float32")
    op32 = StaticIHVP(G.astype(np.float32), damp=damp)
    op64 = StaticIHVP(G, damp=damp)
    x = rounded(rng.standard_normal(d), "float32")
    assert_close(
        op32 @ x.astype(np.float32), op64 @ x, kappa=condition_number(G, damp), dtype="float32"
    )


def test_collinear_gradients_factorise(xp_device, rng, monkeypatch):
    # Gradients of equal norms in a 9-dimensional subspace with a small damping: the
    # last pivots are about m * damp, tiny against a float32 Gram's rounding (which
    # made earlier set-ups recompute); the float64 Gram of the stored data factorises.
    m, d, damp = 16, 4096, 1e-3
    G = _subspace_grads(rng, m, d, rank=9, top=1.0)
    # One chunk of the whole G (small arrays get pieces of 1/64 of their columns).
    monkeypatch.setattr(_pieces, "gram_piece_width", lambda xp, G: G.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        op = StaticIHVP(xp_device.asarray(G, "float32"), damp=damp)
    x = rounded(rng.standard_normal(d), "float32")
    assert_close(
        op @ xp_device.asarray(x, "float32"),
        _oracle_apply(G, damp, x),
        kappa=condition_number(G, damp),
    )


@given(
    seed=st.integers(0, 2**32 - 1),
    rank=st.integers(1, 10),
    top=st.sampled_from([1.0, 1e2, 1e4, 2.5e5]),
    damp=st.sampled_from([1e-5, 1e-3, 1e-1]),
)
def test_no_factorization_error_where_float64_gram_is_definite(seed, rank, top, damp):
    # The promise of the rule: a float32 G whose float64 Gram gives a positive definite
    # capacitance matrix never raises, whatever the single-precision products do.
    rng = np.random.default_rng(seed)
    m, d = 10, 300
    G = _subspace_grads(rng, m, d, rank=rank, top=top)
    C = G @ G.T + m * damp * np.eye(m)
    try:
        np.linalg.cholesky(C)
    except np.linalg.LinAlgError:
        return  # nothing is promised for these
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        op = StaticIHVP(G.astype(np.float32), damp=damp)
    x = rounded(rng.standard_normal(d), "float32")
    close_where_promised(
        op @ x.astype(np.float32), _oracle_apply(G, damp, x), kappa=condition_number(G, damp)
    )


# -- dynamic window ----------------------------------------------------------------------------


def test_dynamic_collinear_float32_window(xp_device, rng):
    # The example, smaller: float32 gradients from a 9-dimensional subspace with
    # norms up to 2.5e5 and damp = 1e-3. Single-precision Gram rows make the factor
    # fail; the window recomputes them in float64 instead of refusing the gradients.
    xp_device.skip_if_immutable()
    m, d, damp = 48, 300, 1e-3
    G = _subspace_grads(rng, m, d, rank=9, top=2.5e5)
    op = DynamicIHVP(
        m, d, damp=damp, dtype=xp_device.dtype("float32"), xp=xp_device.xp, device=xp_device.device
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        for g in G:
            op.update(xp_device.asarray(g, "float32"))
    window = to_numpy(op.window()).astype(np.float64)
    np.testing.assert_array_equal(window, G)
    # Every stored Gram entry is the float64 Gram of the stored gradients.
    gram = to_numpy(op._gram)
    slots = op.slots
    np.testing.assert_allclose(
        gram[np.ix_(slots, slots)], G @ G.T, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(G @ G.T)))
    )
    x = rounded(rng.standard_normal(d), "float32")
    close_where_promised(
        op @ xp_device.asarray(x, "float32"),
        _oracle_apply(G, damp, x),
        kappa=condition_number(G, damp),
    )


def test_dynamic_repeated_float32_gradients(rng):
    # A window of one gradient repeated, plus noise far below float32's resolution of
    # the Gram: the float64 recomputation keeps the factor positive definite.
    m, d, damp = 32, 200, 1e-4
    g = rounded(rng.standard_normal(d) * 1e3, "float32")
    op = DynamicIHVP(m, d, damp=damp, dtype="float32")
    for _ in range(2 * m):
        op.update(g.astype(np.float32))
    x = rounded(rng.standard_normal(d), "float32")
    G = np.tile(g, (m, 1))
    # kappa = 1.9e12 is past any float32 bound; the passes and the factor are float64, so
    # the product is float64 work rounded once to float32.
    want = _oracle_apply(G, damp, x)
    eps32 = float(np.finfo(np.float32).eps)
    assert_close(
        op @ x.astype(np.float32),
        want,
        kappa=condition_number(G, damp),
        dtype="float64",
        atol=eps32 * float(np.linalg.norm(want)),
    )


def test_dynamic_common_case_keeps_two_passes(rng, monkeypatch):
    # The window's rows are exact (float64 sums): the step reads the window twice
    # (G g and G^T c) and never recomputes its Gram.
    m, d = 16, 500
    calls = []
    monkeypatch.setattr(DynamicIHVP, "_exact_gram_matrix", lambda self: calls.append("gram"))
    op = DynamicIHVP(m, d, damp=1e-3, dtype="float32")
    for _ in range(3 * m):
        op.update_and_matvec(rng.standard_normal(d).astype(np.float32))
    assert calls == []


def test_dynamic_failure_changes_nothing(rng):
    # Exact duplicates with a damping far below float64's resolution of their Gram make
    # C singular even in float64: such a gradient is refused, and the window is as it
    # was. Each of them alone already makes the window hopeless (eps(float64) kappa >= 1),
    # which refuses it (a ValueError) before its repeat can fail the factorisation (a
    # FactorizationError, whose message would say that the Gram was float64).
    from mfac_core import FactorizationError

    m, d = 8, 50
    base = rounded(rng.standard_normal((3, d)) * 1e4, "float32").astype(np.float32)
    op = DynamicIHVP(m, d, damp=1e-30, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        for step in range(3 * m):
            before = (to_numpy(op.window()).copy(), to_numpy(op._gram).copy(), op.slots)
            try:
                op.update(base[step % 3])
            except ValueError as err:
                assert isinstance(err, FactorizationError) or "too large" in str(err)
                assert "accumulated in float32" not in str(err)
                break
        else:
            pytest.fail("duplicated gradients with damp=1e-30 were accepted")
    np.testing.assert_array_equal(to_numpy(op.window()), before[0])
    np.testing.assert_array_equal(to_numpy(op._gram), before[1])
    assert op.slots == before[2]


# -- 2-byte storage (G-form) -------------------------------------------------------------------

# NumPy's bfloat16 is ml_dtypes' (JAX's bfloat16 in NumPy).
_HALF_CASES = [
    ("numpy", "float16"),
    ("numpy", "bfloat16"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("cupy", "float16"),
]


@pytest.fixture(params=_HALF_CASES, ids=[f"{b}-{d}" for b, d in _HALF_CASES])
def half_case(request, make_backend):
    name, dtype = request.param
    try:
        backend = make_backend(name)
    except KeyError:
        pytest.skip(f"{name} is not available here")
    if name == "numpy" and dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    return backend, dtype


def _stored(backend, G: np.ndarray, dtype: str):
    """G in the 2-byte dtype on the backend, and the stored values in float64 (the oracle's G)."""
    if dtype == "bfloat16" and backend.is_numpy:
        pytest.importorskip("ml_dtypes")
    # float32 first: PyTorch's bfloat16 then rounds as ml_dtypes does (from float32).
    Gs = backend.asarray(np.asarray(G, dtype=np.float32), dtype)
    return Gs, to_numpy(Gs).astype(np.float64)


def test_half_storage_products_diagonal_entries(half_case, rng):
    backend, dtype = half_case
    m, d, damp = 12, 900, 1e-2
    Gs, G64 = _stored(backend, rng.standard_normal((m, d)), dtype)
    op = StaticIHVP(Gs, damp=damp)
    assert op.dtype == backend.dtype("float32") and op.storage_dtype == dtype
    assert op._factors[0].G is Gs  # kept as given: m d * 2 bytes, no W
    kappa = condition_number(G64, damp)
    Finv = dense_inverse(G64, damp)
    X = rounded(rng.standard_normal((d, 3)), "float32")
    Y = op @ backend.asarray(X, "float32")
    assert Y.dtype == backend.dtype("float32")
    assert_close(Y, Finv @ X, kappa=kappa)
    assert_close(op.matvec(backend.asarray(X[:, 0], "float32")), Finv @ X[:, 0], kappa=kappa)
    assert_close(op.diagonal(), np.diag(Finv), kappa=kappa)
    rows, cols = np.array([0, 5, 899, 7]), np.array([0, 9, 899, 3])
    got = op.entries(backend.asarray(rows, "int64"), backend.asarray(cols, "int64"))
    assert_close(got, Finv[rows, cols], kappa=kappa, atol=1e-6 * float(np.abs(Finv).max()))
    # A 2-byte operand is promoted to float32 (lossless).
    xh = backend.asarray(X[:, 0].astype(np.float32), dtype)
    assert_close(op @ xh, Finv @ to_numpy(xh).astype(np.float64), kappa=kappa)


@given(
    seed=st.integers(0, 2**32 - 1),
    rank=st.integers(1, 12),
    damp=st.sampled_from([1e-1, 1e-3, 1e-5]),
    case=st.sampled_from(_HALF_CASES[:4]),
)
def test_half_storage_matches_the_stored_gradients_oracle(seed, rank, damp, case):
    # Against the exact inverse of the Fisher of the stored (rounded) gradients, at three
    # and more condition numbers: random vectors without refinement, vectors in the span
    # of G (a gradient, their mean) with one step of refinement.
    backend_name, dtype = case
    if backend_name == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    m, d = 12, 400
    G = _subspace_grads(rng, m, d, rank=rank, top=10.0)
    from conftest import _BACKENDS

    backend = _BACKENDS[backend_name]()
    Gs, G64 = _stored(backend, G, dtype)
    C = G64 @ G64.T + m * damp * np.eye(m)
    kappa = condition_number(G64, damp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        op = StaticIHVP(Gs, damp=damp)
        op1 = StaticIHVP(Gs, damp=damp, refine=1)
    if 2**-23 * kappa >= 1e-2:
        return  # nothing to check: the stated precision has no correct digit left
    assert np.all(np.linalg.eigvalsh(C) > 0)

    def oracle(x):
        return (x - G64.T @ np.linalg.solve(C, G64 @ x)) / damp

    x = rounded(rng.standard_normal(d), "float32")
    assert_close(op @ backend.asarray(x, "float32"), oracle(x), kappa=kappa)
    for x in (rounded(G64[0], "float32"), rounded(G64.mean(axis=0), "float32")):
        assert_close(op1 @ backend.asarray(x, "float32"), oracle(x), kappa=kappa)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_storage_block_wise_and_short(half, rng):
    # The G-form serves every layout: blocks (dense and Woodbury) and d <= m, float32
    # results against the float64 inverse of the stored gradients (NumPy's bfloat16:
    # ml_dtypes').
    dt = pytest.importorskip("ml_dtypes").bfloat16 if half == "bfloat16" else np.float16
    G = rng.standard_normal((4, 50)).astype(dt)
    G64 = G.astype(np.float64)
    x = rounded(rng.standard_normal(50), "float32")
    for block_size in (3, 10, None):
        op = StaticIHVP(G, damp=1.0, block_size=block_size)
        assert op.dtype == np.float32
        assert_close(
            op @ x.astype(np.float32),
            dense_inverse(G64, 1.0, block_size=block_size) @ x,
            kappa=condition_number(G64, 1.0, block_size=block_size),
            dtype="float32",
        )
    short = rng.standard_normal((8, 5)).astype(dt)
    op = StaticIHVP(short, damp=1.0)
    assert_close(
        op.diagonal(),
        np.diag(dense_inverse(short.astype(np.float64), 1.0)),
        kappa=condition_number(short.astype(np.float64), 1.0),
        dtype="float32",
    )
