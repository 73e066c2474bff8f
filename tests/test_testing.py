"""Tests of mfac_core.testing: the oracles agree, assert_close catches real errors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from mfac_core import StaticIHVP
from mfac_core.testing import (
    DEFAULT_FACTOR,
    Problem,
    SpectralOracle,
    assert_close,
    condition_number,
    dense_inverse,
    empirical_fisher_dense,
    extended_precision_inverse,
    paper_dynamic,
    paper_static,
    problems,
    to_numpy,
)

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

# Small, well-conditioned problems: (m, d, block_size). Blocks both <= m (the library's
# dense path) and > m (Woodbury), ragged last blocks, d < m, m = 1 and d = 1.
SHAPES = [
    (1, 1, None),
    (1, 7, None),
    (3, 1, None),
    (6, 4, None),
    (5, 17, None),
    (4, 10, 3),
    (3, 11, 5),
    (2, 9, 1),
    (8, 20, 20),
    (8, 20, 30),
]


def _grads(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    return rng.standard_normal((m, d))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _product_rounding(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Entry-wise bound on the difference of two float64 evaluations of ``A @ B``.

    Each evaluation is within ``gamma_n |A| |B|`` of the exact product (Higham,
    Accuracy and Stability of Numerical Algorithms, Sec. 3.5), whatever order
    the BLAS kernel sums in; hence twice that between two of them. Scaled by the
    magnitudes of the operands, not by the entry, which may cancel to near zero.
    """
    n = A.shape[-1]
    gamma = n * EPS64 / (1 - n * EPS64)
    return 2 * gamma * (np.abs(A) @ np.abs(B))


# -- the oracles agree --------------------------------------------------------------------


