"""Run a function on several processes joined by torch.distributed's gloo backend.

``spawn(fn, nprocs, *args)`` starts ``nprocs`` fresh interpreters (the ``spawn``
start method: no state leaks from the test process), initialises a gloo group
through a file in a temporary directory (no port to race for), calls
``fn(comm, *args)`` with a :class:`mfac_core.distributed.TorchComm` on every
rank, and returns what each rank returned or raised, in rank order. ``fn`` must
be a module-level function of an importable module (the children unpickle it).

``spawn(..., pooled=True)`` runs ``fn`` on interpreters kept for the whole test session
instead: starting ranks (an interpreter each, importing torch) is most of a gloo test's
time, and the tests that pass ``pooled=True`` run on several world sizes. Each call is
still a fresh gloo group (initialised for the call, destroyed after it) of fresh ranks
with respect to the test process; what a pooled interpreter keeps between calls is its
imported modules. A call in which a rank raised, died or timed out retires the pool, so
the next call starts new interpreters. Tests of a failing rank or of process-wide torch
state (DDP, device meshes) keep the default, one fresh interpreter per rank and call.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

# One BLAS thread per child: several children share this machine's cores.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def _child_env() -> Iterator[None]:
    """``_CHILD_ENV`` in ``os.environ`` while ranks start (spawned children copy it), then back."""
    saved = {k: os.environ.get(k) for k in _CHILD_ENV}
    os.environ.update(_CHILD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RankError(Exception):
    """What a rank raised, with its traceback as text (exceptions may not pickle)."""

    def __init__(self, kind: str, message: str, trace: str) -> None:
        # All three to Exception, so that the exception pickles back.
        super().__init__(kind, message, trace)
        self.kind = kind
        self.message = message
        self.trace = trace

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}\n{self.trace}"


def _job(
    tag: tuple[int, ...],
    rank: int,
    nprocs: int,
    init_file: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out: Any,
) -> None:
    """One rank's run of ``fn`` in a gloo group of its own; ``(*tag, result)`` goes to ``out``."""
    import torch.distributed as dist

    from mfac_core.distributed import TorchComm

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=nprocs,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result: Any = fn(TorchComm(), *args)
    except Exception as exc:  # sent to the parent
        result = RankError(type(exc).__name__, str(exc), traceback.format_exc())
    try:
        out.put((*tag, result))
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    /,
    *args: Any,
    timeout: float = 60.0,
    pooled: bool = False,
) -> list[Any]:
    """``fn(comm, *args)`` on ``nprocs`` gloo ranks; per rank its result or RankError."""
    if pooled:
        return _POOL.run(fn, nprocs, args, timeout)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        with _child_env():
            procs = [
                ctx.Process(
                    target=_job,
                    args=((r,), r, nprocs, init_file, timeout, fn, args, out),
                    daemon=True,
                )
                for r in range(nprocs)
            ]
            for p in procs:
                p.start()
        results: list[Any] = [None] * nprocs
        received = 0
        try:
            while received < nprocs:
                try:
                    rank, result = out.get(timeout=timeout + 60)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(
                        f"{nprocs - received} rank(s) sent no result in {timeout + 60} s "
                        f"(ranks that died: {dead})"
                    ) from None
                results[rank] = result
                received += 1
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return results


def _pooled_worker(inbox: Any, out: Any) -> None:
    """A pooled rank: runs ``_job`` for each job until it gets None."""
    while (job := inbox.get()) is not None:
        job_id, rank, *rest = job
        _job((job_id, rank), rank, *rest, out)


class _Pool:
    """Interpreters that serve ``spawn(..., pooled=True)`` for the session (see the module)."""

    def __init__(self) -> None:
        self._jobs = itertools.count()
        self._reset()

    def _reset(self) -> None:
        self._procs: list[Any] = []
        self._inboxes: list[Any] = []
        self._out: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _grow(self, nprocs: int) -> None:
        ctx = mp.get_context("spawn")
        if self._out is None:
            self._out = ctx.Queue()
            self._tmp = tempfile.TemporaryDirectory()
        with _child_env():
            while len(self._procs) < nprocs:
                inbox = ctx.Queue()
                proc = ctx.Process(target=_pooled_worker, args=(inbox, self._out), daemon=True)
                proc.start()
                self._procs.append(proc)
                self._inboxes.append(inbox)

    def run(
        self, fn: Callable[..., Any], nprocs: int, args: tuple[Any, ...], timeout: float
    ) -> list[Any]:
        self._grow(nprocs)
        job_id = next(self._jobs)
        assert self._tmp is not None
        init_file = os.path.join(self._tmp.name, f"init-{job_id}")
        healthy = False
        try:
            for rank in range(nprocs):
                job = (job_id, rank, nprocs, init_file, timeout, fn, args)
                self._inboxes[rank].put(job)
            results: list[Any] = [None] * nprocs
            received = 0
            while received < nprocs:
                try:
                    got, rank, result = self._out.get(timeout=timeout + 60)
                except queue.Empty:
                    dead = [r for r, p in enumerate(self._procs[:nprocs]) if not p.is_alive()]
                    raise RuntimeError(
                        f"{nprocs - received} rank(s) sent no result in {timeout + 60} s "
                        f"(ranks that died: {dead})"
                    ) from None
                assert got == job_id, (got, job_id)  # a retired pool leaves no late result
                results[rank] = result
                received += 1
            healthy = not any(isinstance(r, RankError) for r in results)
        finally:
            if not healthy:
                self.close()
        return results

    def close(self) -> None:
        """Stop every interpreter (the next call starts new ones)."""
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
        self._reset()


_POOL = _Pool()
atexit.register(_POOL.close)
