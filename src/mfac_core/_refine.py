"""Iterative refinement of inverse products, with residuals of the forward operator in float64.

A product ``y = F^{-1} x`` computed through the factor has a relative error of
about ``eps * sqrt(kappa) * ||x|| / (damp ||y||)``, which is large for vectors
near the gradients' span (docs/mathematics.rst). One step of refinement,

    r = x - F y   (F = damp I + G^T G / k from the stored gradients, in float64),
    y <- y + F^{-1} r,

brings it down to about ``eps * ||x|| / (damp ||y||) <= eps * kappa``: the
residual is computed from G itself, whose products are backward stable, and
accumulated in float64, so that it is not lost to cancellation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _pieces
from ._compat import Array
from ._finite import float32_overflow_noted, narrowed, note_result_overflow
from ._layout import BlockGroup, chunks, piece_columns, piece_stack

__all__ = ["fisher_residual", "refine"]


def _rows(xp: Any, Y: Array, group: BlockGroup, piece: tuple[int, int, int, int]) -> Array:
    """The rows of ``Y`` (d x k) in a piece as a ``(blocks, width, k)`` view."""
    b0, b1, c0, c1 = piece
    lo, hi = piece_columns(group, piece)
    return xp.reshape(Y[lo:hi, ...], (b1 - b0, c1 - c0, Y.shape[1]))


def fisher_residual(
    xp: Any,
    G: Array,
    groups: tuple[BlockGroup, ...],
    X: Array,
    Y: Array,
    *,
    damp: float,
    scale: float,
) -> Array:
    """``X - F Y`` in float64 for ``F = damp I + scale * blockdiag(G_b^T G_b)``.

    ``X`` (d x k, any floating dtype) and ``Y`` (d x k, float64). G is read
    twice, a column piece at a time, each piece cast to float64, so the
    temporaries stay bounded whatever G's size.
    """
    m = G.shape[0]
    # 32 MiB pieces on the host; on an accelerator, where launches, not caches, count,
    # the engine's one device piece.
    width = _pieces.piece_width(xp, G, m, host=_pieces.LARGE_PIECE_ENTRIES)
    X64 = xp.astype(X, xp.float64)
    parts = []
    for group in groups:
        for chunk in chunks(group, width):
            # The chunk's blocks' G_b Y_b, summed over the pieces of each block.
            P = None
            for piece in chunk:
                Gp = xp.astype(piece_stack(xp, G, group, piece), xp.float64)
                term = Gp @ _rows(xp, Y, group, piece)
                P = term if P is None else P + term
            for piece in chunk:
                Gp = xp.astype(piece_stack(xp, G, group, piece), xp.float64)
                FY = damp * _rows(xp, Y, group, piece) + scale * (xp.matrix_transpose(Gp) @ P)
                R = _rows(xp, X64, group, piece) - FY
                parts.append(xp.reshape(R, (R.shape[0] * R.shape[1], R.shape[2])))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def refine(
    xp: Any,
    apply: Callable[[Array], Array],
    residual: Callable[[Array, Array], Array | None],
    X: Array,
    Y: Array,
    steps: int,
    *,
    collective: bool = False,
) -> Array:
    """``steps`` refinement steps of ``Y ~ F^{-1} X``; returns Y in X's dtype.

    ``apply`` is the operator's own product (in the storage dtype),
    ``residual(X, Y64)`` the float64 residual ``X - F Y64``. The iterate is
    kept in float64 between steps. ``collective``: ``X`` and ``Y`` are one rank's
    shards, and ``residual`` reduces over the ranks; it returns None on every rank
    where the reduced ``G Y64`` is not finite, which ends the refinement there.
    """
    if not steps:
        return Y
    if not collective and (float32_overflow_noted() or note_result_overflow(Y, X)):
        # A product beyond float32's (or float64's) range, said once at the end of the
        # call, is infinity, which the residual would spread to every coordinate as
        # NaN: its finite coordinates are kept as they are, at the dtype's rounding.
        # Not decided from a shard: ranks whose shard is finite would wait in the
        # residual's reduction for those that stopped; its reduced G Y tells every rank.
        return Y
    Y64 = xp.astype(Y, xp.float64)
    for _ in range(steps):
        R = residual(X, Y64)
        if R is None:
            break
        Y64 = Y64 + _correction(xp, apply, R, X.dtype)
    return narrowed(xp, Y64, X.dtype)


def _correction(xp: Any, apply: Callable[[Array], Array], R: Array, dtype: Any) -> Array:
    """``F^{-1} R`` in float64 for the float64 residual ``R``, through ``apply`` in ``dtype``.

    Rounding R to float32 errs by ``eps32 |R|`` in every direction, and R lies near the
    gradients' span, where it is up to kappa times larger than along the others: F^{-1}
    weighs that rounding by ``1 / damp`` and the step added ``eps32^2 kappa`` relative
    (float32 gradients within 1e-3 of one direction: 0.45 at kappa 2e13 against 1.4e-3
    without refinement). So R goes in as its float32 rounding and the rounding's own
    error, two columns of one product, which leaves ``eps32^3 kappa``.
    """
    if dtype == xp.float64:
        return xp.astype(apply(R), xp.float64)
    k = R.shape[1]
    hi = xp.astype(R, dtype)
    lo = xp.astype(R - xp.astype(hi, xp.float64), dtype)
    Z = xp.astype(apply(xp.concat([hi, lo], axis=1)), xp.float64)
    return Z[:, :k] + Z[:, k:]
