"""The interface of what the static inverse keeps per group of blocks.

A :class:`~mfac_core._layout.BlockGroup` says where blocks are; a factor object
says how its blocks are solved. The kinds (chosen per group by the set-up):
``_gform.DenseBlockFactors`` (blocks no wider than m: float64 inverse Cholesky
factors), ``_gform.GFormFactor`` (wider blocks: G and the float64 capacitance
factors, through the pass engine) and ``_streaming.StreamedGForm`` (the full
operator's G streamed from host memory). Each offers ``apply`` (a stack of
columns), ``apply_vector``, ``diagonal`` and ``entries`` on the group's own rows,
so the operator only routes rows to groups.
"""

from __future__ import annotations

from typing import Protocol

from ._compat import Array
from ._layout import BlockGroup

__all__ = ["GroupFactor"]


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