@pytest.mark.parametrize(("m", "d"), [(1, 1), (1, 6), (4, 1), (6, 4), (5, 17), (8, 8)])
def test_paper_oracles_agree_with_dense_and_spectral(rng, m, d):
    G = _grads(rng, m, d)
    damp = 0.3
    x = rng.standard_normal(d)
    inv = dense_inverse(G, damp)
    want = inv @ x
    ps, pd, so = paper_static(G, damp), paper_dynamic(G, damp), SpectralOracle(G, damp)
    assert so.kappa < 1e3
    for got in (ps.matvec(x), pd.matvec(x), so.matvec(x)):
        assert _rel(got, want) < 1e-10
    assert _rel(ps.diagonal(), np.diag(inv)) < 1e-10
    assert _rel(so.diagonal(), np.diag(inv)) < 1e-10
    for i, j in [(0, 0), (0, d - 1), (d - 1, 0), (d // 2, d - 1)]:
        assert abs(ps.entry(i, j) - inv[i, j]) < 1e-10 * np.abs(inv).max()
    assert _rel(so.todense(), inv) < 1e-10


def test_paper_dynamic_structure(rng):
    m, d, damp = 6, 15, 0.2
    G = _grads(rng, m, d)
    pd, ps = paper_dynamic(G, damp), paper_static(G, damp)
    # Off-diagonal Gram entries may nearly cancel, so the bound scales with |G| |G|^T; an
    # entry-wise rtol passed or failed depending on the OpenBLAS kernel behind G @ G.T.
    assert np.all(np.abs(pd.GG - G @ G.T) <= _product_rounding(G, G.T))
    assert np.array_equal(pd.D, np.triu(pd.D))
    assert np.array_equal(pd.B, np.tril(pd.B))
    np.testing.assert_allclose(np.diag(pd.B), 1.0 / damp)
    # kappa of F_m bounds that of every partial Fisher F_{i-1} (their smallest eigenvalue is
    # damp when d > m, and adding gradients only raises the largest).
    kappa = condition_number(G, damp)
    assert d > m and kappa < 1e3
    norms = np.linalg.norm(G, axis=1)
    # D_ij = g_i^T F_{i-1}^{-1} g_j with F_{i-1} the partial Fisher of the first i-1 gradients.
    # |D_ij| <= ||g_i|| ||g_j|| / damp, which also scales its rounding errors: an
    # off-diagonal D_ij may be small by cancellation.
    for i in range(m):
        Fi = damp * np.eye(d) + G[:i].T @ G[:i] / m
        row = G[i] @ np.linalg.solve(Fi, G[i:].T)
        tol = 100 * EPS64 * kappa * norms[i] * norms[i:] / damp
        assert np.all(np.abs(pd.D[i, i:] - row) <= tol), (i, pd.D[i, i:] - row, tol)
    # Row i of B holds the coefficients of v_i = F_{i-1}^{-1} g_i in the gradients (Eq. 7);
    # ||v_i|| <= ||g_i|| / damp.
    err = np.linalg.norm(pd.B @ G - ps.v, axis=1)
    assert np.all(err <= 100 * EPS64 * kappa * norms / damp), err
    # The static q_i are m + D_ii (both >= m: no cancellation).
    np.testing.assert_allclose(ps.q, m + np.diag(pd.D), rtol=1e-12)


def test_paper_static_closed_form(rng):
    # docs/mathematics.rst: q = diag(Delta), the LDL^T pivots of S = m I + G G^T / damp, and
    # V = damp^{-1} L^{-1} G.
    m, d, damp = 5, 12, 0.7
    G = _grads(rng, m, d)
    ps = paper_static(G, damp)
    S = m * np.eye(m) + G @ G.T / damp
    R = np.linalg.cholesky(S)
    piv = np.diag(R) ** 2
    L = R / np.diag(R)
    np.testing.assert_allclose(ps.q, piv, rtol=1e-12)
    # Row i is v_i = F_{i-1}^{-1} g_i, of norm <= ||g_i|| / damp; its entries may cancel.
    kappa = condition_number(G, damp)
    err = np.linalg.norm(ps.v - np.linalg.solve(L, G) / damp, axis=1)
    assert np.all(err <= 100 * EPS64 * kappa * np.linalg.norm(G, axis=1) / damp), err


@pytest.mark.parametrize(("m", "d", "block_size"), SHAPES)
def test_spectral_oracle_matches_dense_inverse(rng, m, d, block_size):
    G = _grads(rng, m, d)
    damp = 0.5
    inv = dense_inverse(G, damp, block_size=block_size)
    so = SpectralOracle(G, damp, block_size=block_size)
    X = rng.standard_normal((d, 3))
    assert _rel(so.todense(), inv) < 1e-12
    assert _rel(so.matmat(X), inv @ X) < 1e-12
    assert _rel(so.matvec(X[:, 0]), inv @ X[:, 0]) < 1e-12
    assert so.matvec(X[:, :1]).shape == (d, 1)
    assert _rel(so.diagonal(), np.diag(inv)) < 1e-12
    rows, cols = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    ent = so.entries(rows, cols)
    assert ent.shape == (d, d)
    assert _rel(ent, inv) < 1e-12
    assert np.array_equal(ent == 0, inv == 0)  # cross-block entries are exactly zero
    assert so.shape == (d, d)
    assert "kappa" in repr(so)


@pytest.mark.parametrize(("m", "d", "block_size"), SHAPES)
def test_dense_fisher_and_condition_number(rng, m, d, block_size):
    G = _grads(rng, m, d)
    damp = 0.25
    F = empirical_fisher_dense(G, damp, block_size=block_size)
    full = damp * np.eye(d) + G.T @ G / m
    b = d if block_size is None else block_size
    same_block = (np.arange(d)[:, None] // b) == (np.arange(d)[None, :] // b)
    # G_b^T G_b and G^T G are different BLAS calls, summing in different orders; entries of
    # G^T G may nearly cancel, so the bound scales with |G|^T |G|, plus the roundings of
    # the division by m and of adding damp.
    tol = _product_rounding(G.T, G) / m + 4 * EPS64 * (
        np.abs(G.T) @ np.abs(G) / m + damp * np.eye(d)
    )
    assert np.all(np.abs(F - np.where(same_block, full, 0.0)) <= tol)
    assert np.all(F[~same_block] == 0.0)
    assert np.array_equal(F, F.T)
    kappa = condition_number(G, damp, block_size=block_size)
    assert_close(dense_inverse(G, damp, block_size=block_size) @ F, np.eye(d), kappa=kappa)
    # The largest condition number of a block (not cond(F) of the assembled matrix).
    per_block = max(np.linalg.cond(F[s : s + b, s : s + b]) for s in range(0, d, b))
    assert kappa == pytest.approx(per_block, rel=1e-10)
    if block_size is None:
        assert kappa == pytest.approx(np.linalg.cond(F), rel=1e-10)
    assert SpectralOracle(G, damp, block_size=block_size).kappa == pytest.approx(kappa, rel=1e-10)


def test_condition_number_formula_for_blocks_with_null_space(rng):
    m, d, damp = 3, 10, 1e-3
    G = _grads(rng, m, d)
    top = np.linalg.eigvalsh(G @ G.T)[-1]
    assert condition_number(G, damp) == pytest.approx(1 + top / (m * damp), rel=1e-12)


def test_spectral_oracle_accurate_at_huge_kappa():
    # Identical gradients: F = damp I + g g^T, known in closed form; kappa = 1e12.
    rng = np.random.default_rng(1)
    m, d = 4, 30
    g = rng.standard_normal(d)
    g *= 1e3 / np.linalg.norm(g)
    G = np.repeat(g[None], m, axis=0)
    damp = 1e-6
    so = SpectralOracle(G, damp)
    assert so.kappa == pytest.approx(1 + 1e6 / damp, rel=1e-12)

    def exact(x: np.ndarray) -> np.ndarray:
        return x / damp - g * (g @ x) / (damp * (damp + g @ g))

    x = rng.standard_normal(d)
    # A generic vector: the null-space part dominates and is computed without loss.
    assert _rel(so.matvec(x), exact(x)) < 100 * EPS64
    # A vector in the span: the problem itself is conditioned like kappa.
    assert_close(so.matvec(g), g / (damp + g @ g), kappa=so.kappa)
    diag = 1 / damp - g * g / (damp * (damp + g @ g))
    assert _rel(so.diagonal(), diag) < 100 * EPS64


def test_oracles_validate_input():
    with pytest.raises(ValueError, match="2-D"):
        SpectralOracle(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="damp"):
        SpectralOracle(np.ones((2, 3)), 0.0)
    with pytest.raises(ValueError, match="block_size"):
        empirical_fisher_dense(np.ones((2, 3)), 1.0, block_size=0)
    so = SpectralOracle(np.ones((2, 3)), 1.0, block_size=2)
    with pytest.raises(IndexError):
        so.entries(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="same shape"):
        so.entries(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        so.matvec(np.ones(4))
    # Regression: a NaN or infinite damping gave a NaN or infinite "reference".
    for fn in (empirical_fisher_dense, dense_inverse):
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match="damp must be finite"):
                fn(np.ones((2, 3)), bad)
        with pytest.raises(TypeError, match="damp must be a real number"):
            fn(np.ones((2, 3)), "1e-3")
    assert np.array_equal(  # 0-d arrays, and zero or negative dampings, are taken
        empirical_fisher_dense(np.ones((2, 3)), np.array(-1.0)),
        empirical_fisher_dense(np.ones((2, 3)), -1.0),
    )
    # Regression: 0.5 was truncated to index 0, an entry of another place. Float indices
    # are refused as the operators' entries refuse them, whole or not.
    for bad in (np.array([0.5]), np.array([np.nan]), np.array([np.inf]), np.array([1.0])):
        with pytest.raises(TypeError, match="rows must have an integer dtype, got float64"):
            so.entries(bad, np.array([0]))


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (np.array([2.7]), TypeError, "integer dtype, got float64"),
        ([2.7], TypeError, "integer dtype"),
        (np.array([True]), TypeError, "integer dtype, got bool"),
        (np.array([-1]), IndexError, r"out of range \[0, 3\): -1"),
        (np.array([3]), IndexError, r"out of range \[0, 3\): 3"),
        (np.array([2**63], dtype=np.uint64), IndexError, "out of range"),
    ],
)
def test_oracle_indices_refused_as_the_operators_refuse_them(index, error, match):
    # A float index was truncated (2.7 read as 2) and a bool read as 0 or 1; a negative
    # one in paper_static's entry counted from the end, as NumPy indexing does.
    G = np.arange(1.0, 7.0).reshape(2, 3)
    so, ps = SpectralOracle(G, 1.0), paper_static(G, 1.0)
    zero = np.zeros(np.shape(index), dtype=np.int64)
    with pytest.raises(error, match=match):
        so.entries(index, zero)
    with pytest.raises(error, match=match.replace("rows", "cols")):
        so.entries(zero, index)
    if isinstance(index, np.ndarray) and index.dtype != np.uint64:
        with pytest.raises(error, match=match):
            StaticIHVP(G, damp=1.0).entries(index, zero)
        with pytest.raises(error, match=match):
            ps.entry(index[0].item(), 0)
    with pytest.raises(TypeError, match="one index"):
        ps.entry([1], 0)
    assert so.entries([1], [2]) == pytest.approx(ps.entry(np.int64(1), 2), rel=1e-12)


@pytest.mark.parametrize("block_size", [2.7, True, np.float64(2.0)])
def test_oracle_block_size_not_truncated(block_size):
    # int(block_size) took 2.7 as 2 and True as 1, where the operators refuse both.
    G = np.ones((2, 3))
    for build in (SpectralOracle, dense_inverse, empirical_fisher_dense, condition_number):
        with pytest.raises(TypeError, match="block_size must be an int"):
            build(G, 1.0, block_size=block_size)
    with pytest.raises(TypeError, match="block_size must be an int"):
        StaticIHVP(G, damp=1.0, block_size=block_size)


# -- to_numpy -------------------------------------------------------------------------------


def test_to_numpy_backends(xp_device):
    a = np.arange(6.0).reshape(2, 3)
    x = xp_device.asarray(a, "float32")
    out = to_numpy(x)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)


