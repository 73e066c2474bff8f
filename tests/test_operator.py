"""Tests of the array-API LinearOperator base class (mfac_core._operator)."""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction
from typing import Any

import array_api_compat
import numpy as np
import pytest
from conftest import Dense, check_space, rounded

from mfac_core import (
    DynamicIHVP,
    EmpiricalFisher,
    LinearOperator,
    SpectralIHVP,
    StaticIHVP,
    WindowOptions,
)
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    empirical_fisher_dense,
    to_numpy,
)


class WrongAdjoint(Dense):
    """An operator whose adjoint is wrong (``A`` instead of ``A^T``)."""

    def _rmatmat(self, X: Any) -> Any:
        return self.A @ X


@pytest.fixture
def fisher_setup(xp_device, dtype, rng):
    m, d, damp = 4, 11, 0.3
    G = rounded(rng.standard_normal((m, d)), dtype)
    Gx = xp_device.asarray(G, dtype)
    return {
        "G": G,
        "damp": damp,
        "d": d,
        "backend": xp_device,
        "dtype": dtype,
        "F": EmpiricalFisher(Gx, damp=damp),
        "Finv": StaticIHVP(Gx, damp=damp),
        "kappa": condition_number(G, damp),
    }


@pytest.fixture
def dense_setup(xp_device, dtype, rng):
    A = rounded(rng.standard_normal((3, 5)), dtype)
    B = rounded(rng.standard_normal((5, 4)), dtype)
    return {
        "A": A,
        "B": B,
        "backend": xp_device,
        "dtype": dtype,
        "opA": Dense(xp_device.asarray(A, dtype)),
        "opB": Dense(xp_device.asarray(B, dtype)),
    }


# -- attributes -----------------------------------------------------------------------------


def test_attributes(fisher_setup):
    s = fisher_setup
    be, dt, d = s["backend"], s["dtype"], s["d"]
    for op in (s["F"], s["Finv"]):
        assert op.shape == (d, d)
        assert op.ndim == 2
        assert op.dtype == be.dtype(dt)
        assert op.device == be.device
        assert op.xp is be.xp
        r = repr(op)
        assert type(op).__name__ in r and f"{d}x{d}" in r and "dtype=" in r
        assert (
            "namespace="
            + {"numpy": "numpy", "torch": "torch", "jax": "jax"}.get(be.name, "array_api_strict")
            in r
        )


def test_reprs_show_what_defines_each_operator_in_one_style():
    """Static, Fisher, spectral and window reprs: the same items in the same order.

    StaticIHVP, EmpiricalFisher and DynamicIHVP showed neither damping, gradient count,
    block size nor storage dtype (two operators at different dampings printed alike),
    and a float16 G's float32 operators printed ``dtype=<class 'numpy.float32'>``.
    """
    G = np.random.default_rng(0).standard_normal((3, 8))
    tail = "dtype=float64, namespace=numpy, device='cpu'>"
    assert repr(StaticIHVP(G, damp=0.5)) == f"<8x8 StaticIHVP with num_grads=3, damp=0.5, {tail}"
    assert repr(StaticIHVP(G, damp=1e-3, block_size=4, refine=1)) == (
        f"<8x8 StaticIHVP with num_grads=3, damp=0.001, block_size=4, refine=1, {tail}"
    )
    assert repr(EmpiricalFisher(G, damp=0.5, block_size=8)) == (
        f"<8x8 EmpiricalFisher with num_grads=3, damp=0.5, {tail}"
    )
    window = DynamicIHVP(4, 8, damp=0.25, dtype="float64")
    window.update(G[0])
    assert repr(window) == f"<8x8 DynamicIHVP with num_grads=4, len=1, damp=0.25, {tail}"
    half = "storage_dtype=float16, dtype=float32, namespace=numpy, device='cpu'>"
    zero = DynamicIHVP(4, 8, damp=0.25, dtype="float16", options=WindowOptions(zero_init=True))
    assert repr(zero) == (
        "<8x8 DynamicIHVP with num_grads=4, len=4, damp=0.25, storage_dtype=float16, "
        "zero_init=True, dtype=float32, namespace=numpy, device='cpu'>"
    )
    G16 = G.astype(np.float16)
    assert repr(StaticIHVP(G16, damp=0.5)).endswith(f"num_grads=3, damp=0.5, {half}")
    spectral = SpectralIHVP(G16, damp=0.5, block_size=4)
    assert repr(spectral).endswith(f"power=-1, num_grads=3, damp=0.5, block_size=4, {half}")


def test_base_class_shape_validation():
    xp = array_api_compat.array_namespace(np.ones(1))
    with pytest.raises(ValueError, match="shape"):
        LinearOperator(shape=(3,), dtype=np.float64, xp=xp, device="cpu")
    with pytest.raises(ValueError, match="shape"):
        LinearOperator(shape=(3, -1), dtype=np.float64, xp=xp, device="cpu")
    # Regression: a bool passed as an int and NumPy's integers were refused (SciPy's
    # LinearOperator takes them); the shape holds Python ints.
    with pytest.raises(ValueError, match="shape"):
        LinearOperator(shape=(True, 2), dtype=np.float64, xp=xp, device="cpu")
    op = LinearOperator(shape=(np.int64(2), np.int32(3)), dtype=np.float64, xp=xp, device="cpu")
    assert op.shape == (2, 3) and all(type(s) is int for s in op.shape)
    op = LinearOperator(shape=(2, 2), dtype=np.float64, xp=xp, device="cpu")
    with pytest.raises(NotImplementedError, match="_matmat"):
        op.matvec(np.ones(2))
    with pytest.raises(NotImplementedError, match="_rmatmat"):
        op.rmatvec(np.ones(2))
    with pytest.raises(NotImplementedError, match="_rmatmat"):
        op.H.matvec(np.ones(2))


