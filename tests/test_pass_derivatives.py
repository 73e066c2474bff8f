"""The passes as autograd Functions (``mfac_core._pass_derivatives``): kernels under autograd."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mfac_core import DynamicIHVP, SpectralIHVP, StaticIHVP, _fused  # noqa: E402

needs_kernels = pytest.mark.skipif(not _fused.available(), reason="no C extension")


def _operators(G):
    window = DynamicIHVP(G.shape[0], G.shape[1], damp=0.3, dtype=G.dtype, xp=torch)
    for g in G:
        window.update(g.clone())
    return {
        "static": StaticIHVP(G, damp=0.3),
        "spectral": SpectralIHVP(G, damp=0.3),
        "window": window,
    }


def _counting(monkeypatch):
    """How many times the kernels' two passes are called, by name."""
    calls = {"project64": 0, "combine64": 0}
    for name in calls:
        real = getattr(_fused, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(_fused, name, counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_product_that_autograd_sees_runs_in_the_kernels_with_the_same_bits(monkeypatch, dtype):
    # Regression (speed): x requiring grad sent both passes to float64 pieces of G, which
    # for float32 G meant a widened copy of each piece per pass (95 against 17 ms at m = 64,
    # d = 1e6). Now the kernels run them, under autograd Functions, and the values are the
    # no-grad product's bits.
    gen = torch.Generator().manual_seed(0)
    G = (torch.randn(6, 3000, generator=gen, dtype=torch.float64) + 1.0).to(dtype)
    x = torch.randn(3000, generator=gen)
    op = StaticIHVP(G, damp=0.3)
    plain = op @ x
    calls = _counting(monkeypatch)
    xr = x.clone().requires_grad_(True)
    y = op @ xr
    assert y.requires_grad and torch.equal(y.detach(), plain)
    assert calls == {"project64": 1, "combine64": 1}
    (grad,) = torch.autograd.grad(y, xr, x)
    assert calls == {"project64": 2, "combine64": 2}  # the gradient: two passes again
    # F^{-1} is symmetric: the gradient is the product of the cotangent, to its rounding.
    scale = float(plain.abs().max())
    eps = float(torch.finfo(x.dtype).eps)
    torch.testing.assert_close(grad, plain, rtol=0, atol=4 * eps * scale)


@needs_kernels
def test_the_functions_derivatives_of_every_order():
    # The passes themselves (float32 G, float64 operands: what the operators pass them):
    # gradients, second derivatives, forward mode and vmap, against torch's own numerics.
    from mfac_core._compat import array_namespace
    from mfac_core._engine import combine, project

    gen = torch.Generator().manual_seed(1)
    G = torch.randn(4, 12, generator=gen)
    xp = array_namespace(G)
    X = torch.randn(12, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def proj(X):
        return project(xp, G, X)

    def comb(X, A):
        return combine(xp, G, X, A, alpha=0.7, dtype=torch.float64)

    assert torch.autograd.gradcheck(proj, (X,))
    assert torch.autograd.gradgradcheck(proj, (X,))
    assert torch.autograd.gradcheck(comb, (X, A))
    assert torch.autograd.gradgradcheck(comb, (X, A))
    G64 = G.to(torch.float64)
    x, a = X.detach()[:, 0], A.detach()[:, 0]
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(torch.func.jacrev(lambda v: proj(v[:, None])[:, 0])(x), G64, **tol)
    torch.testing.assert_close(torch.func.jacfwd(lambda v: proj(v[:, None])[:, 0])(x), G64, **tol)
    torch.testing.assert_close(
        torch.func.jacrev(lambda u: comb(x[:, None], u[:, None])[:, 0])(a), -0.7 * G64.T, **tol
    )
    batched = torch.func.vmap(lambda v: proj(v[:, None])[:, 0])(X.detach().T)
    torch.testing.assert_close(batched, (G64 @ X.detach()).T, **tol)


@needs_kernels
@pytest.mark.parametrize("kind", ["static", "spectral", "window"])
def test_float32_operators_jacobians_and_hessians_are_the_dense_inverses(kind):
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(4, 12, generator=gen)
    op = _operators(G)[kind]
    G64 = G.to(torch.float64)
    dense = torch.linalg.inv(0.3 * torch.eye(12, dtype=torch.float64) + G64.T @ G64 / 4)
    x = torch.randn(12, generator=gen)
    tol = {"rtol": 0, "atol": 4e-7 * float(dense.abs().max())}
    torch.testing.assert_close(torch.func.jacrev(op.matvec)(x).double(), dense, **tol)
    hessian = torch.func.hessian(lambda u: u @ (op @ u))(x).double()
    torch.testing.assert_close(hessian, 2 * dense, rtol=0, atol=2 * tol["atol"])
    X = torch.randn(12, 3, generator=gen).requires_grad_(True)
    (gX,) = torch.autograd.grad((op @ X).sum(), X)
    torch.testing.assert_close(gX.double(), dense @ torch.ones(12, 3, dtype=torch.float64), **tol)


@needs_kernels
def test_a_cotangent_without_plain_storage_takes_the_pieces():
    # The backward's operand may be expanded (the cotangent of a sum: stride 0) or batched
    # (jacrev's vmap): the Functions make it contiguous, or fold the batch into columns.
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(5, 40, generator=gen, dtype=torch.float32)
    op = StaticIHVP(G, damp=0.3)
    x = torch.randn(40, generator=gen).requires_grad_(True)
    (g_sum,) = torch.autograd.grad((op @ x).sum(), x)
    torch.testing.assert_close(g_sum, op @ torch.ones(40), rtol=0, atol=1e-6)
    jac = torch.func.jacrev(op.matvec)(x.detach())
    cols = torch.stack([op @ e for e in torch.eye(40)], dim=1)
    torch.testing.assert_close(jac, cols, rtol=0, atol=1e-6 * float(cols.abs().max()))


def test_without_kernels_the_derivatives_are_unchanged(monkeypatch):
    # The Functions are for the kernels' route; without the extension (or for a G that the
    # kernels cannot read) the pieces record the graph as before.
    monkeypatch.setattr("mfac_core._engine.host_view", lambda xp, A: None)
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(4, 30, generator=gen)
    op = StaticIHVP(G, damp=0.3)
    G64 = G.to(torch.float64)
    dense = torch.linalg.inv(0.3 * torch.eye(30, dtype=torch.float64) + G64.T @ G64 / 4)
    x = torch.randn(30, generator=gen, requires_grad=True)
    (g,) = torch.autograd.grad(op @ x, x, torch.ones(30))
    want = dense @ torch.ones(30, dtype=torch.float64)
    torch.testing.assert_close(g.double(), want, rtol=0, atol=4e-7 * float(want.abs().max()))
