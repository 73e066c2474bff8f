"""Benchmark of the fixed cost per call at small sizes, against bare NumPy and torch.

Usage::

    python benchmarks/overhead.py            # (m, d) = (8, 1e2) ... (64, 1e5), 1 and 2 threads
    python benchmarks/overhead.py --quick    # smoke run, one thread, < 20 s
    python benchmarks/overhead.py --threads 1 --repeat 15

At small d the O(d m) passes take microseconds, and what a call costs besides them
(validation, dispatch, allocations, the m x m solves' library calls) decides its time:
a user calling ``op @ x`` inside ``scipy.sparse.linalg.cg`` at d = 1e3, or stepping a
small model with :class:`mfac_core.torch.MFAC`. Each table runs its candidates
interleaved with their floor, in the same process (docs/design.rst, "Speed: how it is
measured"); a run times a loop of calls (about 2 ms; 0.5 ms with ``--quick``), and the
time per call is the best run's over its count.

**Products** (``StaticIHVP(G) @ x`` with the default ``check_finite=True``, and
``DynamicIHVP.update_and_matvec(g)`` on a full window, both float32 and float64 NumPy):
over the *bare floor*, the same sums by bare NumPy and SciPy calls on a float64 copy of G
made beforehand: ``p = G64 @ x``, the two m x m triangular solves with the factor
(``scipy.linalg.solve_triangular``), ``y = (x - G64.T @ c) / damp``. The window's step
also edits its factor (O(m^2)) and checks its drift; its floor is the same sums, so its
ratio holds that work too. One child process per thread count (``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` and ``MFAC_CORE_NUM_THREADS``), so that every library starts with it.

**torch.compile** (PyTorch CPU float32 tensors, one thread): once ``torch._dynamo`` is
imported, each public call of an operator goes through a twin excluded from tracing
(``torch.compiler.disable``), so that a compiled function that calls it has one graph
break there and the call runs as eagerly. The floor is the same call without that
exclusion (the method it wraps, ``__wrapped__``); then the call as users make it, and
``sin(op(cos(x)))`` eagerly and compiled (inductor; TorchDynamo's eager backend with
``--quick``, which generates no code): the compiled function's excess over the eager one
is TorchDynamo's, at the graph break (its guards, the resumed frame).

**Optimizer** (one torch thread): ``MFAC.step()`` against ``torch.optim.Adam.step()`` on
a small ReLU MLP (d about 1e4 and 1e5, m = 32), the gradients set beforehand, a new one
each step (views into a bank filled once, the same for both optimizers).

The header gives the machine, the load average, and how many cores other processes kept
busy during the run: timings of microseconds are only trustworthy near zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The installed package, not a source tree next to the script; then the helpers.
sys.path.append(str(Path(__file__).resolve().parent))
import _common as common

from mfac_core import DynamicIHVP, StaticIHVP

_CHILD = "--child"
SIZES = [(8, 100), (16, 1_000), (32, 10_000), (64, 100_000)]
QUICK_SIZES = [(8, 100), (32, 10_000)]
DAMP = 1e-2


def make_grads(rng: np.random.Generator, m: int, d: int, dtype: Any) -> np.ndarray:
    """m gradients with a shared mean direction, ``||G||_2^2 / m = 1``."""
    G = rng.standard_normal(d) + rng.standard_normal((m, d))
    G /= np.linalg.norm(G, 2) / np.sqrt(m)
    return G.astype(dtype)


def looped(fn: Callable[[int], Any], calls: int) -> Callable[[Any], None]:
    """A timing candidate: ``fn(i)`` for ``i`` in ``range(calls)``."""

    def run(_: Any) -> None:
        for i in range(calls):
            fn(i)

    return run


def calls_for(fn: Callable[[int], Any], budget: float) -> int:
    """How many calls of ``fn`` fill about ``budget`` seconds (after a warm-up call)."""
    fn(0)
    t0 = time.perf_counter()
    fn(1)
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, int(budget / once)))


def timed(fns: dict[str, Callable[[int], Any]], repeat: int, budget: float) -> dict[str, float]:
    """Seconds per call of each ``fn(i)``, best of ``repeat`` interleaved runs of a loop."""
    counts = {name: calls_for(fn, budget) for name, fn in fns.items()}
    cands = {name: (looped(fn, counts[name]), None) for name, fn in fns.items()}
    t = common.interleaved(cands, repeat, collect=False)
    return {name: t[name].best / counts[name] for name in fns}


def product_rows(m: int, d: int, dtype: Any, repeat: int, budget: float) -> list[list[str]]:
    import scipy.linalg

    rng = np.random.default_rng(0)
    G = make_grads(rng, m, d, dtype)
    # Fresh gradients for the window's steps (a gradient twice would make it singular).
    stream = make_grads(rng, 4 * m, d, dtype)
    x = rng.standard_normal(d).astype(dtype)
    op = StaticIHVP(G, damp=DAMP)
    window = DynamicIHVP(m, d, damp=DAMP, dtype=np.dtype(dtype).name)
    for g in G:
        window.update(g)
    G64 = G.astype(np.float64)
    x64 = x.astype(np.float64)
    U = np.linalg.cholesky(G64 @ G64.T + m * DAMP * np.eye(m)).T

    def floor(i: int) -> Any:
        p = G64 @ x64
        z = scipy.linalg.solve_triangular(U, p, trans=1, check_finite=False)
        c = scipy.linalg.solve_triangular(U, z, check_finite=False)
        return (x64 - G64.T @ c) * (1.0 / DAMP)

    fns = {
        "floor": floor,
        "op @ x": lambda i: op @ x,
        "update_and_matvec(g)": lambda i: window.update_and_matvec(stream[i % stream.shape[0]]),
    }
    t = timed(fns, repeat, budget)
    name = np.dtype(dtype).name
    rows = [[f"{m}", f"{d:.0e}", name, "bare floor", common.fmt_time(t["floor"]), "1.00x"]]
    for what in ("op @ x", "update_and_matvec(g)"):
        cls = "StaticIHVP" if what == "op @ x" else "DynamicIHVP"
        rows.append(
            [
                f"{m}",
                f"{d:.0e}",
                name,
                f"{cls} {what}",
                common.fmt_time(t[what]),
                common.fmt_ratio(t[what] / t["floor"]),
            ]
        )
    return rows


def compiled_rows(repeat: int, budget: float, quick: bool) -> list[list[str]]:
    import torch
    import torch._dynamo  # what torch.compile imports: the exclusion is on from here

    torch.set_num_threads(1)
    backend = "eager" if quick else "inductor"
    rows = []
    for m, d in QUICK_SIZES if quick else SIZES[1:]:
        rows += compiled_size_rows(m, d, repeat, budget, backend)
    return rows


def compiled_size_rows(m: int, d: int, repeat: int, budget: float, backend: str) -> list[list[str]]:
    import torch

    rng = np.random.default_rng(0)
    G = torch.from_numpy(make_grads(rng, m, d, np.float32))
    x = torch.from_numpy(rng.standard_normal(d).astype(np.float32))
    op = StaticIHVP(G, damp=DAMP)
    unexcluded = type(op).matvec.__wrapped__

    def around(v: Any) -> Any:
        return torch.sin(op(torch.cos(v)))

    traced = torch.compile(around, backend=backend)
    fns = {
        "op.matvec(x) without its exclusion (floor)": lambda i: unexcluded(op, x),
        "op.matvec(x)": lambda i: op.matvec(x),
        "sin(op(cos(x))), eager": lambda i: around(x),
        f"sin(op(cos(x))), compiled ({backend})": lambda i: traced(x),
    }
    t = timed(fns, repeat, budget)
    floor = next(iter(t.values()))
    return [
        [f"{m}", f"{d:.0e}", what, common.fmt_time(per), common.fmt_ratio(per / floor)]
        for what, per in t.items()
    ]


def stepper(params: list[Any], opt: Any, bank: Any) -> Callable[[int], Any]:
    """``step(i)``: the gradients set to row ``i`` of ``bank`` (views), then ``opt.step()``."""
    offsets = np.cumsum([0] + [p.numel() for p in params])

    def step(i: int) -> None:
        row = bank[i % bank.shape[0]]
        for p, lo, hi in zip(params, offsets[:-1], offsets[1:], strict=True):
            p.grad = row[lo:hi].view(p.shape)
        opt.step()

    return step


def optimizer_rows(repeat: int, budget: float, quick: bool) -> list[list[str]]:
    import torch
    from torch import nn

    from mfac_core.torch import MFAC

    torch.set_num_threads(1)
    rows = []
    shapes = [(64, 128, 16), (256, 384, 10)]
    for a, h, b in shapes[:1] if quick else shapes:
        models = {}
        for name in ("Adam", "MFAC"):
            torch.manual_seed(0)
            models[name] = nn.Sequential(nn.Linear(a, h), nn.ReLU(), nn.Linear(h, b))
        params = {name: list(model.parameters()) for name, model in models.items()}
        d = sum(p.numel() for p in params["Adam"])
        m = 32
        bank = 1e-2 * torch.randn(4 * m, d)
        opts = {
            "Adam": torch.optim.Adam(params["Adam"], lr=1e-6),
            "MFAC": MFAC(params["MFAC"], lr=1e-6, num_grads=m, damp=1e-3),
        }
        fns = {name: stepper(params[name], opts[name], bank) for name in opts}
        for i in range(m + 2):  # a full window: the steady-state step (a row edit)
            fns["MFAC"](i)
        t = timed(fns, repeat, budget)
        ratio = common.fmt_ratio(t["MFAC"] / t["Adam"])
        rows.append([f"{d:,}", "Adam.step()", common.fmt_time(t["Adam"]), "1.00x"])
        rows.append([f"{d:,}", f"MFAC.step() (m = {m})", common.fmt_time(t["MFAC"]), ratio])
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, action="append", default=None, help="default 1 and 2")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch tables")
    p.add_argument("--quick", action="store_true", help="smoke run: two sizes, one thread, < 20 s")
    p.add_argument(_CHILD, type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.repeat = args.repeat or (3 if args.quick else 9)
    args.budget = 5e-4 if args.quick else 2e-3
    return args


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The tables of one process: ``args.child`` is "products" or "optimizer"."""
    if args.child == "optimizer":
        return {"rows": optimizer_rows(args.repeat, args.budget, args.quick)}
    if args.child == "compiled":
        return {"rows": compiled_rows(args.repeat, args.budget, args.quick)}
    rows = []
    for m, d in QUICK_SIZES if args.quick else SIZES:
        for dtype in (np.float32, np.float64):
            rows += product_rows(m, d, dtype, args.repeat, args.budget)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    monitor = common.CpuMonitor()
    common.print_heading(__file__)
    print(f"- repeat = {args.repeat} (best of), interleaved with the floors\n")
    base = [__file__, "--repeat", str(args.repeat)] + (["--quick"] if args.quick else [])
    headers = ["m", "d", "dtype", "candidate", "per call", "/ floor"]
    for threads in args.threads:
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MFAC_CORE_NUM_THREADS"):
            env[var] = str(threads)
        rows = common.run_child([*base, _CHILD, "products"], env=env)["rows"]
        print(f"## Products over the bare NumPy floor, {threads} thread(s)\n")
        print(common.markdown_table(headers, rows) + "\n")
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("(torch is not installed: no optimizer table)\n")
        else:
            env = dict(os.environ)
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MFAC_CORE_NUM_THREADS"):
                env[var] = "1"
            rows = common.run_child([*base, _CHILD, "optimizer"], env=env)["rows"]
            print("## MFAC.step() against Adam.step(), one torch thread\n")
            print(common.markdown_table(["d", "candidate", "per step", "/ Adam"], rows) + "\n")
            rows = common.run_child([*base, _CHILD, "compiled"], env=env)["rows"]
            print("## PyTorch CPU operators under torch.compile, one thread\n")
            headers = ["m", "d", "candidate", "per call", "/ floor"]
            print(common.markdown_table(headers, rows) + "\n")
    foreign = monitor.foreign_cores()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-"
    if foreign is not None:
        print(f"other processes kept {foreign:.2f} cores busy on average; load average {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
