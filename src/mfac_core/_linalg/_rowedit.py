"""O(k^2) replacement of one row and column of ``C = U^T U`` (float64, any namespace).

The sliding-window operator replaces one gradient per step, which replaces one
row and column of its k x k capacitance matrix. Instead of refactorising in
O(k^3) it edits the upper Cholesky factor U in O(k^2): it deletes row and
column p (a rank-one update of the trailing block) and appends the new ones
(one triangular solve).

The rank-one update uses the product form of Gill, Golub, Murray and Saunders
(1974): ``V^T V + u u^T = V^T (I + q q^T) V`` with ``q = V^{-T} u``, where the
factor of ``I + q q^T`` is known in closed form and is *semiseparable*: its
off-diagonal blocks have rank one. Applied by row panels of ``block`` rows,
from the bottom up, each panel costs one small matrix product plus a rank-one
correction from a running sum, so the whole update is BLAS-3 rich, without a
loop of k dependent scalar steps, in any Array-API library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._compat import device
from .._errors import NotPositiveDefinite

__all__ = ["PANEL_ROWS", "PIVOT_TOL", "replace"]

#: Rows per panel of the rank-one update: the panel products cost ~PANEL_ROWS * k^2
#: flops in all, the Python loop k / PANEL_ROWS steps (timings of the choice:
#: benchmarks/RESULTS.md).
PANEL_ROWS = 32
#: A new pivot at or below this fraction of its diagonal entry ``c`` counts as a failed
#: edit (the appended row is numerically dependent on the others).
PIVOT_TOL = 1e-13

#: ``solve(T, B, lower, trans)``: a backend's triangular solve.
Solve = Callable[[Any, Any, bool, bool], Any]


def _rank_one_update(xp: Any, V: Any, q: Any, out: Any, at: int, block: int) -> None:
    """Write the upper factor of ``V^T (I + q q^T) V`` into ``out[at:, at:]``."""
    n = V.shape[0]
    s = 1.0 + xp.cumulative_sum(q * q, include_initial=True)
    # (I + q q^T) = K^T K with K upper: K_jj = sqrt(s_{j+1}/s_j),
    # K_ji = beta_j q_i for i > j, where s_j = 1 + sum_{i<j} q_i^2.
    diag = xp.sqrt(s[1:] / s[:-1])
    beta = q / xp.sqrt(s[1:] * s[:-1])
    idx = xp.arange(min(block, n), device=device(V))
    upper = idx[:, None] < idx[None, :]
    on_diag = idx[:, None] == idx[None, :]
    # tail = sum over the rows below the current panel of q_i V_i.
    tail = xp.zeros((n,), dtype=V.dtype, device=device(V))
    for j0 in reversed(range(0, n, block)):
        j1 = min(j0 + block, n)
        b = j1 - j0
        VJ = V[j0:j1, j0:]
        qJ, bJ = q[j0:j1], beta[j0:j1]
        K = xp.where(
            upper[:b, :b],
            bJ[:, None] * qJ[None, :],
            xp.where(on_diag[:b, :b], diag[j0:j1, None], 0.0),
        )
        out[at + j0 : at + j1, at + j0 : at + n] = K @ VJ + bJ[:, None] * tail[None, j0:]
        out[at + j0 : at + j1, at : at + j0] = 0.0
        tail[j0:] = tail[j0:] + qJ @ VJ


def replace(
    xp: Any,
    solve: Solve,
    U: Any,
    p: int,
    b: Any,
    c: Any,
    out: Any,
    /,
    *,
    block: int = PANEL_ROWS,
    deferred: bool = False,
) -> Any:
    """Factor of C with row/column p removed and ``[b; c]`` appended last.

    Parameters
    ----------
    solve : callable
        The backend's triangular solve, ``solve(T, B, lower, trans)``.
    U : array (k, k)
        Upper factor of ``C``, float64.
    p : int
        The row and column to remove.
    b : array (k - 1,)
        The new row's entries against the remaining rows, in their order.
    c : float or 0-d array
        The new diagonal entry.
    out : array (k, k)
        Where the new factor is written (not ``U``).
    deferred : bool
        Return ``(out, margin)`` instead of checking the pivot: ``margin`` (a 0-d
        device array) is positive exactly when the pivot is, so that the caller
        reads it with its other checks in one transfer (no synchronisation here).

    Raises ``NotPositiveDefinite`` (unless ``deferred``) if the new pivot is not
    positive, that is, if the new row is numerically dependent on the others.
    """
    k = U.shape[0]
    n = k - 1
    dev = device(U)
    # q = V^{-T} u for the trailing block V = U[p+1:, p+1:] and u = U[p, p+1:].
    # Solving with the whole (contiguous) U gives it without copying V:
    # U^T y = U_pp e_p has y[:p] = 0, y[p] = 1 and y[p+1:] = -q.
    rhs = xp.where(xp.arange(k, device=dev) == p, U[p, p], 0.0)
    q = -solve(U, rhs[:, None], False, True)[p + 1 :, 0]
    if p:
        out[:p, :p] = U[:p, :p]
        out[:p, p:n] = U[:p, p + 1 :]
        out[p:n, :p] = 0.0
    _rank_one_update(xp, U[p + 1 :, p + 1 :], q, out, p, block)
    # Append: with the last row and column set to those of the identity, ``out``
    # is a whole triangular matrix whose solve gives the new column.
    out[:n, n] = 0.0
    out[n, :] = xp.astype(xp.arange(k, device=dev) == n, out.dtype)
    rhs = xp.concat([b, xp.zeros((1,), dtype=b.dtype, device=dev)])
    col = solve(out, rhs[:, None], False, True)[:n, 0]
    out[:n, n] = col
    if deferred:
        pivot = c - xp.vecdot(col, col)
        # sqrt of a negative pivot is NaN; the caller discards such a factor.
        out[n, n] = xp.sqrt(pivot)
        return out, pivot - PIVOT_TOL * xp.abs(c)
    c = float(c)
    pivot = c - float(xp.vecdot(col, col))
    if not pivot > PIVOT_TOL * abs(c):
        raise NotPositiveDefinite(f"pivot {pivot:g} not positive")
    out[n, n] = pivot**0.5
    return out