# -- products -------------------------------------------------------------------------------


def test_matvec_matmat_shapes_and_values(fisher_setup, rng):
    s = fisher_setup
    be, dt, d = s["backend"], s["dtype"], s["d"]
    x = rounded(rng.standard_normal(d), dt)
    X = rounded(rng.standard_normal((d, 3)), dt)
    Fd = empirical_fisher_dense(s["G"], s["damp"])
    oracle = SpectralOracle(s["G"], s["damp"])
    for op, ref in ((s["F"], lambda v: Fd @ v), (s["Finv"], oracle.matmat)):
        y1 = op.matvec(be.asarray(x, dt))
        assert tuple(y1.shape) == (d,)
        check_space(y1, be, dt)
        assert_close(y1, ref(x[:, None])[:, 0], kappa=s["kappa"])
        y2 = op.matvec(be.asarray(x[:, None], dt))
        assert tuple(y2.shape) == (d, 1)
        assert_close(y2[:, 0], to_numpy(y1), kappa=s["kappa"])
        Y = op.matmat(be.asarray(X, dt))
        assert tuple(Y.shape) == (d, 3)
        check_space(Y, be, dt)
        assert_close(Y, ref(X), kappa=s["kappa"])
        # Symmetric operators: rmatvec/rmatmat are matvec/matmat.
        assert_close(op.rmatvec(be.asarray(x, dt)), to_numpy(y1), kappa=s["kappa"])
        assert_close(op.rmatmat(be.asarray(X, dt)), to_numpy(Y), kappa=s["kappa"])
        # __call__ and dot are matvec/matmat for arrays.
        assert_close(op(be.asarray(x, dt)), to_numpy(y1), kappa=s["kappa"])
        assert_close(op.dot(be.asarray(X, dt)), to_numpy(Y), kappa=s["kappa"])
        assert_close(op @ be.asarray(X, dt), to_numpy(Y), kappa=s["kappa"])
        assert_close(op * be.asarray(x, dt), to_numpy(y1), kappa=s["kappa"])


def test_rectangular_matvec_rmatvec(dense_setup, rng):
    s = dense_setup
    be, dt, A, opA = s["backend"], s["dtype"], s["A"], s["opA"]
    x, y = rounded(rng.standard_normal(5), dt), rounded(rng.standard_normal(3), dt)
    assert opA.shape == (3, 5)
    r = opA.matvec(be.asarray(x, dt))
    assert tuple(r.shape) == (3,)
    check_space(r, be, dt)
    assert_close(r, A @ x)
    assert_close(opA.rmatvec(be.asarray(y, dt)), A.T @ y)
    assert tuple(opA.rmatvec(be.asarray(y[:, None], dt)).shape) == (5, 1)
    assert_close(
        opA.rmatmat(be.asarray(np.stack([y, 2 * y], 1), dt)), A.T @ np.stack([y, 2 * y], 1)
    )
    with pytest.raises(ValueError, match="shape"):
        opA.matvec(be.asarray(y, dt))
    with pytest.raises(ValueError, match="shape"):
        opA.rmatvec(be.asarray(x, dt))
    with pytest.raises(ValueError, match="rmatmat"):
        opA.rmatvec(be.asarray(np.ones((3, 2)), dt))


def test_adjoint_and_transpose(dense_setup, fisher_setup, rng):
    s = dense_setup
    be, dt, A, opA = s["backend"], s["dtype"], s["A"], s["opA"]
    for At in (opA.adjoint(), opA.H, opA.transpose(), opA.T):
        assert At.shape == (5, 3)
        y = rounded(rng.standard_normal(3), dt)
        assert_close(At.matvec(be.asarray(y, dt)), A.T @ y)
        assert_close(At.rmatvec(be.asarray(rounded(np.ones(5), dt), dt)), A @ np.ones(5))
        assert_close(At.matmat(be.asarray(np.eye(3), dt)), A.T)
        assert_close(At.rmatmat(be.asarray(np.eye(5), dt)), A)
        assert At.adjoint() is opA
        assert At.transpose() is opA
    Finv = fisher_setup["Finv"]
    assert Finv.H is Finv and Finv.T is Finv and Finv.adjoint() is Finv


class _Matrix(LinearOperator):
    """A subclass as a user writes one: the namespace and device given as they come."""

    def __init__(self, A: Any, xp: Any, device: Any) -> None:
        super().__init__(shape=tuple(A.shape), dtype=A.dtype, xp=xp, device=device)
        self.A = A

    def _matmat(self, X: Any) -> Any:
        return self.A @ X

    def _rmatmat(self, X: Any) -> Any:
        return self.A.T @ X


def test_a_subclass_may_name_the_library_module_and_device_name(rng):
    # Regression: with xp=numpy (not array-api-compat's wrapped namespace) every NumPy
    # input was refused as "x is a numpy array but ... works on numpy arrays", and a
    # PyTorch operator on device="cpu" refused every tensor as "x is on device
    # device(type='cpu') but ... lives on device 'cpu'".
    A = rng.standard_normal((3, 4))
    x = rng.standard_normal(4)
    op = _Matrix(A, np, "cpu")
    assert op.xp is array_api_compat.array_namespace(A)
    assert_close(op @ x, A @ x)
    for bad in ("numpy", None, 3):
        with pytest.raises(TypeError, match="xp must be an array namespace or library module"):
            _Matrix(A, bad, "cpu")
    torch = pytest.importorskip("torch")
    At = torch.asarray(A)
    op = _Matrix(At, torch, "cpu")
    assert op.device == At.device
    assert_close(op @ torch.asarray(x), A @ x)
    assert_close(op.T @ torch.ones(3, dtype=torch.float64), A.T @ np.ones(3))


