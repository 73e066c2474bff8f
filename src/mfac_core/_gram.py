"""The set-ups' float64 Gram products, through NumPy's BLAS for PyTorch CPU tensors.

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
bit. Other libraries and
devices, and tensors NumPy cannot view (autograd, torch.func's wrappers), keep ``@``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._compat import Array, is_torch_namespace

__all__ = ["columns_gram", "rows_gram"]


def rows_gram(xp: Any, X: Array, /) -> Array:
    """``X @ X^T`` of a float64 stack ``(..., m, w)``, in ``xp``."""
    return _gram(xp, X, rows=True)


def columns_gram(xp: Any, X: Array, /) -> Array:
    """``X^T @ X`` of a float64 stack ``(..., m, w)``, in ``xp``."""
    return _gram(xp, X, rows=False)


def _gram(xp: Any, X: Array, *, rows: bool) -> Array:
    host = _numpy_view(xp, X)
    if host is None:
        Xt = xp.matrix_transpose(X)
        return X @ Xt if rows else Xt @ X
    Ht = np.swapaxes(host, -1, -2)
    import torch

    return torch.from_numpy(host @ Ht if rows else Ht @ host)


def _numpy_view(xp: Any, X: Array) -> np.ndarray | None:
    """The NumPy view of a PyTorch CPU float64 tensor, or None."""
    if not is_torch_namespace(xp):
        return None
    import torch

    if X.device.type != "cpu" or X.dtype != torch.float64 or X.requires_grad:
        return None
    try:
        return X.numpy()
    except RuntimeError:  # no plain storage (a torch.func wrapper, the conjugate bit)
        return None
