"""Benchmark of the column-sharded (SPMD) operators: traffic per operation, and times.

Usage::

    python benchmarks/distributed.py               # traffic at m = 64 and 1024; times at
                                                   # d = 1e6, m = 64, float32, 1 and 2 ranks;
                                                   # DDP step at d = 1e5, 1e6, 1e7
    python benchmarks/distributed.py --d 4e6 --m 128 --repeat 10 --ddp-d 1e6
    python benchmarks/distributed.py --quick       # CI smoke run, d = 1e5, m = 32, < 40 s

It prints the machine facts and three markdown tables.

**Traffic** (docs/scaling.rst): what each operation sends through the communicator,
per rank, counted by ``mfac_core.distributed.CountingComm`` on ``--ranks`` thread ranks
(``mfac_core.testing.run_spmd_threads``; the counts do not depend on the engine):
the number of all-reduce calls, the entries and the bytes each rank contributes (with
a ring all-reduce, each rank also receives about as many). The rows come from
``TRAFFIC_CASES``, a list of :class:`TrafficCase`: one per operator (static full,
static block-wise, dynamic; other operators add theirs there).

**Product time**: ``matvec`` on 1 and 2 processes joined by ``torch.distributed``
(gloo, this machine), each rank holding ``d / p`` columns, against the floor measured
in the same processes, interleaved with it: the single-process product (no
communicator) on the rank's own columns, i.e. the local passes a sharded product
cannot avoid (on 1 process: the whole G), full and block-wise. The all-reduce of
the ``m + 20`` numbers a product exchanges (with the status word) is timed alone too.
Times on rank 0, best of ``--repeat`` (median in brackets), every product started
after a barrier; each rank runs ``cores / ranks`` BLAS threads. On one machine the
ranks share its memory bandwidth, so the 2-rank rows show the overhead of the sharded
path (the all-reduce and the barrier), not the speed-up of separate devices.

**DDP step** (docs/torch.rst): under DDP each of 2 gloo processes computes its chunk
of the step; ``mfac_core.torch.MFAC`` all-gathers the *step* and every rank updates
all parameters (momentum 0.9). The alternative, each rank updating *its slice of
the parameters* and all-gathering the parameters, gathers as many numbers but copies
the parameters out and back in. Both are timed (d split into 10 tensors, best of
``--repeat`` (median), between barriers).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common

from mfac_core import ShardedDynamicIHVP, ShardedStaticIHVP, StaticIHVP
from mfac_core.distributed import CountingComm
from mfac_core.testing import run_spmd_threads

# -- traffic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The gradients of a traffic measurement; each rank takes its columns."""

    G: np.ndarray
    damp: float
    bounds: tuple[int, ...]
    k: int

    def columns(self, rank: int) -> slice:
        return slice(self.bounds[rank], self.bounds[rank + 1])


@dataclass(frozen=True)
class TrafficCase:
    """One operator's rows of the traffic table.

    ``build(comm, problem, rank)`` constructs the operator on one rank (its set-up is
    counted); ``operations(op, problem, rank)`` returns the operations to count, by
    name, as thunks. ``note`` says how the counts scale.
    """

    name: str
    build: Callable[[Any, Problem, int], Any]
    operations: Callable[[Any, Problem, int], dict[str, Callable[[], Any]]]
    note: str


def _static_operations(op: Any, p: Problem, rank: int) -> dict[str, Callable[[], Any]]:
    cols = p.columns(rank)
    n = cols.stop - cols.start
    x = np.ones(n, dtype=p.G.dtype)
    X = np.ones((n, p.k), dtype=p.G.dtype)
    idx = np.arange(p.k) % p.G.shape[1]
    return {
        "matvec": lambda: op.matvec(x),
        f"matmat (k={p.k})": lambda: op.matmat(X),
        "diagonal()": lambda: op.diagonal(),
        f"entries (k={p.k})": lambda: op.entries(idx, idx[::-1].copy()),
    }


def _static_full(comm: Any, p: Problem, rank: int) -> Any:
    return ShardedStaticIHVP(p.G[:, p.columns(rank)], damp=p.damp, comm=comm)


def _static_blocks(comm: Any, p: Problem, rank: int) -> Any:
    return ShardedStaticIHVP(p.G[:, p.columns(rank)], damp=p.damp, block_size=BLOCK, comm=comm)


def _dynamic(comm: Any, p: Problem, rank: int) -> Any:
    # A full window from the rows of G: one Gram matrix and one factorisation, where m
    # updates would make m edits of the factor (minutes at m = 1024 on thread ranks).
    return ShardedDynamicIHVP.from_window(p.G[:, p.columns(rank)], damp=p.damp, comm=comm)