def test_H_uses_the_subclass_adjoint():
    A = Dense(np.arange(6.0).reshape(2, 3))
    assert A.H.H is A


def test_operator_algebra(dense_setup, fisher_setup):
    s = dense_setup
    be, dt, A, B, opA, opB = (s[k] for k in ("backend", "dtype", "A", "B", "opA", "opB"))
    cases = {
        "A@B": (opA @ opB, A @ B),
        "A.dot(B)": (opA.dot(opB), A @ B),
        "A*B": (opA * opB, A @ B),
        "A+A": (opA + opA, 2 * A),
        "A-2A": (opA - 2 * opA, -A),
        "2*A": (2 * opA, 2 * A),
        "A*3": (opA * 3, 3 * A),
        "A/4": (opA / 4, A / 4),
        "-A": (-opA, -A),
        "A.dot(0.5)": (opA.dot(0.5), 0.5 * A),
        "B.T@A.T": (opB.T @ opA.T, (A @ B).T),
        "(A@B).H": ((opA @ opB).H, (A @ B).T),
        "(A+A).T": ((opA + opA).T, 2 * A.T),
        "(2A).H": ((2 * opA).H, 2 * A.T),
        "A.T.T": (opA.T.T, A),
    }
    for name, (op, ref) in cases.items():
        assert isinstance(op, LinearOperator), name
        assert op.shape == ref.shape, name
        assert op.dtype == be.dtype(dt)
        dense = op.todense()
        check_space(dense, be, dt)
        assert_close(dense, ref, factor=100, err_msg=name)
        assert_close(op.rmatmat(be.asarray(np.eye(ref.shape[0]), dt)), ref.T, err_msg=name)
    F, Finv = fisher_setup["F"], fisher_setup["Finv"]
    d = fisher_setup["d"]
    kappa = fisher_setup["kappa"]
    prod = F @ Finv
    assert_close(prod.todense(), np.eye(fisher_setup["d"]), kappa=kappa, atol=0)
    combo = 2 * F - Finv / 3 + F @ F
    Fd = empirical_fisher_dense(fisher_setup["G"], fisher_setup["damp"])
    ref = 2 * Fd - np.linalg.inv(Fd) / 3 + Fd @ Fd
    assert_close(combo.todense(), ref, kappa=kappa**2)
    assert combo.shape == (d, d)
    assert combo.H.shape == (d, d)


def test_composition_errors(dense_setup, fisher_setup, numpy_backend, strict_device1):
    opA, opB = dense_setup["opA"], dense_setup["opB"]
    with pytest.raises(ValueError, match="shapes"):
        opA @ opA
    with pytest.raises(ValueError, match="shapes"):
        opA + opB
    with pytest.raises(ValueError, match="shapes"):
        opA - opB
    with pytest.raises(ValueError, match="scalar"):
        opA @ 2
    with pytest.raises(ValueError, match="scalar"):
        2 @ opA
    with pytest.raises(TypeError):
        opA + 1
    with pytest.raises(TypeError):
        opA / "x"
    with pytest.raises(TypeError, match="expected"):
        opA.dot("x")
    with pytest.raises(ValueError, match="1-D or 2-D"):
        opA.dot(dense_setup["backend"].asarray(np.ones((5, 1, 1)), dense_setup["dtype"]))
    # Different dtypes, libraries or devices do not mix.
    other_dtype = "float64" if dense_setup["dtype"] == "float32" else "float32"
    be = dense_setup["backend"]
    other = Dense(be.asarray(np.ones((5, 2)), other_dtype))
    with pytest.raises(TypeError, match="dtype"):
        opA @ other
    foreign = numpy_backend if be.name != "numpy" else strict_device1
    other = Dense(foreign.asarray(np.ones((5, 2)), dense_setup["dtype"]))
    with pytest.raises(TypeError, match="different array libraries or devices"):
        opA @ other
    with pytest.raises(TypeError, match="different array libraries or devices"):
        Dense(foreign.asarray(np.ones((3, 5)), dense_setup["dtype"])) + opA


def test_integer_powers_as_scipy(rng):
    # SciPy's A ** p: p products with a square operator, the identity (a copy) for p = 0.
    A = rng.standard_normal((4, 4))
    op = Dense(A)
    x = rng.standard_normal(4)
    for p in (0, 1, 3, np.int64(2)):
        ref = np.linalg.matrix_power(A, int(p))
        power = op**p
        assert isinstance(power, LinearOperator)
        assert_close(power.todense(), ref, factor=100)
        assert_close(power.H.todense(), ref.T, factor=100)
        assert_close(power @ x, ref @ x, factor=100)
    y = (op**0).matvec(x)
    assert y is not x and np.array_equal(y, x)
    G = rng.standard_normal((3, 6))
    F = empirical_fisher_dense(G, 0.5)
    assert_close(
        (EmpiricalFisher(G, damp=0.5) ** 2).todense(), F @ F, kappa=condition_number(G, 0.5) ** 2
    )
    with pytest.raises(ValueError, match=r">= 0.*separate classes"):
        op**-1
    # An operator with an inverse of its own is pointed to it.
    with pytest.raises(ValueError, match=r">= 0.*SpectralIHVP\.inverse\(\) is its inverse"):
        SpectralIHVP(G, damp=0.5) ** -1
    with pytest.raises(ValueError, match="square"):
        Dense(rng.standard_normal((2, 3))) ** 2
    for bad in (2.0, True, 1j):
        with pytest.raises(TypeError, match="must be an int"):
            op**bad
    with pytest.raises(TypeError):
        op ** "2"


