"""Tests of the SciPy export (mfac_core.scipy): solvers and eigensolvers work unchanged."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import Dense

from mfac_core import DynamicIHVP, EmpiricalFisher, SpectralIHVP, StaticIHVP
from mfac_core.scipy import to_scipy
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    empirical_fisher_dense,
)


@pytest.fixture
def problem(rng):
    m, d = 6, 40
    G = rng.standard_normal((m, d))
    damp = 0.05
    return G, damp


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_to_scipy_is_a_scipy_operator(problem, dtype, rng):
    G, damp = problem
    G = G.astype(dtype)
    for op in (
        StaticIHVP(G, damp=damp),
        EmpiricalFisher(G, damp=damp, block_size=7),
        StaticIHVP(G, damp=damp) @ EmpiricalFisher(G, damp=damp),
    ):
        sop = op.to_scipy()
        assert isinstance(sop, sla.LinearOperator)
        assert sop.shape == op.shape
        assert sop.dtype == np.dtype(dtype)
        x = rng.standard_normal(40).astype(dtype)
        X = rng.standard_normal((40, 3)).astype(dtype)
        y = sop.matvec(x)
        assert y.dtype == np.dtype(dtype)
        assert_close(y, op.matvec(x), factor=1)
        assert_close(sop @ X, op.matmat(X), factor=1)
        assert_close(sop.matmat(X), op.matmat(X), factor=1)
        assert_close(sop.rmatvec(x), op.rmatvec(x), factor=1)
        assert_close(sop.rmatmat(X), op.rmatmat(X), factor=1)
        assert_close(sop.H @ x, op.rmatvec(x), factor=1)
        # SciPy hands in float64 work vectors: they are cast to the operator's dtype.
        assert sop.matvec(x.astype(np.float64)).dtype == np.dtype(dtype)
    assert isinstance(to_scipy(StaticIHVP(G, damp=damp)), sla.LinearOperator)


def test_to_scipy_pickles(problem, rng):
    # SciPy users ship operators to worker processes (multiprocessing, joblib): the export
    # must pickle, and the copy must compute the same products.
    G, damp = problem
    dyn = DynamicIHVP(6, 40, damp=damp, dtype=np.float64)
    for g in G:
        dyn.update(g)
    static = StaticIHVP(G, damp=damp)
    fisher = EmpiricalFisher(G, damp=damp)
    x = rng.standard_normal(40)
    X = rng.standard_normal((40, 2))
    for op in (
        static,
        dyn,
        SpectralIHVP(G, damp=damp),
        fisher,
        static @ fisher,
        static + 2.0 * fisher,
        fisher.H,
    ):
        sop = op.to_scipy()
        copy = pickle.loads(pickle.dumps(sop))
        assert copy.shape == sop.shape and copy.dtype == sop.dtype
        np.testing.assert_array_equal(copy.matvec(x), sop.matvec(x))
        np.testing.assert_array_equal(copy.rmatmat(X), sop.rmatmat(X))
        np.testing.assert_array_equal(copy @ (x + 1j * x), sop @ (x + 1j * x))


def test_to_scipy_passes_matmat_through(problem):
    G, damp = problem
    op = StaticIHVP(G, damp=damp)
    seen = []
    real = op.matmat

    def spy(X):
        seen.append(X.shape)
        return real(X)

    op.matmat = spy
    sop = op.to_scipy()
    sop.matmat(np.ones((40, 5)))
    assert seen == [(40, 5)]  # one call with the whole block, not five matvecs


def test_to_scipy_rectangular_rmatmat(rng):
    A = rng.standard_normal((3, 5))
    sop = Dense(A).to_scipy()
    assert sop.shape == (3, 5)
    Y = rng.standard_normal((3, 2))
    assert_close(sop.rmatmat(Y), A.T @ Y)
    assert_close(sop.rmatvec(Y[:, 0]), A.T @ Y[:, 0])
    assert_close(sop.H.matmat(Y), A.T @ Y)


@pytest.mark.parametrize("backend_name", ["strict-cpu", "strict-device1", "torch"])
def test_to_scipy_refuses_other_libraries(make_backend, backend_name):
    be = make_backend(backend_name)
    op = StaticIHVP(be.asarray(np.ones((2, 4)), "float64"), damp=1.0)
    with pytest.raises(TypeError, match="NumPy-backed"):
        op.to_scipy()
    with pytest.raises(TypeError, match="NumPy-backed"):
        to_scipy(2 * op)


def test_to_scipy_refuses_non_operators():
    with pytest.raises(TypeError, match="LinearOperator"):
        to_scipy(np.eye(3))


# -- solvers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres"])
@pytest.mark.parametrize("preconditioner", [None, "exact", "blocks"])
def test_krylov_solvers(problem, rng, solver, preconditioner):
    G, damp = problem
    d = G.shape[1]
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    M = {
        None: None,
        "exact": StaticIHVP(G, damp=damp).to_scipy(),
        "blocks": StaticIHVP(G, damp=damp, block_size=7).to_scipy(),
    }[preconditioner]
    b = rng.standard_normal(d)
    kappa = condition_number(G, damp)
    x, info = getattr(sla, solver)(F, b, M=M, rtol=1e-12, maxiter=500)
    assert info == 0
    want = np.linalg.solve(empirical_fisher_dense(G, damp), b)
    # rtol 1e-12 on the residual: the error is at most kappa * 1e-12 relative.
    assert np.linalg.norm(x - want) <= 10 * kappa * 1e-12 * np.linalg.norm(want)


def test_minres_block_preconditioner_divisible_blocks(problem, rng):
    # Regression: with block_size=8 dividing d=40 (all blocks > m) StaticIHVP.matvec applied
    # the full Woodbury formula to the block W; the preconditioner was indefinite and
    # minres stopped with 'non-symmetric matrix'.
    G, damp = problem
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    M = StaticIHVP(G, damp=damp, block_size=8).to_scipy()
    _, info = sla.minres(F, rng.standard_normal(G.shape[1]), M=M, rtol=1e-12, maxiter=500)
    assert info == 0


def test_exact_preconditioner_converges_in_one_step(problem, rng):
    G, damp = problem
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    M = StaticIHVP(G, damp=damp).to_scipy()
    b = rng.standard_normal(G.shape[1])
    iters = []
    x, info = sla.cg(F, b, M=M, rtol=1e-10, callback=lambda xk: iters.append(1))
    assert info == 0
    assert len(iters) <= 2
    assert_close(x, SpectralOracle(G, damp).matvec(b), kappa=1e6)  # rtol 1e-10 of cg


# -- eigensolvers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "d"), [(5, 40), (30, 20)], ids=["d>m", "d<m"])
def test_eigsh_largest(rng, m, d):
    G = rng.standard_normal((m, d))
    damp = 0.1
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    want = np.linalg.eigvalsh(empirical_fisher_dense(G, damp))
    vals = np.sort(sla.eigsh(F, k=3, which="LA", return_eigenvectors=False))
    np.testing.assert_allclose(vals, want[-3:], rtol=1e-10)


@pytest.mark.parametrize(("m", "d"), [(5, 40), (30, 20)], ids=["d>m", "d<m"])
def test_eigsh_shift_invert_smallest(rng, m, d):
    G = rng.standard_normal((m, d))
    damp = 0.1
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    Finv = StaticIHVP(G, damp=damp).to_scipy()
    want = np.linalg.eigvalsh(empirical_fisher_dense(G, damp))
    vals = np.sort(sla.eigsh(F, k=3, sigma=0, which="LM", OPinv=Finv, return_eigenvectors=False))
    np.testing.assert_allclose(vals, want[:3], rtol=1e-10)
    if d > m:
        np.testing.assert_allclose(vals, damp, rtol=1e-10)  # the null space of G


@pytest.mark.parametrize("largest", [True, False])
def test_lobpcg(rng, largest):
    m, d, k = 30, 20, 3
    G = rng.standard_normal((m, d))
    damp = 0.1
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    M = StaticIHVP(G, damp=damp).to_scipy()
    want = np.linalg.eigvalsh(empirical_fisher_dense(G, damp))
    X0 = rng.standard_normal((d, k))
    # F^{-1} preconditions the smallest eigenvalues; it would hold back the largest.
    vals, _ = sla.lobpcg(F, X0, M=None if largest else M, largest=largest, maxiter=200, tol=1e-8)
    ref = want[-k:] if largest else want[:k]
    np.testing.assert_allclose(np.sort(vals), ref, rtol=1e-7)


def test_lobpcg_float32(rng):
    m, d, k = 30, 20, 2
    G = rng.standard_normal((m, d)).astype(np.float32)
    damp = 0.1
    F = EmpiricalFisher(G, damp=damp).to_scipy()
    M = StaticIHVP(G, damp=damp).to_scipy()
    want = np.linalg.eigvalsh(empirical_fisher_dense(G.astype(np.float64), damp))
    vals, _ = sla.lobpcg(
        F, rng.standard_normal((d, k)).astype(np.float32), M=M, largest=False, maxiter=200, tol=1e-4
    )
    np.testing.assert_allclose(np.sort(vals), want[:k], rtol=1e-4)


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_solver_vector_beyond_float32_is_refused_as_such(rng, check_finite):
    # Regression: SciPy's float64 vectors are cast to a float32 operator's dtype; an
    # entry beyond float32's range became infinity (NumPy's warning only), refused as
    # "x must not contain NaN or infinity: x[3] is inf", which x did not hold, or with
    # check_finite=False turned into a product of infinities.
    G = rng.standard_normal((3, 8)).astype(np.float32)
    sop = StaticIHVP(G, damp=0.5, check_finite=check_finite).to_scipy()
    x = np.ones(8)
    x[3] = -1e300
    Z = np.ones((8, 2)) + 1j * np.ones((8, 2))
    Z[5, 1] = 1 + 1e40j
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning of the cast either
        with pytest.raises(ValueError, match=r"^x holds -1e\+300 at \[3\], beyond .* float32"):
            sop.matvec(x)
        with pytest.raises(ValueError, match=r"^x holds -1e\+300 at \[3, 0\]"):
            sop.matmat(x[:, None])
        with pytest.raises(ValueError, match=r"^the imaginary part of x holds 1e\+40 at \[5, 1\]"):
            sop.matmat(Z)
        # Within float32's range (and the float64 operator's) nothing changes.
        x[3] = -1e30
        assert_close(sop.matvec(x), StaticIHVP(G, damp=0.5).matvec(x.astype(np.float32)))
        big = StaticIHVP(G.astype(np.float64), damp=0.5).to_scipy()
        assert np.all(np.isfinite(big.matvec(np.full(8, 1e300))))


def test_a_solver_vector_is_cast_without_a_second_read(rng, monkeypatch):
    # Regression: the float64 vector cast to a float32 operator's dtype was then read
    # whole again (np.isfinite) on every product, to find an overflow the cast reports.
    G = rng.standard_normal((3, 8)).astype(np.float32)
    sop = StaticIHVP(G, damp=0.5, check_finite=False).to_scipy()
    x = np.linspace(-1.0, 1.0, 8)
    want = sop.matvec(x)
    reads = []
    isfinite = np.isfinite

    def counted(*args, **kwargs):
        reads.append(args[0].shape)
        return isfinite(*args, **kwargs)

    monkeypatch.setattr(np, "isfinite", counted)
    got = sop.matvec(x)
    monkeypatch.undo()
    assert reads == []
    assert_close(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_complex_vectors_act_on_both_parts(rng, dtype):
    # Regression: a complex vector lost its imaginary part (with only a NumPy warning).
    G = rng.standard_normal((4, 30)).astype(dtype)
    sop = StaticIHVP(G, damp=0.5).to_scipy()
    re, im = rng.standard_normal((2, 30, 3))
    Z = re + 1j * im
    r, i = re.astype(dtype), im.astype(dtype)
    for got, want in (
        (sop.matmat(Z), sop.matmat(r) + 1j * sop.matmat(i)),
        (sop @ Z, sop.matmat(r) + 1j * sop.matmat(i)),
        (sop.matvec(Z[:, 0]), sop.matvec(r[:, 0]) + 1j * sop.matvec(i[:, 0])),
        (sop.rmatvec(Z[:, 0]), sop.rmatvec(r[:, 0]) + 1j * sop.rmatvec(i[:, 0])),
    ):
        assert np.iscomplexobj(got)
        np.testing.assert_array_equal(got, want)
    F = EmpiricalFisher(G.astype(np.float64), damp=0.5).to_scipy()
    b = Z[:, 0].astype(np.complex128)
    x, info = sla.gmres(F, b, rtol=1e-10)  # a complex solve through the real operator
    assert info == 0 and np.iscomplexobj(x)
    assert np.linalg.norm(F @ x - b) <= 1e-8 * np.linalg.norm(b)