def test_assert_close_fails_as_an_assertion_at_any_kappa_and_magnitude():
    # Regressions: with kappa = 0 (allowed: atol alone) or a kappa so small that eps *
    # kappa underflows, a failed comparison raised ZeroDivisionError while writing its
    # message; a difference beyond float64's range raised NumPy's overflow warning first
    # (an error under -W error) instead of the failed comparison.
    a = np.ones(3)
    for kappa in (0.0, 1e-320):
        with pytest.raises(AssertionError, match=r"error / \(eps kappa \|\|desired\|\|\) = inf"):
            assert_close(a + 1, a, kappa=kappa)
    assert_close(a + 1e-3, a, kappa=0.0, atol=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match=r"\|\|actual - desired\|\| = inf"):
            assert_close(np.array([1e308]), np.array([-1e308]))


def test_to_numpy_refuses_what_is_not_numbers():
    # Regression: None and object arrays became NaN, so assert_close(None, None) failed
    # with "desired holds NaN or infinity".
    for bad in (None, np.array([1.0, None]), "abc"):
        with pytest.raises(TypeError, match="expected an array of numbers"):
            to_numpy(bad)
        with pytest.raises(TypeError, match="expected an array of numbers"):
            assert_close(bad, bad)
    if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:  # not float64 itself
        with pytest.raises(TypeError, match=r"float16, bfloat16, float32, float64 \(it"):
            assert_close(np.ones(2, dtype=np.longdouble), np.ones(2))


def test_to_numpy_takes_pythons_own_real_numbers_that_numpy_holds_as_objects():
    # Regression: refusing object arrays (None became NaN) refused these too, which
    # were converted exactly before: an int beyond int64 and a Fraction.
    from fractions import Fraction

    big = 2**70
    assert to_numpy(big) == float(big) and to_numpy(big).dtype == np.float64
    got = to_numpy([Fraction(1, 3), big, 2])
    assert got.dtype == np.float64 and got.tolist() == [1 / 3, float(big), 2.0]
    assert_close(np.array([1.0, float(big)]), [1, big], kappa=1)
    for bad in ([Fraction(1, 3), None], [True, Fraction(1, 2)]):
        with pytest.raises(TypeError, match="expected an array of numbers"):
            to_numpy(bad)


def test_to_numpy_numpy_is_as_is_and_casts_integers():
    a = np.ones(3)
    assert to_numpy(a) is a
    assert to_numpy(np.arange(3)).dtype == np.float64
    assert to_numpy([1, 2]).dtype == np.float64
    assert to_numpy(2.5).shape == ()


def test_to_numpy_torch_grad_and_half():
    torch = pytest.importorskip("torch")
    t = torch.ones(3, requires_grad=True) * 2
    np.testing.assert_array_equal(to_numpy(t), [2.0, 2.0, 2.0])
    assert to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert to_numpy(torch.ones(2, dtype=torch.float16)).dtype == np.float32


def test_to_numpy_and_assert_close_of_ml_dtypes_bfloat16():
    # JAX's bfloat16 arrays, and np.asarray of them, are ml_dtypes' bfloat16 (kind "V"):
    # float32, as PyTorch's bfloat16; they were refused as "not an array of numbers".
    ml_dtypes = pytest.importorskip("ml_dtypes")
    d = np.linspace(1, 2, 20)
    b = d.astype(ml_dtypes.bfloat16)
    out = to_numpy(b)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, b.astype(np.float32))
    assert_close(b, d)  # at bfloat16's precision
    with pytest.raises(AssertionError, match="bfloat16"):
        assert_close((d + 0.5).astype(ml_dtypes.bfloat16), d)