def test_a_scaled_operator_refuses_a_factor_that_is_not_finite(rng):
    # Regression: op * nan, inf * op, op / 1e-310 (1 / x is infinite) built operators
    # whose every product was NaN or infinite, while the inputs are checked for NaN;
    # op * 10**400 raised a bare OverflowError and op / 0 "float division by zero".
    G = rng.standard_normal((3, 6))
    F = EmpiricalFisher(G, damp=0.5)
    x = rng.standard_normal(6)
    want = F @ x
    for build in (
        lambda: F * math.nan,
        lambda: math.inf * F,
        lambda: F.dot(-math.inf),
        lambda: F(np.float32("inf")),
        lambda: F * 10**400,
    ):
        with pytest.raises(ValueError, match="scalar multiplying an operator must be finite"):
            build()
    with pytest.raises(ValueError, match=r"^1 / 1e-310 must be finite"):
        F / 1e-310
    with pytest.raises(ValueError, match="divisor of an operator must be finite"):
        F / math.nan
    with pytest.raises(ZeroDivisionError, match="cannot divide an operator by zero"):
        F / 0
    # Finite factors, down to the smallest, still scale.
    assert np.array_equal((F * 2.0) @ x, 2.0 * want)
    assert np.array_equal((F / 4) @ x, 0.25 * want)
    assert np.array_equal((F * 5e-324) @ x, 5e-324 * want)
    assert np.array_equal(F @ x, want)


def test_a_scipy_operator_operand_is_refused_with_the_way_to_compose_it(rng):
    # Regression: "expected ... a LinearOperator, got _CustomLinearOperator" (it is one,
    # SciPy's), and A + S, S + A, A - S, S - A failed with Python's bare "unsupported
    # operand type(s)"; each message now says how: export A with to_scipy().
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    G = rng.standard_normal((3, 6))
    F = EmpiricalFisher(G, damp=0.5)
    other = scipy_linalg.aslinearoperator(np.eye(6))
    calls = [
        ("A @ S", lambda: F @ other),
        ("A * S", lambda: F * other),
        ("A @ S", lambda: F.dot(other)),
        ("A + S", lambda: F + other),
        ("S + A", lambda: other + F),
        ("A - S", lambda: F - other),
        ("S - A", lambda: other - F),
    ]
    for expression, call in calls:
        scipy_form = re.escape(expression.replace("A", "A.to_scipy()"))
        with pytest.raises(TypeError, match=rf"^{re.escape(expression)} with S a .*{scipy_form}"):
            call()
    x = np.ones(6)
    assert_close((F.to_scipy() @ other) @ x, F @ x)
    assert_close((F.to_scipy() + other) @ x, F @ x + x)
    assert_close((other - F.to_scipy()) @ x, x - F @ x)
    # A SciPy sparse matrix: the same, wrapped by aslinearoperator (Python's bare
    # "unsupported operand" for A + M, "expected an array" for A @ M before).
    sparse = pytest.importorskip("scipy.sparse")
    M = sparse.eye(6, format="csr")
    for expression, call in [
        ("A + S", lambda: F + M),
        ("A - S", lambda: F - M),
        ("A @ S", lambda: F @ M),
        ("A * S", lambda: F * M),
    ]:
        scipy_form = expression.replace("S", "aslinearoperator(S)").replace("A", "A.to_scipy()")
        with pytest.raises(TypeError, match=rf"^{re.escape(expression)} with S a csr_matrix, a "):
            call()
        with pytest.raises(TypeError, match=re.escape(scipy_form)):
            call()
    assert_close((F.to_scipy() + scipy_linalg.aslinearoperator(M)) @ x, F @ x + x)
    # Anything else still gets Python's own refusal (or its own reflected operator).
    with pytest.raises(TypeError, match="unsupported operand"):
        F + "S"


def test_numpy_does_not_take_an_operator_for_an_array(rng):
    # Regression: NumPy converted an operator to a 0-d object array: np.asarray(A)
    # "worked", np.dot(x, A) returned an object array of scaled operators, and SciPy's
    # S @ A failed on that array ("expected 1-d or 2-d array or matrix, got array(<...>)").
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    F = EmpiricalFisher(rng.standard_normal((3, 6)), damp=0.5)
    S = scipy_linalg.aslinearoperator(np.eye(6))
    for call in (lambda: np.asarray(F), lambda: np.dot(np.ones(6), F), lambda: S @ F):
        with pytest.raises(
            TypeError, match=r"^EmpiricalFisher is an operator, not an array.*to_scipy"
        ):
            call()
    x = rng.standard_normal(6)
    assert_close(np.float64(2.0) * F @ x, 2.0 * (F @ x))  # NumPy scalars still scale it
    assert_close(x @ F, F @ x)  # and NumPy arrays still defer to it
    assert_close(S @ F.to_scipy() @ x, F @ x)


