"""O(k^2) replacement of one row and column of ``C = U^T U`` (float64, any namespace).

The sliding-window operators replace one gradient per step, which replaces one
row and column of the k x k capacitance matrix. Instead of refactorising in
O(k^3) the edit works on the upper Cholesky factor U in O(k^2): it deletes row
and column p (a rank-one update of the trailing block) and appends the new ones
(one triangular solve). This module is the one implementation of that edit, for
``DynamicIHVP`` (:func:`replace`, into a caller's buffer) and for
:mod:`mfac_core.jax`'s window (:func:`replaced`, a pure function of arrays,
traceable by ``jax.jit`` for a static p).

Deleting row and column p leaves ``V^T V + u u^T`` as the trailing block, for
``V = U[p+1:, p+1:]`` and ``u = U[p, p+1:]``. The rank-one update uses the
product form of Gill, Golub, Murray and Saunders (1974): with ``q = V^{-T} u``,
``V^T V + u u^T = V^T (I + q q^T) V`` and ``I + q q^T = K^T K``, K upper with

    K_jj = sqrt(s_{j+1} / s_j),   K_ji = beta_j q_i  (i > j),
    s_j = 1 + sum_{i<j} q_i^2,    beta_j = q_j / sqrt(s_j s_{j+1})

(:func:`coefficients`), so the new trailing factor is ``K V``. K is
*semiseparable*: its off-diagonal blocks have rank one. For a panel J of rows,
the rows J of ``K V`` are ``K_JJ V_J + beta_J tail_J`` (:func:`panel_rows`), where
``tail_J`` is the sum of ``q_i V_i`` over the rows i below the panel: one sweep
from the bottom up with a running sum, each panel one small matrix product.

How the sweep runs depends on the library, not the arithmetic. Eager libraries
(NumPy, PyTorch, CuPy, array-api-strict) take panels of :data:`PANEL_ROWS` rows
from Python (:func:`panels`): BLAS-3 products, k / PANEL_ROWS steps. Under XLA
(:mod:`._jax`) a ``lax.fori_loop`` takes panels of one row, written in place into
the result: XLA's CPU products of small panels cost more than they save there
(benchmarks/RESULTS.md), and a cumulative sum over the rows (``lax.cumsum``, log k
passes over the factor) took 7.6 ms at k = 1024 where the row loop took 0.8 ms.

Appending is one triangular solve ``W^T col = b`` with the edited factor W and
the pivot ``sqrt(c - col^T col)``, checked against :data:`PIVOT_TOL`
(:func:`appended`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .._compat import cumulative_sum, device
from .._errors import NotPositiveDefinite

__all__ = [
    "PANEL_ROWS",
    "PIVOT_TOL",
    "appended",
    "coefficients",
    "diagonal_block",
    "panel_rows",
    "panels",
    "replace",
    "replaced",
    "trailing_q",
]

#: Rows per panel of the rank-one update: the panel products cost ~PANEL_ROWS * k^2
#: flops in all, the Python loop k / PANEL_ROWS steps (timings of the choice:
#: benchmarks/RESULTS.md).
PANEL_ROWS = 32
#: A new pivot at or below this fraction of its diagonal entry ``c`` counts as a failed
#: edit (the appended row is numerically dependent on the others).
PIVOT_TOL = 1e-13

#: ``solve(T, B, lower, trans)``: a backend's triangular solve.
Solve = Callable[[Any, Any, bool, bool], Any]


def trailing_q(xp: Any, solve: Solve, U: Any, p: int, /, *, writable: bool = False) -> Any:
    """``q = V^{-T} u`` for ``V = U[p+1:, p+1:]`` and ``u = U[p, p+1:]``, without copying V.

    ``U^T y = U_pp e_p`` has ``y[:p] = 0``, ``y[p] = 1`` and ``y[p+1:] = -q``. With
    ``writable`` (an eager library's arrays) ``U_pp e_p`` is written into zeros: two
    calls where the pure form takes four, the same vector.
    """
    if writable:
        rhs = xp.zeros((U.shape[0], 1), dtype=U.dtype, device=device(U))
        rhs[p, 0] = U[p, p]
    else:
        rhs = xp.where(xp.arange(U.shape[0], device=device(U)) == p, U[p, p], 0.0)[:, None]
    return -solve(U, rhs, False, True)[p + 1 :, 0]


def coefficients(xp: Any, q: Any, /) -> tuple[Any, Any]:
    """The diagonal ``K_jj`` and the factors ``beta_j`` of K (``I + q q^T = K^T K``)."""
    s = 1.0 + cumulative_sum(xp, q * q, include_initial=True)
    return xp.sqrt(s[1:] / s[:-1]), q / xp.sqrt(s[1:] * s[:-1])


def diagonal_block(xp: Any, q: Any, beta: Any, diag: Any, /) -> Any:
    """The block ``K_JJ`` of K for one panel's entries of q, beta and the diagonal."""
    idx = xp.arange(q.shape[0], device=device(q))
    return xp.where(
        idx[:, None] < idx[None, :],
        beta[:, None] * q[None, :],
        xp.where(idx[:, None] == idx[None, :], diag[:, None], 0.0),
    )


def panel_rows(K: Any, VJ: Any, beta: Any, tail: Any, /) -> Any:
    """A panel's rows of ``K V``: ``K_JJ V_J + beta_J tail_J``."""
    return K @ VJ + beta[:, None] * tail[None, :]


def panels(xp: Any, V: Any, q: Any, block: int, /) -> Iterator[tuple[int, Any]]:
    """The rows of ``K V`` panel by panel, bottom-up: ``(j0, rows j0:j0+block from column j0)``.

    V is upper triangular with zeros below the diagonal. Each panel is a new array;
    the caller places it (writes it into a buffer, or concatenates).
    """
    n = V.shape[0]
    dev = device(V)
    diag, beta = coefficients(xp, q)
    # tail = the sum of q_i V_i over the rows below the panel, from the panel's column on:
    # zeros for the bottom panel, and not summed after the top one (at k <= block, the
    # only panel, each array call of the edit costs more than its arithmetic).
    tail = None
    for j0 in reversed(range(0, n, block)):
        j1 = min(j0 + block, n)
        VJ = V[j0:j1, j0:]
        qJ, bJ = q[j0:j1], beta[j0:j1]
        zeros = xp.zeros((j1 - j0,), dtype=V.dtype, device=dev)
        tail = zeros if tail is None else xp.concat([zeros, tail])
        yield j0, panel_rows(diagonal_block(xp, qJ, bJ, diag[j0:j1]), VJ, bJ, tail)
        if j0:
            tail = tail + qJ @ VJ


def appended(xp: Any, c: Any, col: Any, /) -> tuple[Any, Any]:
    """The new pivot's ``(margin, corner)`` for the new column ``col`` and diagonal ``c``.

    ``margin = pivot - PIVOT_TOL |c|`` for the squared pivot ``c - |col|^2`` is
    positive exactly when the edit succeeded (NaN counts as failed); ``corner`` is
    the new last diagonal entry of the factor, ``sqrt(pivot)``, and 1 where the
    edit failed (finite: the caller discards that factor; the square root of a
    negative pivot would be NaN, about which NumPy warns).
    """
    pivot = c - xp.vecdot(col, col)
    # A Python float ``c`` (a host edit's) is used as it is: the same float64 arithmetic.
    margin = pivot - PIVOT_TOL * (abs(c) if isinstance(c, float) else xp.abs(c))
    return margin, xp.sqrt(xp.where(margin > 0, pivot, 1.0))


def replaced(
    xp: Any, solve: Solve, U: Any, p: int, b: Any, c: Any, /, *, block: int = PANEL_ROWS
) -> tuple[Any, Any]:
    """Factor of C with row/column p removed and ``[b; c]`` appended last; and its margin.

    A pure function of arrays (new arrays only, no read on the host), for any
    Array-API namespace; traceable by ``jax.jit`` for a static ``p``, although
    the JAX backend runs its own loop over the rows (``_linalg.replaced_row``).

    Parameters
    ----------
    xp : namespace
        The Array-API namespace of ``U``.
    solve : callable
        The backend's triangular solve, ``solve(T, B, lower, trans)``.
    U : array (k, k)
        Upper factor of ``C``, float64, zeros below the diagonal (as every factor
        from a Cholesky factorisation or from this edit).
    p : int
        The row and column to remove (a Python int).
    b : array (k - 1,)
        The new row's entries against the remaining rows, in their order.
    c : float or 0-d array
        The new diagonal entry.
    block : int
        Rows per panel of the rank-one update.

    Returns
    -------
    new : array (k, k)
        The new upper factor (its last diagonal entry 1 where the edit failed).
    margin : 0-d array
        Positive exactly when the edit succeeded (see :func:`appended`).
    """
    k = U.shape[0]
    n = k - 1
    dev = device(U)
    c = xp.asarray(c, dtype=U.dtype, device=dev)
    blocks = []
    if p:
        blocks.append(xp.concat([U[:p, :p], U[:p, p + 1 :]], axis=1))
    if p < n:
        q = trailing_q(xp, solve, U, p)
        below = [
            xp.concat([xp.zeros((rows.shape[0], p + j0), dtype=U.dtype, device=dev), rows], axis=1)
            for j0, rows in panels(xp, U[p + 1 :, p + 1 :], q, block)
        ]
        blocks.extend(below[::-1])
    W = xp.concat(blocks, axis=0) if blocks else U[:0, :0]
    col = solve(W, b[:, None], False, True)[:, 0] if n else b
    margin, corner = appended(xp, c, col)
    last = xp.concat([xp.zeros((1, n), dtype=U.dtype, device=dev), corner[None, None]], axis=1)
    return xp.concat([xp.concat([W, col[:, None]], axis=1), last], axis=0), margin


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
    """The edit of :func:`replaced`, written into ``out``; the pivot checked unless ``deferred``.

    The same panels and pivot rule as :func:`replaced`, each panel written into
    ``out`` where it belongs: concatenating them first and then copying the whole
    factor into ``out`` took 3x the edit's time at k = 256 and 5x at k = 1024 with
    NumPy (benchmarks/RESULTS.md).

    Parameters
    ----------
    solve : callable
        The backend's triangular solve, ``solve(T, B, lower, trans)``.
    U : array (k, k)
        Upper factor of ``C``, float64, zeros below the diagonal.
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
    if p:
        out[:p, :p] = U[:p, :p]
        out[:p, p:n] = U[:p, p + 1 :]
        out[p:n, :p] = 0.0
    if p < n:
        q = trailing_q(xp, solve, U, p, writable=True)
        for j0, rows in panels(xp, U[p + 1 :, p + 1 :], q, block):
            j1 = j0 + rows.shape[0]
            out[p + j0 : p + j1, p + j0 : n] = rows
            out[p + j0 : p + j1, p : p + j0] = 0.0
    # Append: with the last row and column set to those of the identity, ``out``
    # is a whole triangular matrix whose solve gives the new column.
    out[:n, n] = 0.0
    out[n, :n] = 0.0
    out[n, n] = 1.0
    rhs = xp.zeros((k, 1), dtype=b.dtype, device=dev)
    rhs[:n, 0] = b
    col = solve(out, rhs, False, True)[:n, 0]
    if not isinstance(c, float):
        c = xp.asarray(c, dtype=U.dtype, device=dev)
    margin, corner = appended(xp, c, col)
    if not deferred:
        short = float(margin)
        if not short > 0:
            raise NotPositiveDefinite(
                f"new pivot not positive (margin {short:g} against {PIVOT_TOL:g} |c|)"
            )
    out[:n, n] = col
    out[n, n] = corner
    return (out, margin) if deferred else out
