"""The static inverse for 2-byte gradients (float16, bfloat16): ``F^{-1}`` through G itself.

``W = U^{-T} G`` is never stored in 2 bytes: its rounding (``eps = 2**-8`` for
bfloat16) would set the precision of every product. The operator keeps G as
given, and the float64 factor ``C = U^T U`` of the capacitance matrix, and applies

    F^{-1} x = (x - G^T C^{-1} G x) / damp

with both passes over G in float32, the *compute dtype* (docs/mathematics.rst,
"2-byte storage"): G is cast to float32 a column piece at a time, small enough to
stay in cache, so memory is ``m d * 2`` bytes plus O(m^2) and the pieces, and
the results have float32's precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._capacitance import CapacitanceFactor
from ._compat import Array, array_namespace, device, is_writeable_array
from ._layout import BlockGroup

__all__ = [
    "GFormFactor",
    "half_matvecs64",
    "half_product",
    "half_product64",
    "half_transpose_product",
]

#: float32 entries of one cast piece of G (4 MiB): large enough that the per-piece
#: overhead of a library call stays small, small enough to be read back from cache.
COMPUTE_ENTRIES = 2**20
#: Fewest columns of a piece, so that the per-piece overhead stays small for large m.
MIN_WIDTH = 256
#: float64 entries of one temporary of ``diagonal``/``entries`` (32 MiB).
CHUNK_ENTRIES = 2**22


def piece_width(m: int) -> int:
    """Columns of one float32 piece of an ``(m, n)`` 2-byte array."""
    return max(MIN_WIDTH, COMPUTE_ENTRIES // max(m, 1))


def cast_pieces(xp: Any, G: Array, compute: Any) -> Iterator[tuple[int, int, Array]]:
    """``(c0, c1, G[:, c0:c1] in compute)`` for the column pieces of G.

    The pieces are written into one scratch array where the library allows it:
    with a fresh array per piece, PyTorch's CPU passes took 1.2 to 6 times as
    long on the development machine (benchmarks/RESULTS.md). A piece is valid
    until the next one is produced.
    """
    m, n = G.shape
    if n == 0:
        # One empty piece, so that products over no columns are zeros of the right
        # shape (a rank of a sharded 2-byte window may hold no coordinates).
        yield 0, 0, xp.empty((m, 0), dtype=compute, device=device(G))
        return
    w = min(piece_width(m), n)
    scratch = xp.empty((m, w), dtype=compute, device=device(G))
    reuse = is_writeable_array(scratch)
    for c0 in range(0, n, w):
        c1 = min(c0 + w, n)
        if reuse:
            piece = scratch[:, : c1 - c0]
            piece[...] = G[:, c0:c1]
        else:
            piece = xp.astype(G[:, c0:c1], compute)
        yield c0, c1, piece


def half_product(xp: Any, G: Array, X: Array, compute: Any) -> Array:
    """``G @ X`` (``(m, n)`` 2-byte, ``(n, k)`` compute dtype), summed over float32 pieces."""
    P = None
    for c0, c1, piece in cast_pieces(xp, G, compute):
        term = piece @ X[c0:c1, ...]
        P = term if P is None else P + term
    return P


def half_product64(xp: Any, G: Array, X: Array, compute: Any) -> Array:
    """``G @ X`` in float64: float32 products over cast pieces of G, summed in float64.

    The dynamic window's Gram rows come from here: each piece's product of
    2-byte values is exact term by term and summed in float32 over at most one
    piece's columns, so the rounding of a row is that of a float32 dot product
    of one piece's length, not of all d columns.
    """
    P = None
    for c0, c1, piece in cast_pieces(xp, G, compute):
        term = xp.astype(piece @ X[c0:c1, ...], xp.float64)
        P = term if P is None else P + term
    return P


def half_matvecs64(xp: Any, G: Array, vectors: list[Array], compute: Any) -> list[Array]:
    """``G @ v`` in float64 for each of a few vectors, one cast piece of G serving all.

    As :func:`half_product64`, with one matrix-vector product per vector on each
    cached piece: libraries run those at bandwidth, a product with a two-column
    matrix not always (PyTorch's CPU one took five times as long).
    """
    out: list[Any] = [None] * len(vectors)
    for c0, c1, piece in cast_pieces(xp, G, compute):
        for i, v in enumerate(vectors):
            term = xp.astype(piece @ v[c0:c1], xp.float64)
            out[i] = term if out[i] is None else out[i] + term
    return out


def half_transpose_product(
    xp: Any, G: Array, X: Array, A: Array, alpha: float, compute: Any
) -> Array:
    """``alpha * (X - G^T A)`` (``(n, k)``), a float32 piece of G at a time."""
    out = xp.empty(X.shape, dtype=compute, device=device(X))
    writable = is_writeable_array(out)
    parts = []
    for c0, c1, piece in cast_pieces(xp, G, compute):
        Y = alpha * (X[c0:c1, ...] - xp.matrix_transpose(piece) @ A)
        if writable:
            out[c0:c1, ...] = Y
        else:
            parts.append(Y)
    if writable:
        return out
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


@dataclass(frozen=True)
class GFormFactor:
    """One block of 2-byte gradients ``G`` (``(m, n)``) and the float64 factor of its C.

    Offers the group-factor interface of ``_group_factors`` (``apply``,
    ``apply_vector``, ``diagonal``, ``entries``) with results in ``compute``
    (float32).
    """

    group: BlockGroup
    G: Array
    factor: CapacitanceFactor
    damp: float
    compute: Any

    @property
    def xp(self) -> Any:
        return array_namespace(self.G)

    def apply(self, X: Array, /) -> Array:
        xp = self.xp
        P = xp.astype(half_product(xp, self.G, X, self.compute), xp.float64)
        A = xp.astype(self.factor.solve(P), self.compute)
        return half_transpose_product(xp, self.G, X, A, 1.0 / self.damp, self.compute)

    def apply_vector(self, x: Array, /) -> Array:
        return self.apply(x[:, None])[:, 0]

    def _whitened(self, cols: Array) -> Array:
        """``U^{-T} G[:, cols]`` in float64 (``cols`` a slice's columns or taken ones)."""
        return self.factor.lower_inverse() @ self.xp.astype(cols, self.xp.float64)

    def diagonal(self) -> Array:
        # (1 - ||U^{-T} g_j||^2) / damp in float64, a bounded piece at a time: O(m^2 d),
        # since no W is stored (the W-form's diagonal is O(m d)).
        xp, G = self.xp, self.G
        Linv = self.factor.lower_inverse()
        m, n = G.shape
        width = max(1, CHUNK_ENTRIES // m)
        parts = []
        for lo in range(0, n, width):
            Z = Linv @ xp.astype(G[:, lo : min(lo + width, n)], xp.float64)
            parts.append(xp.astype((1.0 - xp.sum(Z * Z, axis=0)) / self.damp, self.compute))
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def entries(self, rows: Array, cols: Array, /) -> Array:
        xp, G = self.xp, self.G
        Linv = self.factor.lower_inverse()
        n = rows.shape[0]
        width = max(1, CHUNK_ENTRIES // G.shape[0])
        parts = []
        for lo in range(0, n, width):
            r, c = rows[lo : lo + width], cols[lo : lo + width]
            Zr = Linv @ xp.astype(xp.take(G, r, axis=1), xp.float64)
            Zc = Linv @ xp.astype(xp.take(G, c, axis=1), xp.float64)
            delta = xp.astype(r == c, xp.float64)
            parts.append(xp.astype((delta - xp.sum(Zr * Zc, axis=0)) / self.damp, self.compute))
        if not parts:
            return xp.zeros((0,), dtype=self.compute, device=device(G))
        return parts[0] if len(parts) == 1 else xp.concat(parts)
