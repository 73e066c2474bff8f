"""The library's own CPU threads: how many (:func:`max_threads`), and work shared among them.

The C extension's passes (:mod:`mfac_core._fused`) and the dense blocks' set-up
(``_dense_blocks``) split their work into items taken in turn by up to :func:`max_threads`
threads, the calling thread one of them (:func:`share`); the threads are started per call,
so nothing outlives it and ``fork`` is safe.

The count is read at each call that could use a second thread (so a change of
``os.environ`` counts from the next call), from the first of:

1. ``MFAC_CORE_NUM_THREADS``: a positive integer (of a list such as ``"4,2"``, the first
   entry). Any other value is reported (a ``RuntimeWarning``, once per value in the
   process: :func:`max_threads` runs per pass) and the next rule decides; a blank one is
   unset, as for OpenBLAS and OpenMP (``VAR= command`` blanks a variable for one command);
2. ``OPENBLAS_NUM_THREADS``, then ``OMP_NUM_THREADS``, read as OpenBLAS reads them (C's
   ``atoi``: ``"2.5"`` and ``"2,1"`` are 2) and passed over silently, as OpenBLAS does,
   where that is not positive: the library's threads then number BLAS's, and those
   variables' values are BLAS's to word;
3. the CPUs this process may run on.

threadpoolctl's limits do not reach these threads (docs/guidance.rst, "CPU threads").
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Callable

from .._errors import user_stacklevel

__all__ = ["VARIABLE", "max_threads", "share"]

#: The library's own variable, read first.
VARIABLE = "MFAC_CORE_NUM_THREADS"

#: The variables OpenBLAS reads, in its order.
_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

#: C's ``atoi`` as OpenBLAS applies it: leading white space, a plus sign, the digits that
#: follow (a minus sign makes the value negative: passed over).
_ATOI = re.compile(r"[ \t\n\v\f\r]*\+?([0-9]+)")

#: The bad values of :data:`VARIABLE` already reported (each once per process).
_reported: set[str] = set()
_reported_lock = threading.Lock()


def max_threads() -> int:
    """The most threads one call uses (see the module's docstring)."""
    raw = os.environ.get(VARIABLE, "")
    own = _positive(raw.split(",")[0].strip())
    if own is not None:
        return own
    count, source = _blas_count()
    if raw.strip():
        _report(raw, count, source)
    return count


def _positive(text: str) -> int | None:
    """``int(text)`` where ``text`` is ASCII digits of a positive int, else ``None``."""
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        value = int(text)
    except ValueError:  # beyond Python's digits limit for str to int
        return None
    return value if value > 0 else None


def _blas_count() -> tuple[int, str]:
    """The count OpenBLAS's variables give, else the CPUs; and where it came from."""
    for name in _BLAS_VARIABLES:
        match = _ATOI.match(os.environ.get(name, ""))
        if match is not None:
            value = _positive(match[1])
            if value is not None:
                return value, name
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0))), "the CPUs this process may run on"
    return max(1, os.cpu_count() or 1), "the CPUs"


def _report(raw: str, count: int, source: str) -> None:
    """Warn once per process that ``raw`` is not a count of :data:`VARIABLE`."""
    with _reported_lock:
        if raw in _reported:
            return
        _reported.add(raw)  # before warning: an error filter raises at most once per value
    warnings.warn(
        f"{VARIABLE}={raw!r} is not a positive integer; mfac_core uses {count} threads "
        f"instead (from {source})",
        RuntimeWarning,
        # The user's line: max_threads is read deep inside a call (a pass's pieces).
        stacklevel=user_stacklevel(),
    )


def share(
    call: Callable[[int, bool], None],
    count: int,
    threads: int,
    *,
    minor: tuple[type[BaseException], ...] = (),
) -> None:
    """``call(i, on_caller)`` for every ``i < count``, on ``threads`` threads (this one included).

    Threads take the next item when they finish one, so a thread that shares its core
    (with BLAS's idle threads, which spin for a while after each BLAS call, or with
    anything else) does fewer items instead of holding the others up. ``on_caller`` says
    whether ``call`` runs on the calling thread.

    The first error of any thread (a ``KeyboardInterrupt`` on the calling thread while it
    starts or joins the others included) stops every thread at its next item and is raised
    here once no other thread is inside ``call``: nothing of the call runs after it
    returned or raised. An error of a type in ``minor`` yields to any other error.
    """
    if threads <= 1:
        # No thread to start, join or hand errors back (small calls: a loop of calls
        # from scientific code, where the machinery cost more than the work).
        for i in range(count):
            call(i, True)
        return
    team = _Team(call, count)
    helpers: list[threading.Thread] = []
    try:
        for _ in range(min(threads, count) - 1):
            helpers.append(threading.Thread(target=team.helper, daemon=True))
            helpers[-1].start()
        team.work(True)
    except BaseException as exc:
        team.fail(exc)
    team.finish(helpers)
    if team.errors:
        errors = team.errors
        raise next((e for e in errors if not isinstance(e, minor)), errors[0])


class _Team:
    """The items of one :func:`share` call, and what its threads know of one another."""

    def __init__(self, call: Callable[[int, bool], None], count: int) -> None:
        self.call, self.count = call, count
        self.next = 0  # the next item to take
        self.busy = 0  # helpers inside ``call``
        self.waiting = False  # whether finish() waits for busy to reach 0
        self.errors: list[BaseException] = []  # any stops every thread
        # Reentrant: a KeyboardInterrupt that leaves it held by the calling thread (between
        # its acquire and the ``with`` block) cannot then lock that thread out of finish().
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)  # entered through the lock: quicker

    def work(self, caller: bool) -> None:
        """Take items until none is left or some thread failed."""
        while True:
            with self.lock:
                if self.errors or self.next >= self.count:
                    return
                i = self.next
                self.next += 1
                if not caller:
                    self.busy += 1
            try:
                self.call(i, caller)
            finally:
                if not caller:
                    with self.lock:
                        self.busy -= 1
                        if self.waiting and not self.busy:  # notify costs 0.5 us an item
                            self.cond.notify_all()

    def helper(self) -> None:
        try:
            self.work(False)
        except BaseException as exc:  # raised on the calling thread by share()
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)

    def finish(self, helpers: list[threading.Thread]) -> None:
        """Return once no helper is inside ``call`` and every started helper was joined.

        A helper whose start was interrupted before it ran cannot be joined; it takes no
        item once an error is recorded, and the items it took before are waited for here.
        An interrupt of this wait (at most one item per helper), or an error that a signal
        handler raised, is recorded as the call's error, and the wait goes on.
        """
        pending = list(helpers)
        while True:
            try:
                with self.cond:
                    self.waiting = True
                    while self.busy:
                        self.cond.wait()
                while pending:
                    try:
                        pending[-1].join()
                    except RuntimeError:  # not started: it runs no item
                        pass
                    pending.pop()
                return
            except BaseException as exc:  # raised by share() once the helpers are done
                self.fail(exc)
