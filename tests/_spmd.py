"""Run a function on several processes joined by torch.distributed's gloo backend.

``spawn(fn, nprocs, *args)`` starts ``nprocs`` fresh interpreters (the ``spawn``
start method: no state leaks from the test process), initialises a gloo group
through a file in a temporary directory (no port to race for), calls
``fn(comm, *args)`` with a :class:`mfac_core.distributed.TorchComm` on every
rank, and returns what each rank returned or raised, in rank order. ``fn`` must
be a module-level function of an importable module (the children unpickle it).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

# One BLAS thread per child: several children share this machine's cores.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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


def _child(
    rank: int,
    nprocs: int,
    init_file: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out: Any,
) -> None:
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
        out.put((rank, result))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, /, *args: Any, timeout: float = 60.0) -> list[Any]:
    """``fn(comm, *args)`` on ``nprocs`` gloo ranks; per rank its result or RankError."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    saved = {k: os.environ.get(k) for k in _CHILD_ENV}
    os.environ.update(_CHILD_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            procs = [
                ctx.Process(
                    target=_child, args=(r, nprocs, init_file, timeout, fn, args, out), daemon=True
                )
                for r in range(nprocs)
            ]
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
