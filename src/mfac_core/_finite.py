"""Where an array holds NaN or infinity: the check, and the one wording of its refusal.

``check_finite`` refuses an input that is not finite, naming its first such entry
(``x[4] is nan``, ``G[2, 5] is inf``); the operators' float64 sums that find a NaN or an
infinity (a Gram's diagonal) say the same through ``raise_non_finite``, reading the
array again only then. Large arrays are scanned in bounded pieces (``SCAN_ENTRIES``).
"""

from __future__ import annotations

from typing import Any

from ._compat import Array, is_finite_array

__all__ = [
    "SCAN_ENTRIES",
    "check_finite",
    "first_non_finite",
    "non_finite_entry",
    "non_finite_error",
    "raise_non_finite",
]


def check_finite(xp: Any, x: Array, name: str, *, locate: bool = True) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity, naming its first such entry.

    Without ``locate`` the message names none: for one rank's shard of an array, whose
    indices are not the user's.
    """
    if not is_finite_array(xp, x):
        if not locate:
            raise ValueError(f"{name} must not contain NaN or infinity")
        raise_non_finite(xp, x, name)


#: Entries of the pieces in which :func:`non_finite_entry` scans a 2-D array: its
#: temporaries stay bounded (a few MiB) for a G of any size, memory-mapped G included.
SCAN_ENTRIES = 2**22


def non_finite_entry(xp: Any, x: Array, name: str, *, offset: int = 0) -> str | None:
    """``"G[2, 5] is nan"`` for the first NaN or infinity of ``x``, or None where it is finite.

    The first in row-major order; ``x`` may be the columns of a larger array that start
    at column ``offset`` (the last axis), which the index then counts in. A 2-D ``x`` is
    read in bands of rows (and a row that is too long in pieces), each at most
    :data:`SCAN_ENTRIES` entries, so that nothing the size of ``x`` is ever made (a
    memory-mapped G is read piece by piece); the scan stops at the first band with such
    an entry. One more read of ``x``: for failures only.
    """
    found = first_non_finite(xp, x)
    if found is None:
        return None
    index, value = found
    if index:
        index[-1] += offset
    return entry_name(name, index, value)


def entry_name(name: str, index: list[int], value: float) -> str:
    """``"G[2, 5] is nan"``: the entry ``index`` of ``name``, which holds ``value``."""
    where = f"{name}[{', '.join(map(str, index))}]" if index else name
    return f"{where} is {value}"


def first_non_finite(xp: Any, x: Array) -> tuple[list[int], float] | None:
    """The index (a list) and value of ``x``'s first NaN or infinity in row-major order.

    None where ``x`` is finite; read as :func:`non_finite_entry` says.
    """
    if x.ndim != 2:
        return _first_in_piece(xp, x)
    rows, cols = (int(n) for n in x.shape)
    width = max(1, min(cols, SCAN_ENTRIES))
    band = max(1, SCAN_ENTRIES // width)
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        # Row-major order: the first such entry of the band is the earliest of its column
        # pieces' first ones (one piece unless a row is longer than SCAN_ENTRIES).
        hits = []
        for c0 in range(0, cols, width):
            hit = _first_in_piece(xp, x[r0:r1, c0 : c0 + width])
            if hit is not None:
                (i, j), value = hit
                hits.append(([r0 + i, c0 + j], value))
        if hits:
            return min(hits, key=lambda hit: hit[0])
    return None


def _first_in_piece(xp: Any, x: Array) -> tuple[list[int], float] | None:
    bad = ~xp.isfinite(x)
    if not bool(xp.any(bad)):
        return None
    flat = int(xp.argmax(xp.reshape(xp.astype(bad, xp.int8), (-1,))))
    index = []
    for size in reversed(x.shape):
        flat, i = divmod(flat, int(size))
        index.append(i)
    index.reverse()
    return index, float(x[tuple(index)])


def non_finite_error(xp: Any, x: Array, name: str, *, offset: int = 0) -> ValueError | None:
    """The one wording of an array holding NaN or infinity, or None where ``x`` is finite.

    It names the first such entry in row-major order, e.g. ``G[2, 5] is nan``
    (:func:`non_finite_entry`, which also says how ``x`` is read).
    """
    entry = non_finite_entry(xp, x, name, offset=offset)
    if entry is None:
        return None
    return entry_error(name, entry)


def entry_error(name: str, entry: str) -> ValueError:
    """The error of :func:`non_finite_error` for ``entry``, as :func:`entry_name` says it."""
    return ValueError(f"{name} must not contain NaN or infinity: {entry}")


def raise_non_finite(xp: Any, x: Array, name: str, *, offset: int = 0) -> None:
    """Say where ``x`` holds NaN or infinity; for a finite ``x`` that its squares overflow.

    For the checks that find non-finite values in float64 sums over ``x`` (sums of
    squares, a Gram's diagonal), so that they cost no pass of their own: only on
    failure is ``x`` read again, to say where.
    """
    error = non_finite_error(xp, x, name, offset=offset)
    if error is not None:
        raise error
    raise ValueError(
        f"the squared norms of {name}'s rows or columns overflow float64: {name} is finite "
        "but too large; rescale the gradients (the damping scales with them)"
    )