# -- assert_close -------------------------------------------------------------------------


def test_assert_close_passes_on_the_library_result(xp_device, dtype, rng):
    m, d, damp = 6, 25, 1e-2
    G = _grads(rng, m, d)
    x = rng.standard_normal(d)
    if dtype == "float32":
        G, x = G.astype(np.float32).astype(np.float64), x.astype(np.float32).astype(np.float64)
    so = SpectralOracle(G, damp)
    op = StaticIHVP(xp_device.asarray(G, dtype), damp=damp)
    y = op.matmat(xp_device.asarray(x[:, None], dtype))
    assert_close(y, so.matvec(x)[:, None], kappa=so.kappa)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize(
    "mistake",
    ["damp+1%", "damp*10", "missing 1/m", "permuted coordinates", "dropped gradient", "sign"],
)
def test_assert_close_fails_on_real_errors(rng, dtype_name, mistake):
    m, d, damp = 8, 30, 0.05
    G = _grads(rng, m, d)
    x = rng.standard_normal(d)
    npdt = np.dtype(dtype_name)
    G = G.astype(npdt).astype(np.float64)
    x = x.astype(npdt).astype(np.float64)
    so = SpectralOracle(G, damp)
    kappa = so.kappa
    assert 10 < kappa < 1e3
    right = StaticIHVP(G.astype(npdt), damp=damp).matmat(x.astype(npdt)[:, None])[:, 0]
    assert_close(right, so.matvec(x), kappa=kappa)
    wrong = {
        "damp+1%": lambda: SpectralOracle(G, damp * 1.01).matvec(x),
        "damp*10": lambda: SpectralOracle(G, damp * 10).matvec(x),
        "missing 1/m": lambda: np.linalg.solve(damp * np.eye(d) + G.T @ G, x),
        "permuted coordinates": lambda: dense_inverse(G[:, ::-1], damp) @ x,
        "dropped gradient": lambda: SpectralOracle(G[1:], damp).matvec(x),
        "sign": lambda: np.linalg.solve(damp * np.eye(d) - G.T @ G / m, x),
    }[mistake]().astype(npdt)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(wrong, so.matvec(x), kappa=kappa)


def test_assert_close_at_kappa_one_catches_what_kappa_lets_through(rng):
    # The Notes: with kappa = cond(F) = 1e4 a float32 comparison passes a damping 1 % off
    # (tolerance 12 %); the library's float32 products are exact to a few eps32 at any
    # kappa up to about 1e6, so kappa=1 against the extended-precision oracle passes them
    # and fails a damping 0.1 % off (a random vector's product is about x / damp).
    m, d = 8, 400
    G = rng.standard_normal((m, d)).astype(np.float32)
    G64 = G.astype(np.float64)
    damp = float(np.linalg.norm(G64, 2) ** 2 / (m * (1e4 - 1)))
    kappa = condition_number(G64, damp)
    x = rng.standard_normal(d).astype(np.float32)
    want = extended_precision_inverse(G64, damp, x.astype(np.float64))
    wrong = StaticIHVP(G, damp=1.01 * damp) @ x
    assert_close(wrong, want, kappa=kappa)  # lets it through, as the Notes say
    assert_close(StaticIHVP(G, damp=damp) @ x, want)
    for damping in (1.001 * damp, 0.999 * damp):
        with pytest.raises(AssertionError, match="relative error"):
            assert_close(StaticIHVP(G, damp=damping) @ x, want)


def test_assert_close_fails_on_missing_1_over_m_near_kappa_one(rng):
    # Huge damping: kappa - 1 = 1e-6, a missing 1/m changes F^{-1} x by ~ (m - 1) 1e-6.
    m, d = 4, 10
    G = _grads(rng, m, d)
    damp = np.linalg.eigvalsh(G @ G.T)[-1] / m * 1e6
    so = SpectralOracle(G, damp)
    x = rng.standard_normal(d)
    wrong = np.linalg.solve(damp * np.eye(d) + G.T @ G, x)
    with pytest.raises(AssertionError):
        assert_close(wrong, so.matvec(x), kappa=so.kappa)


def test_assert_close_message_and_shapes():
    a = np.ones(4)
    with pytest.raises(AssertionError) as info:
        assert_close(a * (1 + 1e-6), a, kappa=3.0, err_msg="context here")
    msg = str(info.value)
    for word in ("context here", "relative error", "tolerance", "kappa 3", "float64"):
        assert word in msg
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close(np.ones((4, 1)), np.ones(4))
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(np.ones(2), np.array([1.0, np.inf]))


def test_assert_close_tolerance_scales_with_eps_kappa_factor_atol():
    d = np.ones(100)
    rel = 50 * EPS64  # the error below is rel * ||d||
    a = d + rel
    assert_close(a, d)  # 50 < DEFAULT_FACTOR
    with pytest.raises(AssertionError):
        assert_close(a, d, factor=10)
    assert_close(a, d, factor=10, kappa=10)
    # The dtype decides eps: the same error passes as float32 (by the dtype argument).
    big = d + 1e-6
    with pytest.raises(AssertionError):
        assert_close(big, d)
    assert_close(big, d, dtype="float32")
    assert_close(big.astype(np.float32), d)
    # atol for zero references.
    assert_close(np.zeros(3), np.zeros(3))
    with pytest.raises(AssertionError):
        assert_close(np.full(3, 1e-300), np.zeros(3))
    assert_close(np.full(3, 1e-12), np.zeros(3), atol=1e-11)
    assert DEFAULT_FACTOR == 100.0


