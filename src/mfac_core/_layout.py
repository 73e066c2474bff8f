"""Block-diagonal layout of the d coordinates and the passes over an m x d array.

The layout says where blocks are, not how they are solved: the static operators
work on consecutive blocks of ``size`` coordinates;
the full (non-blocked) operator is the case of one block of size d. Blocks of
equal size form a *group* that is processed as one stack, so a layout has at
most two groups: the full blocks and a ragged last block.

The m x d array G stays in its original layout: a group's columns are viewed as
a stack ``(count, m, size)`` without copying. The passes walk the columns in *pieces* of
bounded width so that float64 temporaries stay small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import Array
from ._finite import non_finite_entry, raise_non_finite

__all__ = [
    "BlockGroup",
    "Piece",
    "block_groups",
    "checked_gram",
    "chunk_columns",
    "chunk_culprit",
    "chunk_gram",
    "chunks",
    "group_stack",
    "piece_columns",
    "piece_stack",
    "pieces",
]

#: ``(b0, b1, c0, c1)``: columns ``c0:c1`` of blocks ``b0:b1`` of a group.
Piece = tuple[int, int, int, int]


@dataclass(frozen=True)
class BlockGroup:
    """``count`` consecutive blocks of ``size`` coordinates starting at ``start``."""

    start: int
    count: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.count * self.size


def block_groups(dim: int, block_size: int) -> tuple[BlockGroup, ...]:
    """Split ``dim`` coordinates into full blocks and a ragged last block."""
    full, ragged = divmod(dim, block_size)
    groups = []
    if full:
        groups.append(BlockGroup(0, full, block_size))
    if ragged:
        groups.append(BlockGroup(full * block_size, 1, ragged))
    return tuple(groups)


def chunks(group: BlockGroup, max_cols: int) -> Iterator[list[Piece]]:
    """The pieces ``(b0, b1, c0, c1)`` of a group, in lists that cover whole blocks.

    A piece is either several whole blocks (then it is a chunk by itself), or
    part of one block when a block is wider than ``max_cols`` (then the
    chunk is that block's pieces). The set-up finishes a chunk, from its Gram
    matrices to its part of W, before it reads the next, so the float64 work
    arrays never exceed a chunk.
    """
    s = group.size
    if s >= max_cols:
        for b in range(group.count):
            yield [(b, b + 1, c0, min(c0 + max_cols, s)) for c0 in range(0, s, max_cols)]
    else:
        per = max(1, max_cols // s)
        for b0 in range(0, group.count, per):
            yield [(b0, min(b0 + per, group.count), 0, s)]


def pieces(group: BlockGroup, max_cols: int) -> Iterator[Piece]:
    """All pieces of a group, chunk after chunk (see :func:`chunks`)."""
    for chunk in chunks(group, max_cols):
        yield from chunk


def piece_columns(group: BlockGroup, piece: Piece) -> tuple[int, int]:
    """The column range of G that a piece covers."""
    b0, b1, c0, c1 = piece
    s = group.size
    return group.start + b0 * s + c0, group.start + (b1 - 1) * s + c1


def piece_stack(xp: Any, A: Array, group: BlockGroup, piece: Piece) -> Any:
    """The columns of ``A`` (m x d) in a piece as a ``(blocks, m, width)`` view."""
    lo, hi = piece_columns(group, piece)
    b0, b1, c0, c1 = piece
    cols = A[:, lo:hi]
    if b1 - b0 == 1:
        return cols[None, ...]
    return xp.permute_dims(xp.reshape(cols, (A.shape[0], b1 - b0, c1 - c0)), (1, 0, 2))


def group_stack(xp: Any, A: Array, group: BlockGroup) -> Any:
    """All columns of a group of ``A`` as a ``(count, m, size)`` view."""
    return piece_stack(xp, A, group, (0, group.count, 0, group.size))


#: Pieces of one block that one call of the set-up's Gram kernel sums (``chunk_gram``'s
#: ``gram``): it writes no float64 piece, so it need not take the pieces one at a time,
#: and a span of eight (an eighth of a full set-up's G) gives its threads work enough to
#: share; progress is reported per span. A fixed count, so that the sums' order, and so
#: the Gram's bits, do not depend on the thread count.
GRAM_KERNEL_SPAN = 8


def chunk_gram(
    xp: Any,
    G: Array,
    group: BlockGroup,
    chunk: list[Piece],
    product: Callable[[Any], Any],
    progress: Callable[[int], None] | None = None,
    *,
    gram: Callable[[int, int], Any] | None = None,
) -> Any:
    """``product`` summed over the pieces of one chunk, in float64.

    ``product`` maps a ``(blocks, m, width)`` float64 stack to a stack of small
    matrices; the pieces of one block are added up, so a block wider than a
    piece never has a float64 copy in memory at once. ``gram(lo, hi)``, where given, is
    ``product`` of the columns ``G[:, lo:hi]`` of one block, from G itself
    (``_engine.gram_kernel``: the C extension's rows' Gram, with no float64 copy), over
    up to :data:`GRAM_KERNEL_SPAN` consecutive pieces of that block at a time.
    """
    acc = None
    for span in _spans(chunk, GRAM_KERNEL_SPAN if gram is not None else 1):
        b0, b1 = span[0][0], span[0][1]
        # Squared norms beyond float64 leave inf on the Gram's diagonal, which its users
        # report as an error that says so (checked_gram, the factorisations); NumPy's own
        # RuntimeWarning would come first, and be the error where warnings are errors.
        # np.errstate is local to this context.
        with np.errstate(over="ignore", invalid="ignore"):
            if gram is not None and b1 - b0 == 1:
                lo, hi = piece_columns(group, span[0])[0], piece_columns(group, span[-1])[1]
                P = gram(lo, hi)[None, ...]
            else:
                X = xp.astype(piece_stack(xp, G, group, span[0]), xp.float64)
                P = product(X)
                del X  # before the next piece is cast: two float64 pieces at once otherwise
            acc = P if acc is None else acc + P
        if progress is not None:
            progress(sum((p[1] - p[0]) * (p[3] - p[2]) for p in span))
    return acc


def _spans(chunk: list[Piece], most: int) -> list[list[Piece]]:
    """The pieces of a chunk in runs of up to ``most`` consecutive pieces of one block (a
    piece of several blocks alone)."""
    spans: list[list[Piece]] = []
    for piece in chunk:
        last = spans[-1][-1] if spans else None
        joins = (
            last is not None
            and len(spans[-1]) < most
            and piece[1] - piece[0] == 1
            and last[:2] == piece[:2]
            and last[3] == piece[2]
        )
        if joins:
            spans[-1].append(piece)
        else:
            spans.append([piece])
    return spans


def checked_gram(
    xp: Any,
    G: Array,
    group: BlockGroup,
    chunk: list[Piece],
    product: Callable[[Any], Any],
    *,
    check: bool,
    progress: Callable[[int], None] | None = None,
    gram: Callable[[int, int], Any] | None = None,
) -> Any:
    """:func:`chunk_gram`, and with ``check`` a ValueError that says where G is not finite.

    A NaN or infinity anywhere in G makes its row's (or column's) sum of squares
    non-finite: the Gram's diagonal checks G at no extra pass. Only on failure is the
    chunk read again, to say where.
    """
    acc = chunk_gram(xp, G, group, chunk, product, progress, gram=gram)
    if check and not bool(xp.all(xp.isfinite(xp.linalg.diagonal(acc)))):
        lo, hi = chunk_columns(group, chunk)
        raise_non_finite(xp, G[:, lo:hi], "G", offset=lo)
    return acc


def chunk_columns(group: BlockGroup, chunk: list[Piece]) -> tuple[int, int]:
    """The column range of G that a chunk covers."""
    return piece_columns(group, chunk[0])[0], piece_columns(group, chunk[-1])[1]


def chunk_culprit(
    xp: Any, G: Array, group: BlockGroup, chunk: list[Piece]
) -> Callable[[], str | None]:
    """The ``locate`` of a chunk's factorisation (``_capacitance.factorize``).

    Where ``check_finite=False`` let NaN or infinity into G, it names the chunk's first
    such entry as the check would have (:func:`checked_gram`), reading G in pieces.
    """
    lo, hi = chunk_columns(group, chunk)
    return lambda: non_finite_entry(xp, G[:, lo:hi], "G", offset=lo)
