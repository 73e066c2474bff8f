"""Communicators: what a column-sharded (SPMD) operator needs from a parallel engine.

A column-sharded operator (:class:`~mfac_core.ShardedStaticIHVP`,
:class:`~mfac_core.ShardedDynamicIHVP`, or :class:`mfac_core.torch.MFAC` given
``comm=``) holds one rank's columns of the gradients (and
takes and returns that rank's entries of every vector). Every contraction over
the d coordinates is a sum of per-rank parts, so the only collective the
algorithms need is a **sum-all-reduce**; everything m x m is computed
identically on every rank from reduced, bit-identical data. A communicator is
therefore three things:

- :class:`Communicator`, the protocol: ``rank``, ``size`` and
  ``allreduce_sum(x)``;
- :class:`TorchComm`, over a :mod:`torch.distributed` process group (gloo on
  CPUs, NCCL on GPUs);
- :class:`SingleProcessComm` (one rank, no engine) and :class:`CountingComm`
  (wraps another and counts what crosses the wire, for benchmarks and tests).

``docs/scaling.rst`` works out what each operation exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._compat import Array, array_namespace, device, is_torch_array

__all__ = [
    "CommCall",
    "Communicator",
    "CountingComm",
    "SingleProcessComm",
    "TorchComm",
    "check_communicator",
]


@runtime_checkable
class Communicator(Protocol):
    """The collective operations a column-sharded operator uses.

    Attributes
    ----------
    rank : int
        This process's index in the group, ``0 <= rank < size``.
    size : int
        The number of processes in the group.

    Notes
    -----
    ``allreduce_sum(x)`` is collective: every rank calls it, in the same order,
    with an array of the same shape and dtype, and each gets back a **new** array
    (``x`` is left as it was) in ``x``'s namespace, dtype and device holding the
    elementwise sum over ranks. The result must be **bit for bit the same on every
    rank**: the operators factorise reduced m x m matrices on each rank
    independently and rely on the factors agreeing exactly. A failure (a peer that
    died, a timeout of the engine) raises; it never returns partial sums.
    """

    @property
    def rank(self) -> int:
        """This process's index in the group."""  # numpydoc ignore=RT01,SS05
        ...

    @property
    def size(self) -> int:
        """The number of processes in the group."""  # numpydoc ignore=RT01,SS05
        ...

    def allreduce_sum(self, x: Array, /) -> Array:
        """Sum ``x`` over all ranks.

        Parameters
        ----------
        x : array
            This rank's part.

        Returns
        -------
        array
            A new array with the elementwise sum, the same bits on every rank.
        """
        ...


class SingleProcessComm:
    """The communicator of a group with one process: the sum is a copy.

    An operator built with it gives the same results as one built without
    ``comm``; it exists so that code written for sharded operators runs, and is
    tested, in one process.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.distributed import SingleProcessComm
    >>> comm = SingleProcessComm()
    >>> comm.rank, comm.size
    (0, 1)
    >>> comm.allreduce_sum(np.array([1.0, 2.0]))
    array([1., 2.])
    """

    @property
    def rank(self) -> int:
        """Always 0."""  # numpydoc ignore=RT01,SS05
        return 0

    @property
    def size(self) -> int:
        """Always 1."""  # numpydoc ignore=RT01,SS05
        return 1

    def allreduce_sum(self, x: Array, /) -> Array:
        """A copy of ``x`` (the sum over one rank).

        Parameters
        ----------
        x : array
            The local part.

        Returns
        -------
        array
            A new array equal to ``x``.
        """
        return array_namespace(x).asarray(x, copy=True)

    def __repr__(self) -> str:
        return "SingleProcessComm()"