def test_assert_close_refuses_a_slack_that_cannot_fail_or_pass():
    # Regression: kappa or atol = inf passed any arrays (a test that cannot fail), NaN or
    # a negative value failed equal ones, and a complex desired lost its imaginary part.
    a = np.ones(3)
    for name in ("kappa", "factor", "atol"):
        for bad in (math.inf, math.nan, -1.0):
            with pytest.raises(ValueError, match=rf"{name} must be finite and >= 0"):
                assert_close(a, a, **{name: bad})
        with pytest.raises(TypeError, match=rf"{name} must be a real number"):
            assert_close(a, a, **{name: True})
    with pytest.raises(TypeError, match="complex128"):
        assert_close(a, a + 1j)
    assert_close(a, a, kappa=np.array(2.0), atol=0)  # a 0-d array is a number
    for damp in (0.0, -1.0):
        with pytest.raises(ValueError, match="damp must be finite and > 0"):
            condition_number(np.ones((2, 3)), damp)


def test_oracles_that_divide_by_damp_check_it_and_x():
    # Regression: extended_precision_inverse took a 2-D or short x to a deep broadcasting
    # error and damp=0 to a division by zero; a string damping was read with float().
    G = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(3,\), got \(3, 2\)"):
        extended_precision_inverse(G, 0.5, np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"x must have shape \(3,\), got \(2,\)"):
        extended_precision_inverse(G, 0.5, np.ones(2))
    with pytest.raises(ValueError, match="damp must be finite and > 0"):
        extended_precision_inverse(G, 0.0, np.ones(3))
    for call in (SpectralOracle, condition_number):
        with pytest.raises(TypeError, match="damp must be a real number"):
            call(G, "0.5")


def test_complex_arrays_are_refused_not_compared_by_their_real_part():
    # Regression: with dtype= given, a complex actual was cast to float64 (NumPy's
    # ComplexWarning only) and passed on its real part; the oracles likewise dropped the
    # imaginary part of a complex G or x and returned the result for its real part.
    a = np.ones(3)
    with pytest.raises(TypeError, match="actual is complex128"):
        assert_close(a + 1j, a, dtype="float64")
    G = np.ones((2, 3))
    so = SpectralOracle(G, 0.5)
    calls = [
        ("G", lambda: SpectralOracle(G + 1j, 0.5)),
        ("G", lambda: condition_number(G + 1j, 0.5)),
        ("G", lambda: empirical_fisher_dense(G + 1j, 0.5)),
        ("G", lambda: paper_static(G + 1j, 0.5)),
        ("x", lambda: so.matvec(a + 1j)),
        ("X", lambda: so.matmat(a[:, None] + 1j)),
        ("x", lambda: extended_precision_inverse(G, 0.5, a + 1j)),
        ("x", lambda: paper_static(G, 0.5).matvec(a + 1j)),
        ("x", lambda: paper_dynamic(G, 0.5).matvec(a + 1j)),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=rf"^{name} must be real .*complex128"):
            call()


def test_assert_close_refuses_a_relative_tolerance_of_one_or_more():
    # Regression: at factor * eps * kappa >= 1 the tolerance was ||desired|| or more, so a
    # zero result passed (float32 at kappa 1e5, bfloat16 at kappa 13): a check that cannot
    # tell a wrong operator from a right one.
    d = np.linspace(1.0, 2.0, 8)
    zero32 = np.zeros(8, dtype=np.float32)
    kappa32 = 1.0 / (DEFAULT_FACTOR * float(np.finfo(np.float32).eps))
    with pytest.raises(AssertionError):
        assert_close(zero32, d, kappa=0.99 * kappa32)
    for kappa, dtype in ((kappa32, None), (1e14, "float64"), (13.0, "bfloat16")):
        with pytest.raises(ValueError, match=r"factor \* eps \* kappa = .* is 1 or more"):
            assert_close(zero32, d, kappa=kappa, dtype=dtype)
    with pytest.raises(ValueError, match="is 1 or more"):
        assert_close(d, d, factor=2 / float(np.finfo(np.float64).eps))


def test_assert_close_refuses_a_string_or_huge_int_slack():
    # Regression: float() parsed a string ("1e-3" as atol, read as a number) and an int
    # beyond float64's range raised a bare OverflowError.
    a = np.ones(3)
    for name in ("kappa", "factor", "atol"):
        for text in ("10", b"10"):
            with pytest.raises(TypeError, match=rf"{name} must be a real number"):
                assert_close(a, a, **{name: text})
        with pytest.raises(ValueError, match=rf"{name} must be finite and >= 0"):
            assert_close(a, a, **{name: 10**400})


def test_assert_close_dtypes_of_other_libraries(xp_device):
    d = np.ones(10)
    x32 = xp_device.asarray(d + 1e-6, "float32")
    assert_close(x32, d)  # float32 eps
    x64 = xp_device.asarray(d + 1e-6, "float64")
    with pytest.raises(AssertionError, match="float64"):
        assert_close(x64, d)


def test_assert_close_bfloat16():
    torch = pytest.importorskip("torch")
    d = np.linspace(1, 2, 20)
    t = torch.asarray(d, dtype=torch.bfloat16)
    assert_close(t, d)
    with pytest.raises(AssertionError, match="bfloat16"):
        assert_close(t + 0.5, d)
    with pytest.raises(TypeError, match="floating"):
        assert_close(np.arange(3), np.arange(3.0), dtype="int64")


# -- Hypothesis strategies -------------------------------------------------------------------

