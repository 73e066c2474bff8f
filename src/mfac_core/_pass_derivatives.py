"""The pass engine's two passes as PyTorch autograd Functions, for products taking derivatives.

Where autograd, forward-mode AD or ``torch.func`` takes derivatives through the vectors of
a product (``x``, and the ``m x k`` coefficients ``A`` solved from ``G x``), the kernels
cannot run the passes as they are: they read NumPy views and record nothing. The pieces'
route that does record (``contract_columns``) widens each piece of a float32 G to float64
for each pass: ``StaticIHVP``, m = 64, d = 1e6, one thread, 127 ms a product against 24
for the kernels. These Functions run the kernels in their forward and state their
derivatives as passes again: the projection's gradient is a combination and the
combination's a projection, both exact sums in float64 (the engine's), so that
derivatives of any order read G through the kernels, or through the pieces where those
cannot serve (a batched or traced tensor without storage; autograd's legacy batches of
cotangents take one float64 copy of G's columns). G is a constant: the operators store it
detached, and the Functions save it for the backward (PyTorch's in-place check). A window,
whose rows change in place through NumPy (unseen by that check), does not come here
(``_engine.kernels_under_derivatives``), nor does forward mode: under a dual level every
tensor counts as tracked (``_compat.tracks_derivatives``), G too, and the pieces serve.

``pass_functions(project, combine)`` builds them around the engine's own functions, which
call them back where derivatives are taken (``_engine`` imports this module).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._compat import array_namespace, is_legacy_batched
from ._gram import contract_columns

__all__ = ["pass_functions"]


def _folded(batch_size: int, X: Any, dim: int | None) -> tuple[Any, Callable[[Any], Any]]:
    """``X`` batched along ``dim`` as the columns of one ``(n, B * k)`` operand, and the
    inverse for a result of ``(r, B * k)``: a pass serves any number of vectors at once."""
    Xb = X.expand(batch_size, *X.shape) if dim is None else X.movedim(dim, 0)
    B, n, k = Xb.shape
    Xf = Xb.permute(1, 0, 2).reshape(n, B * k)

    def unfold(Y: Any) -> Any:
        return Y.reshape(Y.shape[0], B, k).permute(1, 0, 2)

    return Xf, unfold


@functools.cache
def pass_functions(project: Callable[..., Any], combine: Callable[..., Any]) -> tuple[Any, Any]:
    """Autograd Functions of the engine's ``project`` and ``combine``.

    Parameters
    ----------
    project, combine : callable
        ``_engine.project`` and ``_engine.combine``, which call these Functions back where
        derivatives are taken.

    Returns
    -------
    tuple
        ``(Project, Combine)``: ``Project.apply(X, G, start, stop)`` is
        ``project(xp, G, X, start=start, stop=stop)``, and
        ``Combine.apply(X, A, G, alpha, dtype, start, stop)`` is
        ``combine(xp, G, X, A, alpha=alpha, dtype=dtype, start=start, stop=stop)``.

    Notes
    -----
    Their gradients in ``X`` and ``A`` call ``project`` and ``combine`` again, which come
    back here where those gradients are themselves differentiated; their ``vmap`` rules
    (``jacrev``, ``hessian``) fold the batch into the passes' columns.
    """
    import torch

    class Project(torch.autograd.Function):
        @staticmethod
        def forward(X: Any, G: Any, start: int, stop: int) -> Any:
            # The inputs come as they were given (requiring grad, under no_grad): detached,
            # the engine gives them to the kernels.
            X = X.detach()
            return project(array_namespace(X), G, X, start=start, stop=stop)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            X, G, ctx.start, ctx.stop = inputs
            ctx.save_for_backward(G)  # PyTorch's in-place check on G, at the gradient
            ctx.x_dtype = X.dtype

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None, None]:
            (G,) = ctx.saved_tensors
            if is_legacy_batched(grad):
                Gt = G[:, ctx.start : ctx.stop].to(torch.float64).mT
                return (Gt @ grad.to(torch.float64)).to(ctx.x_dtype), None, None, None
            # G^T grad, as the combination -(0 - G^T grad): exact, and summed in float64.
            grad = grad.contiguous()
            zero = torch.zeros((ctx.stop - ctx.start, grad.shape[1]), dtype=torch.float64)
            xp = array_namespace(grad)
            GtP = combine(xp, G, zero, grad, alpha=-1.0, dtype=xp.float64,
                          start=ctx.start, stop=ctx.stop)  # fmt: skip
            return GtP.to(ctx.x_dtype), None, None, None

        @staticmethod
        def vmap(info: Any, in_dims: tuple[Any, ...], X: Any, G: Any, start: int, stop: int) -> Any:
            Xf, unfold = _folded(info.batch_size, X, in_dims[0])
            return unfold(Project.apply(Xf, G, start, stop)), 0

    class Combine(torch.autograd.Function):
        @staticmethod
        def forward(X: Any, A: Any, G: Any, alpha: float, dtype: Any, start: int, stop: int) -> Any:
            X, A = X.detach(), A.detach()
            xp = array_namespace(X)
            return combine(xp, G, X, A, alpha=alpha, dtype=dtype, start=start, stop=stop)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            X, _, G, ctx.alpha, ctx.dtype, ctx.start, ctx.stop = inputs
            ctx.save_for_backward(G)  # PyTorch's in-place check on G, at the gradient
            ctx.x_dtype = X.dtype

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            (G,) = ctx.saved_tensors
            needs = ctx.needs_input_grad
            grad_X = (ctx.alpha * grad.to(torch.float64)).to(ctx.x_dtype) if needs[0] else None
            grad_A = None
            if needs[1] and is_legacy_batched(grad):
                # Autograd's legacy batch (is_grads_batched) has no storage for the kernels,
                # and no rule for the pieces' slices: one float64 copy of the columns.
                G64 = G[:, ctx.start : ctx.stop].to(torch.float64)
                grad_A = -ctx.alpha * contract_columns(torch, G64, grad.to(torch.float64))
            elif needs[1]:
                xp = array_namespace(grad)
                P = project(xp, G, grad.contiguous(), start=ctx.start, stop=ctx.stop)
                grad_A = -ctx.alpha * P
            return grad_X, grad_A, None, None, None, None, None

        @staticmethod
        def vmap(
            info: Any, in_dims: tuple[Any, ...], X: Any, A: Any, G: Any, alpha: float,
            dtype: Any, start: int, stop: int,
        ) -> Any:  # fmt: skip
            Xf, unfold = _folded(info.batch_size, X, in_dims[0])
            Af, _ = _folded(info.batch_size, A, in_dims[1])
            return unfold(Combine.apply(Xf, Af, G, alpha, dtype, start, stop)), 0

    return Project, Combine
