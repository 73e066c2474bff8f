"""Benchmark of ``mfac_core.DynamicIHVP`` on NumPy against measured machine floors.

Usage::

    python benchmarks/dynamic.py                 # d = 1e6, m = 64, 256, 1024, float32
    python benchmarks/dynamic.py --m 256 --d 2e6 --repeat 7
    python benchmarks/dynamic.py --quick         # CI smoke run, d = 1e5, m = 32 and 128

**Step**: ``op.update_and_matvec(g)`` on a full window (the optimiser step: replace the
oldest gradient, then ``F^{-1} g``) over its floor, two passes over the m x d window,
``2 m d itemsize`` bytes over the copy bandwidth (``2 * nbytes / t`` of ``np.copyto``)
measured in the same run, interleaved with the steps. The read-bandwidth floor (fastest
read-only BLAS pass) is shown too. Target: 1.3x at m >= 256.

**m x m part** of one update, independent of d and so timed on a window of d = 2m:
the factor edit of the incremental path (delete the oldest row and column of the
float64 Cholesky factor, append the new one, drift check) against the O(m^3) path that
refactorises (``refactor_every=0``); and the m x m part of a product (two
triangular solves). Target: incremental edit <= 2 ms at m = 1024.

The last lines say how many cores other processes used during the run: timings taken
while that number is well above zero are not trustworthy on a small machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

if __package__ in (None, ""):  # run as a script: python benchmarks/dynamic.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    CpuMonitor,
    bandwidth_candidates,
    fmt_ratio,
    fmt_time,
    interleaved,
    machine_facts,
    markdown_table,
)

from mfac_core import DynamicIHVP, WindowOptions
from mfac_core._dynamic_factor import edited


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=float, default=None, help="coordinates (default 1e6)")
    p.add_argument(
        "--m",
        type=int,
        action="append",
        default=None,
        help="window sizes (repeatable; default 64, 256, 1024)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.d = args.d or 1e5
        args.m = args.m or [32, 128]
        args.repeat = args.repeat or 3
    args.d = int(args.d or 1e6)
    args.m = args.m or [64, 256, 1024]
    args.repeat = args.repeat or 5
    return args


def _window(rng: np.random.Generator, m: int, d: int, dtype: str, damp: float) -> np.ndarray:
    # Scaled so that kappa ~ 1e4: realistic for float32, no effect on timings.
    G = rng.standard_normal((m, d), dtype=np.float32).astype(dtype)
    G *= np.sqrt(1e4 * damp * m / (m + d + 2 * np.sqrt(m * d)))
    return G


def step_row(args: argparse.Namespace, m: int, rng: np.random.Generator) -> list[str]:
    d, dtype = args.d, args.dtype
    op = DynamicIHVP.from_window(_window(rng, m, d, dtype, args.damp), damp=args.damp)
    pool = _window(rng, 4, d, dtype, args.damp)
    counter = iter(range(10**9))
    cands, bandwidth = bandwidth_candidates(max(256 * 2**20, 2 * op._G.nbytes // 4))
    cands["step"] = (lambda _: op.update_and_matvec(pool[next(counter) % len(pool)]), None)
    timings = interleaved(cands, args.repeat)
    bw = bandwidth(timings)
    step = timings["step"].best
    nbytes = 2 * m * d * np.dtype(dtype).itemsize
    floor_copy, floor_read = nbytes / bw.copy, nbytes / bw.read
    target = 1.3 if m >= 256 else None
    return [
        str(m),
        fmt_time(step),
        fmt_time(timings["step"].median),
        fmt_time(floor_copy),
        fmt_ratio(step / floor_copy, target),
        fmt_time(floor_read),
        fmt_ratio(step / floor_read),
        f"{bw.copy / 1e9:.1f} GB/s",
    ]


def mm_row(args: argparse.Namespace, m: int, rng: np.random.Generator) -> list[str]:
    d = 2 * m
    G = _window(rng, m, d, "float64", args.damp)
    ops = {
        method: DynamicIHVP.from_window(
            G, damp=args.damp, options=WindowOptions(refactor_every=every)
        )
        for method, every in (("incremental", None), ("refactor", 0))
    }
    g = _window(rng, 1, d, "float64", args.damp)[0]
    slot = ops["incremental"].slots[0]
    b = ops["incremental"]._G @ g
    b[slot] = g @ g
    P = ops["incremental"]._G @ rng.standard_normal((d, 1))
    # The operator's own m x m steps (internals, timed without the O(dm) passes).
    cands = {name: (lambda _, op=op: edited(op, slot, b), None) for name, op in ops.items()}
    cands["solve"] = (lambda _: ops["incremental"]._factor.coefficients(P), None)
    t = interleaved(cands, max(args.repeat, 7))
    inc, ref = t["incremental"].best, t["refactor"].best
    return [
        str(m),
        fmt_time(inc),
        fmt_ratio(inc / 2e-3, 1.0) if m == 1024 else "-",
        fmt_time(ref),
        f"{ref / inc:.0f}x",
        fmt_time(t["solve"].best),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    monitor = CpuMonitor()
    print("# DynamicIHVP benchmark\n")
    for key, value in machine_facts():
        print(f"- {key}: {value}")
    print(
        f"- problem: d = {args.d:.3g}, {args.dtype} window, damp = {args.damp:g}, "
        f"best of {args.repeat}\n"
    )
    rows = [step_row(args, m, rng) for m in args.m]
    print("## Step: update_and_matvec on a full window\n")
    print(
        markdown_table(
            [
                "m",
                "step",
                "median",
                "floor (copy)",
                "step/floor",
                "floor (read)",
                "step/read floor",
                "copy bw",
            ],
            rows,
        )
    )
    rows = [mm_row(args, m, rng) for m in args.m]
    print("\n## m x m part of one update (float64, independent of d)\n")
    print(
        markdown_table(
            [
                "m",
                "incremental edit",
                "vs 2 ms",
                "O(m^3) refactor",
                "refactor/edit",
                "product's solves",
            ],
            rows,
        )
    )
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(f"\nOther processes used {foreign:.2f} cores on average during this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