FIND = settings(database=None, max_examples=2000, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@settings(max_examples=40)
@given(data=st.data())
def test_problems_are_valid(dtype_name, data):
    p = data.draw(problems(dtype=dtype_name, max_m=5, max_d=12))
    assert isinstance(p, Problem)
    m, d = p.G.shape
    assert 1 <= m <= 5 and 1 <= d <= 12
    assert p.x.shape == (d,)
    assert p.G.dtype == np.float64 and p.x.dtype == np.float64
    assert np.all(np.isfinite(p.G)) and np.all(np.isfinite(p.x))
    assert np.isfinite(p.damp) and p.damp > 0
    assert p.block_size is None or 1 <= p.block_size <= d + 2
    assert p.kappa <= 1 + (1e4 if dtype_name == "float32" else 1e6) * (1 + 1e-9)
    if dtype_name == "float32":
        assert np.array_equal(p.G.astype(np.float32).astype(np.float64), p.G)
        assert np.array_equal(p.x.astype(np.float32).astype(np.float64), p.x)
    assert f"m={m}" in p.description and repr(p).startswith("Problem(")
    assert not p.G.flags.writeable


@pytest.mark.parametrize(
    "condition",
    [
        lambda p: p.m == 1,
        lambda p: p.d == 1,
        lambda p: p.d < p.m,
        lambda p: p.m > 2 and np.all(p.G == p.G[0]),
        lambda p: p.m > 2 and len({r.tobytes() for r in p.G}) not in (1, p.m),
        lambda p: p.block_size is not None and p.d % p.block_size != 0 and p.block_size < p.d,
        lambda p: p.block_size is not None and p.block_size <= p.m < p.d,
        lambda p: not np.any(p.x),
        lambda p: (
            np.any(p.x)
            and np.linalg.matrix_rank(np.vstack([p.G, p.x])) == np.linalg.matrix_rank(p.G) < p.d
        ),
        lambda p: p.kappa > 1e5,
        lambda p: p.kappa < 1 + 1e-6,
        lambda p: np.ptp(np.log10(np.linalg.norm(p.G, axis=1))) > 3,
    ],
    ids=[
        "m=1",
        "d=1",
        "d<m",
        "identical",
        "duplicated",
        "ragged",
        "dense-blocks",
        "x=0",
        "x-in-span",
        "tiny-damp",
        "huge-damp",
        "scaled-rows",
    ],
)
def test_problems_cover_the_hard_cases(condition):
    find(problems(), condition, settings=FIND)


def test_problems_float32_bounds_kappa():
    with pytest.raises(NoSuchExample):
        find(
            problems(dtype="float32"),
            lambda p: p.kappa > 1.0001e4 + 1,
            settings=settings(FIND, max_examples=300),
        )


def test_problem_as_arrays(xp_device, dtype):
    p = Problem(G=np.ones((2, 3)), damp=1.0, x=np.arange(3.0), block_size=None, description="test")
    G, x = p.as_arrays(xp_device.xp, dtype, device=xp_device.device)
    assert G.dtype == xp_device.dtype(dtype) and x.dtype == xp_device.dtype(dtype)
    assert tuple(G.shape) == (2, 3) and tuple(x.shape) == (3,)
    np.testing.assert_array_equal(to_numpy(x), [0, 1, 2])
    G2, _ = p.as_arrays(xp_device.xp, xp_device.dtype(dtype), device=xp_device.device)
    if xp_device.mutable:
        G2[0, 0] = 5.0  # a copy: the problem is unchanged
        assert p.G[0, 0] == 1.0
    assert isinstance(p.oracle(), SpectralOracle)


def test_problems_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        problems(dtype="float16")
    with pytest.raises(ValueError):
        problems(max_m=0)


@settings(max_examples=20)
@given(data=st.data())
def test_problems_draw_their_shapes_from_shapes(data):
    shapes = [(1, 1), (3, 17), (6, 2)]
    p = data.draw(problems(dtype="float32", shapes=shapes), label="problem")
    assert (p.m, p.d) in shapes
    assert p.G.shape == (p.m, p.d) and p.x.shape == (p.d,)
    assert p.block_size is None or 1 <= p.block_size <= p.d + 2
    assert np.all(p.G.astype(np.float32) == p.G) and p.damp > 0


def test_problems_draw_every_one_of_shapes():
    shapes = [(2, 5), (4, 1), (np.int64(1), 3)]
    for m, d in shapes:
        find(
            problems(shapes=shapes),
            lambda p, m=m, d=d: (p.m, p.d) == (m, d),
            settings=FIND,
        )


def test_problems_refuses_bad_shapes():
    for shapes in ([], (5, 3), [(5, 3, 1)], "ab", [[2]], {(1, 2)}):
        with pytest.raises(TypeError, match=r"shapes must be a non-empty sequence of \(m, d\)"):
            problems(shapes=shapes)
    with pytest.raises(ValueError, match=r"shapes\[1\]\[1\] must be >= 1"):
        problems(shapes=[(1, 2), (3, 0)])
    with pytest.raises(TypeError, match=r"shapes\[0\]\[0\] must be an int"):
        problems(shapes=[(2.0, 2)])


def test_import_without_hypothesis():
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "sys.modules['hypothesis.strategies'] = None\n"
        "import mfac_core.testing as t\n"
        "t.SpectralOracle([[1.0, 2.0]], 1.0)\n"
        "try:\n"
        "    t.problems()\n"
        "except ImportError as e:\n"
        "    assert 'Hypothesis' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_extended_precision_inverse_against_the_dense_inverse(rng):
    G = rng.standard_normal((5, 12))
    x = rng.standard_normal(12)
    for damp in (10.0, 0.1, 1e-3):
        want = dense_inverse(G, damp) @ x
        got = extended_precision_inverse(G, damp, x)
        kappa = condition_number(G, damp)
        assert np.linalg.norm(got - want) <= 100 * np.finfo(
            np.float64
        ).eps * kappa * np.linalg.norm(want)
    # Where float64 loses digits (x = the gradients' mean, kappa ~ 1e9), it agrees with
    # the spectral oracle to the oracle's own accuracy, not better: both are references,
    # the extended one for the cancelling directions.
    damp = float(np.linalg.norm(G, 2)) ** 2 / (5 * 1e9)
    x = G.mean(axis=0)
    got = extended_precision_inverse(G, damp, x)
    want = SpectralOracle(G, damp).matvec(x)
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_extended_precision_inverse_does_not_lose_digits_with_the_coordinates():
    """Regression: the reference summed G G^T and G x one term after the other in
    longdouble, whose roundings lean one way for gradients with a shared mean: two float32
    gradients at d = 1e6 and kappa = 1e7 left it 24 eps(float32) off (180 at d = 4e6), more
    than the operators it judged. Against a reference whose long sums are exact (math.fsum,
    the float64 products of float32 items being exact) it is now within 0.01."""
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("numpy.longdouble is float64 here: no reference beyond float64")
    from fractions import Fraction

    LD, d = np.longdouble, 1_000_000
    rng = np.random.default_rng(2)
    a = np.array([1.2616, 1.2985], np.float32)
    G = (a[:, None] + np.float32(2.0**-9) * rng.choice([-1, 1], size=(2, d))).astype(np.float32)
    G64 = G.astype(np.float64)
    x64 = G.mean(axis=0).astype(np.float64)
    damp = float(np.linalg.norm(G64, 2) ** 2 / (2 * (1e7 - 1)))

    def exact_sum(terms: np.ndarray) -> Fraction:
        hi = math.fsum(terms)  # the sum rounded once, then what the rounding left
        return Fraction(hi) + Fraction(math.fsum(np.append(terms, -hi)))

    # Woodbury's capacitance system, solved exactly (a solve in longdouble is not enough:
    # Cramer's rule there was 0.13 eps(float32) off at this kappa).
    C = [
        [exact_sum(G64[i] * G64[j]) + 2 * Fraction(damp) * (i == j) for j in range(2)]
        for i in range(2)
    ]
    p = [exact_sum(row * x64) for row in G64]
    det = C[0][0] * C[1][1] - C[0][1] * C[1][0]
    z = [(C[1][1] * p[0] - C[0][1] * p[1]) / det, (C[0][0] * p[1] - C[1][0] * p[0]) / det]
    zl = np.array([LD(v.numerator) / LD(v.denominator) for v in z])
    want = ((x64.astype(LD) - G64.T.astype(LD) @ zl) / LD(damp)).astype(np.float64)
    got = extended_precision_inverse(G64, damp, x64)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 0.01 * np.finfo(np.float32).eps, err / np.finfo(np.float32).eps


def _exact_solve(G: np.ndarray, damp: float, x: np.ndarray) -> np.ndarray:
    """``F^{-1} x`` in exact rational arithmetic, rounded once to float64 (tiny d only)."""
    from fractions import Fraction

    m, d = G.shape
    F = [
        [
            Fraction(damp) * (i == j)
            + sum(Fraction(G[k, i]) * Fraction(G[k, j]) for k in range(m)) / m
            for j in range(d)
        ]
        for i in range(d)
    ]
    b = [Fraction(v) for v in x]
    for k in range(d):
        for i in range(k + 1, d):
            f = F[i][k] / F[k][k]
            F[i] = [F[i][j] - f * F[k][j] for j in range(d)]
            b[i] -= f * b[k]
    z = [Fraction(0)] * d
    for k in range(d - 1, -1, -1):
        z[k] = (b[k] - sum(F[k][j] * z[j] for j in range(k + 1, d))) / F[k][k]
    return np.array([float(v) for v in z])


@pytest.mark.parametrize("damp", [1.0, 2.0**-30, 2.0**-53, 1e-16, 2.0**-70])
@pytest.mark.parametrize(
    ("m", "d", "block_size"), [(4, 3, None), (5, 5, None), (3, 6, 2), (2, 7, 3)]
)
def test_extended_precision_inverse_exact_at_tiny_damping(m, d, block_size, damp):
    # Regression: Woodbury's (x - G^T C^{-1} G x) / damp cancelled for blocks of B <= m
    # coordinates at a tiny damping (relative error 5e-4 at m = 4, d = 3, damp = 2**-53, NaN
    # at 2**-70, though kappa ~ 10); such blocks are now solved with F_b itself. Against an
    # exact rational reference on integer-valued gradients.
    rng = np.random.default_rng(m * 100 + d)
    G = rng.integers(-3, 4, size=(m, d)).astype(np.float64)
    x = rng.integers(-3, 4, size=d).astype(np.float64)
    b = block_size or d
    want = np.concatenate(
        [_exact_solve(G[:, s : s + b], damp, x[s : s + b]) for s in range(0, d, b)]
    )
    kw = {} if block_size is None else {"block_size": block_size}
    got = extended_precision_inverse(G, damp, x, **kw)
    kappa = condition_number(G, damp, block_size=block_size)
    eps_ld = float(np.finfo(np.longdouble).eps)
    # Rounded once to float64, beside the extended computation's own eps(longdouble) kappa.
    assert np.linalg.norm(got - want) <= 10 * (EPS64 + eps_ld * kappa) * np.linalg.norm(want)


def test_extended_precision_inverse_refuses_a_system_singular_in_extended_precision():
    # Regression: a zero pivot divided 0 by 0 into a NaN result, with a RuntimeWarning only.
    G = np.ones((2, 2))
    with pytest.raises(np.linalg.LinAlgError, match="singular in extended precision"):
        extended_precision_inverse(G, 1e-30, np.array([1.0, -1.0]))
    with pytest.raises(np.linalg.LinAlgError, match="singular in extended precision"):
        extended_precision_inverse(np.ones((2, 5)), 1e-30, np.arange(5.0))
    with pytest.raises(TypeError, match="block_size"):
        extended_precision_inverse(G, 1.0, np.ones(2), block_size=1.5)


@pytest.mark.parametrize("block_size", [None, 2])
def test_spectral_oracle_kappa_is_the_condition_number_at_a_tiny_damping(block_size):
    # Regression: for blocks of B <= m coordinates SpectralOracle.kappa was f[-1] / f[0] of
    # F_b's eigenvalues; with identical gradients at damp 1e-17 the smallest (damp) was lost
    # in rounding and came out <= 0, and kappa was 1 where condition_number gives 4e16.
    g = np.array([[1.0, -0.5, 1.25, 0.75]])
    G = np.repeat(g, 6, axis=0)
    damp = 1e-17
    kappa = SpectralOracle(G, damp, block_size=block_size).kappa
    assert kappa == condition_number(G, damp, block_size=block_size)
    # Each block's null space has the eigenvalue damp, its range damp + |g_b|^2.
    b = block_size or 4
    want = max(1 + float(g[0, s : s + b] @ g[0, s : s + b]) / damp for s in range(0, 4, b))
    assert abs(kappa - want) <= 1e-6 * want
    # F(s G, s^2 damp) = s^2 F(G, damp): the same kappa, where G_b^T G_b overflowed (inf).
    scaled = condition_number(1e160 * G, 1e160 * (1e160 * damp), block_size=block_size)
    assert abs(scaled - want) <= 1e-6 * want


def test_oracles_refuse_non_finite_gradients():
    # Regression: NaN gradients gave condition_number 1.0 (max(1.0, nan)), a NaN dense
    # inverse and SpectralOracle, and a "singular" extended-precision solve.
    x = np.ones(2)
    calls = {
        "empirical_fisher_dense": lambda G: empirical_fisher_dense(G, 1.0),
        "dense_inverse": lambda G: dense_inverse(G, 1.0),
        "condition_number": lambda G: condition_number(G, 1.0),
        "SpectralOracle": lambda G: SpectralOracle(G, 1.0),
        "extended_precision_inverse": lambda G: extended_precision_inverse(G, 1.0, x),
        "paper_static": lambda G: paper_static(G, 1.0),
        "paper_dynamic": lambda G: paper_dynamic(G, 1.0),
    }
    for name, call in calls.items():
        for bad, shown in ((math.nan, "nan"), (-math.inf, "-inf")):
            G = np.ones((3, 2))
            G[1, 1] = bad
            with pytest.raises(
                ValueError, match=rf"G must not contain NaN or infinity: G\[1, 1\] is {shown}"
            ):
                call(G)
            assert np.isnan(G[1, 1]) if math.isnan(bad) else G[1, 1] == bad, name  # untouched


def test_paper_oracles_check_damp_and_x():
    # Regression: the paper's transcriptions read damp with float() (a string was taken,
    # NaN and 0 gave NaN references) and took a short or 2-D x to NumPy's errors deep in
    # their loops ("setting an array element with a sequence").
    G = np.arange(1.0, 7.0).reshape(2, 3)
    for make in (paper_static, paper_dynamic):
        with pytest.raises(TypeError, match="damp must be a real number"):
            make(G, "1")
        for bad in (math.nan, 0.0, -1.0):
            with pytest.raises(ValueError, match="damp must be finite and > 0"):
                make(G, bad)
        oracle = make(G, 0.5)
        for x in (np.ones(2), np.ones((3, 2)), np.ones((1, 3))):
            with pytest.raises(
                ValueError, match=re.escape(f"x must have shape (3,), got {x.shape}")
            ):
                oracle.matvec(x)
        assert_close(oracle.matvec([1.0, -1.0, 2.0]), dense_inverse(G, 0.5) @ [1.0, -1.0, 2.0])


def test_problems_refuses_bounds_that_are_not_ints():
    # Regression: max_m=2.5 reached Hypothesis's InvalidArgument only when drawing, True
    # was taken as 1, and block_sizes="no" drew block sizes.
    for kw in ({"max_m": 2.5}, {"max_d": True}, {"max_m": "8"}):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be an int"):
            problems(**kw)
    with pytest.raises(TypeError, match="block_sizes must be True or False"):
        problems(block_sizes="no")
    with pytest.raises(ValueError, match="max_d must be >= 1"):
        problems(max_d=0)
    problems(max_m=np.int64(3), block_sizes=np.bool_(False))  # NumPy's ints and bools are


@pytest.mark.parametrize("damp", [2.0**-30, 2.0**-45])
def test_spectral_oracle_keeps_a_generic_vector_accurate_in_rank_deficient_small_blocks(damp):
    # Regression: a block of B <= m coordinates took F_b's eigenvalues from eigh, whose
    # smallest (damp, on the null space of rank-deficient gradients) carries an absolute
    # error eps * ||F_b||: a generic vector's result, dominated by x's null-space part
    # times 1 / damp, lost log10(kappa) digits (relative error 1e-3 at damp 2**-40, kappa
    # 8e12), and at 2**-60 the eigenvalue came out <= 0 (a wrong sign, or a division by
    # zero). The eigenvalues are now damp + |G_b q|^2 / m. The vector has a null-space part, so the
    # result is well conditioned in it: eps-level, against an exact rational reference.
    G = np.array([[1, 2, 3], [2, -1, 1], [0, 3, 3], [-2, 1, -1], [1, 1, 2]], dtype=np.float64)
    x = np.array([3.0, -1.0, 1.0])  # its part along the null vector (1, 1, -1) is 1/3
    want = _exact_solve(G, damp, x)
    for block_size in (None, 3):
        got = SpectralOracle(G, damp, block_size=block_size).matvec(x)
        assert np.linalg.norm(got - want) <= 20 * EPS64 * np.linalg.norm(want)
