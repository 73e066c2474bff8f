"""Sums of many partial sums, added as a balanced tree.

The long sums over G's columns run in levels (each piece's from zero, then the pieces'),
as a blocked BLAS does: one running sum of partial sums of one sign and size (a vector
near the gradients' span, a Gram entry) rounds the same way at every step, an error
that grows with their count rather than its logarithm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["sum_in_pairs"]

T = TypeVar("T", bound=Any)


def sum_in_pairs(parts: Iterable[T], /) -> T:
    """The sum of ``parts`` as a balanced tree.

    Parameters
    ----------
    parts : iterable of arrays
        One or more arrays (or numbers) of one shape, taken in order.

    Returns
    -------
    array
        Their sum.

    Raises
    ------
    ValueError
        If ``parts`` is empty.

    Notes
    -----
    A binary counter of partial sums: each part's rounding grows with the logarithm of
    their count, no more than that logarithm of partial sums is held at once, and the
    order depends on the count alone.
    """
    stack: list[tuple[int, Any]] = []
    for part in parts:
        level = 0
        while stack and stack[-1][0] == level:
            part = stack.pop()[1] + part
            level += 1
        stack.append((level, part))
    if not stack:
        raise ValueError("sum_in_pairs needs at least one part")
    total = stack.pop()[1]
    while stack:
        total = stack.pop()[1] + total
    return total
