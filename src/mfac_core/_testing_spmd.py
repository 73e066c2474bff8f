"""Column-sharded (SPMD) computations on threads of one process, for :mod:`mfac_core.testing`.

:class:`ThreadComm` and :func:`run_spmd_threads` are public, re-exported and
documented by :mod:`mfac_core.testing`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ._compat import array_namespace, device

# -- SPMD on threads ------------------------------------------------------------------------


class _ThreadGroup:
    """What the ranks of one :func:`run_spmd_threads` call share: a barrier that breaks.

    Unlike :class:`threading.Barrier`, a rank released from a round returns even if
    another rank fails right after the release, so only ranks that wait for a rank
    that failed see :class:`threading.BrokenBarrierError`.
    """

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.parts: list[Any] = [None] * size
        self._cond = threading.Condition()
        self._waiting = 0
        self._round = 0
        self._failed = False

    def wait(self) -> None:
        with self._cond:
            if self._failed:
                raise threading.BrokenBarrierError
            this_round = self._round
            self._waiting += 1
            if self._waiting == self.size:
                self._waiting = 0
                self._round += 1
                self._cond.notify_all()
                return
            self._cond.wait_for(lambda: self._round != this_round or self._failed, self.timeout)
            if self._round != this_round:
                return
            self._failed = True
            self._cond.notify_all()
            raise threading.BrokenBarrierError

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()


class ThreadComm:
    """One rank of a group of threads: a :class:`~mfac_core.distributed.Communicator`.

    Made by :func:`run_spmd_threads`, one per thread. ``allreduce_sum`` waits for
    every rank (a barrier), then each rank adds the parts in rank order, so the
    sum is the same bits on every rank, as the protocol requires.

    Parameters
    ----------
    group : object
        The state the ranks share (internal).
    rank : int
        This thread's rank.

    Attributes
    ----------
    rank : int
        This thread's rank.
    size : int
        The number of threads in the group.
    num_calls : int
        The reductions this rank has completed.

    Notes
    -----
    A rank that raises breaks the group, so a rank still waiting in a
    reduction raises :class:`threading.BrokenBarrierError` instead of waiting
    forever: a test sees an error that is not collective as different
    exceptions on different ranks. Ranks that reduce arrays of different
    shapes or dtypes (which the protocol forbids, and which an engine such
    as gloo cannot reduce) all raise :class:`RuntimeError`; ranks of
    different array libraries each get the sum in their own.
    """

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        self._group = group
        self.rank = rank
        self.size = group.size
        self.num_calls = 0

    def allreduce_sum(self, x: Any, /) -> Any:
        """The sum of every rank's ``x``, added in rank order.

        Parameters
        ----------
        x : array
            This rank's part.

        Returns
        -------
        array
            A new array with the sum, in ``x``'s namespace and device.
        """
        group = self._group
        group.parts[self.rank] = x
        group.wait()
        parts = list(group.parts)
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            group.fail()
            raise RuntimeError(f"ranks reduced arrays of different shapes: {sorted(shapes)}")
        # The protocol's dtype too: adding float32 to float64 here would promote without a
        # word, where an engine that exchanges bytes fails (gloo aborts the process). The
        # libraries may differ (the protocol returns each rank's sum in its own namespace,
        # and TorchComm reduces NumPy arrays beside tensors): dtypes compare by name.
        kinds = {f"{type(p).__module__}.{type(p).__name__} {p.dtype}" for p in parts}
        if len({str(p.dtype).rsplit(".", 1)[-1] for p in parts}) != 1:
            group.fail()
            raise RuntimeError(f"ranks reduced arrays of different dtypes: {sorted(kinds)}")
        xp = array_namespace(x)
        total = xp.asarray(self._own(x, parts[0]), copy=True)
        # An engine adds without a word: a sum beyond float64 (or inf + -inf) is the
        # caller's to report, as it is over gloo. NumPy's RuntimeWarning would come first,
        # and be the error where warnings are errors (np.errstate is local to this thread).
        with np.errstate(over="ignore", invalid="ignore"):
            for part in parts[1:]:
                total = total + self._own(x, part)
        # Nobody may overwrite its part before every rank has read all of them.
        group.wait()
        self.num_calls += 1
        return total

    @staticmethod
    def _own(x: Any, part: Any) -> Any:
        """``part`` in the namespace, dtype and device of ``x`` (its values, exactly)."""
        xp = array_namespace(x)
        if array_namespace(part) is xp:
            return part
        # Through the host (a GPU tensor's tolist, another library's DLPack export).
        tolist = getattr(part, "tolist", None)
        values = tolist() if tolist is not None else np.from_dlpack(part)
        return xp.asarray(values, dtype=x.dtype, device=device(x))


def run_spmd_threads(
    fn: Callable[..., Any], size: int, /, *args: Any, timeout: float = 60.0
) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``size`` threads, each a rank of one group.

    Parameters
    ----------
    fn : callable
        Called as ``fn(comm, *args)`` on every rank, with ``comm`` a
        :class:`ThreadComm`.
    size : int
        The number of ranks (threads), at least 1.
    *args
        Passed to ``fn`` on every rank.
    timeout : float, default 60.0
        Seconds a rank waits in a reduction for the others before the group is
        declared broken.

    Returns
    -------
    list
        Per rank, in rank order: what ``fn`` returned, or the exception it raised
        (returned, not raised, so that a test can check that every rank failed
        the same way).

    Raises
    ------
    ValueError
        If ``size`` is not an integer >= 1.
    BaseException
        What a rank raised that is not an ``Exception`` (``pytest.fail``'s, that of
        ``pytest.raises`` in a rank, ``SystemExit``), after every rank stopped: a
        check made in a rank fails the caller.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.testing import run_spmd_threads
    >>> run_spmd_threads(lambda comm: comm.allreduce_sum(np.array([comm.rank])), 3)
    [array([3]), array([3]), array([3])]
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    group = _ThreadGroup(size, timeout)
    results: list[Any] = [None] * size
    escaped: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank), *args)
        except Exception as exc:  # reported to the caller per rank
            results[rank] = exc
            group.fail()
        except BaseException as exc:  # pytest.fail's, SystemExit: the caller's to raise
            escaped.append(exc)
            group.fail()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if escaped:
        raise escaped[0]
    return results


# Re-exported by mfac_core.testing, under whose name they are documented, doctested and pickled.
for _public in (ThreadComm, run_spmd_threads):
    _public.__module__ = "mfac_core.testing"
