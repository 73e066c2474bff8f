"""2-byte (float16, bfloat16) storage: the sliding window, the pruning functions, MFAC.

The rule (docs/mathematics.rst, "2-byte storage"): an operator inverts the Fisher of
the gradients *as stored*. Every product is compared with the float64 oracle of the
stored gradients (their 2-byte values, upcast), at the float32 precision of the
compute dtype: ``100 eps32 kappa`` times the amplification ``r(x)`` of a vector in
the window's span without refinement, ``100 eps32 kappa`` with one step of it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import sys
import tracemalloc
import warnings

import numpy as np
import pytest
from conftest import _BACKENDS, close_where_promised, rounded
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac_core import (
    DynamicIHVP,
    EmpiricalFisher,
    IllConditionedWarning,
    SpectralIHVP,
    StaticIHVP,
    WindowOptions,
)
from mfac_core.testing import assert_close, to_numpy

# NumPy's bfloat16 is ml_dtypes' (JAX's bfloat16 gradients as NumPy arrays).
_CASES = [("numpy", "float16"), ("numpy", "bfloat16"), ("torch", "float16"), ("torch", "bfloat16")]
_IDS = [f"{b}-{d}" for b, d in _CASES]


def _backend(name: str, dtype: str | None = None):
    if name == "torch":
        pytest.importorskip("torch")
    if name == "numpy" and dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    return _BACKENDS[name]()


def _as64(a) -> np.ndarray:
    """Any array (bfloat16 tensors included) as a float64 NumPy array."""
    if type(a).__module__.startswith("torch"):
        return a.detach().double().cpu().numpy()
    return to_numpy(a).astype(np.float64)


def _store(dtype: str, a: np.ndarray) -> np.ndarray:
    """``a`` rounded to the 2-byte ``dtype`` (round to nearest even), in float64."""
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # PyTorch's cases without JAX: PyTorch rounds alike
            import torch

            return torch.tensor(a, dtype=torch.float32).to(torch.bfloat16).double().numpy()
        return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return rounded(a, dtype)


def _window_op(backend, m: int, d: int, dtype: str, *, damp: float, **options) -> DynamicIHVP:
    """A window of ``backend``; ``options`` are ``WindowOptions``'s."""
    return DynamicIHVP(
        m,
        d,
        damp=damp,
        dtype=dtype,
        xp=backend.xp,
        device=backend.device,
        options=WindowOptions(**options),
    )


def _kappa(G: np.ndarray, scale_rows: int, damp: float) -> float:
    """The Woodbury form's error scale ``1 + ||G||_2^2 / (m damp)`` (DynamicIHVP's form)."""
    return 1.0 + float(np.linalg.norm(G, 2)) ** 2 / (scale_rows * damp)


def _oracle(G: np.ndarray, scale_rows: int, damp: float, x: np.ndarray) -> np.ndarray:
    """``F^{-1} x`` for ``F = damp I + G^T G / scale_rows``, in float64."""
    C = G @ G.T + scale_rows * damp * np.eye(G.shape[0])
    return (x - G.T @ np.linalg.solve(C, G @ x)) / damp


def _amplified(G, scale_rows, damp, x):
    """The oracle and the error scale ``kappa * r(x)``, ``r(x) = ||x|| / (damp ||F^-1 x||)``."""
    want = _oracle(G, scale_rows, damp, x)
    r = float(np.linalg.norm(x)) / (damp * float(np.linalg.norm(want)))
    return want, _kappa(G, scale_rows, damp) * max(1.0, r)


