"""What the column-sharded DynamicIHVP and MFAC exchange, and the DDP gather choice.

- :func:`dynamic_rows`: per operation of a sharded :class:`~mfac_core.DynamicIHVP`,
  the reductions one rank makes (counted by a ``CountingComm`` on ``size``
  thread-ranks): rows ``(operation, calls, numbers, bytes)``.
- :func:`ddp_gather_timings`: under DDP each rank computes its chunk of the step;
  either the *step* is all-gathered and every rank updates all parameters
  (what :class:`mfac_core.torch.MFAC` does), or each rank updates *its slice of
  the parameters* and the parameters are all-gathered. Both gather d numbers;
  this times the two on real processes.

``python benchmarks/_distributed_dynamic.py`` prints both (the timing on two gloo
processes).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from mfac_core import DynamicIHVP
from mfac_core.distributed import Communicator, CountingComm
from mfac_core.testing import run_spmd_threads

Row = tuple[str, int, int, int]


def dynamic_rows(m: int, d: int, *, size: int = 2, k: int = 8) -> list[Row]:
    """Reductions per operation of a DynamicIHVP sharded over ``size`` ranks.

    Parameters
    ----------
    m, d : int
        Window size and number of coordinates (split evenly over the ranks).
    size : int, optional
        The number of ranks (threads).
    k : int, optional
        The number of columns of the ``matmat`` row.

    Returns
    -------
    list of tuple
        ``(operation, calls, numbers, bytes)`` that one rank contributes per call
        (the status word included), for a full window in float32.
    """
    widths = [d // size + (r < d % size) for r in range(size)]

    def rank(comm: Communicator) -> list[Row]:
        counting = CountingComm(comm)
        lo = sum(widths[: comm.rank])
        hi = lo + widths[comm.rank]
        rng = np.random.default_rng(0)
        op = DynamicIHVP(m, hi - lo, damp=float(d), dtype="float32", comm=counting)
        for _ in range(m):
            op.update(rng.standard_normal(d).astype(np.float32)[lo:hi])
        g = rng.standard_normal(d).astype(np.float32)[lo:hi]
        X = rng.standard_normal((d, k)).astype(np.float32)[lo:hi]
        rows = []
        for name, call in (
            ("update_and_matvec", lambda: op.update_and_matvec(g)),
            ("update", lambda: op.update(g)),
            ("matvec", lambda: op.matvec(g)),
            (f"matmat (k={k})", lambda: op.matmat(X)),
            ("set_damp", lambda: op.set_damp(2.0 * d)),
            ("remove", lambda: op.remove(op.slots[0])),
        ):
            counting.reset()
            call()
            rows.append((name, counting.num_calls, counting.num_elements, counting.num_bytes))
        op.refine = 1
        counting.reset()
        op.matvec(g)
        rows.append(
            ("matvec, refine=1", counting.num_calls, counting.num_elements, counting.num_bytes)
        )
        return rows

    results = run_spmd_threads(rank, size)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results[0])


def ddp_gather_timings(
    comm: Any, d: int, *, params: int = 10, repeats: int = 20, lr: float = 1e-3
) -> dict[str, float]:
    """Median seconds of the two ways to finish a DDP step, on the calling processes.

    Parameters
    ----------
    comm : TorchComm
        The group (its ``group`` is used for ``all_gather``).
    d : int
        The number of coordinates, split into ``params`` parameter tensors.
    params : int, optional
        How many parameter tensors hold the d coordinates.
    repeats : int, optional
        Timed repetitions (after one warm-up).
    lr : float, optional
        The learning rate (with momentum 0.9).

    Returns
    -------
    dict
        ``{"gather step": s, "gather parameters": s}``.
    """
    import torch
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    size, rank = comm.size, comm.rank
    chunk = -(-d // size)
    lo, hi = min(rank * chunk, d), min((rank + 1) * chunk, d)
    sizes = [d // params + (i < d % params) for i in range(params)]
    tensors = [torch.randn(n) for n in sizes]
    s_local = torch.randn(hi - lo)
    out = torch.empty(chunk * size)
    padded = torch.zeros(chunk)

    def step_gathered(buf: Any) -> None:
        padded[: hi - lo] = s_local
        gather(out, padded, group=comm.group)
        buf.mul_(0.9).add_(out[:d])  # the whole momentum buffer on every rank
        for p, part in zip(tensors, torch.split(buf, sizes), strict=True):
            p.add_(part, alpha=-lr)

    def params_gathered(buf: Any) -> None:
        flat = torch.cat(tensors)  # this rank's parameters, flat
        buf.mul_(0.9).add_(s_local)  # the momentum of this rank's chunk only
        padded[: hi - lo] = flat[lo:hi] - lr * buf
        gather(out, padded, group=comm.group)
        for p, part in zip(tensors, torch.split(out[:d], sizes), strict=True):
            p.copy_(part)

    results = {}
    for name, fn, buf in (
        ("gather step", step_gathered, torch.zeros(d)),
        ("gather parameters", params_gathered, torch.zeros(hi - lo)),
    ):
        times = []
        for i in range(repeats + 1):
            dist.barrier(group=comm.group)
            t0 = time.perf_counter()
            fn(buf)
            dist.barrier(group=comm.group)
            if i:
                times.append(time.perf_counter() - t0)
        results[name] = float(np.median(times))
    return results


def _timing_child(rank: int, size: int, init: str, d: int, out: Any) -> None:
    import torch.distributed as dist

    from mfac_core.distributed import TorchComm

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    try:
        result = ddp_gather_timings(TorchComm(), d)
        if rank == 0:
            out.put(result)
    finally:
        dist.destroy_process_group()


def main() -> None:
    """Print the reduction table and the DDP timing on two gloo processes."""
    import multiprocessing as mp

    print(f"{'operation':<22}{'calls':>6}{'numbers':>9}{'bytes':>8}   (m=64, d=10**5, 2 ranks)")
    for name, calls, numbers, nbytes in dynamic_rows(64, 10**5):
        print(f"{name:<22}{calls:>6}{numbers:>9}{nbytes:>8}")
    ctx = mp.get_context("spawn")
    for d in (10**5, 10**6, 10**7):
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            queue = ctx.Queue()
            procs = [
                ctx.Process(target=_timing_child, args=(r, 2, init, d, queue)) for r in range(2)
            ]
            for p in procs:
                p.start()
            result = queue.get(timeout=600)
            for p in procs:
                p.join()
        print(
            f"DDP, 2 gloo processes, d={d:.0e}: "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in result.items())
        )


if __name__ == "__main__":
    main()
