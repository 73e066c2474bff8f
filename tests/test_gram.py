"""The set-ups' float64 Grams (``_gram``): NumPy's BLAS for PyTorch CPU tensors."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from mfac_core import SpectralIHVP, StaticIHVP
from mfac_core._dynamic_setup import local_gram
from mfac_core._gram import columns_gram, contract_columns, rows_gram

torch = pytest.importorskip("torch")
xpt = pytest.importorskip("array_api_compat.torch")


def _stack(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("shape", [(5, 300), (3, 7, 40)])
def test_a_torch_cpu_gram_is_numpys_bit_for_bit(shape):
    X = _stack(shape)
    T = torch.from_numpy(X)
    np_rows = X @ np.swapaxes(X, -1, -2)
    np_cols = np.swapaxes(X, -1, -2) @ X
    got_rows, got_cols = rows_gram(xpt, T), columns_gram(xpt, T)
    assert isinstance(got_rows, torch.Tensor) and got_rows.dtype == torch.float64
    np.testing.assert_array_equal(got_rows.numpy(), np_rows)
    np.testing.assert_array_equal(got_cols.numpy(), np_cols)


def test_a_strided_torch_piece_is_read_in_place():
    # A (blocks, m, width) view of G's columns, as _layout.piece_stack gives.
    X = _stack((4, 3 * 50))
    T = torch.from_numpy(X).reshape(4, 3, 50).permute(1, 0, 2)
    want = np.stack([X[:, 50 * b : 50 * (b + 1)] @ X[:, 50 * b : 50 * (b + 1)].T for b in range(3)])
    np.testing.assert_allclose(rows_gram(xpt, T).numpy(), want, rtol=1e-14, atol=0)


def test_tensors_numpy_cannot_view_keep_torchs_product():
    X = torch.from_numpy(_stack((4, 30))).requires_grad_(True)
    R = rows_gram(xpt, X)
    assert R.requires_grad  # torch's own product: autograd sees it
    np.testing.assert_allclose(R.detach().numpy(), (X @ X.T).detach().numpy(), rtol=1e-14)
    F = torch.from_numpy(_stack((4, 30))).to(torch.float32)  # not float64: not NumPy's
    np.testing.assert_array_equal(rows_gram(xpt, F).numpy(), (F @ F.T).numpy())


def test_numpy_arrays_keep_their_product():
    X = _stack((6, 80))
    np.testing.assert_array_equal(rows_gram(np, X), X @ X.T)
    np.testing.assert_array_equal(columns_gram(np, X), X.T @ X)


@pytest.mark.parametrize("shape", [(16, 5000), (64, 20000)])
def test_a_tensors_set_up_gram_is_an_arrays(shape):
    # The Gram was PyTorch's MKL dgemm for a tensor, NumPy's dsyrk for an array: their
    # float64 sums of the same exact products round differently (hundreds of entries).
    G = _stack(shape, seed=3).astype(np.float32)
    want = local_gram(np, G)
    np.testing.assert_array_equal(local_gram(xpt, torch.from_numpy(G)).numpy(), want)


@pytest.mark.parametrize("cls", [StaticIHVP, SpectralIHVP])
@pytest.mark.parametrize("block_size", [None, 40, 500])
def test_torch_and_numpy_float32_operators_agree_bit_for_bit(cls, block_size):
    # Same Grams, same kernels: the same float32 results.
    G = (_stack((8, 1000), seed=3) * np.linspace(0.5, 3, 1000)).astype(np.float32)
    x = _stack((1000,), seed=4).astype(np.float32)
    a = cls(G, damp=1e-3, block_size=block_size) @ x
    b = cls(torch.from_numpy(G), damp=1e-3, block_size=block_size) @ torch.from_numpy(x)
    np.testing.assert_array_equal(b.numpy(), a)


def _leaning_pair(d: int) -> np.ndarray:
    """Two float32 gradients with a shared mean, in float64: every product of their Gram
    and of their mean's projection has one sign and about one size."""
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(2, d))
    a = np.array([[1.2616], [1.2985]], np.float32)
    return (a + 2.0**-9 * signs).astype(np.float32).astype(np.float64)


def _libraries():
    """``(name, namespace, make)`` of each library at hand, and the context JAX needs."""
    out = [("numpy", np, lambda a: a), ("torch", xpt, torch.from_numpy)]
    out.append(("torch autograd", xpt, lambda a: torch.from_numpy(a).requires_grad_(True)))
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return out, contextlib.nullcontext()
    from mfac_core._compat import array_namespace

    return [*out, ("jax", array_namespace(jnp.zeros(1)), jnp.asarray)], jax.enable_x64(True)


@pytest.mark.parametrize("d", [1_000, 200_000])
def test_long_contractions_do_not_lean_one_way(d):
    # Regression: PyTorch's CPU matmul of float64 and XLA's CPU dot summed each entry over
    # all d columns in one running sum, which leans one way for such products: PyTorch 2940
    # eps(float64) of the terms' sum (Gram) and 10100 (projection) at d = 2e5, JAX 950 and
    # 8400 at d = 1e6. Sums in levels, as BLAS's: within 1000 here (NumPy's: 37 and 54).
    G = _leaning_pair(d)
    x = G.mean(axis=0)[:, None]
    Gl, xl = G.astype(np.longdouble), x.astype(np.longdouble)
    libs, x64 = _libraries()
    eps = np.finfo(np.float64).eps
    with x64:
        for name, xp, make in libs:
            A, B = make(G), make(x)
            for got, want, terms in (
                (contract_columns(xp, A, B), Gl @ xl, np.abs(G) @ np.abs(x)),
                (contract_columns(xp, A, A.T), Gl @ Gl.T, np.abs(G) @ np.abs(G).T),
            ):
                got = np.asarray(got.detach() if name == "torch autograd" else got, np.float64)
                err = np.abs(got.astype(np.longdouble) - want).astype(np.float64)
                assert np.all(err <= 1000 * eps * terms), (name, np.max(err / terms) / eps)


def test_long_contractions_keep_autograd():
    # A tensor that requires grad goes through PyTorch's own products of blocks of columns
    # (not NumPy's view): its gradient is that of the plain product, to rounding.
    G = _leaning_pair(3_000)
    A = torch.from_numpy(G).requires_grad_(True)
    B = torch.from_numpy(G.mean(axis=0)[:, None])
    got = contract_columns(xpt, A, B)
    assert got.requires_grad
    (grad,) = torch.autograd.grad(got.sum(), A)
    np.testing.assert_array_equal(grad.numpy(), np.broadcast_to(B.numpy().T, G.shape))
    np.testing.assert_allclose(got.detach().numpy(), G @ B.numpy(), rtol=1e-13)
