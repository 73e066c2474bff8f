"""Collective building blocks of the column-sharded (SPMD) operators.

Two rules (docs/scaling.rst) shape everything here:

- everything m x m is computed on every rank from reduced data, so it must be
  reduced bit-identically (the communicator's contract) and never decided from
  rank-local values;
- an error is collective: a rank whose local part fails still joins the
  reduction that was due (with zeros and a status word), so that every rank
  learns of the failure from the reduced status and raises, instead of one rank
  raising while the others wait in the reduction.

:func:`reduce_checked` implements the second rule for any local computation;
:func:`gather_ints` and :class:`ShardLayout` tell each rank where its columns
lie among all ranks' columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._compat import Array
from .distributed import Communicator

__all__ = [
    "MAX_TAG",
    "MAX_TAG_RANKS_FLOAT32",
    "STATUS_LENGTH",
    "ShardLayout",
    "decode_status",
    "encode_status",
    "gather_ints",
    "host_values",
    "reduce_checked",
    "tags_agree",
]

# The exception classes a status word can carry, in the order a rank that saw
# several kinds of failure among its peers reports them.
_KINDS: tuple[type[Exception], ...] = (TypeError, IndexError, ValueError, RuntimeError)


def host_values(a: Array) -> list[float]:
    """The entries of a small 1-D array as Python floats (one transfer)."""
    tolist = getattr(a, "tolist", None)
    if tolist is not None:
        return [float(v) for v in tolist()]
    return [float(a[i]) for i in range(int(a.shape[0]))]


def gather_ints(
    comm: Communicator, xp: Any, device: Any, values: Sequence[int]
) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (the same count on every rank), in rank order.

    One reduction of ``size x len(values)`` float64 numbers: each rank fills its
    own row and zeros elsewhere, so every reduced entry is one rank's value plus
    zeros, exact for integers below 2**53.
    """
    k = len(values)
    flat_host = [0.0] * (comm.size * k)
    flat_host[comm.rank * k : (comm.rank + 1) * k] = [float(v) for v in values]
    flat = xp.asarray(flat_host, dtype=xp.float64, device=device)
    total = host_values(comm.allreduce_sum(flat))
    return [tuple(int(v) for v in total[r * k : (r + 1) * k]) for r in range(comm.size)]


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's columns lie among all ranks' columns.

    Attributes
    ----------
    rank : int
        This rank.
    widths : tuple of int
        The number of columns each rank holds, in rank order.
    """

    rank: int
    widths: tuple[int, ...]

    @classmethod
    def exchange(cls, comm: Communicator, xp: Any, device: Any, width: int) -> ShardLayout:
        """The layout, from one reduction of every rank's column count."""
        widths = tuple(row[0] for row in gather_ints(comm, xp, device, [width]))
        return cls(comm.rank, widths)

    @property
    def start(self) -> int:
        """The global index of this rank's first column."""
        return sum(self.widths[: self.rank])

    @property
    def stop(self) -> int:
        """One past the global index of this rank's last column."""
        return self.start + self.widths[self.rank]

    @property
    def dim(self) -> int:
        """The number of columns over all ranks."""
        return sum(self.widths)


#: Tags (:func:`reduce_checked`) lie in ``range(MAX_TAG)``.
MAX_TAG = 32

#: The largest group whose tag check is exact in a float32 reduction: the reduced
#: sum of squared tags, at most ``size * (MAX_TAG - 1)**2``, stays below 2**24.
MAX_TAG_RANKS_FLOAT32 = (2**24 - 1) // (MAX_TAG - 1) ** 2

#: The length of the status word appended to every checked reduction: one count of
#: failed ranks per class of ``_KINDS``, then the tag and its square. Counts, not one
#: number weighting the classes by powers of (size + 1), so that they stay exact in
#: float32 for any group below 2**24 ranks (a weighted sum needs
#: size * (size + 1)**3 < 2**24: 62 ranks); the tag's two entries are exact in
#: float32 up to ``MAX_TAG_RANKS_FLOAT32`` (17,458) ranks.
STATUS_LENGTH = len(_KINDS) + 2


def encode_status(error: Exception | None, tag: int = 0) -> list[float]:
    """This rank's status word: a one-hot count of its error's class, then ``tag, tag**2``.

    Parameters
    ----------
    error : Exception or None
        The exception this rank's part raised, if any.
    tag : int, optional
        The operation and replicated state this rank's call is for, in
        ``range(MAX_TAG)`` (default 0).

    Returns
    -------
    list of float
        ``STATUS_LENGTH`` numbers: 1 at the index of the first class of
        (TypeError, IndexError, ValueError, RuntimeError) that ``error`` is an
        instance of (RuntimeError for any other exception), 0 at the other
        three, then ``tag`` and ``tag**2``.
    """
    if not 0 <= tag < MAX_TAG:
        raise ValueError(f"internal error: tag {tag} outside range({MAX_TAG})")
    word = [0.0] * len(_KINDS)
    if error is not None:
        index = next((k for k, kind in enumerate(_KINDS) if isinstance(error, kind)), -1)
        word[index] = 1.0
    return [*word, float(tag), float(tag * tag)]