def test_row_vector_times_operator_torch():
    torch = pytest.importorskip("torch")
    A = np.arange(15.0).reshape(3, 5)
    op = Dense(torch.asarray(A))
    y = torch.asarray(np.arange(3.0))
    assert_close(y @ op, np.arange(3.0) @ A)
    Y = torch.asarray(np.ones((2, 3)))
    assert_close(Y @ op, np.ones((2, 3)) @ A)


def test_row_vector_times_operator_numpy():
    A = np.arange(15.0).reshape(3, 5)
    assert_close(np.arange(3.0) @ Dense(A), np.arange(3.0) @ A)
    # SciPy's x * A is x @ A (it raised TypeError: unsupported operand).
    assert_close(np.arange(3.0) * Dense(A), np.arange(3.0) @ A)
    assert_close(np.ones((2, 3)) * Dense(A), np.ones((2, 3)) @ A)


def test_row_stack_times_operator_names_x_as_given():
    # Regression: x @ A checked x^T, so that for x of shape (2, 5) and A of shape (3, 5)
    # the message read "X must have shape (3, k), got (5, 2)", and a NaN at x[1, 2] was
    # "X[2, 1] is nan".
    A = np.arange(15.0).reshape(3, 5)
    op = Dense(A)
    with pytest.raises(
        ValueError, match=r"^x @ A needs x of shape \(3,\) or \(k, 3\), got \(2, 5\)"
    ):
        np.ones((2, 5)) @ op
    x = np.ones((2, 3))
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"x\[1, 2\] is nan"):
        x @ op
    with pytest.raises(TypeError, match="floating"):
        np.ones((2, 3), dtype=np.int64) @ op
    y = np.arange(6.0).reshape(2, 3)
    assert_close(y @ op, y @ A)
    assert_close(y.astype(np.float32) @ op, y @ A)  # promoted to the operator's float64


def test_row_stack_times_operator_reads_x_once(monkeypatch):
    # Regression: x @ A checked x's values itself, then matmat checked x^T again: two
    # reads of x on every product, the second only to name x's own index on a failure.
    import mfac_core._operator as operator_module

    reads = []
    checked = operator_module.check_finite

    def counted(xp, x, name, **kwargs):
        reads.append(name)
        return checked(xp, x, name, **kwargs)

    monkeypatch.setattr(operator_module, "check_finite", counted)
    A = np.arange(15.0).reshape(3, 5)
    y = np.arange(6.0).reshape(2, 3)
    assert_close(y @ Dense(A), y @ A)
    assert len(reads) == 1
    y[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"x\[1, 2\] is inf"):
        y @ Dense(A)


# -- dottest ---------------------------------------------------------------------------------


def _dottest(op, backend, dtype, rng, *, kappa=1.0) -> float:
    """``<A y, x> = <y, A^H x>`` up to ``100 eps kappa (||Ay|| ||x|| + ||y|| ||A^H x||)``."""
    n_out, n_in = op.shape
    y = rounded(rng.standard_normal(n_in), dtype)
    x = rounded(rng.standard_normal(n_out), dtype)
    Ay = to_numpy(op.matvec(backend.asarray(y, dtype))).astype(np.float64)
    AHx = to_numpy(op.H.matvec(backend.asarray(x, dtype))).astype(np.float64)
    lhs, rhs = Ay @ x, y @ AHx
    eps = float(np.finfo(dtype).eps)
    scale = np.linalg.norm(Ay) * np.linalg.norm(x) + np.linalg.norm(y) * np.linalg.norm(AHx)
    assert abs(lhs - rhs) <= 100 * eps * kappa * scale, (lhs, rhs, scale)
    return abs(lhs - rhs) / scale


def test_dottest(fisher_setup, dense_setup, rng):
    s = fisher_setup
    be, dt, k = s["backend"], s["dtype"], s["kappa"]
    F, Finv = s["F"], s["Finv"]
    opA, opB = dense_setup["opA"], dense_setup["opB"]
    for op, kappa in (
        (F, k),
        (Finv, k),
        (F @ Finv, k * k),
        (2 * F - Finv, k),
        (F @ F, k * k),
        (opA, 1),
        (opB, 1),
        (opA @ opB, 1),
        (opA.H, 1),
        (opB.T @ opA.T, 1),
        (opA + 2 * opA, 1),
        (opA.T @ opA, 1),
    ):
        _dottest(op, be, dt, rng, kappa=kappa)


def test_dottest_detects_a_wrong_adjoint(numpy_backend, rng):
    A = rng.standard_normal((6, 6))
    with pytest.raises(AssertionError):
        _dottest(WrongAdjoint(A), numpy_backend, "float64", rng)


# -- input checks ----------------------------------------------------------------------------


def test_wrong_shapes(fisher_setup):
    s = fisher_setup
    be, dt, d, op = s["backend"], s["dtype"], s["d"], s["Finv"]
    for bad in (np.ones(d + 1), np.ones((d + 1, 1)), np.ones((d, 1, 1)), np.ones(()).reshape(())):
        with pytest.raises(ValueError, match="shape"):
            op.matvec(be.asarray(bad, dt))
    with pytest.raises(ValueError, match="use matmat"):
        op.matvec(be.asarray(np.ones((d, 2)), dt))
    for bad in (np.ones(d), np.ones((d + 1, 2)), np.ones((d, 2, 1))):
        with pytest.raises(ValueError, match="shape"):
            op.matmat(be.asarray(bad, dt))
        with pytest.raises(ValueError, match="shape"):
            op.rmatmat(be.asarray(bad, dt))


