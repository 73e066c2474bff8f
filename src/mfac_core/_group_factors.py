"""What the static inverse keeps per group of blocks, and how each applies ``F^{-1}``.

A :class:`~mfac_core._layout.BlockGroup` says where blocks are; a factor object
says how its blocks are solved. Two kinds, chosen per group by the set-up:

:class:`DenseBlockInverses`
    blocks no wider than m keep their dense ``B x B`` inverse (cheaper than
    Woodbury there);
:class:`WoodburyFactor`
    wider blocks keep their columns of ``W = U^{-T} G`` and apply
    ``F_b^{-1} = (I - W_b^T W_b) / damp``.

Each offers ``apply`` (a stack of columns), ``apply_vector``, ``diagonal`` and
``entries`` on the group's own rows, so the operator only routes rows to groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ._compat import Array, array_namespace, device
from ._layout import BlockGroup, lowrank_apply

__all__ = ["DenseBlockInverses", "GroupFactor", "WoodburyFactor"]

#: float64 entries in one temporary of ``diagonal``/``entries`` (32 MiB).
CHUNK_ENTRIES = 2**22


class GroupFactor(Protocol):
    """The inverse of F restricted to one group of blocks."""

    @property
    def group(self) -> BlockGroup:
        """The blocks this factor covers."""

    def apply(self, X: Array, /) -> Array:
        """``F_g^{-1} X`` for the group's rows ``X`` (``(count * size, k)``)."""

    def apply_vector(self, x: Array, /) -> Array:
        """``F_g^{-1} x`` for the group's entries ``x`` (``(count * size,)``)."""

    def diagonal(self) -> Array:
        """The group's diagonal entries of ``F^{-1}``."""

    def entries(self, rows: Array, cols: Array, /) -> Array:
        """``[F_g^{-1}]_{rows, cols}`` for int64 group-local indices in one block each."""


@dataclass(frozen=True)
class DenseBlockInverses:
    """The dense inverses ``(count, size, size)`` of a group's blocks (storage dtype)."""

    group: BlockGroup
    inverses: Array

    @property
    def xp(self) -> Any:
        return array_namespace(self.inverses)

    def apply(self, X: Array, /) -> Array:
        xp, g = self.xp, self.group
        Xb = xp.reshape(X, (g.count, g.size, X.shape[-1]))
        return xp.reshape(self.inverses @ Xb, (g.count * g.size, X.shape[-1]))

    def apply_vector(self, x: Array, /) -> Array:
        return self.apply(x[:, None])[:, 0]

    def diagonal(self) -> Array:
        return self.xp.reshape(self.xp.linalg.diagonal(self.inverses), (-1,))

    def entries(self, rows: Array, cols: Array, /) -> Array:
        s = self.group.size
        # int64 offsets: a stack of B x B blocks can hold more than 2**31 entries.
        flat = (rows // s) * (s * s) + (rows % s) * s + (cols % s)
        return self.xp.take(self.xp.reshape(self.inverses, (-1,)), flat)


@dataclass(frozen=True)
class WoodburyFactor:
    """A group's columns of ``W = U^{-T} G`` (``(m, count * size)``, storage dtype)."""

    group: BlockGroup
    W: Array
    damp: float

    @property
    def xp(self) -> Any:
        return array_namespace(self.W)

    def apply(self, X: Array, /) -> Array:
        whole = BlockGroup(0, self.group.count, self.group.size)
        return lowrank_apply(self.xp, self.W, X, whole, 1.0 / self.damp, -1.0 / self.damp)

    def apply_vector(self, x: Array, /) -> Array:
        if self.group.count == 1:
            W = self.W
            return (x - (W @ x) @ W) / self.damp
        return self.apply(x[:, None])[:, 0]

    def diagonal(self) -> Array:
        # (1 - sum_i W_ij^2) / damp, the sums in float64, a bounded piece at a time.
        xp = self.xp
        W = self.W
        width = max(1, CHUNK_ENTRIES // W.shape[0])
        parts = []
        for lo in range(0, W.shape[1], width):
            Wc = xp.astype(W[:, lo : min(lo + width, W.shape[1])], xp.float64)
            parts.append(xp.astype((1.0 - xp.sum(Wc * Wc, axis=0)) / self.damp, W.dtype))
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def entries(self, rows: Array, cols: Array, /) -> Array:
        # (delta_jk - W_:j^T W_:k) / damp, in float64, a bounded number of pairs at a time.
        xp = self.xp
        W = self.W
        n = rows.shape[0]
        width = max(1, CHUNK_ENTRIES // W.shape[0])
        parts = []
        for lo in range(0, n, width):
            hi = min(lo + width, n)
            r, c = rows[lo:hi], cols[lo:hi]
            Wr = xp.astype(xp.take(W, r, axis=1), xp.float64)
            Wc = xp.astype(xp.take(W, c, axis=1), xp.float64)
            delta = xp.astype(r == c, xp.float64)
            parts.append(xp.astype((delta - xp.sum(Wr * Wc, axis=0)) / self.damp, W.dtype))
        if not parts:
            return xp.zeros((0,), dtype=W.dtype, device=device(W))
        return parts[0] if len(parts) == 1 else xp.concat(parts)