def _dynamic_operations(op: Any, p: Problem, rank: int) -> dict[str, Callable[[], Any]]:
    cols = p.columns(rank)
    m, d = p.G.shape
    # The same gradients on every rank (a fixed seed), each rank taking its columns.
    rng = np.random.default_rng(1)
    g = rng.standard_normal(d).astype(p.G.dtype)[cols]
    X = rng.standard_normal((d, p.k)).astype(p.G.dtype)[cols]
    n = cols.stop - cols.start

    def construct() -> None:
        ShardedDynamicIHVP(m, n, damp=p.damp, dtype=p.G.dtype.name, comm=op.comm)

    def refined() -> None:
        op.refine = 1
        try:
            op.matvec(g)
        finally:
            op.refine = 0

    return {
        "constructor (empty window)": construct,
        "update_and_matvec": lambda: op.update_and_matvec(g),
        "update": lambda: op.update(g),
        "matvec": lambda: op.matvec(g),
        f"matmat (k={p.k})": lambda: op.matmat(X),
        "remove": lambda: op.remove(op.slots[0]),
        "set_damp": lambda: op.set_damp(2.0 * p.damp),
        "matvec, refine=1": refined,
    }


#: Block size of the block-wise rows (every shard boundary is a multiple of it).
BLOCK = 256

# The rows of the traffic table. Another sharded operator adds a TrafficCase here.
TRAFFIC_CASES: list[TrafficCase] = [
    TrafficCase(
        "StaticIHVP (full)",
        _static_full,
        _static_operations,
        "set-up: p x 8 (shapes, options, identity), m^2 float64 Gram, p x 5 (agreement); "
        "matvec m, matmat 0 then m k, entries 0 then 2 m k, all float64; each call + 20 (the "
        "status word: failed ranks per exception class, digests of the operation and arguments)",
    ),
    TrafficCase(
        f"StaticIHVP (block_size={BLOCK})",
        _static_blocks,
        _static_operations,
        "whole blocks on each rank: set-up p x 8 and p x 5, products and diagonal nothing, "
        "entries 0 then k",
    ),
    TrafficCase(
        "ShardedDynamicIHVP",
        _dynamic,
        _dynamic_operations,
        "set-up from_window: p (rows checked), p x 10 (settings, identity), m^2 (Gram); "
        "constructor p x 10; update, update_and_matvec and matvec m (the Gram row, float64), "
        "matmat 0 then m k, remove and set_damp p (the argument agrees); each + 20 but the "
        "Gram; a refinement step m + m more",
    ),
]