def test_matvec_shape_error_names_the_vector_shapes():
    # Regression: matvec and rmatvec of a row (1, d) said "x must have shape (d,) or (d, k)",
    # a shape they refuse for k > 1 ("use matmat").
    G = np.random.default_rng(0).standard_normal((2, 5))
    for op in (EmpiricalFisher(G, damp=0.5), StaticIHVP(G, damp=0.5)):
        for call in (op.matvec, op.rmatvec, op.T.matvec):
            for bad in (np.ones((1, 5)), np.ones(()), np.ones((5, 1, 1))):
                with pytest.raises(ValueError, match=r"x must have shape \(5,\) or \(5, 1\), got"):
                    call(bad)
        with pytest.raises(ValueError, match=r"X must have shape \(5, k\), got \(1, 5\)"):
            op.matmat(np.ones((1, 5)))


def test_other_library_device_dtype(fisher_setup, numpy_backend, strict_device1):
    s = fisher_setup
    be, dt, d, op = s["backend"], s["dtype"], s["d"], s["Finv"]
    if be.name != "numpy":
        with pytest.raises(TypeError, match="numpy array"):
            op.matvec(numpy_backend.asarray(np.ones(d), dt))
    else:
        torch = pytest.importorskip("torch")
        with pytest.raises(TypeError, match="torch array"):
            op.matvec(torch.ones(d, dtype=getattr(torch, dt)))
        with pytest.raises(TypeError, match="array_api_strict array"):
            op.matmat(strict_device1.asarray(np.ones((d, 1)), dt))
    if be.name == "strict-cpu":
        with pytest.raises(ValueError, match="device"):
            op.matvec(strict_device1.asarray(np.ones(d), dt))
    if be.name == "strict-device1":
        import array_api_strict

        cpu = be.xp.asarray(
            np.ones(d), dtype=be.dtype(dt), device=array_api_strict.Device("CPU_DEVICE")
        )
        with pytest.raises(ValueError, match="device"):
            op.matvec(cpu)
    if dt == "float32":
        # The lossy direction is refused ...
        with pytest.raises(TypeError, match="dtype"):
            op.matvec(be.asarray(np.ones(d), "float64"))
    else:
        # ... the lossless one promoted, as the Array API's promotion rules say.
        x32 = be.asarray(np.ones(d), "float32")
        y = op.matvec(x32)
        assert y.dtype == be.dtype("float64")
        want = op.matvec(be.xp.astype(x32, be.dtype("float64")))
        assert bool(be.xp.all(y == want))
    with pytest.raises(TypeError, match="floating"):
        op.matvec(be.asarray(np.ones(d), "int64"))
    with pytest.raises(TypeError, match="array"):
        op.matvec([1.0] * d)


def test_non_finite_inputs(fisher_setup):
    s = fisher_setup
    be, dt, d = s["backend"], s["dtype"], s["d"]
    for op in (s["F"], s["Finv"], s["F"] @ s["Finv"], s["F"] + s["Finv"], 2 * s["Finv"]):
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones(d)
            x[1] = bad
            with pytest.raises(ValueError, match="NaN or infinity"):
                op.matvec(be.asarray(x, dt))
            with pytest.raises(ValueError, match="NaN or infinity"):
                op.matmat(be.asarray(x[:, None], dt))


def test_check_finite_false_skips_the_check(xp_device, dtype, rng):
    G = rng.standard_normal((3, 7))
    x = np.ones(7)
    x[2] = np.nan
    for cls in (StaticIHVP, EmpiricalFisher):
        op = cls(xp_device.asarray(G, dtype), damp=0.5, check_finite=False)
        assert not op.check_finite
        y = to_numpy(op.matvec(xp_device.asarray(x, dtype)))
        assert np.isnan(y).any()


def test_todense_max_entries(fisher_setup):
    s = fisher_setup
    op, d = s["Finv"], s["d"]
    with pytest.raises(ValueError, match="max_entries"):
        op.todense(max_entries=d * d - 1)
    with pytest.raises(ValueError, match="max_entries"):
        (op @ op).todense(max_entries=10)
    dense = op.todense(max_entries=d * d)
    assert tuple(dense.shape) == (d, d)


# -- pickling and copying ---------------------------------------------------------------------


def _operators(be, dtype, rng):
    G = be.asarray(rng.standard_normal((5, 23)), dtype)
    ops = {}
    if be.mutable:
        ops["dynamic"] = DynamicIHVP(
            4, 23, damp=0.3, dtype=be.dtype(dtype), xp=be.xp, device=be.device
        )
        for g in rng.standard_normal((6, 23)):
            ops["dynamic"].update(be.asarray(g, dtype))
    return ops | {
        "static": StaticIHVP(G, damp=0.3),
        "static-blocks": StaticIHVP(G, damp=0.3, block_size=4),
        "static-refine": StaticIHVP(G, damp=0.3, refine=1),
        "fisher": EmpiricalFisher(G, damp=0.3, block_size=7),
        "sum": EmpiricalFisher(G, damp=0.3) + StaticIHVP(G, damp=0.3),
    }


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_operators_pickle_and_deepcopy_to_equal_working_objects(xp_device, dtype, rng, how):
    import copy
    import pickle

    be = xp_device
    x = be.asarray(rng.standard_normal(23), dtype)
    for name, op in _operators(be, dtype, rng).items():
        twin = pickle.loads(pickle.dumps(op)) if how == "pickle" else copy.deepcopy(op)
        assert type(twin) is type(op) and twin.xp is op.xp and twin.device == op.device
        assert bool(be.xp.all(twin.matvec(x) == op.matvec(x))), name
        if isinstance(op, DynamicIHVP):
            # The copy keeps working, independently of the original.
            g = be.asarray(rng.standard_normal(23), dtype)
            twin.update(g)
            op.update(g)
            assert bool(be.xp.all(twin.matvec(x) == op.matvec(x)))
            twin.reset()
            assert len(op) == 4 and len(twin) == 0