def decode_status(word: Sequence[float]) -> dict[type[Exception], int]:
    """The number of failed ranks per class, from the reduced status word.

    Parameters
    ----------
    word : sequence of float
        The sum of every rank's :func:`encode_status`.

    Returns
    -------
    dict
        Exception class to the number of ranks that failed with it.
    """
    return {kind: round(v) for kind, v in zip(_KINDS, word[: len(_KINDS)], strict=True)}


def tags_agree(word: Sequence[float], size: int) -> bool:
    """Whether every rank's tag was the same, from the reduced status word.

    With ``S1`` and ``S2`` the sums of the tags and of their squares over ``size``
    ranks, ``S1**2 <= size * S2`` (Cauchy-Schwarz), with equality exactly when all
    the tags are equal. Computed in Python integers from the rounded sums, so exact
    while the reduction summed them exactly (float64; float32 up to
    ``MAX_TAG_RANKS_FLOAT32`` ranks).

    Parameters
    ----------
    word : sequence of float
        The sum of every rank's :func:`encode_status`.
    size : int
        The number of ranks.

    Returns
    -------
    bool
        True if the tags were all equal.
    """
    s1, s2 = round(word[len(_KINDS)]), round(word[len(_KINDS) + 1])
    return s1 * s1 == size * s2


def reduce_checked(
    comm: Communicator,
    xp: Any,
    local: Callable[[], Array],
    *,
    length: int,
    dtype: Any,
    device: Any,
    what: str,
    tag: int = 0,
) -> Array:
    """All-reduce ``local()`` with a status word; every rank raises if any rank failed.

    Parameters
    ----------
    comm : Communicator
        The group.
    xp, device : namespace, device
        Where the payload lives.
    local : callable
        Computes this rank's 1-D payload of ``length`` entries of ``dtype``; it
        validates this rank's inputs and may raise.
    length : int
        The payload length, the same on every rank (from replicated state).
    dtype : dtype
        float32 or float64: the dtype of the reduction, payload and status word
        (``STATUS_LENGTH`` numbers: counts of failed ranks, exact in float32 below
        2**24 ranks, and the tag check, exact in float32 up to
        ``MAX_TAG_RANKS_FLOAT32`` = 17,458 ranks and skipped for larger groups).
    device : device
        The payload's device.
    what : str
        The operation, for the message of ranks whose own part was fine.
    tag : int, optional
        Identifies the operation and the replicated state it acts on, in
        ``range(MAX_TAG)`` (default 0). If the ranks passed different tags (they
        called different operations whose reductions have the same length, or
        their replicated states diverged), the reduced payload mixes unrelated
        sums, and every rank raises.

    Returns
    -------
    array
        The reduced payload (``length`` entries), the same on every rank. The
        reduction itself carries ``length + STATUS_LENGTH`` numbers.

    Raises
    ------
    RuntimeError
        On every rank, the same, if the tags differ between ranks (checked
        first; a rank's own error, if any, is its cause).
    Exception
        On a rank whose ``local()`` raised: that exception, after the reduction.
        On every other rank, if some rank failed: an exception of the same class
        (TypeError, IndexError, ValueError, else RuntimeError) naming how many
        ranks failed.
    """
    error: Exception | None = None
    try:
        payload = local()
        if tuple(payload.shape) != (length,):
            raise RuntimeError(
                f"internal error: local payload of shape {tuple(payload.shape)}, "
                f"expected ({length},)"
            )
    except Exception as exc:  # every failure must reach the other ranks
        error = exc
        payload = xp.zeros((length,), dtype=dtype, device=device)
    status = xp.asarray(encode_status(error, tag), dtype=dtype, device=device)
    total = comm.allreduce_sum(xp.concat([xp.astype(payload, dtype), status]))
    word = host_values(total[length:])
    exact = dtype == xp.float64 or comm.size <= MAX_TAG_RANKS_FLOAT32
    if exact and not tags_agree(word, comm.size):
        raise RuntimeError(
            f"{what}: the ranks called different collective operations, or their "
            "replicated states diverged (reset, load_state_dict or another edit on some "
            "ranks only); every rank must call the same operations in the same order. "
            "Every rank raised this and left its state as it was"
        ) from error
    counts = decode_status(word)
    if any(counts.values()):
        if error is not None:
            raise error
        kind = next(k for k in _KINDS if counts[k])
        failed = sum(counts.values())
        raise kind(
            f"{what} failed on {failed} other rank(s) of {comm.size} (their errors say "
            f"why); rank {comm.rank} left its state as it was"
        )
    return total[:length]