class TorchComm:
    """A :class:`Communicator` over a :mod:`torch.distributed` process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group; the default group when None. It must be initialised
        (:func:`torch.distributed.init_process_group`, e.g. under ``torchrun``).
    deterministic : bool, default True
        How the sum is formed. True: every rank gathers all parts
        (``all_gather``) and adds them in rank order, so the sum is the same bits
        on every rank and in every run whatever the engine's reduction
        algorithm; each rank receives ``size`` times the array. False: the
        engine's ``all_reduce``, which receives about twice the array whatever
        the group's size and, for gloo and NCCL's ring and tree algorithms, gives
        every rank the same bits; use it for large m x m reductions on many
        ranks.

    Raises
    ------
    RuntimeError
        If torch.distributed is not available or not initialised.

    Notes
    -----
    Arrays of any library that supports DLPack are exchanged without a copy to
    the host: a NumPy or array-api-strict array (CPU) needs a CPU backend such as
    gloo, a CuPy array or CUDA tensor a GPU backend such as NCCL; the result
    comes back in the input's library. The engine's timeout (the ``timeout`` of
    ``init_process_group``) applies to every call, so a peer that died makes the
    others raise instead of waiting forever. A TorchComm of the default group
    pickles as "the default group of the process that loads it", so that
    each rank can save and load its column-sharded operator.

    Examples
    --------
    Under ``torchrun --nproc-per-node 2 script.py``::

        import torch.distributed as dist
        from mfac_core import ShardedStaticIHVP
        from mfac_core.distributed import TorchComm

        dist.init_process_group("gloo")
        comm = TorchComm()
        # G_local: this rank's columns of the m x d gradients
        op = ShardedStaticIHVP(G_local, damp=1e-4, comm=comm)
        y_local = op.matvec(x_local)  # this rank's entries of F^-1 x
    """

    def __init__(self, group: Any = None, *, deterministic: bool = True) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (or run under torchrun) first"
            )
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
        self._dist = dist
        self.group = group
        self.deterministic = deterministic
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""  # numpydoc ignore=RT01,SS05
        return self._rank

    @property
    def size(self) -> int:
        """The number of processes in the group."""  # numpydoc ignore=RT01,SS05
        return self._size

    def allreduce_sum(self, x: Array, /) -> Array:
        """The elementwise sum of ``x`` over the group's ranks.

        Parameters
        ----------
        x : array
            This rank's part: a torch tensor, or an array of a library that
            supports DLPack (NumPy, CuPy, JAX, array-api-strict).

        Returns
        -------
        array
            A new array in ``x``'s library, dtype and device; the same on every
            rank.
        """
        import torch

        if is_torch_array(x):
            t = x.detach()
        else:
            # Through a copy, whose strides are positive: PyTorch has none that are
            # negative, and its DLPack import of a reversed view (x[::-1]) aborts the
            # process instead of raising. The arrays reduced are small (m x m at most).
            t = torch.from_dlpack(array_namespace(x).asarray(x, copy=True))
        if self.deterministic:
            parts = [torch.empty_like(t) for _ in range(self._size)]
            self._dist.all_gather(parts, t.contiguous(), group=self.group)
            total = parts[0]
            for part in parts[1:]:
                total.add_(part)
        else:
            total = t.clone(memory_format=torch.contiguous_format)
            self._dist.all_reduce(total, group=self.group)
        if is_torch_array(x):
            return total
        return _from_torch(x, total)

    def __repr__(self) -> str:
        return (
            f"TorchComm(rank={self._rank}, size={self._size}, deterministic={self.deterministic})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # A process group is a connection, not data: a pickled TorchComm is bound again
        # to the default group of the process that loads it (initialised there first).
        if self.group is not None:
            raise TypeError(
                "a TorchComm over a process group other than the default one cannot be "
                "pickled (the group is not data); pickle with the default group, or rebuild "
                "the object on the loading side"
            )
        return (_default_torch_comm, (self.deterministic,))


def _default_torch_comm(deterministic: bool) -> TorchComm:
    """A :class:`TorchComm` of the default group: what an unpickled one becomes."""
    return TorchComm(deterministic=deterministic)


def _from_torch(like: Array, t: Any) -> Array:
    """``t`` in the library and on the device of ``like``, through DLPack (no copy)."""
    xp = array_namespace(like)
    out = xp.from_dlpack(t)
    if device(out) != device(like):
        # array-api-strict's simulated devices are not DLPack devices.
        out = xp.asarray(out, device=device(like))
    return out


@dataclass(frozen=True)
class CommCall:
    """One reduction a :class:`CountingComm` saw.

    Attributes
    ----------
    shape : tuple of int
        The shape of the reduced array.
    dtype : str
        Its dtype.
    nbytes : int
        Its size in bytes: what each rank contributes to the sum.
    """

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


class CountingComm:
    """A :class:`Communicator` that counts the reductions of another.

    Parameters
    ----------
    comm : Communicator
        The communicator that does the work.

    Attributes
    ----------
    calls : list of CommCall
        Every reduction since construction or the last :meth:`reset`.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.distributed import CountingComm, SingleProcessComm
    >>> comm = CountingComm(SingleProcessComm())
    >>> _ = comm.allreduce_sum(np.zeros(5))
    >>> comm.num_calls, comm.num_elements, comm.num_bytes
    (1, 5, 40)
    """

    def __init__(self, comm: Communicator) -> None:
        if not isinstance(comm, Communicator):
            raise TypeError(
                "comm must implement the Communicator protocol (rank, size, "
                f"allreduce_sum), got {type(comm).__name__}"
            )
        self.comm = comm
        self.calls: list[CommCall] = []

    def __repr__(self) -> str:
        return f"CountingComm({self.comm!r}, num_calls={self.num_calls})"

    @property
    def rank(self) -> int:
        """The wrapped communicator's rank."""  # numpydoc ignore=RT01,SS05
        return self.comm.rank

    @property
    def size(self) -> int:
        """The wrapped communicator's size."""  # numpydoc ignore=RT01,SS05
        return self.comm.size

    def allreduce_sum(self, x: Array, /) -> Array:
        """Record the call, then reduce with the wrapped communicator.

        Parameters
        ----------
        x : array
            This rank's part.

        Returns
        -------
        array
            The wrapped communicator's result.
        """
        shape = tuple(int(n) for n in x.shape)
        count = 1
        for n in shape:
            count *= n
        itemsize = _itemsize(x)
        self.calls.append(CommCall(shape, _dtype_name(x), count * itemsize))
        return self.comm.allreduce_sum(x)

    @property
    def num_calls(self) -> int:
        """The number of reductions recorded."""  # numpydoc ignore=RT01,SS05
        return len(self.calls)

    @property
    def num_elements(self) -> int:
        """The array entries this rank contributed, over all calls."""  # numpydoc ignore=RT01,SS05
        total = 0
        for call in self.calls:
            count = 1
            for n in call.shape:
                count *= n
            total += count
        return total

    @property
    def num_bytes(self) -> int:
        """The bytes this rank contributed, over all calls."""  # numpydoc ignore=RT01,SS05
        return sum(call.nbytes for call in self.calls)

    def reset(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()


def _dtype_name(x: Array) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


def _itemsize(x: Array) -> int:
    if hasattr(x, "itemsize"):
        return int(x.itemsize)
    size = getattr(x.dtype, "itemsize", None)
    if size is not None:
        return int(size)
    xp = array_namespace(x)
    if xp.isdtype(x.dtype, "real floating") or xp.isdtype(x.dtype, "complex floating"):
        return int(xp.finfo(x.dtype).bits) // 8
    if xp.isdtype(x.dtype, "bool"):
        return 1
    return int(xp.iinfo(x.dtype).bits) // 8


def check_communicator(comm: Any) -> Communicator:
    """``comm`` if it implements :class:`Communicator`; a TypeError otherwise.

    Parameters
    ----------
    comm : object
        What the caller passed as ``comm=``.

    Returns
    -------
    Communicator
        ``comm`` itself.

    Raises
    ------
    TypeError
        If ``comm`` lacks ``rank``, ``size`` or ``allreduce_sum``, or its rank
        and size are not integers with ``0 <= rank < size``.
    """
    if not isinstance(comm, Communicator):
        raise TypeError(
            "comm must implement the mfac_core.distributed.Communicator protocol "
            f"(rank, size, allreduce_sum), got {type(comm).__name__}"
        )
    rank, size = comm.rank, comm.size
    if not (isinstance(rank, int) and isinstance(size, int) and 0 <= rank < size):
        raise TypeError(
            f"comm has rank={rank!r} and size={size!r}; they must be integers with 0 <= rank < size"
        )
    return comm
