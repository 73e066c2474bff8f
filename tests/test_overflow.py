"""Results beyond float32's range: one RuntimeWarning per call, on every host path.

A float32 operator (float32 or 2-byte gradients) sums in float64 and rounds each result
once to float32; a result beyond float32's range is infinity. The library says so once
per call (``_finite.FLOAT32_OVERFLOW``): from the C kernels' overflow flag, from NumPy's
cast on the fallback of float64 pieces, and from a PyTorch CPU result's extremes. Before,
the C extension's path was silent and the fallback gave NumPy's incidental cast warning
(once per piece or block group). The check changes no value: every result equals, bit for
bit, the same operator's over the gradients' values in float64, rounded to float32.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mfac_core import DynamicIHVP, EmpiricalFisher, SpectralIHVP, StaticIHVP, _fused
from mfac_core._finite import (
    FLOAT32_OVERFLOW,
    float32_overflow_noted,
    float32_overflow_said_by_caller,
)

M, D, BLOCK = 4, 96, 40  # block-wise: two groups (2 blocks of 40, one of 16)


def _as(lib: str, a: np.ndarray, storage: str) -> Any:
    if lib == "numpy":
        if storage == "bfloat16":
            return a.astype(pytest.importorskip("ml_dtypes").bfloat16)
        return np.ascontiguousarray(a, dtype=storage)
    torch = pytest.importorskip("torch")
    return torch.tensor(a, dtype=getattr(torch, storage))


def _numpy(y: Any) -> np.ndarray:
    return y.numpy() if hasattr(y, "numpy") else np.asarray(y)


def _values(storage: str, a: np.ndarray) -> np.ndarray:
    """``a`` rounded to ``storage``, as float64 (the stored values)."""
    return (
        _numpy(_as("torch", a, storage).double())
        if storage == "bfloat16"
        else (a.astype(storage).astype(np.float64))
    )


#: Each case: (the operator's class and options, the call, what it needs).
_Call = Callable[[Any, dict[str, Any]], Any]
CASES: dict[str, tuple[type, dict[str, Any], _Call]] = {
    "matvec": (StaticIHVP, {}, lambda op, a: op.matvec(a["x"])),
    "matmat": (StaticIHVP, {}, lambda op, a: op.matmat(a["X"])),
    "rmatvec": (StaticIHVP, {}, lambda op, a: op.rmatvec(a["x"])),
    "block matvec": (StaticIHVP, {"block_size": BLOCK}, lambda op, a: op.matvec(a["x"])),
    "block matmat": (StaticIHVP, {"block_size": BLOCK}, lambda op, a: op @ a["X"]),
    "diagonal": (StaticIHVP, {}, lambda op, a: op.diagonal()),
    "block diagonal": (StaticIHVP, {"block_size": BLOCK}, lambda op, a: op.diagonal()),
    "entries": (StaticIHVP, {}, lambda op, a: op.entries(a["rows"], a["cols"])),
    "spectral matvec": (SpectralIHVP, {}, lambda op, a: op.matvec(a["x"])),
    "spectral sweep": (SpectralIHVP, {}, lambda op, a: op.sweep(a["x"], damps=a["damps"])),
    "spectral sweep matrix": (
        SpectralIHVP,
        {"block_size": BLOCK},
        lambda op, a: op.sweep(a["X"], damps=a["damps"]),
    ),
    "spectral diagonal": (SpectralIHVP, {}, lambda op, a: op.diagonal(damps=a["damps"])),
    "fisher matvec": (EmpiricalFisher, {}, lambda op, a: op.matvec(a["x"])),
    "fisher diagonal": (EmpiricalFisher, {"block_size": BLOCK}, lambda op, a: op.diagonal()),
}
#: float16 cannot hold gradients small enough for a diagonal beyond float32's range.
_PRODUCTS = ("matvec", "matmat", "rmatvec", "block matvec", "block matmat", "spectral matvec")


def _setup(case: str, storage: str, *, overflow: bool) -> tuple[np.ndarray, float, np.ndarray]:
    """(G's values, damp, x) whose results overflow float32 (or, scaled, do not)."""
    rng = np.random.default_rng(zlib.crc32(f"{case} {storage}".encode()))
    x = rng.standard_normal(D)
    if case.startswith("fisher"):
        # F x = damp x + G^T G x / m: gradients of 1e20 give results of about 1e41.
        G, damp = rng.standard_normal((M, D)) * (1e20 if overflow else 1e15), 1.0
    elif storage == "float16":
        # F^{-1} x ~ x / damp beyond the gradients' span: x of 1e37 over a damping of 0.01.
        G, damp = rng.standard_normal((M, D)), 1e-2
        x = x * (1e37 if overflow else 1e30)
    else:
        # Gradients of 1e-20 and a damping of 1e-39 (kappa about 10): F^{-1} ~ 1 / damp.
        G, damp = rng.standard_normal((M, D)) * 1e-20, 1e-39 if overflow else 1e-30
    return _values(storage, G), damp, x


def _arguments(lib: str, x: np.ndarray) -> dict[str, Any]:
    X = np.stack([x, -0.5 * x], axis=1)
    rows, cols = np.array([0, 5, 41, 95, 7]), np.array([0, 5, 41, 95, 90])
    if lib == "torch":
        torch = pytest.importorskip("torch")
        ints = {"rows": torch.from_numpy(rows), "cols": torch.from_numpy(cols)}
    else:
        ints = {"rows": rows, "cols": cols}
    return {"x": _as(lib, x, "float32"), "X": _as(lib, X, "float32"), "damps": None, **ints}


def _run(case: str, lib: str, storage: str, *, overflow: bool) -> tuple[Any, Any, list[Any]]:
    """The case's result, the float64 operator's result rounded to float32, the warnings."""
    cls, options, call = CASES[case]
    G, damp, x = _setup(case, storage, overflow=overflow)
    op = cls(_as(lib, G, storage), damp=damp, **options)
    op64 = cls(G, damp=damp, **options)
    args, args64 = _arguments(lib, x), _arguments("numpy", x)
    args["damps"] = args64["damps"] = [damp, 3 * damp]
    args64["x"], args64["X"] = (np.asarray(_numpy(args[k]), np.float64) for k in ("x", "X"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _numpy(call(op, args))
    with np.errstate(over="ignore"):
        want = np.asarray(call(op64, args64)).astype(np.float32)
    return got, want, caught


def _cases() -> list[tuple[str, str]]:
    out = []
    for storage in ("float32", "bfloat16", "float16"):
        names = _PRODUCTS if storage == "float16" else CASES
        out += [(c, storage) for c in names if storage == "float32" or not c.startswith("fisher")]
    return out


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(("case", "storage"), _cases())
def test_a_result_beyond_float32_warns_once(engine_path, lib, case, storage):
    got, want, caught = _run(case, lib, storage, overflow=True)
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    assert np.isinf(got).any()
    np.testing.assert_array_equal(got, want)  # infinities included, with their signs


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(("case", "storage"), _cases())
def test_a_result_in_range_does_not_warn(engine_path, lib, case, storage):
    got, want, caught = _run(case, lib, storage, overflow=False)
    assert not caught, [str(w.message) for w in caught]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [{}, {"block_size": BLOCK}], ids=["full", "blocks"])
def test_a_fortran_ordered_g_reports_its_overflow_too(engine_path, storage, options):
    # A Fortran-ordered G goes through the kernels' transposed reads: its own flag test.
    G, damp, x = _setup("matvec", storage, overflow=True)
    F = np.asfortranarray(_as("numpy", G, storage))
    assert F.flags.f_contiguous and not F.flags.c_contiguous
    op = StaticIHVP(F, damp=damp, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = op.matvec(x.astype(np.float32))
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    with np.errstate(over="ignore"):
        op64 = StaticIHVP(G, damp=damp, **options)
        want = op64.matvec(x.astype(np.float32).astype(np.float64)).astype(np.float32)
    assert np.isinf(got).any()
    np.testing.assert_array_equal(got, want)


def _window(lib: str, damp: float, rows: np.ndarray) -> Any:
    dtype = np.float32 if lib == "numpy" else pytest.importorskip("torch").float32
    xp = None if lib == "numpy" else pytest.importorskip("torch")
    op = DynamicIHVP(max(len(rows), 2), D, damp=damp, dtype=dtype, xp=xp)
    for g in rows:
        op.update(_as(lib, g, "float32"))
    return op


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("filled", [0, 3])
def test_a_window_product_beyond_float32_warns_once(engine_path, lib, filled):
    # An empty window's F^{-1} x = x / damp, now in float64 and rounded once as the others
    # (it divided by the damping rounded to float32, with NumPy's overflow warning).
    rng = np.random.default_rng(filled)
    rows = (rng.standard_normal((filled, D)) * 1e-20).astype(np.float32).astype(np.float64)
    x = rng.standard_normal(D).astype(np.float32)
    op = _window(lib, 1e-39, rows)
    op64 = DynamicIHVP(max(filled, 2), D, damp=1e-39, dtype=np.float64)
    for g in rows:
        op64.update(g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _numpy(op.matvec(_as(lib, x.astype(np.float64), "float32")))
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    with np.errstate(over="ignore"):
        want = op64.matvec(x.astype(np.float64)).astype(np.float32)
    assert np.isinf(got).any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_window_step_beyond_float32_warns_once(engine_path, lib):
    # F^{-1} g = g / (damp + |g|^2) for one gradient: about 1e40 per entry for entries of
    # 2e-43 (float32 subnormals) and a damping of 1e-83.
    g = np.full(D, 2e-43, np.float32)
    g[::2] *= -1
    op = _window(lib, 1e-83, np.zeros((0, D)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _numpy(op.update_and_matvec(_as(lib, g.astype(np.float64), "float32")))
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, FLOAT32_OVERFLOW)]
    assert np.isinf(got).all() and np.all(np.sign(got) == np.sign(g))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("filled", [0, 1, 2])
def test_a_window_step_whose_warning_is_an_error_leaves_the_window_as_it_was(
    engine_path, lib, filled
):
    # docs/mathematics.rst suggests filterwarnings("error", ...) for the overflow warning:
    # update_and_matvec then fails, and a failed call leaves the window as it was (as a
    # hopeless gradient's warning turned into an error does). It raised after inserting g.
    # filled: the window filling up, and full (the row edit); gradients of 2e-43 as above.
    g = np.full(D, 2e-43, np.float32)
    g[::2] *= -1
    op = _window(lib, 1e-83, np.zeros((0, D)))
    for k in range(filled):
        op.update(_as(lib, (3.0 + k) * g.astype(np.float64), "float32"))
    before = (list(op.slots), _numpy(op._G).copy(), _numpy(op._gram).copy())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "a result exceeds float32's range")
        with pytest.raises(RuntimeWarning, match="float32's range"):
            op.update_and_matvec(_as(lib, g.astype(np.float64), "float32"))
    assert list(op.slots) == before[0]
    np.testing.assert_array_equal(_numpy(op._G), before[1])
    np.testing.assert_array_equal(_numpy(op._gram), before[2])
    # Warned, not refused, the same call inserts g and returns the infinities.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _numpy(op.update_and_matvec(_as(lib, g.astype(np.float64), "float32")))
    assert [str(w.message) for w in caught] == [FLOAT32_OVERFLOW]
    assert len(op.slots) == min(filled + 1, 2) and np.isinf(got).any()


def test_a_window_step_inside_a_call_that_says_it_itself_says_nothing():
    # update_and_matvec says its overflow before the commit, except inside a caller that
    # says it in its own words (float32_overflow_said_by_caller, as MFAC's step): that
    # caller still finds it noted.
    g = np.full(D, 2e-43, np.float32)
    g[::2] *= -1
    op = _window("numpy", 1e-83, np.zeros((0, D)))

    @float32_overflow_said_by_caller
    def step() -> tuple[Any, bool]:
        return op.update_and_matvec(g), float32_overflow_noted()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, noted = step()
    assert caught == [] and noted and np.isinf(got).all()


def test_refinement_keeps_the_finite_coordinates_of_an_overflowing_product(engine_path):
    # The residual of an infinite product is NaN everywhere (NumPy said "invalid value"):
    # the product is returned as it is, its finite coordinates at float32's rounding.
    G, damp, x = _setup("matvec", "float32", overflow=True)
    op = StaticIHVP(G.astype(np.float32), damp=damp, refine=1)
    plain = StaticIHVP(G.astype(np.float32), damp=damp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = op.matvec(x.astype(np.float32))
        want = plain.matvec(x.astype(np.float32))
    assert [str(w.message) for w in caught] == [FLOAT32_OVERFLOW] * 2
    assert np.isinf(got).any() and not np.isnan(got).any()
    np.testing.assert_array_equal(got, want)


def test_threads_report_one_overflow(monkeypatch):
    # Pieces on several threads, one piece overflowing: one warning, on the caller's thread.
    if not _fused.available():
        pytest.skip("the C extension was not built")
    monkeypatch.setattr(_fused, "_PIECE_WORK", 2**8)
    monkeypatch.setattr(_fused, "_MIN_THREAD_WORK", 1)
    monkeypatch.setenv("MFAC_CORE_NUM_THREADS", "3")
    rng = np.random.default_rng(5)
    G = rng.standard_normal((4, 4096)).astype(np.float32)
    x = rng.standard_normal(4096).astype(np.float32)
    x[3000] = 3e38  # beyond float32's range times alpha = 2
    C, alpha = rng.standard_normal((2, 4)), np.array([2.0, 0.5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Y = _fused.combine64(G, C, alpha, x, start=0, stop=4096, dtype=np.float32)
        Y64 = _fused.combine64(G, C, alpha, x, start=0, stop=4096, dtype=np.float64)
    assert [str(w.message) for w in caught] == [FLOAT32_OVERFLOW]  # float64 results: none
    assert np.isinf(Y[0, 3000]) and np.isfinite(np.delete(Y[0], 3000)).all()
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(Y, Y64.astype(np.float32))


#: FE_OVERFLOW of <fenv.h> where the test reads the flag through libm.
_FE_OVERFLOW = {"x86_64": 0x08, "AMD64": 0x08, "aarch64": 0x04, "arm64": 0x04}


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in _FE_OVERFLOW,
    reason="reads the thread's flags through glibc's libm",
)
@pytest.mark.parametrize("raised", [False, True])
def test_the_kernels_leave_the_callers_overflow_flag_as_found(raised):
    # The kernel clears the flag and tests it; the caller's flag is put back as it was,
    # whether or not the kernel overflowed.
    if not _fused.available():
        pytest.skip("the C extension was not built")
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    flag = _FE_OVERFLOW[platform.machine()]
    G = np.ones((2, 64), np.float32)
    Ct = np.zeros((2, 8))
    Ct[:, 0] = 1.0
    x = np.full(64, 3e38, np.float32)
    for a0, overflows in ((1.0, False), (4.0, True)):
        a, Y = np.zeros(8), np.empty((1, 64), np.float32)
        a[0] = a0
        libm.feclearexcept(flag)
        if raised:
            libm.feraiseexcept(flag)
        before = libm.fetestexcept(flag)
        # The kernel itself (the wrapper's NumPy calls may touch the flags).
        got = _fused._passes.combine64(G, 64, 0, 2, Ct, 1, a, x, False, False, Y, False,
                                       64, 0, 64, 0, 0)  # fmt: skip
        after = libm.fetestexcept(flag)
        libm.feclearexcept(flag)
        assert got is overflows
        assert after == before == (flag if raised else 0)
        assert np.isinf(Y).all() == overflows


def test_the_optimizers_step_says_it_once_in_its_own_words(engine_path):
    # MFAC skips a step that is not finite and says why (MFACStepWarning): no second warning.
    torch = pytest.importorskip("torch")
    from mfac_core.torch import MFAC, MFACStepWarning

    p = torch.nn.Parameter(torch.zeros(D))
    opt = MFAC([p], num_grads=2, damp=1e-83, lr=1.0)
    p.grad = torch.full((D,), 2e-43)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w.category for w in caught] == [MFACStepWarning]
    assert "NaN or infinity" in str(caught[0].message)
    assert opt.skipped_steps == 1 and not p.detach().any()
