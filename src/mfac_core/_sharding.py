"""Collective building blocks of the column-sharded (SPMD) operators.

Two rules (docs/scaling.rst) shape everything here:

- everything m x m is computed on every rank from reduced data, so it must be
  reduced bit-identically (the communicator's contract) and never decided from
  rank-local values;
- an error is collective: a rank whose local part fails still joins the
  reduction that was due (with zeros and a status word), so that every rank
  learns of the failure from the reduced status and raises, instead of one rank
  raising while the others wait in the reduction.

:func:`reduce_checked` implements the second rule for any local computation,
and with it the one agreement check of the package: every rank's tag (the
operation and the replicated state it acts on) and arguments that must match
travel as :func:`digest` pieces in the status word and are compared exactly;
:func:`gather_ints` and :class:`ShardLayout` tell each rank where its columns
lie among all ranks' columns.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import Array, array_namespace, host_values, is_dask_namespace, is_torch_array
from .distributed import Communicator

__all__ = [
    "DIGEST_BITS",
    "MAX_AGREEMENT_RANKS",
    "STATUS_LENGTH",
    "ShardLayout",
    "agreement",
    "dask_refusal",
    "decode_status",
    "digest",
    "encode_status",
    "gather_ints",
    "host_values",
    "copied_identity",
    "identity_draw",
    "reduce_checked",
]

# The exception classes a status word can carry, in the order a rank that saw
# several kinds of failure among its peers reports them. ValueError last: it is the
# class callers recover from (a gradient holding NaN skips an optimizer's step), so
# another rank's hard failure is not hidden behind it, as one process checks its
# arguments before it looks for NaN.
_KINDS: tuple[type[Exception], ...] = (TypeError, IndexError, RuntimeError, ValueError)


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


def dask_refusal(xp: Any, device: Any, what: str) -> tuple[Any, Any, TypeError | None]:
    """The namespace and device of a set-up's reduction, and the refusal of a Dask ``xp``.

    A Dask array cannot cross a communicator (it has no DLPack), and Dask spreads
    its chunks over its own workers: a rank given one refuses it inside the set-up's
    reduction, which then runs in NumPy, so that every rank raises alike.
    """
    if xp is None or not is_dask_namespace(xp):
        return xp, device, None
    import numpy as np

    return (
        array_namespace(np.empty(0)),
        None,
        TypeError(
            f"{what} takes no Dask arrays: Dask distributes the chunks of G over its "
            "workers itself (DaskStaticIHVP). Give each rank its columns as NumPy, CuPy "
            "or PyTorch arrays"
        ),
    )


def identity_draw() -> int:
    """A random number to name one sharded operator in the tags of its reductions.

    Every rank draws one in the set-up's first reduction and all take rank 0's, so
    that the operator's tags are the same on every rank and differ from another
    operator's: ranks that apply two operators of one shape in different orders
    (a ``set`` iterated in per-process hash order) raise instead of adding the sums
    of one to the other's. 52 bits: exact in the float64 reduction.
    """
    return secrets.randbits(52)


def copied_identity(identity: int, count: int) -> int:
    """The identity of the ``count``-th copy of an operator named ``identity`` (52 bits).

    Derived without a reduction, alike on every rank that copies the operator as
    often (ranks copy in the same order, as they make every collective call), so
    that an operator and its copy, diverged by updates, are told apart in the tags.
    """
    digest = hashlib.blake2b(f"{identity}:{count}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 12


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


#: Bits of an agreement digest (:func:`digest`): two different values pass for equal
#: with probability 2**-64 (BLAKE2b), never by a structured coincidence.
DIGEST_BITS = 64
#: A digest travels in pieces of this many bits, each with its square: the reduced sums
#: stay exact integers in float64 for groups of up to ``MAX_AGREEMENT_RANKS`` ranks.
_PIECE_BITS = 16
_PIECES = DIGEST_BITS // _PIECE_BITS

#: The largest group whose agreement checks are exact: ``size * (2**16 - 1)**2 < 2**53``
#: (2,097,216 ranks); a larger group skips them (its counts of failures stay exact).
MAX_AGREEMENT_RANKS = (2**53 - 1) // (2**_PIECE_BITS - 1) ** 2

#: The length of the status word appended to every checked reduction (float64): one
#: count of failed ranks per class of ``_KINDS``, then the digest of the tag (the
#: operation and the replicated state it acts on) and the digest of the arguments
#: every rank must pass alike, each as ``_PIECES`` pieces and their squares.
STATUS_LENGTH = len(_KINDS) + 2 * 2 * _PIECES


def _host_array(a: Any) -> np.ndarray:
    """The values of an array of any library as a C-ordered NumPy array (one copy at most)."""
    if isinstance(a, np.ndarray | np.generic):
        return np.ascontiguousarray(a)
    if is_torch_array(a):
        import torch

        t = a.detach().cpu()
        # NumPy has no bfloat16: its bits, as 2-byte integers, name it as well.
        return np.ascontiguousarray(
            (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        )
    get = getattr(a, "get", None)  # CuPy's copy to the host
    if callable(get) and type(a).__module__.split(".")[0] == "cupy":
        return np.ascontiguousarray(get())
    try:
        return np.ascontiguousarray(np.from_dlpack(a))
    except (AttributeError, BufferError, RuntimeError, TypeError, ValueError):
        return np.asarray(a.tolist())


def _feed(h: Any, x: object) -> None:
    """Feed ``x`` to hash ``h`` unambiguously: a type code, a length, then the bytes."""

    def chunk(code: bytes, data: bytes) -> None:
        h.update(code + len(data).to_bytes(8, "little") + data)

    if x is None:
        chunk(b"N", b"")
    elif isinstance(x, bool):
        chunk(b"B", bytes([x]))
    elif isinstance(x, int):
        chunk(b"I", str(x).encode())
    elif isinstance(x, float):
        chunk(b"F", struct.pack("<d", x))
    elif isinstance(x, str):
        chunk(b"S", x.encode())
    elif isinstance(x, bytes):
        chunk(b"Y", x)
    elif isinstance(x, tuple | list):
        chunk(b"T", len(x).to_bytes(8, "little"))
        for item in x:
            _feed(h, item)
    else:  # an array: its library's dtype name, its shape and its bytes
        values = _host_array(x)
        chunk(b"A", f"{getattr(x, 'dtype', values.dtype)}{tuple(values.shape)}".encode())
        chunk(b"V", values.tobytes())


def digest(*parts: object) -> int:
    """A ``DIGEST_BITS``-bit BLAKE2b digest of ``parts``, the same on every rank for equal parts.

    Parameters
    ----------
    *parts : object
        None, bools, ints, floats, strings, bytes, arrays of any library (their
        dtype, shape and values), and tuples or lists of these.

    Returns
    -------
    int
        The digest, in ``range(2**DIGEST_BITS)``.
    """
    h = hashlib.blake2b(digest_size=DIGEST_BITS // 8)
    _feed(h, parts)
    return int.from_bytes(h.digest(), "little")


def _pieces(value: int) -> list[float]:
    mask = (1 << _PIECE_BITS) - 1
    pieces = [(value >> (_PIECE_BITS * i)) & mask for i in range(_PIECES)]
    return [float(v) for p in pieces for v in (p, p * p)]


def encode_status(error: Exception | None, tag: object = 0, agree: object = None) -> list[float]:
    """This rank's status word: a one-hot count of its error's class, then two digests.

    Parameters
    ----------
    error : Exception or None
        The exception this rank's part raised, if any.
    tag : object, optional
        The operation and replicated state this rank's call is for (anything
        :func:`digest` takes; default 0).
    agree : object, optional
        The arguments every rank must pass alike (anything :func:`digest`
        takes; default None).

    Returns
    -------
    list of float
        ``STATUS_LENGTH`` numbers: 1 at the index of the first class of
        (TypeError, IndexError, RuntimeError, ValueError) that ``error`` is an
        instance of (RuntimeError for any other exception), 0 at the other
        three, then the pieces of the two digests, each with its square.
    """
    word = [0.0] * len(_KINDS)
    if error is not None:
        word[_KINDS.index(_kind(error))] = 1.0
    return [*word, *_pieces(digest(tag)), *_pieces(digest(agree))]


def _kind(error: Exception) -> type[Exception]:
    """The class of ``_KINDS`` that ``error`` is counted as (RuntimeError for any other)."""
    return next((kind for kind in _KINDS if isinstance(error, kind)), RuntimeError)


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


def _all_equal(sums: Sequence[float], size: int) -> bool:
    # With S1 and S2 the sums of a piece and of its square over the ranks,
    # S1**2 <= size * S2 (Cauchy-Schwarz), with equality exactly when all are equal.
    values = [round(v) for v in sums]
    return all(s1 * s1 == size * s2 for s1, s2 in zip(values[::2], values[1::2], strict=True))


def agreement(word: Sequence[float], size: int) -> tuple[bool, bool]:
    """Whether every rank passed the same tag, and the same arguments, from the reduced word.

    Exact (computed in Python integers from the rounded sums, which float64
    adds exactly) for groups of up to ``MAX_AGREEMENT_RANKS`` ranks; a larger
    group is reported as agreeing.

    Parameters
    ----------
    word : sequence of float
        The sum of every rank's :func:`encode_status`.
    size : int
        The number of ranks.

    Returns
    -------
    tuple of bool
        ``(tags agree, arguments agree)``.
    """
    if size > MAX_AGREEMENT_RANKS:
        return True, True
    n = len(_KINDS)
    tags, args = word[n : n + 2 * _PIECES], word[n + 2 * _PIECES : n + 4 * _PIECES]
    return _all_equal(tags, size), _all_equal(args, size)


def reduce_checked(
    comm: Communicator,
    xp: Any,
    local: Callable[[], Array],
    *,
    length: int,
    dtype: Any,
    device: Any,
    what: str,
    tag: object = 0,
    agree: Callable[[], object] | None = None,
    disagree: tuple[type[Exception], str] | None = None,
    agreed_into: list[bool] | None = None,
    diverged: Callable[[], str] | None = None,
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
        float64: the dtype of the reduction, payload and status word
        (``STATUS_LENGTH`` numbers, whose sums are exact integers).
    device : device
        The payload's device.
    what : str
        The operation, for the messages.
    tag : object, optional
        Identifies the operation and the replicated state it acts on (anything
        :func:`digest` takes; default 0). If the ranks passed different tags
        (they called different operations whose reductions have the same
        length, or their replicated states diverged), the reduced payload
        mixes unrelated sums, and every rank raises.
    agree : callable, optional
        Called after ``local()`` succeeded: the arguments every rank must have
        passed alike (anything :func:`digest` takes), compared exactly through
        their digests.
    disagree : tuple, optional
        ``(exception class, message)`` raised on every rank when ``agree``
        differs between ranks (default: ValueError, "the ranks passed different
        arguments").
    agreed_into : list, optional
        Where given, whether ``agree`` is known to be the same on every rank is
        appended to it, and ranks that differ raise nothing: ``agree`` is then a
        value that the ranks may hold differently, such as a flag, of which a
        rank learns whether every rank holds its own (exactly for two values,
        whose digests differ in a piece). False where they differ, and in a group
        larger than ``MAX_AGREEMENT_RANKS``, which compares nothing.
    diverged : callable, optional
        Gives the message of the ``RuntimeError`` raised where the tags differ, for a
        ``tag`` that holds the caller's replicated state beside the operation's
        (default: the ranks called different operations, or their states
        diverged). Where given, the tags are compared only where no rank's
        ``local()`` raised: ``local()`` checks that state, so a value that it
        refused on one rank may be why the tags differ, and every rank then
        raises as for any failure, the failing rank its own exception.

    Returns
    -------
    array
        The reduced payload (``length`` entries), the same on every rank. The
        reduction itself carries ``length + STATUS_LENGTH`` numbers.

    Raises
    ------
    RuntimeError
        On every rank, the same, if the tags differ between ranks (checked
        first, but with ``diverged`` after the failures; a rank's own error, if
        any, is its cause).
    Exception
        If some rank failed, on every rank an exception of one class: the first
        of TypeError, IndexError, ValueError and RuntimeError (for any other)
        that a rank failed with. A rank whose ``local()`` raised that class
        raises its own exception, after the reduction; every other rank one
        naming how many ranks failed (a rank that failed with another class,
        its own exception as the cause). Then, if ``agree`` differs between
        ranks and ``agreed_into`` is not given, ``disagree`` on every rank.
    """
    if dtype != xp.float64:
        raise ValueError(f"internal error: checked reductions are float64, not {dtype}")
    error: Exception | None = None
    agreed: object = None
    try:
        payload = local()
        if tuple(payload.shape) != (length,):
            raise RuntimeError(
                f"internal error: local payload of shape {tuple(payload.shape)}, "
                f"expected ({length},)"
            )
        if agree is not None:
            agreed = ("agree", agree())
    except Exception as exc:  # every failure must reach the other ranks
        error = exc
        payload = xp.zeros((length,), dtype=dtype, device=device)
    status = xp.asarray(encode_status(error, tag, agreed), dtype=dtype, device=device)
    total = comm.allreduce_sum(xp.concat([xp.astype(payload, dtype), status]))
    word = host_values(total[length:])
    same_tag, same_args = agreement(word, comm.size)
    counts = decode_status(word)  # valid whatever the tags: its places are the same
    if not same_tag and (diverged is None or not any(counts.values())):
        raise RuntimeError(
            diverged()
            if diverged is not None
            else f"{what}: the ranks called different collective operations (or one on "
            "different operators), or their replicated states diverged (reset, "
            "load_state_dict or another edit on some ranks only); every rank must call "
            "the same operations in the same order. Every rank raised this and left its "
            "state as it was"
        ) from error
    if any(counts.values()):
        kind = next(k for k in _KINDS if counts[k])
        if error is not None and _kind(error) is kind:
            raise error
        # Every rank raises the same class, also a rank that failed with another: a
        # caller may decide from it (a NaN skips a step), alike on every rank.
        others = sum(counts.values()) - (error is not None)
        own = "" if error is None else ", and on this rank with the error that caused this"
        raise kind(
            f"{what} failed on {others} other rank(s) of {comm.size} (their errors say "
            f"why){own}; rank {comm.rank} left its state as it was"
        ) from error
    if agreed_into is not None:
        agreed_into.append(same_args and comm.size <= MAX_AGREEMENT_RANKS)
    elif not same_args:
        kind, message = disagree or (ValueError, f"{what}: the ranks passed different arguments")
        raise kind(message)
    return total[:length]
