"""Benchmark of ``StaticIHVP`` over Dask arrays against the NumPy operator.

Usage::

    python benchmarks/dask_static.py               # d = 4e6, m = 64, float32, chunks of 5e5
    python benchmarks/dask_static.py --d 2e6 --m 128 --chunk 2.5e5 --block-size 4096
    python benchmarks/dask_static.py --quick       # CI smoke run, d = 2e5, m = 32, < 30 s

(The script is not called ``dask.py``: run as a script, it would shadow the dask package.)

Three candidates over the same gradients (Gaussian, float32 by default), timed
interleaved (docs/design.rst, "Speed: how it is measured"):

* ``numpy``: ``StaticIHVP(G)`` on the NumPy array, with the process's BLAS threads;
* ``dask-threads``: the Dask operator on Dask's local threaded scheduler (no cluster);
* ``dask-cluster``: the Dask operator on a ``dask.distributed`` local cluster of one
  single-threaded worker process per core, with G persisted on the workers first.

Rows: the **set-up** (the constructor and one ``matvec``, computed: under
``dask.distributed`` W is persisted in the background, so the first product waits for
it), a **matvec**, a **matmat** of 8 columns and the **diagonal**, each computed to a
NumPy array. On one small machine the Dask operator cannot be faster than NumPy's BLAS;
the table shows what the scheduling costs, which a cluster of many machines pays back
when G does not fit in one.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Run as a script, this directory is sys.path[0], where benchmarks/distributed.py would
# shadow the dask.distributed package, here and in the worker processes, which inherit
# sys.path: search this directory last, so that only _common comes from it.
sys.path.append(sys.path.pop(0))

import numpy as np
from _common import fmt_time, interleaved, machine_facts, markdown_table

from mfac_core import DaskStaticIHVP, IllConditionedWarning, StaticIHVP


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--m", type=int, default=64, help="number of gradients (default 64)")
    p.add_argument("--d", type=float, default=4e6, help="dimension (default 4e6)")
    p.add_argument("--chunk", type=float, default=5e5, help="chunk width along d (default 5e5)")
    p.add_argument("--block-size", type=int, default=None, help="block size (default: full)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per candidate (default 3)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: d = 2e5, m = 32")
    args = p.parse_args(argv)
    if args.quick:
        args.m, args.d, args.chunk, args.repeat = 32, 2e5, 5e4, 2
    args.d, args.chunk = int(args.d), int(args.chunk)
    if args.block_size is not None:
        args.chunk = max(1, args.chunk // args.block_size) * args.block_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import dask
        import dask.array as da
        import distributed
    except ImportError:
        print("dask[array] and distributed are not installed: nothing to measure")
        return 0
    for name, value in machine_facts():
        print(f"{name + ':' if name else '':28s} {value}")
    m, d, dtype = args.m, args.d, np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    G = (rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)).astype(dtype)
    damp = float(np.sum(G.astype(np.float64) ** 2)) / m / 1e4  # kappa ~ 1e4
    x = rng.standard_normal(d).astype(dtype)
    X = rng.standard_normal((d, 8)).astype(dtype)
    kw = {"damp": damp, "block_size": args.block_size}
    print(
        f"m = {m}, d = {d}, {dtype}, chunks of {args.chunk} columns, "
        f"block_size = {args.block_size}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}\n"
    )
    workers = os.cpu_count() or 1
    with (
        warnings.catch_warnings(),
        distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        warnings.simplefilter("ignore", IllConditionedWarning)
        # Persisting G from this process ships it once; the warning says so.
        warnings.filterwarnings("ignore", message="Sending large graph")
        G_cluster = client.persist(da.from_array(G, chunks=(m, args.chunk)))
        G_local = da.from_array(G, chunks=(m, args.chunk))

        # The client is the default scheduler; the threaded candidate overrides it.
        def in_cluster(fn):
            return lambda _: fn()

        def local(fn):
            def run(_):
                with dask.config.set(scheduler="threads"):
                    return fn()

            return run

        def vec(a):
            return da.from_array(a, chunks=(args.chunk, *a.shape[1:]))

        ops = {
            "numpy": StaticIHVP(G, **kw),
            "dask-threads": local(lambda: DaskStaticIHVP(G_local, **kw))(None),
            "dask-cluster": in_cluster(lambda: DaskStaticIHVP(G_cluster, **kw))(None),
        }
        wrap = {"numpy": lambda f: lambda _: f(), "dask-threads": local, "dask-cluster": in_cluster}
        inputs = {"numpy": (G, x, X), "dask-threads": (G_local, vec(x), vec(X))}
        inputs["dask-cluster"] = (G_cluster, vec(x), vec(X))

        def result(a):
            return np.asarray(a.compute() if hasattr(a, "compute") else a)

        build = {"numpy": StaticIHVP, "dask-threads": DaskStaticIHVP}
        build["dask-cluster"] = DaskStaticIHVP
        rows = {
            "set-up (+ 1 matvec)": lambda name: (
                lambda: result(build[name](inputs[name][0], **kw).matvec(inputs[name][1]))
            ),
            "matvec": lambda name: lambda: result(ops[name].matvec(inputs[name][1])),
            "matmat (k = 8)": lambda name: lambda: result(ops[name].matmat(inputs[name][2])),
            "diagonal": lambda name: lambda: result(ops[name].diagonal()),
        }
        # The three agree (the same set-up and products, up to summation order).
        want = ops["numpy"].matvec(x)
        for name in ("dask-threads", "dask-cluster"):
            got = wrap[name](rows["matvec"](name))(None)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            assert err < 1e3 * float(np.finfo(dtype).eps), (name, err)

        table = []
        for row, make in rows.items():
            times = interleaved({n: (wrap[n](make(n)), None) for n in ops}, args.repeat)
            base = times["numpy"].best
            table.append(
                [row]
                + [
                    f"{fmt_time(times[n].best)} ({times[n].best / base:.1f}x)"
                    if n != "numpy"
                    else fmt_time(base)
                    for n in ops
                ]
            )
    print(markdown_table(["", *ops], table))
    print(f"\nbest of {args.repeat} (interleaved); ratios to numpy in parentheses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
