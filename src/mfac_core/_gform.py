"""The static inverse in the G-form: ``F^{-1}`` through the stored gradients and a float64 factor.

The operator keeps G as given (any storage dtype: float32, float64, float16,
bfloat16) and, per group of blocks wider than m, the float64 upper Cholesky
factors ``U_b`` of the capacitance matrices ``C_b = m damp I + G_b G_b^T`` (Gram
summed in float64), and applies

    F_b^{-1} x_b = (x_b - G_b^T C_b^{-1} G_b x_b) / damp

with both passes over G summed in float64 by the pass engine (``_engine``), the
result rounded once to the operator's dtype (docs/mathematics.rst, "Exact
passes"). No derived m x d array (``W = U^{-T} G``) is stored: the diagonal and
single entries whiten the columns they need on the fly, in float64 (O(m^2) per
coordinate, BLAS-3), where ``1 - ||w_j||^2`` cancels for coordinates the
gradients cover well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from . import _engine, _pieces
from ._capacitance import CapacitanceFactor
from ._compat import Array, FoundNamespace, device
from ._finite import narrowed
from ._layout import BlockGroup, piece_stack, pieces

__all__ = [
    "DenseBlockFactors",
    "GFormFactor",
    "whitened_diagonal",
    "whitened_pairs",
]


def whitened_diagonal(xp: Any, Linv: Array, G64: Array, damp: float) -> Array:
    """``(1 - ||L^{-1} g_j||^2) / damp`` for the float64 columns ``g_j`` of ``G64``, float64.

    ``Linv`` and ``G64`` may be stacks (a factor per block): the sums run over axis -2.
    """
    Z = Linv @ G64
    return (1.0 - xp.sum(Z * Z, axis=-2)) / damp


def whitened_pairs(xp: Any, Zr: Array, Zc: Array, rows: Array, cols: Array, damp: float) -> Array:
    """``(delta_rc - z_r . z_c) / damp`` per pair, float64, from whitened columns ``(m, n)``."""
    delta = xp.astype(rows == cols, xp.float64)
    return (delta - xp.sum(Zr * Zc, axis=0)) / damp


@dataclass(frozen=True)
class GFormFactor(FoundNamespace):
    """A group of blocks in the G-form: G (all of it; the group's columns are used) and
    the float64 factor stack ``U`` ``(count, m, m)`` of the blocks' capacitance matrices.

    Offers the group-factor interface of ``_group_factors`` (``apply``,
    ``apply_vector``, ``diagonal``, ``entries``) with results in ``dtype``.
    """

    group: BlockGroup
    G: Array
    factor: CapacitanceFactor
    damp: float
    dtype: Any

    _NAMESPACE_FIELD: ClassVar[str] = "G"

    def apply(self, X: Array, /) -> Array:
        xp, g = self.xp, self.group
        X = _engine.widened_for_derivatives(xp, X)
        P = _engine.project_blocks(xp, self.G, g, X)
        A = self.factor.solve(P)
        return _engine.combine_blocks(xp, self.G, g, X, A, alpha=1.0 / self.damp, dtype=self.dtype)

    def apply_vector(self, x: Array, /) -> Array:
        return self.apply(x[:, None])[:, 0]

    def diagonal(self) -> Array:
        # (1 - ||U_b^{-T} g_j||^2) / damp in float64, a bounded piece at a time: one
        # triangular product over G (the BLAS-3 work a stored W would have cost at set-up).
        xp, g, G = self.xp, self.group, self.G
        Linv = self.factor.lower_inverse()
        m = G.shape[0]
        parts = []
        width = _pieces.piece_width(xp, G, m, host=_pieces.LARGE_PIECE_ENTRIES)
        for b0, b1, c0, c1 in pieces(g, width):
            Gp = xp.astype(piece_stack(xp, G, g, (b0, b1, c0, c1)), xp.float64)
            D = whitened_diagonal(xp, Linv[b0:b1, ...], Gp, self.damp)
            parts.append(narrowed(xp, xp.reshape(D, (-1,)), self.dtype))
        if not parts:
            return xp.zeros((0,), dtype=self.dtype, device=device(G))
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def entries(self, rows: Array, cols: Array, /) -> Array:
        # (delta_jk - w_j^T w_k) / damp with w_j = U_b^{-T} g_j in float64. Each chunk of
        # pairs whitens its distinct coordinates once (O(m^2) each), then every pair is one
        # dot product (O(m)): the k^2 entries of a k x k submatrix cost O(m^2 k + m k^2).
        # rows and cols are group-local and in one block each (the operator masks others).
        xp, g, G = self.xp, self.group, self.G
        Linv = self.factor.lower_inverse()
        m = G.shape[0]
        n = rows.shape[0]
        per_column = m * (m if g.count > 1 else 1)  # a gathered factor per column if blocks
        entries = _pieces.piece_entries(xp, G, host=_pieces.LARGE_PIECE_ENTRIES)
        width = max(1, entries // max(2 * per_column, 1))
        parts = []
        for lo in range(0, n, width):
            hi = min(lo + width, n)
            r, c = rows[lo:hi], cols[lo:hi]
            coords, where = xp.unique_inverse(xp.concat([r, c]))
            Gu = xp.astype(_engine.take_columns(xp, G, coords + g.start), xp.float64)  # (m, u)
            if g.count == 1:
                Z = Linv[0, ...] @ Gu
            else:
                L = xp.take(Linv, coords // g.size, axis=0)  # (u, m, m): each one's block
                Z = xp.matrix_transpose((L @ xp.matrix_transpose(Gu)[..., None])[..., 0])
            Zr = xp.take(Z, where[: hi - lo], axis=1)
            Zc = xp.take(Z, where[hi - lo :], axis=1)
            parts.append(narrowed(xp, whitened_pairs(xp, Zr, Zc, r, c, self.damp), self.dtype))
        if not parts:
            return xp.zeros((0,), dtype=self.dtype, device=device(G))
        return parts[0] if len(parts) == 1 else xp.concat(parts)


@dataclass(frozen=True)
class DenseBlockFactors(FoundNamespace):
    """The blocks of a group no wider than m: ``Linv`` ``(count, size, size)``, float64,
    the inverse of each block's lower Cholesky factor, ``F_b^{-1} = Linv_b^T Linv_b``.

    Products are computed in float64 and rounded once to ``dtype``: an inverse rounded to
    float32 would carry an error of ``eps32 * kappa`` into every product. The explicit
    inverse is never formed (its product ``Linv^T Linv`` would cost as much again as the
    factorisation); the diagonal is the columns' squared norms.
    """

    group: BlockGroup
    Linv: Array
    dtype: Any

    _NAMESPACE_FIELD: ClassVar[str] = "Linv"

    def apply(self, X: Array, /) -> Array:
        xp, g = self.xp, self.group
        Xb = xp.reshape(xp.astype(X, xp.float64), (g.count, g.size, X.shape[-1]))
        Y = xp.matrix_transpose(self.Linv) @ (self.Linv @ Xb)
        return narrowed(xp, xp.reshape(Y, (g.count * g.size, X.shape[-1])), self.dtype)

    def apply_vector(self, x: Array, /) -> Array:
        return self.apply(x[:, None])[:, 0]

    def diagonal(self) -> Array:
        xp = self.xp
        D = xp.sum(self.Linv * self.Linv, axis=-2)  # (count, size): column norms squared
        return narrowed(xp, xp.reshape(D, (-1,)), self.dtype)

    def entries(self, rows: Array, cols: Array, /) -> Array:
        # [F_b^{-1}]_jk = Linv_b[:, j] . Linv_b[:, k]: each pair's two columns gathered
        # from the flat stack (int64 offsets: the stack can exceed 2**31 entries), a
        # bounded number of pairs at a time.
        xp, s = self.xp, self.group.size
        flat = xp.reshape(self.Linv, (-1,))
        down = xp.reshape(xp.arange(s, dtype=xp.int64, device=device(flat)) * s, (1, s))
        n = rows.shape[0]
        entries = _pieces.piece_entries(xp, flat, host=_pieces.LARGE_PIECE_ENTRIES)
        width = max(1, entries // max(2 * s, 1))
        parts = []
        for lo in range(0, n, width):
            hi = min(lo + width, n)
            r, c = rows[lo:hi], cols[lo:hi]
            base = xp.reshape((r // s) * (s * s), (-1, 1)) + down
            Lr = xp.take(flat, xp.reshape(base + xp.reshape(r % s, (-1, 1)), (-1,)))
            Lc = xp.take(flat, xp.reshape(base + xp.reshape(c % s, (-1, 1)), (-1,)))
            dots = xp.sum(xp.reshape(Lr * Lc, (hi - lo, s)), axis=-1)
            parts.append(narrowed(xp, dots, self.dtype))
        if not parts:
            return xp.zeros((0,), dtype=self.dtype, device=device(flat))
        return parts[0] if len(parts) == 1 else xp.concat(parts)
