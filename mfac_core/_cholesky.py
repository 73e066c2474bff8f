"""O(k^2) edits of an upper Cholesky factor ``C = U^T U`` (float64, any namespace).

The sliding-window operator replaces one gradient per step, which replaces one
row and column of its capacitance matrix. Instead of refactorising in O(k^3),
it deletes the row/column from the factor (a rank-one update of the trailing
block) and appends the new one (a triangular solve), both O(k^2).

The rank-one update uses the product form of Gill, Golub, Murray and Saunders
(1974): ``U^T U + u u^T = U^T (I + q q^T) U`` with ``q = U^{-T} u``, and the
Cholesky factor of ``I + q q^T`` is known in closed form. Applying it needs one
triangular solve and a handful of elementwise passes with a cumulative sum, all
vectorised: no loop of k sequential steps, so it runs as well through NumPy,
PyTorch or CuPy as a compiled kernel would, up to a small constant.
"""

from __future__ import annotations

from typing import Any

from . import _linalg
from ._compat import device

__all__ = ["append", "delete", "rank_one_update"]


def rank_one_update(xp: Any, U: Any, u: Any, /) -> Any:
    """The upper factor of ``U^T U + u u^T`` for upper triangular ``U`` (n x n)."""
    n = U.shape[0]
    if n == 0:
        return U
    q = _linalg.solve_triangular(xp, U, u[:, None], lower=False, trans=True)[:, 0]
    # s_j = 1 + sum_{i<j} q_i^2 for j = 0..n; the factor of I + q q^T has diagonal
    # sqrt(s_{j+1}/s_j) and entries q_i q_j / sqrt(s_j s_{j+1}) below it.
    s = 1.0 + xp.cumulative_sum(q * q, include_initial=True)
    diag = xp.sqrt(s[1:] / s[:-1])
    beta = q / xp.sqrt(s[1:] * s[:-1])
    M = q[:, None] * U
    # Row j of the result adds beta_j * sum_{i>j} M_i: a suffix sum, written as the
    # total minus a prefix sum so that the zeros below the diagonal stay exact.
    prefix = xp.cumulative_sum(M, axis=0)
    suffix = prefix[-1:, :] - prefix
    return diag[:, None] * U + beta[:, None] * suffix


def delete(xp: Any, U: Any, p: int, /) -> Any:
    """The factor of ``C`` without row and column ``p``."""
    k = U.shape[0]
    tail = rank_one_update(xp, U[p + 1:, p + 1:], U[p, p + 1:])
    if p == 0:
        return tail
    top = xp.concat([U[:p, :p], U[:p, p + 1:]], axis=1)
    zeros = xp.zeros((k - 1 - p, p), dtype=U.dtype, device=device(U))
    return xp.concat([top, xp.concat([zeros, tail], axis=1)], axis=0)


def append(xp: Any, U: Any, b: Any, c: float, /) -> Any:
    """The factor of ``[[C, b], [b^T, c]]``.

    Raises ``_linalg._NotPositiveDefinite`` if the new pivot is not positive.
    """
    k = U.shape[0]
    dev = device(U)
    if k == 0:
        if not c > 0.0:
            raise _linalg._NotPositiveDefinite("non-positive pivot")
        return xp.full((1, 1), c ** 0.5, dtype=U.dtype, device=dev)
    col = _linalg.solve_triangular(xp, U, b[:, None], lower=False, trans=True)
    pivot = c - float(xp.sum(col * col))
    # A pivot lost to rounding means the new gradient is (numerically) in the span
    # of the window at this damping: the caller refactorises or reports it.
    if not pivot > 1e-13 * abs(c):
        raise _linalg._NotPositiveDefinite(f"pivot {pivot:g} not positive")
    top = xp.concat([U, col], axis=1)
    bottom = xp.concat([xp.zeros((1, k), dtype=U.dtype, device=dev),
                        xp.full((1, 1), pivot ** 0.5, dtype=U.dtype, device=dev)], axis=1)
    return xp.concat([top, bottom], axis=0)
