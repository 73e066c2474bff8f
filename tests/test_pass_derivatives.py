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


@needs_kernels
def test_a_window_edited_before_the_backward_still_gives_its_gradient():
    # A review's finding: the Functions read G when the gradient is taken, and a window's
    # rows change in place (through NumPy: PyTorch's version counter does not see it), so an
    # update between the product and its backward mixed new rows with the old factor. A
    # window keeps the pieces' route, whose graph holds float64 copies.
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(5, 24, generator=gen)
    window = DynamicIHVP(5, 24, damp=0.3, dtype=torch.float32, xp=torch)
    for g in G:
        window.update(g.clone())
    G64 = G.to(torch.float64)
    dense = torch.linalg.inv(0.3 * torch.eye(24, dtype=torch.float64) + G64.T @ G64 / 5)
    x = torch.randn(24, generator=gen, requires_grad=True)
    y = window @ x
    window.update(torch.randn(24, generator=gen))
    (g,) = torch.autograd.grad(y, x, torch.ones(24))
    want = dense @ torch.ones(24, dtype=torch.float64)
    torch.testing.assert_close(g.double(), want, rtol=0, atol=4e-7 * float(want.abs().max()))
    # An operator's G modified in place by PyTorch: its version check says so.
    Gs = G.clone()
    op = StaticIHVP(Gs, damp=0.3)
    y = op @ x
    Gs.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, x, torch.ones(24))


@needs_kernels
def test_autograds_legacy_batches_of_cotangents():
    # A review's finding: is_grads_batched, jacobian(vectorize=True) and gradcheck's batched
    # check hand the backward a batched tensor without storage; the kernels cannot read it
    # and the pieces' slices have no batching rule there ("aten::alias").
    from mfac_core._compat import array_namespace
    from mfac_core._engine import combine, project

    gen = torch.Generator().manual_seed(5)
    G = torch.randn(5, 24, generator=gen)
    G64 = G.to(torch.float64)
    dense = torch.linalg.inv(0.3 * torch.eye(24, dtype=torch.float64) + G64.T @ G64 / 5)
    op = StaticIHVP(G, damp=0.3)
    x = torch.randn(24, generator=gen, requires_grad=True)
    (J,) = torch.autograd.grad(op @ x, x, torch.eye(24), is_grads_batched=True)
    tol = {"rtol": 0, "atol": 4e-7 * float(dense.abs().max())}
    torch.testing.assert_close(J.double(), dense, **tol)
    J2 = torch.autograd.functional.jacobian(op.matvec, x.detach(), vectorize=True)
    torch.testing.assert_close(J2.double(), dense, **tol)
    xp = array_namespace(G)
    X = torch.randn(24, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def comb(X, A):
        return combine(xp, G, X, A, alpha=0.7, dtype=torch.float64)

    assert torch.autograd.gradcheck(lambda X: project(xp, G, X), (X,), check_batched_grad=True)
    assert torch.autograd.gradcheck(comb, (X, A), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(comb, (X, A), check_batched_grad=True)