# -- no process-wide side effects ---------------------------------------------------------------


def test_concurrent_use_leaves_blas_settings_alone(rng):
    # Regression: a process-wide one-thread BLAS limit around the m x m work, saved and
    # restored by each call, raced between threads and left NumPy's BLAS at one thread.
    import threading

    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg  # noqa: F401  (load SciPy's BLAS too before the snapshot)

    before = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]
    G = rng.standard_normal((32, 400))
    x = rng.standard_normal(400)
    want = StaticIHVP(G, damp=0.1).matvec(x)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                np.testing.assert_allclose(
                    StaticIHVP(G, damp=0.1).matvec(x), want, rtol=1e-10, atol=0
                )
                op = DynamicIHVP(8, 400, damp=0.1, dtype="float64")
                for g in G[:12]:
                    op.update_and_matvec(g)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]
    assert after == before


def test_the_package_does_not_touch_blas_threads():
    # Nothing in mfac_core may reach for a thread-pool controller: run a set-up and a window
    # step in a fresh process and check that threadpoolctl was never imported.
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, mfac_core\n"
        "G = np.random.default_rng(0).standard_normal((16, 300))\n"
        "mfac_core.StaticIHVP(G, damp=0.1, block_size=50).matvec(G[0])\n"
        "op = mfac_core.DynamicIHVP(4, 300, damp=0.1, dtype='float64')\n"
        "[op.update_and_matvec(g) for g in G[:9]]\n"
        "assert 'threadpoolctl' not in sys.modules, 'threadpoolctl imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_product_builds_no_repr_but_a_refusal_names_the_operator(monkeypatch):
    """The operand checks name the operator in their messages; its repr (several
    microseconds, read on every product and step before) is built for a message only."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 30)).astype(np.float32)
    window = DynamicIHVP(4, 30, damp=0.1, dtype="float32")
    ops = [StaticIHVP(G, damp=0.1), window]
    calls = []
    real = LinearOperator.__repr__

    def counted(self: Any) -> str:
        calls.append(type(self).__name__)
        return real(self)

    monkeypatch.setattr(LinearOperator, "__repr__", counted)
    x = rng.standard_normal(30).astype(np.float32)
    for op in ops:
        op.matvec(x)
    window.update_and_matvec(x)
    assert calls == []
    with pytest.raises(TypeError, match=r"x has dtype float64 but <30x30 StaticIHVP with"):
        ops[0].matvec(x.astype(np.float64))
    assert calls == ["StaticIHVP"]


# -- devices by name or None in a subclass; huge int scales (review of this session) ------------


class _IdentityOnDevice(LinearOperator):
    def __init__(self, xp, device, dtype):
        super().__init__(shape=(3, 3), dtype=dtype, xp=xp, device=device, symmetric=True)

    def _matmat(self, X):
        return X


def test_a_device_by_name_or_none_is_the_namespaces_own_in_a_subclass():
    # Regression: stored as given, None (or JAX's "cpu") refused every input.
    x = np.arange(3.0)
    for dev in (None, "cpu"):
        assert np.array_equal(_IdentityOnDevice(np, dev, np.float64) @ x, x)
    torch = pytest.importorskip("torch")
    assert torch.equal(
        _IdentityOnDevice(torch, None, torch.float64) @ torch.ones(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
    jnp = pytest.importorskip("jax.numpy")
    for dev in (None, "cpu"):
        y = jnp.ones(3, dtype=jnp.float32)
        assert bool(jnp.all(_IdentityOnDevice(jnp, dev, jnp.float32) @ y == y))
    assert (
        DynamicIHVP(2, 3, damp=1.0, dtype="float64", xp=np, device=None).device
        == _IdentityOnDevice(np, None, np.float64).device
    )


def test_a_huge_int_scale_is_short_and_its_reciprocal_underflows():
    rng = np.random.default_rng(0)
    F = EmpiricalFisher(rng.standard_normal((3, 6)), damp=0.5)
    with pytest.raises(ValueError, match=r"got an int of 401 digits \(1\.000e\+400\)") as info:
        F * 10**400
    assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match="an int of 5001 digits"):
        10**5000 * F
    with pytest.raises(ValueError, match=r"got a Fraction of 401 / 1 digits \(3\.333e\+399\)"):
        F * Fraction(10**400, 3)
    with pytest.raises(ValueError, match=r"^1 / a Fraction of 1 / 401 digits .* must be finite"):
        F / Fraction(1, 10**400)  # not a division by zero: its float is 0.0, not it
    with pytest.raises(ValueError, match=r"^1 / an int of 401 digits .* underflows float64 to 0"):
        F / 10**400
    x = rng.standard_normal(6)
    assert np.array_equal((F / 10**309) @ x, (1 / 10**309) * (F @ x))


def test_a_nonzero_scale_that_underflows_is_refused_as_its_reciprocal_is():
    # Regression: F * Fraction(1, 10**400) was silently the zero operator, while
    # F / 10**400, the same factor, is refused as underflowing to 0.
    F = EmpiricalFisher(np.random.default_rng(0).standard_normal((3, 6)), damp=0.5)
    for scale in (Fraction(1, 10**400), Fraction(-1, 10**400), np.longdouble(2) ** -1100):
        for scaled in (lambda s: F * s, lambda s: s * F):
            with pytest.raises(ValueError, match=r"is not 0 but underflows float64 to 0"):
                scaled(scale)
    with pytest.raises(ValueError, match=r"^1 / .* must be finite, got -inf"):
        F / -(np.longdouble(2) ** -1100)  # its inverse overflows: not 'a product of 0'
    assert np.array_equal((F * 0.0).todense(), np.zeros((6, 6)))  # a zero asked for
    assert np.array_equal((F * Fraction(0)).todense(), np.zeros((6, 6)))


# -- the operator's dtype as SciPy's takes it; the arithmetic's operands (review of SciPy use) ---


def test_an_operator_dtype_is_real_floating_and_a_name_is_the_librarys_dtype(rng):
    # Regression: a complex dtype was taken, and A.T and x @ A (the adjoint) were silently
    # conjugated; an integer one made 2.5 * A report int64 and to_scipy() cast SciPy's
    # float vectors to int. dtype="float64" (as SciPy takes it) refused float32 operands
    # that dtype=np.dtype("float64") promotes, and np.float64 printed as a class.
    for bad in (np.complex128, "complex64", np.int64, np.bool_, None, "garbage"):
        with pytest.raises(TypeError, match="dtype must be a real floating dtype of numpy"):
            LinearOperator(shape=(3, 3), dtype=bad, xp=np, device="cpu")
    M = rng.standard_normal((3, 3)) + 1j * rng.standard_normal((3, 3))
    with pytest.raises(TypeError, match=r"got dtype\('complex128'\)"):
        _Matrix(M, np, "cpu")  # whose A.T would have been M^H
    x32 = rng.standard_normal(3).astype(np.float32)
    for given in ("float64", np.float64, "f8"):
        op = _IdentityOnDevice(np, "cpu", given)
        assert op.dtype == np.dtype("float64") and isinstance(op.dtype, np.dtype)
        assert "dtype=float64," in repr(op)
        y = op @ x32
        assert y.dtype == np.float64 and np.array_equal(y, x32.astype(np.float64))
    torch = pytest.importorskip("torch")
    assert _IdentityOnDevice(torch, "cpu", "float32").dtype is torch.float32
    with pytest.raises(TypeError, match="real floating dtype of torch"):
        _IdentityOnDevice(torch, "cpu", torch.complex64)


def test_a_complex_factor_and_a_left_array_of_other_dimensions_are_refused_by_name(rng):
    # Regression: np.complex128(2) * A said "scalar operands are not allowed with @, use *
    # instead" (a NumPy scalar taken for an array); A * 2j that a scalar was expected; and
    # an array of 0 or 3 dimensions on the left, or a row of the wrong length, was told
    # Python's "unsupported operand" or offered the shape (M, 1), which x @ A refuses.
    F = EmpiricalFisher(rng.standard_normal((3, 6)), damp=0.5)
    for scaled in (
        lambda: F * 2j,
        lambda: 2j * F,
        lambda: np.complex128(2) * F,
        lambda: F * np.complex64(2),
        lambda: F / 2j,
        lambda: F.dot(1j),
    ):
        with pytest.raises(TypeError, match=r"operators are real, and so are their factors"):
            scaled()
    with pytest.raises(TypeError, match="a bool is no factor"):
        True * F
    for x in (np.array(2.0), np.ones((2, 6, 1)), np.ones(5), np.ones((6, 1))):
        for product in (lambda x: x @ F, lambda x: x * F):
            with pytest.raises(ValueError, match=r"^x @ A needs x of shape \(6,\) or \(k, 6\)"):
                product(x)
    x = rng.standard_normal(6)
    assert_close(x @ F, F.todense() @ x)  # F is symmetric
    assert_close(x @ (2.0 * F), 2.0 * (F.todense() @ x))


def test_todense_of_an_overflowing_composite_says_it_once_as_its_products_do(rng):
    # Regression: todense() was no public call to the overflow reports: NumPy's own
    # "overflow encountered in multiply" and "invalid value encountered in reduce" came with
    # the library's warning, where A @ x says the library's alone.
    F = EmpiricalFisher(rng.standard_normal((3, 6)), damp=0.5)
    for dtype, big in ((np.float64, 1e308), (np.float32, 1e38)):
        A = EmpiricalFisher(rng.standard_normal((3, 6)).astype(dtype), damp=0.5) * big * big
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            D = A.todense()
        assert not np.isfinite(D).all()
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "exceeds" in messages[0], messages
    assert np.array_equal((2.0 * F).todense(), 2.0 * F.todense())


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_a_numpy_matrix_is_refused_as_one_everywhere(rng):
    # Regression: SciPy's operators take np.matrix; here it was "x must be an array of an
    # Array-API library (NumPy, ...), got matrix", "expected an array, a scalar or an
    # mfac_core LinearOperator" for A @ M, and Python's "unsupported operand" for M @ A.
    F = EmpiricalFisher(rng.standard_normal((3, 6)), damp=0.5)
    M = np.asmatrix(rng.standard_normal((6, 2)))
    calls = (F.matvec, F.matmat, F.rmatvec, F.rmatmat, F.dot, F.__matmul__)
    for call in (*calls, lambda M: M.T @ F, lambda M: M * F, lambda M: F * M):
        with pytest.raises(TypeError, match=r"is a numpy\.matrix, .* np\.asarray\(X?x?\)"):
            call(M)
    assert_close(F @ np.asarray(M), F.todense() @ np.asarray(M))
