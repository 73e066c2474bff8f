"""Exact passes (docs/mathematics.rst, "Exact passes"): results at the storage's rounding.

For float32 and 2-byte storage, every product, diagonal and entry of the operators that
keep their gradients is within ``8 eps(float32)`` of the exact inverse of the Fisher of
the *stored* gradients (an extended-precision reference), for the vectors users apply
F^{-1} to — the gradients' mean, a stored gradient — and random ones, at condition
numbers from 1e2 to 1e7; with the C extension and through the fallback of float64
column pieces, on NumPy and PyTorch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from conftest import rounded
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac_core import DynamicIHVP, SpectralIHVP, StaticIHVP, WindowOptions
from mfac_core.testing import extended_precision_inverse

EPS32 = float(np.finfo(np.float32).eps)
#: The bound of docs/mathematics.rst, in units of eps(float32), normwise.
BOUND = 8.0
KAPPAS = (1e2, 1e4, 1e5, 1e7)


#: The libraries and storages of the products' tests (NumPy's bfloat16 is ml_dtypes').
_LIBS_STORAGES = [
    ("numpy", "float32"),
    ("torch", "float32"),
    ("numpy", "float16"),
    ("numpy", "bfloat16"),
    ("torch", "bfloat16"),
]


def spread_grads(
    rng: np.random.Generator, m: int, d: int, storage: str, *, decay: float = 0.0
) -> np.ndarray:
    """m gradients with a shared mean direction (as an optimizer's are), stored in ``storage``.

    The mean plus isotropic noise; with ``decay``, the noise of the rows falls off
    geometrically down to ``10**-decay`` (a spectrum with small eigenvalues in the
    window). Returned in float64, holding exactly the stored values.
    """
    mean = rng.standard_normal(d)
    G = mean + rng.standard_normal((m, d)) * np.logspace(0, -decay, m)[:, None]
    G /= np.linalg.norm(G, 2) / np.sqrt(m)  # ||G||_2^2 / m = 1
    if storage == "bfloat16":
        return _bfloat16_values(G)
    return rounded(G, storage)


def _bfloat16_values(G: np.ndarray) -> np.ndarray:
    """``G`` rounded to bfloat16 (to nearest even, as ml_dtypes and PyTorch round), in float64."""
    try:
        import ml_dtypes
    except ImportError:
        torch = pytest.importorskip("torch")
        return torch.tensor(G).to(torch.bfloat16).to(torch.float64).numpy()
    return G.astype(ml_dtypes.bfloat16).astype(np.float64)


def damp_for(G: np.ndarray, kappa: float) -> float:
    """The damping that gives ``F`` of the stored gradients the condition number kappa."""
    m = G.shape[0]
    return float(np.linalg.norm(G, 2) ** 2 / (m * (kappa - 1.0)))


def vectors(G: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The vectors of the bound: the mean (rounded to float32), a stored gradient, random."""
    return {
        "mean": rounded(G.mean(axis=0), "float32"),
        "gradient": G[G.shape[0] // 2].copy(),
        "random": rounded(rng.standard_normal(G.shape[1]), "float32"),
    }


#: The references already computed, keyed by the exact bytes of every input. The solves in
#: extended precision are most of this module's time, and many repeat: a problem's data
#: depends on its seed and storage only, not on the engine path or the library under test,
#: and a sweep's columns are the vectors that the products were checked on.
_REFERENCES: dict[tuple[object, ...], np.ndarray] = {}


def reference(G: np.ndarray, damp: float, x: np.ndarray, block_size: int | None = None):
    """``F^{-1} x`` of the stored gradients in extended precision (block by block).

    Computed once per distinct input (the code under test never sees the cache); the
    result is read-only, so no caller can alter what a later test compares against.
    """
    G, x = np.asarray(G), np.asarray(x)
    key = (
        G.dtype.str,
        G.shape,
        hashlib.sha256(np.ascontiguousarray(G).tobytes()).digest(),
        float(damp),
        x.dtype.str,
        x.shape,
        np.ascontiguousarray(x).tobytes(),
        block_size,
    )
    out = _REFERENCES.get(key)
    if out is None:
        out = _reference(G, damp, x, block_size)
        out.setflags(write=False)
        _REFERENCES[key] = out
    return out


def _reference(G: np.ndarray, damp: float, x: np.ndarray, block_size: int | None) -> np.ndarray:
    if block_size is None:
        return extended_precision_inverse(G, damp, x)
    d = G.shape[1]
    parts = []
    for lo in range(0, d, block_size):
        hi = min(lo + block_size, d)
        if hi - lo <= G.shape[0]:
            Fb = (
                damp * np.eye(hi - lo, dtype=np.longdouble)
                + (G[:, lo:hi].astype(np.longdouble).T @ G[:, lo:hi].astype(np.longdouble))
                / G.shape[0]
            )
            parts.append(np.linalg.solve(Fb.astype(np.float64), x[lo:hi]))
        else:
            parts.append(extended_precision_inverse(G[:, lo:hi], damp, x[lo:hi]))
    return np.concatenate(parts)


def rel(y: Any, want: np.ndarray) -> float:
    y = np.asarray(y.cpu() if hasattr(y, "cpu") else y, dtype=np.float64)
    return float(np.linalg.norm(y - want) / np.linalg.norm(want))


def _as(lib: str, a: np.ndarray, storage: str) -> Any:
    if lib == "numpy":
        if storage == "bfloat16":  # ml_dtypes' (JAX's bfloat16 in NumPy)
            storage = pytest.importorskip("ml_dtypes").bfloat16
        return np.ascontiguousarray(a, dtype=storage)
    torch = pytest.importorskip("torch")
    return torch.tensor(a, dtype=getattr(torch, storage))


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize(
    ("lib", "storage"),
    _LIBS_STORAGES,
)
def test_static_products_are_exact(engine_path, lib, storage, kappa):
    rng = np.random.default_rng(int(kappa) % 1000 + 7)
    m, d = 24, 1500
    G = spread_grads(rng, m, d, storage)
    damp = damp_for(G, kappa)
    op = StaticIHVP(_as(lib, G, storage), damp=damp)
    for name, x in vectors(G, rng).items():
        want = reference(G, damp, x)
        got = op @ _as(lib, x, "float32")
        assert rel(got, want) <= BOUND * EPS32, (name, rel(got, want) / EPS32)


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize(
    ("lib", "storage"),
    _LIBS_STORAGES,
)
def test_dynamic_products_are_exact(engine_path, lib, storage, kappa):
    rng = np.random.default_rng(int(kappa) % 1000 + 11)
    m, d = 24, 1500
    G = spread_grads(rng, m, d, storage)
    damp = damp_for(G, kappa)
    xp = None
    if lib == "torch":
        import array_api_compat
        import torch

        xp = array_api_compat.array_namespace(torch.zeros(1))
    op = DynamicIHVP(m, d, damp=damp, dtype=storage, **({"xp": xp} if xp else {}))
    for g in G[:-1]:
        op.update(_as(lib, g, "float32"))
    # The optimizer's step: insert the last gradient, precondition it.
    y = op.update_and_matvec(_as(lib, G[-1], "float32"))
    assert rel(y, reference(G, damp, G[-1])) <= BOUND * EPS32
    for name, x in vectors(G, rng).items():
        got = op @ _as(lib, x, "float32")
        want = reference(G, damp, x)
        assert rel(got, want) <= BOUND * EPS32, (name, rel(got, want) / EPS32)


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("block_size", [5, 16, 300, 700])
def test_block_wise_products_are_exact(engine_path, block_size, kappa):
    # Blocks no wider than m (dense float64 inverses) and wider (the G-form per block),
    # with a ragged last block.
    rng = np.random.default_rng(int(kappa) % 997 + block_size)
    m, d = 16, 1500
    G = spread_grads(rng, m, d, "float32")
    damp = damp_for(G, kappa)
    op = StaticIHVP(G.astype(np.float32), damp=damp, block_size=block_size)
    for name, x in vectors(G, rng).items():
        want = reference(G, damp, x, block_size)
        got = op @ x.astype(np.float32)
        assert rel(got, want) <= BOUND * EPS32, (name, rel(got, want) / EPS32)
    X = np.stack(list(vectors(G, rng).values()), axis=1)
    Y = op @ X.astype(np.float32)
    for j in range(X.shape[1]):
        assert rel(Y[:, j], reference(G, damp, X[:, j], block_size)) <= BOUND * EPS32


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("block_size", [None, 8, 200])
def test_diagonal_and_entries_are_exact_per_coordinate(kappa, block_size):
    rng = np.random.default_rng(int(kappa) % 991 + 3)
    m, d = 16, 400
    G = spread_grads(rng, m, d, "float32")
    damp = damp_for(G, kappa)
    op = StaticIHVP(G.astype(np.float32), damp=damp, block_size=block_size)
    # The reference columns of F^{-1}, in extended precision, for a sample of coordinates.
    cols = np.array([0, 1, 7, 8, 199, 200, 201, 399])
    E = np.stack([reference(G, damp, np.eye(d)[:, j], block_size) for j in cols], axis=1)
    diag_want = E[cols, np.arange(cols.size)]
    diag = np.asarray(op.diagonal(), dtype=np.float64)[cols]
    assert np.all(np.abs(diag - diag_want) <= BOUND * EPS32 * diag_want)
    rows = np.array([3, 1, 7, 9, 150, 200, 250, 399])
    got = np.asarray(op.entries(rows, cols), dtype=np.float64)
    want = E[rows, np.arange(cols.size)]
    # Off-diagonal entries may cancel to nothing: the scale per coordinate pair is
    # sqrt(F^-1_jj F^-1_kk), which bounds |F^-1_jk| (F^-1 is positive definite).
    scale = np.sqrt(diag_want * np.asarray(op.diagonal(), dtype=np.float64)[rows])
    assert np.all(np.abs(got - want) <= BOUND * EPS32 * scale)


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize(
    ("lib", "storage"),
    _LIBS_STORAGES,
)
@pytest.mark.parametrize("block_size", [None, 16, 300])
def test_spectral_products_and_sweeps_are_exact(engine_path, lib, storage, block_size, kappa):
    # Products, one-vector sweeps (one read of G for all dampings) and matrix sweeps, at
    # the operator's damping and at others: each within the bound of its own F.
    rng = np.random.default_rng(int(kappa) % 977 + (block_size or 1))
    m, d = 24, 1500
    G = spread_grads(rng, m, d, storage)
    damp = damp_for(G, kappa)
    op = SpectralIHVP(_as(lib, G, storage), damp=damp, block_size=block_size)
    damps = [damp, 3.0 * damp, damp_for(G, kappa / 50.0)]
    xs = vectors(G, rng)
    X = np.stack(list(xs.values()), axis=1)
    Y = np.asarray(_numpy(op.sweep(_as(lib, X, "float32"), damps=damps)))
    for name, x in xs.items():
        want = reference(G, damp, x, block_size)
        got = op @ _as(lib, x, "float32")
        assert rel(got, want) <= BOUND * EPS32, (name, rel(got, want) / EPS32)
        sweep = op.sweep(_as(lib, x, "float32"), damps=damps)
        for j, dp in enumerate(damps):
            want = reference(G, dp, x, block_size)
            assert rel(sweep[j], want) <= BOUND * EPS32, (name, dp, rel(sweep[j], want) / EPS32)
    for j, dp in enumerate(damps):
        for c in range(X.shape[1]):
            assert rel(Y[j, :, c], reference(G, dp, X[:, c], block_size)) <= BOUND * EPS32


def _numpy(a: Any) -> np.ndarray:
    return np.asarray(a.cpu() if hasattr(a, "cpu") else a)


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("block_size", [None, 8, 200])
def test_spectral_diagonals_are_exact_per_coordinate(engine_path, kappa, block_size):
    # Coordinates the gradients cover well are where 1 - sum c_i (U^T g_j)_i^2 cancels: a
    # stored float32 U^T G (the earlier set-up) loses eps32 * kappa there.
    rng = np.random.default_rng(int(kappa) % 971 + 5)
    m, d = 16, 400
    G = spread_grads(rng, m, d, "float32")
    damp = damp_for(G, kappa)
    op = SpectralIHVP(G.astype(np.float32), damp=damp, block_size=block_size)
    cols = np.array([0, 1, 7, 8, 199, 200, 201, 399])
    damps = [damp, 10.0 * damp]
    D = np.asarray(op.diagonal(damps=damps), dtype=np.float64)
    for j, dp in enumerate(damps):
        want = np.array([reference(G, dp, np.eye(d)[:, c], block_size)[c] for c in cols])
        assert np.all(np.abs(D[j, cols] - want) <= BOUND * EPS32 * want), dp


@pytest.mark.parametrize("scale", [4e-12, 1e-3, 1e17])
@pytest.mark.parametrize(
    ("lib", "storage"), [("numpy", "float32"), ("numpy", "bfloat16"), ("torch", "bfloat16")]
)
def test_extreme_gradient_scales(scale, lib, storage):
    # Gradients near the ends of float32's range (and bfloat16 ones of 1e18, beyond
    # float32's squares): every sum of squares and coefficient is float64, so nothing
    # underflows or overflows before the result's own rounding.
    rng = np.random.default_rng(17)
    m, d = 8, 300
    scale = 1e18 if storage == "bfloat16" and scale > 1 else scale
    G = spread_grads(rng, m, d, "float32") * scale
    if storage == "float32":
        G = rounded(G, "float32")
    else:
        G = _bfloat16_values(G)
    damp = damp_for(G, 1e5)
    x = vectors(G, rng)["mean"] / np.float32(scale)
    x = rounded(x, "float32")
    want = reference(G, damp, x)
    stored = _as(lib, G, storage)
    static = StaticIHVP(stored, damp=damp)
    spectral = SpectralIHVP(stored, damp=damp)
    window = DynamicIHVP(m, d, damp=damp, dtype=stored.dtype, xp=_namespace(stored))
    for g in stored:
        window.update(g)
    xin = _as(lib, x, "float32")
    for op in (static, spectral, window):
        got = op @ xin
        assert rel(got, want) <= BOUND * EPS32, (type(op).__name__, rel(got, want) / EPS32)
    assert np.isfinite(spectral.logdet()) and np.isfinite(spectral.trace())


def _namespace(a: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(a)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 20),
    extra=st.integers(1, 300),
    log_kappa=st.floats(2.0, 7.0),
    which=st.sampled_from(["mean", "gradient", "random"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_static_exact_hypothesis(m, extra, log_kappa, which, seed):
    rng = np.random.default_rng(seed)
    d = m + extra
    G = spread_grads(rng, m, d, "float32")
    damp = damp_for(G, 10.0**log_kappa)
    x = vectors(G, rng)[which]
    got = StaticIHVP(G.astype(np.float32), damp=damp) @ x.astype(np.float32)
    assert rel(got, reference(G, damp, x)) <= BOUND * EPS32


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6])
def test_decaying_spectrum_static_and_dynamic(kappa):
    # Noise falling off over two decades: the float64 Gram's own rounding is what limits
    # such windows beyond kappa = 1e6 (docs/mathematics.rst, "Exact passes").
    rng = np.random.default_rng(int(kappa) % 983 + 1)
    m, d = 24, 1500
    G = spread_grads(rng, m, d, "float32", decay=2.0)
    damp = damp_for(G, kappa)
    static = StaticIHVP(G.astype(np.float32), damp=damp)
    window = DynamicIHVP(m, d, damp=damp, dtype="float32")
    for g in G:
        window.update(g.astype(np.float32))
    for name, x in vectors(G, rng).items():
        want = reference(G, damp, x)
        for op in (static, window):
            got = op @ x.astype(np.float32)
            assert rel(got, want) <= BOUND * EPS32, (name, type(op).__name__)


def test_float32_accumulation_would_fail_here():
    # The same problem with the passes summed in float32 (the earlier operators): the
    # bound is not a property of the data, the float64 accumulation is what holds it.
    rng = np.random.default_rng(5)
    m, d, kappa = 24, 1500, 1e5
    G = spread_grads(rng, m, d, "float32")
    damp = damp_for(G, kappa)
    x = vectors(G, rng)["mean"]
    G32 = G.astype(np.float32)
    C = G @ G.T + m * damp * np.eye(m)
    a = np.linalg.solve(C, G @ x)
    y32 = (x.astype(np.float32) - G32.T @ a.astype(np.float32)) / np.float32(damp)
    assert rel(y32, reference(G, damp, x)) > 100 * BOUND * EPS32


def _torch_operators(torch: Any, G: np.ndarray, damp: float, dtype: Any) -> list[Any]:
    Gt = torch.from_numpy(G.astype(dtype))
    window = DynamicIHVP(G.shape[0], G.shape[1], damp=damp, dtype=Gt.dtype, xp=torch)
    for g in Gt:
        window.update(g.clone())
    return [StaticIHVP(Gt, damp=damp), SpectralIHVP(Gt, damp=damp), window]


def test_the_gradient_of_a_float32_product_is_exact_too():
    """Regression: x, float32 and requiring grad, was widened once per pass, and autograd
    rounded each pass's float64 gradient to float32 on its own; near the gradients' span the
    two cancel: ``grad(op @ x, x, v) = F^{-1} v`` 4774 eps(float32) off at kappa = 1e4 (7 %
    at 1e6). Widened once, the two meet in float64 and are rounded once."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    G = rounded(rng.standard_normal((8, 20_000)) + 1.0, "float32")
    x = rounded(G.mean(axis=0), "float32")
    damp = damp_for(G, 1e4)
    want = reference(G, damp, x)
    for op in _torch_operators(torch, G, damp, np.float32):
        xr = torch.from_numpy(x.astype(np.float32)).requires_grad_(True)
        (grad,) = torch.autograd.grad(op @ xr, xr, torch.from_numpy(x.astype(np.float32)))
        assert rel(grad, want) <= BOUND * EPS32, type(op).__name__


def test_reverse_mode_gradients_sum_over_the_columns_as_the_products_do():
    """Regression: the gradient's sum over the columns (``G @ cotangent``, the backward of
    the second pass's torch ``matmul``) was one running sum per entry: for two float64
    gradients with a shared mean, 45x (StaticIHVP), 190x (SpectralIHVP) and 16x
    (DynamicIHVP) the product's own error. Now within 3x of it."""
    torch = pytest.importorskip("torch")
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(2, 200_000))
    G = rounded(np.array([[1.2616], [1.2985]]) + 2.0**-9 * signs, "float32")
    x = G.mean(axis=0)
    damp = damp_for(G, 1e2)
    want = reference(G, damp, x)
    xt = torch.from_numpy(x)
    for op in _torch_operators(torch, G, damp, np.float64):
        xr = xt.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(op @ xr, xr, xt)
        assert rel(grad, want) <= 3 * rel(op @ xt, want), type(op).__name__


def test_torch_tensors_without_plain_storage_take_the_library_path():
    # Views with the negative bit and torch.func's wrapped tensors cannot be viewed as
    # NumPy arrays: the engine falls back to float64 pieces instead of raising.
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(5, 50, generator=gen)
    x = torch.randn(50, generator=gen)
    op = StaticIHVP(G, damp=0.1)
    want = op @ (-x)
    torch.testing.assert_close(op @ x._neg_view(), want, rtol=0, atol=0)
    neg = StaticIHVP(G._neg_view(), damp=0.1)
    torch.testing.assert_close(neg @ x, StaticIHVP(-G, damp=0.1) @ x)
    grad = torch.func.grad(lambda v: (op @ v).sum())(x)
    torch.testing.assert_close(grad, op @ torch.ones(50), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise", [1e-2, 1e-3, 1e-4])
def test_nearly_collinear_gradients(noise):
    # Gradients within `noise` of one direction: the float64 factor's own rounding
    # (about eps64 * kappa^1.5 for the mean) keeps the bound up to kappa = 1e6; beyond,
    # one step of refine (residuals from the stored gradients) restores it.
    rng = np.random.default_rng(int(1 / noise))
    m, d = 24, 1500
    G = rounded(rng.standard_normal(d) + noise * rng.standard_normal((m, d)), "float32")
    for kappa, refine in ((1e6, 0), (1e7, 1)):
        damp = damp_for(G, kappa)
        op = StaticIHVP(G.astype(np.float32), damp=damp, refine=refine)
        for name, x in vectors(G, rng).items():
            got = op @ x.astype(np.float32)
            assert rel(got, reference(G, damp, x)) <= BOUND * EPS32, (kappa, name)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_refine_over_narrow_storage_beyond_kappa_1e7(storage):
    # Regression: refinement rounded the float64 residual to float32 before applying
    # F^{-1}, an error of eps32 |r| that F^{-1} weighs by 1 / damp: one step made a stored
    # gradient's product worse than none (5.8e-5 against 1.5e-5 at kappa 2e11, 0.45
    # against 1.4e-3 at 2e13). The residual now goes in as its rounding and the rounding's
    # error, and the step gives the float32 bound there.
    rng = np.random.default_rng(7)
    m, d = 8, 40
    G = (rng.standard_normal(d) + 1e-3 * rng.standard_normal((m, d))).astype(storage)
    G64 = G.astype(np.float64)
    damp = damp_for(G64, 2e11)
    x = G64[0].astype(np.float32)
    want = reference(G64, damp, x.astype(np.float64))
    options = WindowOptions(refine=1)
    window = DynamicIHVP.from_window(G[1:], damp=damp, num_grads=m, options=options)
    for got in (
        StaticIHVP(G, damp=damp, refine=1) @ x,
        DynamicIHVP.from_window(G, damp=damp, options=options) @ x,
        window.update_and_matvec(x),  # x = G[0], oldest first: the same window
    ):
        assert rel(got, want) <= BOUND * EPS32


def test_without_the_c_extension_the_products_say_once_that_they_are_slower(monkeypatch):
    """A build without a C compiler computes the same products through float64 column
    pieces, and says so once per process, at the first product that the kernels would
    have served (not at each one, and not for float64 gradients, which BLAS serves)."""
    from mfac_core import _engine, _fused

    rng = np.random.default_rng(0)
    G, x = rng.standard_normal((4, 300)).astype(np.float32), rng.standard_normal(300)
    x = x.astype(np.float32)
    want = StaticIHVP(G, damp=0.1) @ x
    monkeypatch.setattr(_fused, "available", lambda: False)
    monkeypatch.setattr(_engine, "_warned_slow", False)
    with pytest.warns(UserWarning, match="C extension was not built") as caught:
        op = StaticIHVP(G, damp=0.1)
        got = op @ x
        op @ x
        StaticIHVP(G.astype(np.float64), damp=0.1) @ x.astype(np.float64)
    assert len(caught) == 1
    np.testing.assert_allclose(got, want, rtol=8 * np.finfo(np.float32).eps)