# -- the sliding window ------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    case=st.sampled_from(_CASES),
    rank=st.integers(1, 8),
    damp=st.sampled_from([1e-1, 1e-3, 1e-5]),
    zero_init=st.booleans(),
    steps=st.integers(1, 14),
)
def test_half_window_matches_the_stored_gradients_oracle(seed, case, rank, damp, zero_init, steps):
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    rng = np.random.default_rng(seed)
    m, d = 6, 300
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
    grads = rounded((rng.standard_normal((steps, rank)) * 3.0) @ basis, "float32")
    kw = {"damp": damp, "zero_init": zero_init}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        op = _window_op(backend, m, d, dtype, **kw)
        refined = _window_op(backend, m, d, dtype, refine=1, **kw)
        for g in grads:
            y = op.update_and_matvec(backend.asarray(g, "float32"))
            y1 = refined.update_and_matvec(backend.asarray(g, "float32"))
    assert op.dtype == backend.dtype("float32") and op.storage_dtype == dtype
    assert y.dtype == backend.dtype("float32")
    # Each gradient was rounded once, to the nearest 2-byte value.
    G = _store(dtype, grads[-m:])
    if zero_init:  # the window starts as m zero gradients
        G = np.concatenate([np.zeros((m - G.shape[0], d)), G])
    np.testing.assert_array_equal(_as64(op.window()), G)
    rows = G.shape[0]
    kappa = _kappa(G, rows, damp)
    if 2**-23 * kappa >= 1e-2:
        return  # the stated precision has no correct digit left
    g = grads[-1]
    want, scale = _amplified(G, rows, damp, g)
    close_where_promised(y, want, kappa=scale, err_msg="update_and_matvec")
    assert_close(y1, want, kappa=kappa, err_msg="update_and_matvec, refine=1")
    x = rounded(rng.standard_normal(d), "float32")
    want, scale = _amplified(G, rows, damp, x)
    close_where_promised(op @ backend.asarray(x, "float32"), want, kappa=scale, err_msg="random x")
    mean = rounded(G.mean(axis=0), "float32")
    X = np.stack([x, mean], axis=1)
    Y = refined.matmat(backend.asarray(X, "float32"))
    assert_close(Y[:, 1], _oracle(G, rows, damp, mean), kappa=kappa, err_msg="mean, refine=1")


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
def test_half_window_checkpoints_edits_and_damping(case, rng):
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    m, d, damp = 5, 400, 1e-2
    grads = rounded(rng.standard_normal((9, d)), "float32")
    op = _window_op(backend, m, d, dtype, damp=damp)
    for g in grads[:7]:
        op.update(backend.asarray(g, "float32"))
    # The state keeps the storage dtype; it restores bit for bit.
    state = op.state_dict()
    assert state["grads"].dtype == op.window().dtype == backend.dtype(dtype)
    twin = _window_op(backend, m, d, dtype, damp=damp)
    twin.load_state_dict(state)
    for g in grads[7:]:
        a = op.update_and_matvec(backend.asarray(g, "float32"))
        b = twin.update_and_matvec(backend.asarray(g, "float32"))
        np.testing.assert_array_equal(_as64(a), _as64(b))
    with pytest.raises(TypeError, match="dtype"):
        _window_op(backend, m, d, "float32", damp=damp).load_state_dict(state)
    if backend.is_numpy and dtype == "bfloat16":
        # A state saved with numpy.save comes back with its bfloat16 grads as raw |V2
        # values: the refusal says how to view them, and the view restores the state.
        saved = dict(state, grads=state["grads"].view("V2"))
        fresh = _window_op(backend, m, d, dtype, damp=damp)
        view = re.escape("state['grads'].view(ml_dtypes.bfloat16)")
        with pytest.raises(TypeError, match=r"has dtype \|V2, expected bfloat16 .*" + view):
            fresh.load_state_dict(saved)
        fresh.load_state_dict(dict(saved, grads=saved["grads"].view(state["grads"].dtype)))
    # A window built at once from the stored gradients is the same operator.
    G = _store(dtype, grads[-m:])
    x = rounded(rng.standard_normal(d), "float32")
    kappa = _kappa(G, m, damp)
    whole = DynamicIHVP.from_window(op.window(), damp=damp)
    assert whole.storage_dtype == dtype
    for each in (op, whole):
        assert_close(each @ backend.asarray(x, "float32"), _oracle(G, m, damp, x), kappa=kappa)
    # Another damping, refactorised from the stored Gram matrix.
    op.set_damp(1e-1)
    assert_close(
        op @ backend.asarray(x, "float32"),
        _oracle(G, m, 1e-1, x),
        kappa=_kappa(G, m, 1e-1),
    )
    # Removals: the oldest, then one in the middle.
    op.remove_oldest()
    op.remove(op.slots[1])
    G = np.delete(G[1:], 1, axis=0)
    assert_close(
        op @ backend.asarray(x, "float32"),
        _oracle(G, 3, 1e-1, x),
        kappa=_kappa(G, 3, 1e-1),
    )
    np.testing.assert_array_equal(_as64(op.window()), G)


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
def test_half_window_takes_its_storage_dtype_and_refuses_overflow(case, rng):
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    m, d = 3, 50
    op = _window_op(backend, m, d, dtype, damp=1.0)
    g = rng.standard_normal(d)
    op.update(backend.asarray(_store(dtype, g), dtype))  # the storage dtype as given
    op.update(backend.asarray(g, "float32"))  # float32, rounded
    np.testing.assert_array_equal(_as64(op.window()), _store(dtype, np.stack([g, g])))
    before = op.state_dict()
    with pytest.raises(TypeError, match="dtype"):  # float64 would lose precision silently
        op.update(backend.asarray(g, "float64"))
    big = g.copy()
    big[7] = 1e5  # beyond float16's largest finite value 65504; bfloat16 has float32's range
    if dtype == "float16":
        for call in (op.update, op.update_and_matvec):
            with pytest.raises(ValueError, match="overflows"):
                call(backend.asarray(big, "float32"))
        nan = g.copy()
        nan[0] = np.nan
        unchecked = _window_op(backend, m, d, dtype, damp=1.0, check_finite=False)
        with pytest.raises(ValueError, match="NaN"):
            unchecked.update(backend.asarray(nan, "float32"))
    else:
        # kappa ~ 1e10 / (m damp): within reach of the float64 factor and passes, so no
        # warning (docs/mathematics.rst, "Exact passes").
        with warnings.catch_warnings():
            warnings.simplefilter("error", IllConditionedWarning)
            op.update(backend.asarray(big, "float32"))
        op.remove(op.slots[-1])
    after = op.state_dict()
    assert after["window_slots"] == before["window_slots"]
    np.testing.assert_array_equal(_as64(after["grads"]), _as64(before["grads"]))


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
def test_half_window_dtype_is_the_librarys_float32_dtype(case):
    """A 2-byte window computes in float32: its ``dtype`` is the same float32 dtype object
    as a float32 window's (NumPy's ``dtype('float32')``, not the scalar type
    ``numpy.float32``), so that its repr and messages print ``dtype=float32``."""
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    op = _window_op(backend, 2, 5, dtype, damp=0.1)
    ref = _window_op(backend, 2, 5, "float32", damp=0.1)
    assert op.dtype == ref.dtype
    assert type(op.dtype) is type(ref.dtype)
    assert f"dtype={ref.dtype}," in repr(op)


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
def test_static_and_spectral_2byte_dtype_is_the_librarys_float32_dtype(case):
    """The static operators of 2-byte G, and the derived spectral ones, report float32
    as a float32 G's operator does: NumPy's ``dtype('float32')``, with ``itemsize`` and
    ``name``, not the scalar type ``numpy.float32``."""
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    G32 = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    G = backend.asarray(_store(dtype, G32.astype(np.float64)), dtype=dtype)
    ref = StaticIHVP(backend.asarray(G32, dtype="float32"), damp=0.1)
    spectral = SpectralIHVP(G, damp=0.1)
    for op in (StaticIHVP(G, damp=0.1), spectral, spectral.sqrt(), spectral.with_damp(1.0)):
        assert op.dtype == ref.dtype
        assert type(op.dtype) is type(ref.dtype)
        assert f"dtype={ref.dtype}," in repr(op)


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
@pytest.mark.parametrize("block_size", [None, 10])
def test_empirical_fisher_of_2byte_gradients_is_the_stored_gradients_fisher(case, block_size):
    """EmpiricalFisher of 2-byte G: products, columns and diagonal within 8 eps32 of the
    float64 Fisher of the stored gradients (per coordinate for the diagonal), float32
    results, NaN refused; a 2-byte StaticIHVP of the same G inverts it."""
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    rng = np.random.default_rng(3)
    m, d, damp = 6, 37, 1e-3
    G64 = _store(dtype, rng.standard_normal(d) + 0.1 * rng.standard_normal((m, d)))
    G = backend.asarray(G64, dtype=dtype)
    F = damp * np.eye(d)
    for lo in range(0, d, block_size or d):
        hi = min(d, lo + (block_size or d))
        F[lo:hi, lo:hi] += G64[:, lo:hi].T @ G64[:, lo:hi] / m
    X = np.stack([G64.mean(axis=0), rng.standard_normal(d)], axis=1).astype(np.float32)
    op = EmpiricalFisher(G, damp=damp, block_size=block_size)
    assert op.storage_dtype == dtype
    eps32 = float(np.finfo(np.float32).eps)
    Y = op.matmat(backend.asarray(X, dtype="float32"))
    assert Y.dtype == op.dtype == backend.dtype("float32")
    for j in range(2):
        want = F @ X[:, j].astype(np.float64)
        x = backend.asarray(X[:, j], dtype="float32")
        assert_close(_as64(op.matvec(x)), want, dtype="float32", factor=8)
        assert_close(_as64(Y[:, j]), want, dtype="float32", factor=8)
    diag = _as64(op.diagonal())
    assert np.max(np.abs(diag - np.diag(F)) / np.diag(F)) <= 8 * eps32
    inverse = StaticIHVP(G, damp=damp, block_size=block_size)
    x = backend.asarray(X[:, 1], dtype="float32")
    kappa = float(np.linalg.cond(F))
    assert_close(_as64(op.matvec(inverse.matvec(x))), X[:, 1], dtype="float32", kappa=kappa)
    G64[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        EmpiricalFisher(backend.asarray(G64, dtype=dtype), damp=damp)


def test_half_window_dtypes_the_library_lacks(strict_device1, monkeypatch):
    with pytest.raises(TypeError, match="no bfloat16"):
        DynamicIHVP(2, 4, damp=1.0, dtype="bfloat16", xp=strict_device1.xp)
    with monkeypatch.context() as mp:  # NumPy's bfloat16 is ml_dtypes', where installed
        mp.setitem(sys.modules, "ml_dtypes", None)
        with pytest.raises(TypeError, match=r"no bfloat16.*where ml_dtypes is installed"):
            DynamicIHVP(2, 4, damp=1.0, dtype="bfloat16")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    # The passes read the machine's byte order only.
    # Its refusal says so: the swapped dtype prints as "dtype(bfloat16)", which the
    # message listed as accepted.
    swapped = np.dtype(ml_dtypes.bfloat16).newbyteorder("S")
    with pytest.raises(TypeError, match=r"dtype must be.*bfloat16 in the byte order that is no"):
        DynamicIHVP(2, 4, damp=1.0, dtype=swapped)
    with pytest.raises(TypeError, match=r"G\.astype\(G\.dtype\.newbyteorder\('='\)\)"):
        DynamicIHVP.from_window(np.ones((2, 4), swapped), damp=1.0)
    # numpy.save writes a bfloat16 window as raw |V2 values; numpy.load gives those back.
    with pytest.raises(TypeError, match=re.escape("G.view(ml_dtypes.bfloat16)")):
        DynamicIHVP.from_window(np.ones((2, 4), ml_dtypes.bfloat16).view("V2"), damp=1.0)
    with pytest.raises(TypeError, match="no float16"):
        DynamicIHVP(2, 4, damp=1.0, dtype="float16", xp=strict_device1.xp)
    with pytest.raises(TypeError, match="dtype"):
        DynamicIHVP(2, 4, damp=1.0, dtype="float8")
    with pytest.raises(TypeError, match="dtype"):
        DynamicIHVP(2, 4, damp=1.0, dtype=np.int16)


def test_half_window_keeps_no_float32_copy(rng):
    # Memory: the 2-byte buffer plus O(m^2) float64 matrices, nothing of m x d float32.
    m, d = 16, 20_000
    grads = rng.standard_normal((m + 3, d)).astype(np.float32)
    # The same steps on a small window first: the first factorisation of the process
    # imports scipy.linalg (the NumPy backend, _linalg._numpy, loads it on first use),
    # whose ~4 MB of modules would count as kept where this test runs first or alone.
    warm = DynamicIHVP(2, 8, damp=1e-2, dtype="float16")
    for g in grads[:3, :8]:
        warm.update_and_matvec(g)
    tracemalloc.start()
    op = DynamicIHVP(m, d, damp=1e-2, dtype="float16")
    for g in grads:
        op.update_and_matvec(g)
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert kept <= 2 * m * d + 8 * (4 * m * m + 4 * d) + 64 * 1024
    assert op._G.dtype == np.float16 and op._G.shape == (m, d)


def test_half_window_of_nearly_collinear_gradients(rng):
    # One gradient repeated with a tiny damping: float32 products of the rounded rows
    # can make the factor fail; the window then recomputes in float64 (from the stored
    # gradient, not the given one) instead of refusing.
    m, d, damp = 12, 2000, 1e-6
    g = rng.standard_normal(d).astype(np.float32) * 30
    op = DynamicIHVP(m, d, damp=damp, dtype="float16", options=WindowOptions(zero_init=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        for k in range(2 * m):
            op.update(g * np.float32(1 + 1e-3 * (k % 3)))
    G = _as64(op.window())
    gram = to_numpy(op._gram)[np.ix_(op.slots, op.slots)]
    np.testing.assert_allclose(gram, G @ G.T, rtol=1e-5 * 1, atol=1e-6 * float(np.max(G @ G.T)))
    x = rounded(rng.standard_normal(d), "float32")
    close_where_promised(
        op @ x.astype(np.float32), _oracle(G, m, damp, x), kappa=_kappa(G, m, damp), dtype="float32"
    )


# -- the PyTorch optimizer ---------------------------------------------------------------------


def _mfac_problem(seed: int, dtype_name: str = "float32"):
    """A small classifier and its batches (the same for every run of one seed)."""
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 10, generator=gen, dtype=dtype)
    w = torch.randn(10, 3, generator=gen, dtype=dtype)
    y = torch.argmax(X @ w + 0.3 * torch.randn(256, 3, generator=gen, dtype=dtype), dim=1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).to(dtype)
    batches = [(X[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    return model, batches, (X, y)


def _loss(model, data) -> float:
    import torch

    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data[0]), data[1]))


def _train(model, opt, batches, epochs: int) -> None:
    import torch

    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


@functools.cache
def _trained_losses(name: str) -> tuple[float, float]:
    """The loss before and after training with a window of ``name`` gradients (the float32
    run, the same for every 2-byte dtype below, is trained once)."""
    import torch

    from mfac_core.torch import MFAC

    kw = {"lr": 0.05, "num_grads": 16, "damp": 1e-3, "momentum": 0.5}
    model, batches, data = _mfac_problem(0)
    start = _loss(model, data)
    dt = None if name == "float32" else getattr(torch, name)
    opt = MFAC(model.parameters(), grad_dtype=dt, **kw)
    _train(model, opt, batches, epochs=5)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt.ihvp.storage_dtype == (None if dt is None else name)
    assert opt.state_dict()["state"][0]["window"]["grads"].dtype == getattr(torch, name)
    assert (opt.steps, opt.skipped_steps, opt.rejected_grads) == (40, 0, 0)
    return start, _loss(model, data)


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16"])
def test_mfac_trains_with_a_2byte_window(grad_dtype):
    pytest.importorskip("torch")
    start, trained = _trained_losses("float32")
    results = {"float32": trained, grad_dtype: _trained_losses(grad_dtype)[1]}
    gain = start - results["float32"]
    assert gain > 0.3 * start  # the float32 run learns
    # The 2-byte window learns as much, to a tenth of the float32 run's gain.
    assert results[grad_dtype] <= results["float32"] + 0.1 * gain


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16"])
def test_mfac_2byte_window_checkpoints(grad_dtype):
    torch = pytest.importorskip("torch")
    import copy
    import io

    from mfac_core.torch import MFAC

    dt = getattr(torch, grad_dtype)
    kw = {"lr": 0.05, "num_grads": 4, "damp": 1e-3, "momentum": 0.5, "grad_dtype": dt}
    model, batches, _ = _mfac_problem(1)
    opt = MFAC(model.parameters(), **kw)
    _train(model, opt, batches[:6], epochs=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    assert twin_opt.defaults["grad_dtype"] == dt
    _train(model, opt, batches[6:], epochs=1)
    _train(twin_model, twin_opt, batches[6:], epochs=1)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    fresh, _, _ = _mfac_problem(2)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = MFAC(fresh.parameters(), **kw)
    fresh_opt.load_state_dict(ckpt["opt"])
    _train(fresh, fresh_opt, batches[6:], epochs=1)
    for a, b, c in zip(
        model.parameters(), fresh.parameters(), twin_model.parameters(), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(a, c)
    # A float32 window cannot take the 2-byte state (nor the reverse).
    other, _, _ = _mfac_problem(1)
    with pytest.raises(ValueError, match="dtype"):
        MFAC(other.parameters(), **{**kw, "grad_dtype": None}).load_state_dict(ckpt["opt"])
    with pytest.raises(TypeError, match="grad_dtype"):
        MFAC(other.parameters(), **{**kw, "grad_dtype": torch.float64})


def test_mfac_2byte_window_skips_and_rejects():
    torch = pytest.importorskip("torch")
    from mfac_core.torch import MFAC, MFACStepWarning

    model, batches, _ = _mfac_problem(3)
    kw = {"lr": 0.05, "num_grads": 4, "damp": 1e-3, "grad_dtype": torch.float16}
    opt = MFAC(model.parameters(), **kw)
    _train(model, opt, batches[:3], epochs=1)
    x, y = batches[3]

    def backward(bad: float) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        next(iter(model.parameters())).grad.view(-1)[0] = bad

    # A NaN gradient skips the step; one beyond float16's range is left out of the
    # window and stepped with the previous window.
    backward(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(MFACStepWarning, match="NaN"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    window = opt.ihvp.state_dict()
    backward(1e6)
    with pytest.warns(MFACStepWarning, match="beyond the range"):
        opt.step()
    assert (opt.steps, opt.skipped_steps, opt.rejected_grads) == (4, 1, 1)
    assert opt.ihvp.slots == window["window_slots"]
    assert torch.equal(opt.ihvp.window(), window["grads"][window["window_slots"]])
    # errors="raise": the window's own error, and nothing changes.
    strict = MFAC(model.parameters(), **kw, errors="raise")
    backward(1e6)
    with pytest.raises(ValueError, match="overflows"):
        strict.step()
    assert strict.steps == 0 and not bool(torch.any(strict.ihvp.window()))  # m zeros still


def test_mfac_2byte_window_with_float64_parameters():
    # float64 parameters, a bfloat16 window: the step is F^{-1} g of the stored window
    # in float32, and the parameters stay float64.
    torch = pytest.importorskip("torch")
    from mfac_core.torch import MFAC

    model, batches, _ = _mfac_problem(4, "float64")
    opt = MFAC(model.parameters(), lr=1.0, num_grads=3, damp=1e-2, grad_dtype=torch.bfloat16)
    _train(model, opt, batches[:2], epochs=1)
    x, y = batches[2]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).to(torch.float32)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert after.dtype == torch.float64
    G = _as64(opt.ihvp.window())
    g64 = g.double().numpy()
    want = _oracle(G, 3, 1e-2, g64)
    assert_close((before - after).numpy(), want, kappa=_kappa(G, 3, 1e-2), dtype="float32")


# -- the pruning functions ---------------------------------------------------------------------


def _pruning_case(case, rng, m=8, d=120):
    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    G = _store(dtype, rng.standard_normal((m, d)) + 0.5 * rng.standard_normal(d))
    theta = rounded(rng.standard_normal(d), "float32")
    return backend, backend.asarray(G, dtype), G, theta


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
def test_pruning_with_2byte_gradients(case, rng):
    from mfac_core import pruning
    from mfac_core.testing import dense_inverse

    backend, Gs, G, theta = _pruning_case(case, rng)
    m, d = G.shape
    damp = 1e-2
    t32 = backend.asarray(theta, "float32")
    Finv = dense_inverse(G, damp)
    kappa = 1.0 + float(np.linalg.norm(G, 2)) ** 2 / (m * damp)
    # OBD: the diagonal of the stored gradients' Fisher.
    obd = pruning.obd_saliency(t32, Gs, damp=damp)
    assert obd.dtype == backend.dtype("float32")
    assert_close(obd, theta**2 * (damp + (G**2).sum(axis=0) / m) / 2, dtype="float32")
    # OBS with the paper's update: the selection ranks the oracle's saliencies (to
    # float32 rounding), and the update is the oracle's for that selection.
    res = pruning.prune(t32, Gs, sparsity=0.5, damp=damp)
    assert res.theta.dtype == backend.dtype("float32")
    pruned = ~to_numpy(res.mask).astype(bool)
    assert pruned.sum() == d // 2
    rho = theta**2 / (2 * np.diag(Finv))
    slack = 1e3 * 2**-23 * kappa * float(rho.max())
    assert rho[pruned].max() <= rho[~pruned].min() + slack
    coef = np.where(pruned, theta / np.diag(Finv), 0.0)
    want = np.where(pruned, 0.0, theta - Finv @ coef)
    assert_close(res.theta, want, kappa=kappa)
    assert np.all(to_numpy(res.theta)[pruned] == 0)
    # The joint update: stationary where the weights are free.
    joint = pruning.prune(t32, Gs, sparsity=0.5, damp=damp, update="joint")
    keep = to_numpy(joint.mask).astype(bool)
    delta = to_numpy(joint.theta).astype(np.float64) - theta
    Fm = damp * np.eye(d) + G.T @ G / m
    scale = float(np.linalg.norm(Fm, 2) * np.linalg.norm(delta))
    assert np.linalg.norm((Fm @ delta)[keep]) <= 1e3 * 2**-23 * kappa * scale
    # Block-wise Fishers and the damping sweep work on a float32 copy: the same
    # results as for the float32 copy given.
    G32 = backend.asarray(G, "float32")
    for kw in ({"block_size": 30}, {"block_size": 30, "saliency": "obd", "update": "joint"}):
        a = pruning.prune(t32, Gs, sparsity=0.4, damp=damp, **kw)
        b = pruning.prune(t32, G32, sparsity=0.4, damp=damp, **kw)
        np.testing.assert_array_equal(to_numpy(a.mask), to_numpy(b.mask))
        np.testing.assert_allclose(to_numpy(a.theta), to_numpy(b.theta), rtol=1e-5, atol=1e-6)
    a = pruning.damping_sweep(t32, Gs, [1e-3, 1e-1], sparsity=0.3)
    b = pruning.damping_sweep(t32, G32, [1e-3, 1e-1], sparsity=0.3)
    np.testing.assert_array_equal(to_numpy(a.saliency), to_numpy(b.saliency))
    # Gradual pruning with 2-byte gradients from grad_fn.
    steps = []
    out = pruning.gradual_prune(
        t32,
        lambda th, mk: Gs,
        sparsity=0.75,
        steps=3,
        damp=damp,
        callback=lambda t, r: steps.append(to_numpy(r.mask).astype(bool)),
    )
    assert (to_numpy(out.mask) == 0).sum() == 90
    assert all(np.all(b <= a) for a, b in itertools.pairwise(steps))
    # 2-byte gradients compute in float32: float64 weights are refused.
    with pytest.raises(TypeError, match="float32 weights"):
        pruning.prune(backend.asarray(theta, "float64"), Gs, sparsity=0.5)


@pytest.mark.parametrize("case", _CASES, ids=_IDS)
def test_half_window_step_fast_paths_match_the_generic_ones(case, rng, monkeypatch):
    """The step's per-library forms (PyTorch, NumPy) of its two O(d) pieces, against the
    Array-API forms they replace: the stored row and ``g`` in one ``(2, d)`` array, and
    ``max |g|`` without ``abs``'s temporary; with NumPy float16 also the F16C casts of the
    row's write and widening (``_fused.cast16``) against NumPy's, and the row's write in one
    loop (``_fused.store_row``) against the library's own ops. Same bits of every
    result, same refusals (NaN, infinities, overflow of either sign), the window unchanged
    after each; PyTorch also with the checks deferred as on a device (read with the row
    edit's, once)."""
    from mfac_core import _dynamic_checks, _dynamic_window, _fused, _pieces

    backend_name, dtype = case
    backend = _backend(backend_name, dtype)
    xp = backend.xp
    m, d = 3, 40
    top = 7e4 if dtype == "float16" else 3.4e38  # past the storage's largest finite value
    edges = np.array([[1.0, -3.0, 2.0], [1.0, np.nan, -5.0], [-np.inf, 1.0, 0.0],
                      [np.nan, -np.inf, 1.0], [-top, 1.0, top / 2]])  # fmt: skip
    for e in edges:
        a = backend.asarray(e, "float32")
        fast = float(_dynamic_checks.largest_magnitude(xp, a))
        generic = float(_dynamic_checks.generic_largest_magnitude(xp, a))
        assert fast == generic or (np.isnan(fast) and np.isnan(generic)), e
    grads = rng.standard_normal((m + 3, d)).astype(np.float32)
    bad = []
    for where, value in [(5, np.nan), (6, np.inf), (7, -np.inf), (8, top), (9, -top)]:
        b = grads[0].copy()
        b[where] = value
        bad.append(b)

    def run(generic: bool, deferred: bool) -> tuple[list, list[str], dict]:
        place = _pieces.simulate_device() if deferred else contextlib.nullcontext()
        with monkeypatch.context() as mp, place:
            if generic:
                mp.setattr(_dynamic_window, "paired_rows", _dynamic_window.generic_paired_rows)
                mp.setattr(_dynamic_checks, "largest_magnitude",
                           _dynamic_checks.generic_largest_magnitude)  # fmt: skip
                mp.setattr(_fused, "cast16", lambda src, dst: False)  # NumPy's casts
                mp.setattr(_fused, "stores", lambda storage: False)  # the library's own ops
            op = _window_op(backend, m, d, dtype, damp=0.1, check_finite=False)
            out = [_as64(op.update_and_matvec(backend.asarray(g, "float32"))) for g in grads]
            before = op.state_dict()
            errors = []
            for b in bad:
                with pytest.raises(ValueError) as info:
                    op.update_and_matvec(backend.asarray(b, "float32"))
                errors.append(str(info.value))
                status = op._update_and_matvec_checked(backend.asarray(b, "float32"))
                assert status.s is None and str(status.error) == errors[-1]
            after = op.state_dict()
            assert after.keys() == before.keys()
            for key, value in before.items():
                if key in ("grads", "gram") or hasattr(value, "shape"):
                    np.testing.assert_array_equal(_as64(after[key]), _as64(value), err_msg=key)
                else:
                    assert after[key] == value, key
            return out, errors, after

    for deferred in [False, True] if backend_name == "torch" else [False]:
        out_f, err_f, state_f = run(False, deferred)
        out_g, err_g, state_g = run(True, deferred)
        for a, b in zip(out_f, out_g, strict=True):
            np.testing.assert_array_equal(a, b)
        assert err_f == err_g
        assert all("NaN or infinity" in e for e in err_f[:3])
        assert all("overflows" in e for e in err_f[3:]), err_f
        np.testing.assert_array_equal(_as64(state_f["grads"]), _as64(state_g["grads"]))


def _bfloat16_edge_bits(rng) -> np.ndarray:
    """float32 bit patterns for rounding to bfloat16: random ones, exact ties (both parities
    of the kept bit), one below and above each tie, subnormals, and values next to
    bfloat16's largest (below, at, and past the midpoint to infinity). No NaN."""
    rand = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    kept = rng.integers(0, 2**16, size=512, dtype=np.uint64).astype(np.uint32) << 16
    tie = kept | 0x8000
    top = np.uint32(0x7F7F0000)  # bfloat16's largest finite value, 3.3895e38
    near = np.array([top, top | 0x7FFF, top | 0x8000, top | 0x8001, 0x7F7FFFFF], np.uint32)
    small = np.array([1, 0x7FFF, 0x8000, 0x8001, 0x18000, 0x7FFFFF], np.uint32)
    bits = np.concatenate([rand, tie, tie - 1, tie + 1, near, small])
    bits = np.concatenate([bits, bits ^ np.uint32(0x80000000)])  # both signs
    return bits[~np.isnan(bits.view(np.float32))]


def test_numpy_bfloat16_rounds_as_pytorch_does(rng):
    # NumPy's bfloat16 (ml_dtypes), the C extension's row write and PyTorch round float32
    # to nearest even alike, to the bit: ties, subnormals, values past bfloat16's largest
    # (to infinity). All 2**32 - 2**24 non-NaN patterns were compared once; this samples.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    from mfac_core import _fused

    f = _bfloat16_edge_bits(rng).view(np.float32)
    want = torch.from_numpy(f.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    with np.errstate(over="ignore"):
        got = f.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got.view(np.int16), want)
    assert not np.isinf(f).any() and np.isinf(got.astype(np.float32)).any()  # past the top
    if _fused.stores("bfloat16"):
        row = np.empty(f.shape, np.uint16)
        assert _fused.store_row(f, row, storage="bfloat16") is not None
        np.testing.assert_array_equal(row.view(np.int16), want)


def test_numpy_and_pytorch_bfloat16_windows_are_bit_identical(rng):
    # The same engine reads both: the same gradients give the same stored bits, the same
    # products and the same refusals, with and without the C extension's row write (NumPy's
    # own path casts through ml_dtypes). And a static operator on the same bits agrees.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    from mfac_core import _fused, _host_rows

    m, d, damp = 4, 300, 1e-2
    grads = (rng.standard_normal((m + 3, d)) * np.logspace(-3, 3, d)).astype(np.float32)
    # Ties of both parities, one either side, subnormals.
    edges = np.array(
        [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 1, 0x8000, 0x18000, 0x807FFFFF]
    )
    grads[:, :8] = edges.astype(np.uint32).view(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    results = []
    for generic in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if generic:
                mp.setattr(_fused, "stores", lambda storage: False)
            a = DynamicIHVP(m, d, damp=damp, dtype=ml_dtypes.bfloat16)
            b = DynamicIHVP(m, d, damp=damp, dtype=torch.bfloat16, xp=torch)
            # The extension writes NumPy's rows as PyTorch's: as bfloat16 bits.
            views = _host_rows.host_row_views(a._xp, a._G, grads[0])
            assert (views is None) == (generic or not _fused.stores("bfloat16"))
            assert views is None or views[2] == "bfloat16"
            for g in grads:
                ya = a.update_and_matvec(g)
                yb = b.update_and_matvec(torch.from_numpy(g))
                np.testing.assert_array_equal(ya, yb.numpy())
            wa, wb = a.window(), b.window()
            assert wa.dtype == np.dtype(ml_dtypes.bfloat16) and a.storage_dtype == "bfloat16"
            np.testing.assert_array_equal(wa.view(np.int16), wb.view(torch.int16).numpy())
            np.testing.assert_array_equal(a @ x, (b @ torch.from_numpy(x)).numpy())
            big = grads[0].copy()
            big[5] = -3.4e38  # rounds to -inf in bfloat16
            for op, g in ((a, big), (b, torch.from_numpy(big))):
                with pytest.raises(ValueError, match="overflows its range"):
                    op.update(g)
            results.append(wa.copy())
            static = StaticIHVP(wa, damp=damp)
            static_t = StaticIHVP(wb, damp=damp)
            assert static.storage_dtype == "bfloat16" and static.dtype == np.float32
            np.testing.assert_array_equal(static @ x, (static_t @ torch.from_numpy(x)).numpy())
            np.testing.assert_array_equal(static.diagonal(), static_t.diagonal().numpy())
    np.testing.assert_array_equal(results[0].view(np.int16), results[1].view(np.int16))


@pytest.mark.parametrize("saved_by", ["numpy", "torch"])
def test_a_bfloat16_window_state_of_the_other_library_says_how_to_convert_it(saved_by, rng):
    # Regression: a NumPy window's state (ml_dtypes' bfloat16) given to a PyTorch window, or
    # the reverse, was refused with "convert it explicitly first" only, which neither
    # torch.as_tensor nor Tensor.numpy() can do for bfloat16. The message gives the bit
    # view that does; followed, the load gives the saved window back.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")

    m, d, damp = 3, 5, 1e-2
    windows = {
        "numpy": DynamicIHVP(m, d, damp=damp, dtype=ml_dtypes.bfloat16),
        "torch": DynamicIHVP(m, d, damp=damp, dtype=torch.bfloat16, xp=torch),
    }
    source = windows[saved_by]
    target = windows["torch" if saved_by == "numpy" else "numpy"]
    for g in rng.standard_normal((m + 1, d)).astype(np.float32):
        source.update(g if saved_by == "numpy" else torch.from_numpy(g))
    state = source.state_dict()
    grads = state["grads"]
    if saved_by == "numpy":
        said = "torch.from_numpy(state['grads'].view(numpy.int16)).view(torch.bfloat16)"
        converted = torch.from_numpy(grads.view(np.int16)).view(torch.bfloat16)
        rest = {k: torch.as_tensor(state[k]) for k in ("gram", "factor")}
    else:
        said = "state['grads'].cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)"
        converted = grads.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        rest = {k: state[k].numpy() for k in ("gram", "factor")}
    with pytest.raises(TypeError, match=re.escape(said)):
        target.load_state_dict(state)
    if saved_by == "numpy":  # as the window of an MFAC state
        from mfac_core.torch import MFAC

        p = torch.nn.Parameter(torch.zeros(d))
        opt = MFAC([p], num_grads=m, damp=damp, zero_init=False, grad_dtype=torch.bfloat16)
        saved = opt.state_dict()
        saved["state"][0]["window"] = state
        with pytest.raises(ValueError, match=re.escape(said)):
            opt.load_state_dict(saved)
    target.load_state_dict({**state, **rest, "grads": converted})
    x = rng.standard_normal(d).astype(np.float32)
    want = to_numpy(source.matvec(x if saved_by == "numpy" else torch.from_numpy(x)))
    got = to_numpy(target.matvec(torch.from_numpy(x) if saved_by == "numpy" else x))
    np.testing.assert_array_equal(got, want)


def test_the_bfloat16_conversion_of_a_gradient_is_code_to_copy(rng):
    # Regression: the conversion named the value by its message name, "gradient 0", which
    # made "torch.from_numpy(gradient 0.view(numpy.int16))", no Python; followed, the code
    # now given converts the gradient.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")

    G = rng.standard_normal((2, 5)).astype(ml_dtypes.bfloat16)
    store = torch.empty(2, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"^gradient 0 is a numpy array") as info:
        StaticIHVP.from_gradients(iter(G), num_grads=2, dim=5, damp=0.1, grads_out=store)
    said = "torch.from_numpy(x.view(numpy.int16)).view(torch.bfloat16), x being it"
    assert said in str(info.value)
    converted = [torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in G]
    StaticIHVP.from_gradients(iter(converted), num_grads=2, dim=5, damp=0.1, grads_out=store)
    np.testing.assert_array_equal(store.view(torch.int16).numpy(), G.view(np.int16))
