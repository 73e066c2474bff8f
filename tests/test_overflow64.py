"""Results beyond float64's range, and the composite operators' own arithmetic.

A float64 operator's result whose exact value is beyond float64's range is infinity,
or NaN where a sum inside the product overflowed first (the projection ``G x``, the
float64 solve with the capacitance matrix). Each public call says so once
(``_finite.FLOAT64_OVERFLOW``), on NumPy, array-api-strict and PyTorch CPU alike.
Before, NumPy gave its own warnings from deep inside ("overflow encountered in
multiply", one per operation, two to five per call), array-api-strict the same, and
PyTorch nothing; a product of operators whose solve overflowed gave NaN everywhere
without a word on any library. A composite's own arithmetic (``c * A``, ``A + B``)
that leaves the dtype's range is said in the library's words too, float32 included
(NumPy's "overflow encountered in multiply", PyTorch nothing, before).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mfac_core import (
    DynamicIHVP,
    EmpiricalFisher,
    IllConditionedWarning,
    SpectralIHVP,
    StaticIHVP,
)
from mfac_core._finite import FLOAT32_OVERFLOW, FLOAT64_OVERFLOW

M, D, BLOCK = 4, 96, 40
LIBS = ["numpy", "torch", "array_api_strict"]


def _lib(name: str) -> Any:
    return np if name == "numpy" else pytest.importorskip(name)


def _as(lib: str, a: np.ndarray) -> Any:
    mod = _lib(lib)
    return mod.asarray(a.copy()) if lib != "torch" else mod.from_numpy(a.copy())


def _numpy(y: Any) -> np.ndarray:
    return np.asarray(y.numpy() if hasattr(y, "numpy") else y)


def _warnings(call: Callable[[], Any]) -> tuple[np.ndarray, list[tuple[type, str]]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _numpy(call())
    return got, [(w.category, str(w.message)) for w in caught]


def _gradients(scale: float, dtype: str = "float64") -> np.ndarray:
    return (np.random.default_rng(3).standard_normal((M, D)) * scale).astype(dtype)


def _vector(scale: float, dtype: str = "float64") -> np.ndarray:
    return (np.random.default_rng(4).standard_normal(D) * scale).astype(dtype)


def _window(G: Any, damp: float, lib: str) -> DynamicIHVP:
    mod = _lib(lib)
    op = DynamicIHVP(M, D, damp=damp, dtype=mod.float64, xp=None if lib == "numpy" else mod)
    for i in range(G.shape[0]):
        op.update(G[i, :])
    return op


#: Each case: (the operator, from G and the library's name; the call, on x).
#: Gradients of 1e-150 at damp 1e-300: F^{-1} x ~ x / damp beyond the gradients' span.
_TINY = 1e-150
CASES: dict[str, tuple[Callable[[Any, str], Any], Callable[[Any, Any], Any]]] = {
    "matvec": (lambda G, lib: StaticIHVP(G, damp=1e-300), lambda op, x: op.matvec(x)),
    "matmat": (lambda G, lib: StaticIHVP(G, damp=1e-300), lambda op, x: op @ x[:, None]),
    "rmatvec": (lambda G, lib: StaticIHVP(G, damp=1e-300), lambda op, x: op.rmatvec(x)),
    "blocks": (
        lambda G, lib: StaticIHVP(G, damp=1e-300, block_size=BLOCK),
        lambda op, x: op.matvec(x),
    ),
    "refined": (lambda G, lib: StaticIHVP(G, damp=1e-300, refine=1), lambda op, x: op @ x),
    "spectral": (lambda G, lib: SpectralIHVP(G, damp=1e-300), lambda op, x: op.matvec(x)),
    "sweep": (
        lambda G, lib: SpectralIHVP(G, damp=1e-300),
        lambda op, x: op.sweep(x, damps=[1e-300, 3e-300]),
    ),
    "quadratic": (
        lambda G, lib: SpectralIHVP(G, damp=1e-300),
        lambda op, x: op.quadratic(op.xp.stack([x, x])),
    ),
    "window": (lambda G, lib: _window(G, 1e-300, lib), lambda op, x: op.matvec(x)),
    "empty window": (lambda G, lib: _window(G[:0, :], 1e-300, lib), lambda op, x: op.matvec(x)),
    "scaled": (lambda G, lib: 3.0 * StaticIHVP(G, damp=1e-300), lambda op, x: op @ x),
    "sum": (
        lambda G, lib: StaticIHVP(G, damp=1e-300) * 2 - 1 * StaticIHVP(G, damp=1e-300),
        lambda op, x: op @ x,
    ),
    # The second product overflows in the float64 solve: NaN everywhere, said by nobody.
    "product": (lambda G, lib: StaticIHVP(G, damp=1e-300) ** 2, lambda op, x: op @ (x * 1e-30)),
}


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_result_beyond_float64_warns_once_in_the_librarys_words(lib, case):
    build, call = CASES[case]
    op = build(_as(lib, _gradients(_TINY)), lib)
    got, caught = _warnings(lambda: call(op, _as(lib, _vector(1e10))))
    assert caught == [(RuntimeWarning, FLOAT64_OVERFLOW)]
    assert not np.isfinite(got).all()


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_float64_result_in_range_does_not_warn(lib, case):
    build, call = CASES[case]
    op = build(_as(lib, _gradients(_TINY)), lib)
    # Results of about 1e10 (1e280 inside the product of operators: its second solve)
    got, caught = _warnings(lambda: call(op, _as(lib, _vector(1e-290))))
    assert caught == []
    assert np.isfinite(got).all()


@pytest.mark.parametrize("lib", LIBS)
def test_an_overflowing_projection_is_said_not_numpys_invalid_value(lib):
    # x near float64's largest value: G x overflows, and the result is NaN everywhere
    # (NumPy said "overflow encountered in matmul" and "invalid value", PyTorch nothing).
    op = StaticIHVP(_as(lib, _gradients(1.0)), damp=0.1)
    got, caught = _warnings(lambda: op.matvec(_as(lib, np.full(D, 8e307))))
    assert caught == [(RuntimeWarning, FLOAT64_OVERFLOW)]
    assert np.isnan(got).all()


@pytest.mark.parametrize("lib", LIBS)
def test_fisher_products_beyond_float64_warn_once(lib):
    # F x = damp x + G^T G x / m: gradients of 1e150 and x of 1e10 give about 1e311.
    op = EmpiricalFisher(_as(lib, _gradients(1e150)), damp=1.0)
    got, caught = _warnings(lambda: op.matvec(_as(lib, _vector(1e10))))
    assert caught == [(RuntimeWarning, FLOAT64_OVERFLOW)]
    assert not np.isfinite(got).all()


def test_refinement_keeps_the_finite_coordinates_of_an_overflowing_float64_product():
    # The residual of an infinite product is NaN everywhere: the product is returned as
    # it is (it was NaN in every coordinate, with NumPy's warnings).
    G, x = _gradients(_TINY), _vector(1e10)
    plain = StaticIHVP(G, damp=1e-300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = plain.matvec(x)
    got, caught = _warnings(lambda: StaticIHVP(G, damp=1e-300, refine=1).matvec(x))
    assert caught == [(RuntimeWarning, FLOAT64_OVERFLOW)]
    assert np.isinf(got).any() and not np.isnan(got).any()
    np.testing.assert_array_equal(got, want)


def test_nan_given_with_check_finite_off_is_no_overflow():
    # NaN in, NaN out, as the user asked by turning the check off: not an overflow.
    op = StaticIHVP(_gradients(1.0), damp=0.1, check_finite=False)
    x = _vector(1.0)
    x[5] = np.nan
    got, caught = _warnings(lambda: op.matvec(x))
    assert caught == [] and np.isnan(got).any()


def test_the_warning_turned_into_an_error_is_raised_by_the_call():
    op = StaticIHVP(_gradients(_TINY), damp=1e-300)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "a result exceeds float64's range")
        with pytest.raises(RuntimeWarning, match="float64's range"):
            op.matvec(_vector(1e10))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("how", ["scaled", "divided", "sum", "difference"])
def test_a_float32_composites_arithmetic_beyond_float32_warns_once(lib, how):
    # The products are in range (about 1e30); the composite's own step leaves float32's
    # range. NumPy said "overflow encountered in multiply/add", PyTorch nothing.
    op = StaticIHVP(_as(lib, _gradients(1e-20, "float32")), damp=1e-30)
    x = _as(lib, _vector(1.0, "float32"))
    y = _numpy(op @ x)
    big = 2.5e38 / float(np.max(np.abs(y)))  # (big * op) x in range, twice it is not
    composite = {
        "scaled": lambda: 1e10 * op,
        "divided": lambda: op / 1e-10,
        "sum": lambda: big * op + big * op,
        "difference": lambda: big * op - (-big) * op,
    }[how]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building big * op must not warn
        composite_in_range = big * op + op
    got, caught = _warnings(lambda: composite @ x)
    assert caught == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    assert np.isinf(got).any()
    got, caught = _warnings(lambda: composite_in_range @ x)
    assert caught == [] and np.isfinite(got).all()


@pytest.mark.parametrize("call", ["matvec", "blocks", "diagonal"])
def test_array_api_strict_float32_results_beyond_float32_warn_once(call):
    # array-api-strict's casts are NumPy's: the library's warning, not NumPy's
    # "overflow encountered in cast" (once per block group).
    xps = pytest.importorskip("array_api_strict")
    G = xps.asarray(_gradients(1e-20, "float32"))
    op = StaticIHVP(G, damp=1e-39, block_size=BLOCK if call == "blocks" else None)
    x = xps.asarray(_vector(1.0, "float32"))
    got, caught = _warnings(lambda: op.diagonal() if call == "diagonal" else op.matvec(x))
    assert caught == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    assert np.isinf(got).any()


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_trace_beyond_float64_warns_once(lib):
    # tr F^{-1} ~ d / damp: 96 / 1e-307 is beyond float64's range (a silent inf before).
    op = SpectralIHVP(_as(lib, _gradients(_TINY)), damp=1e-307)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = op.trace()
        finite = (op.trace_inverse(), op.logdet(), op.with_damp(1e-300).trace())
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, FLOAT64_OVERFLOW)]
    assert got == np.inf and np.isfinite(finite).all()


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("options", [{}, {"block_size": BLOCK}], ids=["full", "blocks"])
def test_results_below_float32s_normal_range_are_rounded_not_flushed(engine_path, lib, options):
    # docs/mathematics.rst: underflow is not reported; a result below float32's smallest
    # normal number is the float64 sum rounded once to a subnormal (not flushed to 0).
    z = _vector(1.0)
    G, x = _gradients(1.0, "float32"), (np.sign(z) * (1 + np.abs(z)) * 1e-36).astype(np.float32)
    op = StaticIHVP(_as(lib, G), damp=1e3, **options)
    got, caught = _warnings(lambda: op.matvec(_as(lib, x)))
    want = StaticIHVP(G.astype(np.float64), damp=1e3, **options).matvec(x.astype(np.float64))
    tiny = np.finfo(np.float32).tiny
    assert caught == []
    assert np.all((got != 0) & (np.abs(got) < tiny))  # about 1e-39: subnormal, every one
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("cls", "options"),
    [(StaticIHVP, {}), (StaticIHVP, {"block_size": BLOCK}), (SpectralIHVP, {})],
    ids=["full", "blocks", "spectral"],
)
def test_a_float32_product_whose_float64_coefficients_overflow_warns_once(lib, cls, options):
    # Gradients of 1e-20 at damp 1e-300 (hopeless: warned at set-up) and x of 1e30: the
    # coefficients C^{-1} G x / damp overflow float64 and the kernels make NaN of them
    # (infinities of both signs summed; BLAS, without the C extension, infinity), which
    # raises no overflow flag. NumPy's "overflow encountered in multiply" was the only
    # word (its warnings now give way to the library's, which must then say it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        op = cls(_as(lib, _gradients(1e-20, "float32")), damp=1e-300, **options)
    got, caught = _warnings(lambda: op.matvec(_as(lib, _vector(1e30, "float32"))))
    assert caught == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    assert not np.isfinite(got).all()


@pytest.mark.parametrize("lib", LIBS)
def test_a_large_finite_result_whose_sum_overflows_says_nothing(lib):
    # The one-sum test overflows for results near float64's largest value: it then reads
    # the result entry by entry, finds it finite, and says nothing.
    x = _as(lib, np.full(D, 1e307))
    got, caught = _warnings(lambda: StaticIHVP(_as(lib, _gradients(1e-3)), damp=1.0) @ x)
    assert caught == [] and np.isfinite(got).all()
    assert float(np.sum(np.abs(got) / 1e300)) > 1.8e8  # the sum did overflow


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_float32_result_whose_float64_sum_overflowed_warns_once(engine_path, lib):
    # Gradients of a few float32 subnormals at damp 1e-280 (hopeless: warned at set-up):
    # the coefficients stay finite but (x - G^T A) / damp overflows float64 itself, which
    # the cast to float32 cannot tell (inf to inf). PyTorch's float64 pieces said nothing.
    G = (np.random.default_rng(1).integers(-3, 4, (M, D)) * 1.4e-45).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        op = StaticIHVP(_as(lib, G), damp=1e-280)
    got, caught = _warnings(lambda: op.matvec(_as(lib, _vector(1e37, "float32"))))
    assert caught == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    assert not np.isfinite(got).all()


def test_narrowing_to_a_numpy_dtype_does_not_read_dtype_names(monkeypatch):
    # Regression: every product's cast to its dtype (narrowed) read np.dtype(dtype).name, a
    # Python property of ~2 us: 4.5 of a 43 us matvec (d = 300, m = 8), where comparing
    # the dtypes takes 0.2 us. NumPy's dtypes are compared; only others are named.
    from mfac_core import _finite

    def named(dtype: Any) -> str:
        raise AssertionError(f"{dtype} was named")

    G = _gradients(1.0)
    ops = [StaticIHVP(G, damp=1.0), StaticIHVP(G.astype(np.float32), damp=1.0)]
    monkeypatch.setattr(_finite, "_dtype_name", named)
    for op in ops:
        y = op.matvec(_vector(1.0, str(op.dtype)))
        assert y.dtype == op.dtype
    with pytest.warns(RuntimeWarning, match="float32's range"):  # still said
        _finite.narrowed(np, np.array([1e39, 1.0]), np.float32)


def test_a_result_that_requires_grad_is_tested_without_pytorchs_warning():
    # The result's test read float() of a sum that required grad, and PyTorch warned
    # ("Converting a tensor with requires_grad=True to a scalar") from inside the
    # library; so did the name of a NaN in such an input.
    torch = pytest.importorskip("torch")
    G = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64).reshape(4, 10)
    op = StaticIHVP(G, damp=0.5)
    x = torch.linspace(0.5, 2.0, 10, dtype=torch.float64, requires_grad=True)
    bad = torch.ones(10, dtype=torch.float64)
    bad[3] = float("nan")
    bad.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = op.matvec(x)
        with pytest.raises(ValueError, match=r"x\[3\] is nan"):
            op.matvec(bad)
    assert y.requires_grad
    # Autograd's route sums in PyTorch's operations, the other in NumPy's BLAS.
    want = op.matvec(x.detach())
    assert float(torch.linalg.norm(y.detach() - want)) <= 1e-14 * float(torch.linalg.norm(want))
