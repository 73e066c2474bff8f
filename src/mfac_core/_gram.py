"""The float64 products over G's columns: the set-ups' Grams, and the long contractions.

A set-up sums Gram matrices of float64 column pieces (``X X^T``, and ``X^T X`` of
the blocks no wider than m) wherever the C extension's own Gram does not serve
(``_engine.gram_kernel``): the one BLAS-3 work of such a set-up (``_layout.chunk_gram``).
NumPy's OpenBLAS sees that the two operands are one array and its transpose and calls
``dsyrk`` (half the flops of a ``dgemm``). PyTorch's CPU build calls MKL's ``dgemm``
under its OpenMP threads, which wait for each other where another process keeps a core
busy: StaticIHVP's set-up of a 64 x 10**6 float32 tensor took 244 ms on one Zen 4 core
against 183 ms through NumPy, and 595 against 220 ms on two cores with one of them busy
(alike on two quiet cores; benchmarks/RESULTS.md). So a PyTorch CPU tensor's Gram is
NumPy's, over the same memory (no copy either way), and equals a NumPy array's bit for
bit. :func:`contract_columns` is every long contraction over the columns (a rows Gram,
the engine's projection where no kernel serves): ``@``, except where a library sums it
as one running sum per entry (XLA's CPU ``dot``, PyTorch's CPU ``matmul``), where BLAS
and cuBLAS block their sums. A PyTorch CPU tensor that autograd, forward-mode AD or
``torch.func`` must see gets NumPy's product too, through an autograd Function whose
derivatives are its own products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ._compat import (
    Array,
    array_namespace,
    forward_ad_active,
    functionalizing,
    is_functorch_wrapped,
    is_jax_namespace,
    is_torch_namespace,
)
from ._pieces import is_accelerator

__all__ = ["columns_gram", "contract_columns", "rows_gram"]

#: Columns of one product of :func:`contract_columns`'s blocks (or m, where larger), and (on
#: JAX) the blocks' products summed from zero before they join the total.
BLOCK_TERMS = 256
SPAN_BLOCKS = 64


def rows_gram(xp: Any, X: Array, /) -> Array:
    """``X @ X^T`` of a float64 stack ``(..., m, w)``, in ``xp``."""
    return _gram(xp, X, rows=True)


def columns_gram(xp: Any, X: Array, /) -> Array:
    """``X^T @ X`` of a float64 stack ``(..., m, w)``, in ``xp``."""
    return _gram(xp, X, rows=False)


def contract_columns(xp: Any, A: Array, B: Array, /) -> Array:
    """``A @ B`` of float64 stacks ``(..., m, w)`` and ``(..., w, k)``, w long (G's columns).

    On JAX's CPU backend the stacks may be of any floating dtype: each block is widened to
    float64 as it is sliced, so that no float64 copy of them is made.

    XLA's CPU ``dot`` sums the w terms of an entry one after the other, and where
    they have one sign and size (a squared norm; gradients with a shared mean) the
    roundings lean one way: an error growing with w, not with its square root (two
    float32 gradients with a shared mean at w = 1e6: a Gram entry 950 eps(float64) of its
    terms' sum off, their mean's projection 8400; the product 1160 eps(float32) off at
    kappa = 1e6). There the sums go in levels, as BLAS and cuBLAS block theirs: products
    of :data:`BLOCK_TERMS` (or m) columns, summed from zero in spans of
    :data:`SPAN_BLOCKS`, then the spans (:func:`_jax_contract`). PyTorch's CPU
    ``matmul`` of float64 sums alike (a float64 G's product 200x NumPy's error): its
    tensors go to NumPy's BLAS over the same memory (:func:`_host_matmul`), and so do
    those that autograd, forward-mode AD or ``torch.func`` must see, through an autograd
    Function whose derivatives are its own products (:func:`_host_contraction`; its
    product is the plain route's bit for bit). Tensors of another dtype (a direct call:
    the engine widens its pieces first), under ``torch.func.functionalize`` (no rule for
    autograd Functions), or without storage where the Function's forward reads them
    (traced by ``make_fx``; batched by the legacy vmap of ``autograd.grad``'s
    ``is_grads_batched``) go to products of blocks of columns summed by ``sum``
    (:func:`_blocks`). Elsewhere, and for JAX and PyTorch on a GPU (cuBLAS; a loop of
    small products would be launches), ``A @ B``.
    """
    if is_accelerator(xp, A):
        return A @ B
    if is_torch_namespace(xp):
        a, b = _numpy_view(xp, A), _numpy_view(xp, B)
        if a is not None and b is not None:
            import torch

            return torch.from_numpy(_host_matmul(a, b))
        if A.dtype == xp.float64 and B.dtype == xp.float64 and not functionalizing():
            return _host_contraction().apply(A, B)
        return _blocks(xp, A, B)
    if not is_jax_namespace(xp):
        return A @ B
    return _jax_contract()(A, B)


def _host_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` by NumPy, each operand in a layout that NumPy hands to BLAS.

    Where an operand's last two axes have a zero stride, or strides of no whole row or
    column (a broadcast cotangent, a view with odd strides), NumPy's ``matmul`` runs its
    own loops, one running sum per entry: that operand is copied to C order. A long
    column-major ``a`` (a Fortran-ordered G) goes in blocks (:func:`_column_major_blocks`).
    """
    a, b = _blas_operand(a), _blas_operand(b)
    rows, w = a.shape[-2:]
    if rows > 1 and a.strides[-2] == a.itemsize and w >= 2 * BLOCK_TERMS:
        return _column_major_blocks(a, b)
    return a @ b


def _column_major_blocks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for a column-major ``a``, in blocks of :data:`BLOCK_TERMS` columns, the
    blocks' products added as a balanced tree.

    OpenBLAS's ``dgemv`` over a column-major matrix adds its columns one after the other:
    two float64 gradients with a shared mean, stored as the columns of a Fortran-ordered
    G (d = 2e5), left ``G x`` 10123 eps(float64) of its terms off, 54 for the same G in C
    order. The blocks' products go through one batched ``matmul`` (no copy of ``a``).
    """
    c = BLOCK_TERMS
    n = a.shape[-1] // c
    lead, m, k = a.shape[:-2], a.shape[-2], b.shape[-1]
    blocks = np.swapaxes(a[..., : n * c].reshape(*lead, m, n, c), -3, -2)
    parts = blocks @ b[..., : n * c, :].reshape(*lead, n, c, k)  # (..., n, m, k)
    # Contiguous along the blocks: NumPy sums that axis pairwise.
    out = np.ascontiguousarray(np.moveaxis(parts, -3, -1)).sum(axis=-1)
    if n * c < a.shape[-1]:
        out += a[..., n * c :] @ b[..., n * c :, :]
    return out


def _blas_operand(a: np.ndarray) -> np.ndarray:
    """``a``, or its C-ordered copy where NumPy's ``matmul`` would not hand it to BLAS."""
    size, (rows, cols), (row_step, col_step) = a.itemsize, a.shape[-2:], a.strides[-2:]
    c_order = col_step == size and row_step % size == 0 and row_step >= cols * size
    f_order = row_step == size and col_step % size == 0 and col_step >= rows * size
    return a if c_order or f_order else np.ascontiguousarray(a)


@functools.cache
def _host_contraction() -> Any:
    """The autograd Function of :func:`contract_columns` for PyTorch CPU float64 tensors.

    Its forward is NumPy's product over the tensors' memory (:func:`_host_matmul`), the
    plain route's own sums. Its backward and its forward-mode derivative are products of
    the Function itself: the gradients sum over k and m, but their derivatives with
    respect to the cotangent (double backward) and the tangents' products sum over w,
    which torch's ``matmul`` would sum in one running sum. ``torch.func``'s ``grad``,
    ``vjp`` and ``jvp`` hand the forward their unwrapped tensors; ``vmap`` would hand it
    batched ones, without storage, so its rule is one product of stacks with the batch
    in front (an operand without one broadcast to it).
    """
    import torch

    class HostContraction(torch.autograd.Function):
        @staticmethod
        def forward(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            a, b = _storage_view(A), _storage_view(B)
            if a is None or b is None:  # traced, or batched by the legacy vmap (gradcheck's)
                return _blocks(array_namespace(A, B), A, B)
            return torch.from_numpy(_host_matmul(a, b))

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            A, B = inputs
            # Each operand's gradient needs the other operand alone (as torch's matmul
            # saves): a widened piece of G is not kept for a gradient that does not use it.
            needs = ctx.needs_input_grad
            ctx.save_for_backward(A if needs[1] else None, B if needs[0] else None)
            if forward_ad_active():  # torch.func.jvp opens a dual level too
                ctx.save_for_forward(A, B)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, Any]:
            A, B = ctx.saved_tensors
            grad_A = None if B is None else HostContraction.apply(grad, B.mT)
            grad_B = None if A is None else HostContraction.apply(A.mT, grad)
            return grad_A, grad_B

        @staticmethod
        def jvp(ctx: Any, dA: torch.Tensor | None, dB: torch.Tensor | None) -> torch.Tensor:
            A, B = ctx.saved_tensors
            if dA is None:
                return HostContraction.apply(A, dB)
            out = HostContraction.apply(dA, B)
            return out if dB is None else out + HostContraction.apply(A, dB)

        @staticmethod
        def vmap(info: Any, in_dims: tuple[Any, Any], A: torch.Tensor, B: torch.Tensor) -> Any:
            def front(X: torch.Tensor, dim: int | None) -> torch.Tensor:
                return X.expand(info.batch_size, *X.shape) if dim is None else X.movedim(dim, 0)

            return HostContraction.apply(front(A, in_dims[0]), front(B, in_dims[1])), 0

    return HostContraction


def _blocking(A: Any) -> tuple[int, int]:
    """``(c, n)``: columns of one block of ``A`` (:data:`BLOCK_TERMS`, or m), whole blocks."""
    c = max(BLOCK_TERMS, A.shape[-2])
    return c, A.shape[-1] // c


def _blocks(xp: Any, A: Array, B: Array) -> Array:
    """:func:`contract_columns` as one batched product of blocks of columns, then ``sum``.

    Each block's entries sum :data:`BLOCK_TERMS` (or m) terms; ``xp.sum`` adds the
    blocks (PyTorch's sums are cascaded, not one running sum). The stack of partial
    products is no larger than ``A``.
    """
    lead, m, w, k = tuple(A.shape[:-2]), A.shape[-2], A.shape[-1], B.shape[-1]
    c, n = _blocking(A)
    if n < 2:
        return A @ B
    nlead = len(lead)
    blocks = xp.permute_dims(
        xp.reshape(A[..., : n * c], (*lead, m, n, c)), (*range(nlead), nlead + 1, nlead, nlead + 2)
    )
    out = xp.sum(blocks @ xp.reshape(B[..., : n * c, :], (*lead, n, c, k)), axis=-3)
    if n * c < w:
        out = out + A[..., n * c :] @ B[..., n * c :, :]
    return out


@functools.cache
def _jax_contract() -> Callable[[Any, Any], Any]:
    """:func:`contract_columns` on JAX, jitted (inlined where the caller is jitted).

    A loop of products over the blocks: a Gram's took 0.6-1.0x the time of one ``dot`` on
    XLA's CPU backend, a few vectors' 2.5-3.5x (m = 8 to 256, 2**14 to 2**19 columns);
    one batched product of all blocks took 1.4-3x a loop's.
    """
    import jax
    from jax import lax

    def contract(A: Any, B: Any) -> Any:
        a_axis, b_axis = A.ndim - 1, B.ndim - 2
        c, n = _blocking(A)
        f64 = jax.numpy.float64
        if n < 2:
            return A.astype(f64) @ B.astype(f64)

        def block(j: Any) -> Any:
            a = lax.dynamic_slice_in_dim(A, j * c, c, a_axis).astype(f64)
            return a @ lax.dynamic_slice_in_dim(B, j * c, c, b_axis).astype(f64)

        # Static trip counts: the loops are scans, which reverse-mode autodiff goes through.
        def span(j0: Any, count: int) -> Any:
            return lax.fori_loop(0, count - 1, lambda i, acc: acc + block(j0 + 1 + i), block(j0))

        spans, rest = divmod(n, SPAN_BLOCKS)
        # Loops start from their first term, not from zeros: under shard_map a carry has
        # the type of the body's result, which varies over the devices as A and B do.
        if spans:
            out = span(0, SPAN_BLOCKS)
            if spans > 1:
                out = lax.fori_loop(
                    1, spans, lambda s, total: total + span(s * SPAN_BLOCKS, SPAN_BLOCKS), out
                )
            if rest:
                out = out + span(spans * SPAN_BLOCKS, rest)
        else:
            out = span(0, rest)  # n >= 2 blocks
        if n * c < A.shape[-1]:
            out = out + A[..., n * c :].astype(f64) @ B[..., n * c :, :].astype(f64)
        return out

    return jax.jit(contract)


def _gram(xp: Any, X: Array, *, rows: bool) -> Array:
    Xt = xp.matrix_transpose(X)
    if rows:  # over the columns, which may be many (NumPy's view of a tensor there too)
        return contract_columns(xp, X, Xt)
    host = _numpy_view(xp, X)  # X^T X sums over the m rows
    if host is None:
        return Xt @ X
    import torch

    return torch.from_numpy(np.swapaxes(host, -1, -2) @ host)


def _numpy_view(xp: Any, X: Array) -> np.ndarray | None:
    """The NumPy view of a PyTorch CPU float64 tensor that no derivative sees, or None."""
    if not is_torch_namespace(xp):
        return None
    import torch

    if X.device.type != "cpu" or X.dtype != torch.float64 or X.requires_grad:
        return None
    if forward_ad_active():  # a dual tensor's view would drop its tangent
        return None
    return _storage_view(X)


def _storage_view(X: Any) -> np.ndarray | None:
    """The NumPy array over a CPU tensor's memory, past autograd, or None.

    None for a ``torch.func`` wrapper too (``functionalize``'s has a NumPy view, of memory
    that does not hold its values), and while PyTorch traces its operations (``make_fx``,
    ``torch.export``): NumPy's product would be a constant of the trace.
    """
    import torch

    if is_functorch_wrapped(X):
        return None
    C: Any = torch._C
    try:
        modes = C._TorchDispatchModeKey
        if any(C._get_dispatch_mode(k) is not None for k in (modes.PROXY, modes.FAKE)):
            return None
    except AttributeError:  # another PyTorch, without these functions
        pass
    try:
        return X.detach().numpy()
    except RuntimeError:  # no plain storage (legacy vmap's batches, the conjugate bit)
        return None