def traffic_rows(m: int, ranks: int, dtype: Any, k: int) -> list[list[str]]:
    """Count every operation of every case on ``ranks`` thread ranks (rank 0's counts)."""
    rng = np.random.default_rng(0)
    d = 2 * BLOCK * ranks
    G = rng.standard_normal((m, d)).astype(dtype)
    damp = 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m
    bounds = tuple(range(0, d + 1, d // ranks))
    problem = Problem(G, damp, bounds, k)
    rows = []
    for case in TRAFFIC_CASES:

        def fn(comm: Any, case: TrafficCase = case) -> list[tuple[str, CountingComm]]:
            counting = CountingComm(comm)
            op = case.build(counting, problem, comm.rank)
            out = [("set-up", list(counting.calls))]
            for name, thunk in case.operations(op, problem, comm.rank).items():
                counting.reset()
                thunk()
                out.append((name, list(counting.calls)))
            return out

        results = run_spmd_threads(fn, ranks)
        for r in results:
            if isinstance(r, Exception):
                raise r
        for name, calls in results[0]:
            elements = sum(int(np.prod(c.shape)) for c in calls)
            nbytes = sum(c.nbytes for c in calls)
            kinds = sorted({c.dtype for c in calls})
            rows.append(
                [
                    case.name,
                    name,
                    str(len(calls)),
                    str(elements),
                    common.fmt_bytes(nbytes) if nbytes else "0",
                    "/".join(kinds) or "-",
                ]
            )
    return rows


# -- product times on processes -----------------------------------------------------------


def _child(rank: int, size: int, init: str, args: dict[str, Any], out: Any) -> None:
    import torch.distributed as dist

    from mfac_core.distributed import TorchComm

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        task = _timed_products if args["task"] == "products" else _timed_ddp_steps
        out.put((rank, task(TorchComm(), args)))
    except Exception as exc:  # reported by the parent
        out.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def _timed_products(comm: Any, a: dict[str, Any]) -> dict[str, common.Timing]:
    """Rank-local timings: sharded products, the local floor and the bare all-reduce."""
    warnings.simplefilter("ignore", category=UserWarning)
    m, d, dtype, repeat = a["m"], a["d"], np.dtype(a["dtype"]), a["repeat"]
    rng = np.random.default_rng(a["seed"])
    n = d // comm.size
    lo = comm.rank * n
    # Each rank draws its own columns: the same G as a single process would hold.
    G_local = rng.standard_normal((m, d), dtype=np.float32)[:, lo : lo + n].astype(dtype)
    x = np.ones(n, dtype=dtype)
    damp = 1.0
    sharded = ShardedStaticIHVP(G_local, damp=damp, comm=comm)
    blocks = ShardedStaticIHVP(G_local, damp=damp, block_size=a["block"], comm=comm)
    local = StaticIHVP(G_local, damp=damp)
    local_blocks = StaticIHVP(G_local, damp=damp, block_size=a["block"])
    payload = np.zeros(m + 20, dtype=dtype)  # a product's, with the status word

    def barrier() -> None:
        comm.allreduce_sum(np.zeros(1))

    candidates = {
        "sharded": lambda: sharded.matvec(x),
        "block-wise": lambda: blocks.matvec(x),
        "local": lambda: local.matvec(x),
        "local-blocks": lambda: local_blocks.matvec(x),
        "allreduce": lambda: comm.allreduce_sum(payload),
    }
    times = {name: common.Timing() for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            barrier()
            t0 = time.perf_counter()
            fn()
            times[name].times.append(time.perf_counter() - t0)
    return times


def _ddp_candidates(comm: Any, d: int) -> dict[str, Callable[[], None]]:
    """The two ways to finish a DDP step of d coordinates (10 tensors, momentum 0.9).

    Both gather d numbers: the step (then every rank updates the whole momentum buffer
    and all parameters, as ``MFAC(comm=)`` does), or the parameters (each rank updates
    its chunk of them and of the momentum, then copies the gathered parameters in).
    """
    import torch
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    size, rank, lr, params = comm.size, comm.rank, 1e-3, 10
    chunk = -(-d // size)
    lo, hi = min(rank * chunk, d), min((rank + 1) * chunk, d)
    sizes = [d // params + (i < d % params) for i in range(params)]
    tensors = [torch.randn(n) for n in sizes]
    s_local = torch.randn(hi - lo)
    out = torch.empty(chunk * size)
    padded = torch.zeros(chunk)
    step_buf, param_buf = torch.zeros(d), torch.zeros(hi - lo)

    def step_gathered() -> None:
        padded[: hi - lo] = s_local
        gather(out, padded, group=comm.group)
        step_buf.mul_(0.9).add_(out[:d])  # the whole momentum buffer on every rank
        for p, part in zip(tensors, torch.split(step_buf, sizes), strict=True):
            p.add_(part, alpha=-lr)

    def params_gathered() -> None:
        flat = torch.cat(tensors)  # this rank's parameters, flat
        param_buf.mul_(0.9).add_(s_local)  # the momentum of this rank's chunk only
        padded[: hi - lo] = flat[lo:hi] - lr * param_buf
        gather(out, padded, group=comm.group)
        for p, part in zip(tensors, torch.split(out[:d], sizes), strict=True):
            p.copy_(part)

    return {"gather step": step_gathered, "gather parameters": params_gathered}


def _timed_ddp_steps(comm: Any, a: dict[str, Any]) -> dict[str, common.Timing]:
    """Rank-local timings of :func:`_ddp_candidates`, per d in ``a["ds"]``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.size))
    times: dict[str, common.Timing] = {}
    for d in a["ds"]:
        candidates = _ddp_candidates(comm, d)
        for fn in candidates.values():  # warm-up
            fn()
        for _ in range(a["repeat"]):
            for name, fn in candidates.items():
                dist.barrier(group=comm.group)
                t0 = time.perf_counter()
                fn()
                dist.barrier(group=comm.group)
                times.setdefault(f"{name} {d}", common.Timing()).times.append(
                    time.perf_counter() - t0
                )
    return times


def spawn_timings(size: int, args: dict[str, Any]) -> dict[str, common.Timing]:
    """Rank 0's timings on ``size`` gloo processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    # The ranks share this machine's cores: BLAS threads per rank = cores / ranks.
    threads = str(max(1, (os.cpu_count() or 1) // size))
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_child, args=(r, size, init, args, out), daemon=True)
            for r in range(size)
        ]
        os.environ.update({k: threads for k in names})
        try:
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        results: dict[int, Any] = {}
        try:
            while len(results) < size:
                try:
                    rank, value = out.get(timeout=900)
                except queue.Empty:
                    raise RuntimeError("a rank sent no result in 900 s") from None
                results[rank] = value
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    for value in results.values():
        if isinstance(value, str):
            raise RuntimeError(value)
    return results[0]


def _fmt(t: common.Timing) -> str:
    return f"{common.fmt_time(t.best)} ({common.fmt_time(t.median)})"


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=float, default=1e6, help="coordinates of the timed products")
    ap.add_argument("--m", type=int, default=64, help="gradients of the timed products")
    ap.add_argument("--traffic-m", type=int, action="append", help="m of the traffic table")
    ap.add_argument("--ranks", type=int, default=4, help="thread ranks of the traffic table")
    ap.add_argument("--k", type=int, default=8, help="columns of matmat and pairs of entries")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--processes", type=int, action="append", help="process counts (1 2)")
    ap.add_argument("--block", type=int, default=2500, help="block size of the block-wise row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ddp-d", type=float, action="append", help="d of the DDP step table")
    ap.add_argument("--quick", action="store_true", help="CI smoke run (d = 1e5, m = 32)")
    args = ap.parse_args(argv)
    if args.quick:
        args.d, args.m, args.repeat = 1e5, 32, 3
        args.traffic_m = args.traffic_m or [32]
        args.ddp_d = args.ddp_d or [1e5]
    args.traffic_m = args.traffic_m or [64, 1024]
    args.ddp_d = [int(d) for d in args.ddp_d or [1e5, 1e6, 1e7]]
    args.processes = args.processes or [1, 2]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    monitor = common.CpuMonitor()
    dtype = np.dtype(args.dtype)
    print("# Column-sharded operators (benchmarks/distributed.py)\n")
    for name, value in common.machine_facts():
        print(f"{name + ':' if name else '':28s} {value}")
    print(
        f"{'parameters:':28s} traffic m={args.traffic_m} on {args.ranks} thread ranks, "
        f"k={args.k}; products d={int(args.d)}, m={args.m}, {args.dtype}, "
        f"processes {args.processes}, best of {args.repeat} (median); DDP step "
        f"d={args.ddp_d} on 2 processes"
    )

    for m in args.traffic_m:
        print(f"... traffic m={m}", file=sys.stderr, flush=True)
        rows = traffic_rows(m, args.ranks, dtype.type, args.k)
        print(f"\n## Traffic per rank: m={m}, {args.ranks} ranks, {args.dtype}\n")
        print(
            common.markdown_table(
                ["operator", "operation", "calls", "entries", "bytes", "dtypes"], rows
            )
        )
    print()
    for case in TRAFFIC_CASES:
        print(f"- {case.name}: {case.note}")

    d = int(args.d)
    timing_args = {
        "task": "products",
        "m": args.m,
        "d": d,
        "dtype": args.dtype,
        "repeat": args.repeat,
        "seed": args.seed,
        "block": args.block,
    }
    for size in args.processes:
        if d % size or (d // size) % args.block:
            raise SystemExit(f"--d={d} must split into {size} shards of whole --block={args.block}")
    rows = []
    for size in args.processes:
        print(f"... {size} gloo process(es)", file=sys.stderr, flush=True)
        t = spawn_timings(size, timing_args)
        rows.append(
            [
                str(size),
                _fmt(t["local"]),
                _fmt(t["sharded"]),
                f"{t['sharded'].best / t['local'].best:.2f}",
                _fmt(t["local-blocks"]),
                _fmt(t["block-wise"]),
                f"{t['block-wise'].best / t['local-blocks'].best:.2f}",
                _fmt(t["allreduce"]),
            ]
        )
    print(f"\n## Product time: d={d}, m={args.m}, {args.dtype}, gloo on this machine\n")
    print(
        common.markdown_table(
            [
                "processes",
                "floor: local matvec",
                "sharded matvec",
                "ratio",
                f"floor: local B={args.block}",
                f"sharded B={args.block}",
                "ratio",
                f"all-reduce of {args.m + 20}",
            ],
            rows,
        )
    )
    print("... DDP step, 2 gloo processes", file=sys.stderr, flush=True)
    t = spawn_timings(2, {"task": "ddp", "ds": args.ddp_d, "repeat": args.repeat})
    rows = [
        [
            f"{d:.0e}",
            _fmt(t[f"gather step {d}"]),
            _fmt(t[f"gather parameters {d}"]),
            f"{t[f'gather step {d}'].median / t[f'gather parameters {d}'].median:.2f}",
        ]
        for d in args.ddp_d
    ]
    print("\n## DDP step: gather the step or the parameters, 2 gloo processes, float32\n")
    print(
        common.markdown_table(
            ["d", "gather step (MFAC)", "gather parameters", "ratio of medians"], rows
        )
    )
    foreign = monitor.foreign_cores()
    print(
        f"\nOther processes used {foreign:.1f} cores on average during the run"
        if foreign is not None
        else ""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
