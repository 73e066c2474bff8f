"""Benchmark of ``MFAC(masks=...)``: window memory and step time against the density.

Usage::

    python benchmarks/sparse_finetuning.py      # d = 2^20, m = 32, density 100/50/10 %
    python benchmarks/sparse_finetuning.py --dim 4194304 --m 64 --density 0.1 --density 0.02
    python benchmarks/sparse_finetuning.py --quick   # smoke run (seconds): d = 2^14, m = 8

The parameters are four float32 weight matrices of ``d / 4`` coordinates, on the CPU
with ``--threads`` torch threads (default 1), pruned at random to each density
(unstructured, as magnitude or OBS pruning leaves them). For each density the table
gives the optimizer built with those masks and, as its floor, a dense :class:`MFAC`
over a model made of just the kept coordinates (``d = kept``: four 1-D parameters of
the kept sizes), fed fresh random gradients; the 100 % row is the dense optimizer
without masks. Measured, interleaved round-robin, best of ``repeat``:

- **window**: the bytes of the window's ``m x kept`` gradient array (``opt.ihvp``),
  as allocated; **extra**: what the sparse mode adds, the copies of the masks (one
  byte per coordinate) and the kept positions (8 bytes per kept coordinate);
- **step**: ``opt.step()`` alone (setting the gradients is set-up, not timed);
- **dense at d = kept**: the same for the floor; the ratio is what the gather of the
  kept gradient entries and the scatter of the step cost on top.

The last line says how many cores other processes kept busy during the run; timings
taken while that is well above zero are not trustworthy on a small machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: python benchmarks/sparse_finetuning.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    CpuMonitor,
    fmt_bytes,
    fmt_ratio,
    fmt_time,
    interleaved,
    machine_facts,
    markdown_table,
)

from mfac_core.torch import MFAC

PARTS = 4  # weight matrices
COLS = 1024  # columns of each (fewer for tiny --dim)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dim", type=int, default=None, help="coordinates d (default 2^20)")
    p.add_argument("--m", type=int, default=None, help="window size (default 32)")
    p.add_argument(
        "--density",
        type=float,
        action="append",
        default=None,
        help="kept fractions below 1 (repeatable; default 0.5 and 0.1; 1.0 is always run)",
    )
    p.add_argument("--damp", type=float, default=1e-3)
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.dim = args.dim or 2**14
        args.m = args.m or 8
        args.repeat = args.repeat or 3
    args.dim = args.dim or 2**20
    args.m = args.m or 32
    args.repeat = args.repeat or 7
    args.density = args.density or [0.5, 0.1]
    if any(not 0 < x < 1 for x in args.density) or args.dim < PARTS:
        p.error("densities must be in (0, 1) and --dim at least 4")
    return args


def weights(dim: int, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    cols = min(COLS, dim // PARTS)
    rows = dim // PARTS // cols
    return [nn.Parameter(torch.randn(rows, cols, generator=gen)) for _ in range(PARTS)]


def candidate(opt: MFAC, params: list[nn.Parameter]) -> tuple[Callable[[Any], Any], Any]:
    """``(step, set-up)`` for :func:`interleaved`: fresh gradients, then one timed step.

    Fresh each time: a gradient inserted twice would make the window singular.
    """
    gen = torch.Generator().manual_seed(1)

    def setup() -> None:
        for p in params:
            p.grad = 1e-2 * torch.randn(p.shape, generator=gen)

    for _ in range(3):  # past the first steps' allocations
        setup()
        opt.step()
    return (lambda _: opt.step()), setup


def window_bytes(opt: MFAC) -> int:
    G = opt.ihvp._G
    return G.numel() * G.element_size()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    monitor = CpuMonitor()
    print("# Sparse M-FAC: window memory and step time against the density\n")
    facts = [*machine_facts(), ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads")]
    print(markdown_table(["machine", ""], facts))
    options = {"lr": 1e-4, "num_grads": args.m, "damp": args.damp}
    dense_params = weights(args.dim)
    d = sum(p.numel() for p in dense_params)
    runs: dict[float, dict[str, Any]] = {1.0: {"opt": MFAC(dense_params, **options)}}
    cands = {"100%": candidate(runs[1.0]["opt"], dense_params)}
    for density in args.density:
        params = weights(args.dim)
        gen = torch.Generator().manual_seed(2)
        masks = {p: torch.rand(p.shape, generator=gen) < density for p in params}
        with torch.no_grad():
            for p, mask in masks.items():
                p.masked_fill_(~mask, 0.0)
        sparse = MFAC(params, masks=masks, **options)
        # The floor: a dense optimizer over just the kept coordinates.
        kept = [nn.Parameter(p.detach()[mask].clone()) for p, mask in masks.items()]
        floor = MFAC(kept, **options)
        extra = sum(mask.numel() + 8 * int(mask.sum()) for mask in masks.values())
        runs[density] = {"opt": sparse, "floor": floor, "extra": extra}
        cands[f"{density:.0%}"] = candidate(sparse, params)
        cands[f"{density:.0%} floor"] = candidate(floor, kept)
    t = interleaved(cands, args.repeat)
    base = t["100%"].best
    rows = []
    for density, run in runs.items():
        name = f"{density:.0%}"
        opt = run["opt"]
        best, median = t[name].best, t[name].median
        floor = t[f"{name} floor"].best if "floor" in run else base
        rows.append(
            [
                name,
                f"{opt.dim:,}",
                fmt_bytes(window_bytes(opt)),
                fmt_bytes(run["extra"]) if "extra" in run else "-",
                fmt_time(best),
                fmt_time(median),
                fmt_time(floor) if "floor" in run else "(this row)",
                fmt_ratio(best / floor),
                fmt_ratio(best / base),
            ]
        )
    print(
        f"\nd = {d:,} float32 coordinates in {PARTS} weights, m = {args.m}, damp "
        f"{args.damp:g}; best of {args.repeat} interleaved runs (median as noise indicator)\n"
    )
    head = [
        "density",
        "kept d",
        "window",
        "extra",
        "step",
        "median",
        "dense at d = kept",
        "vs dense at kept",
        "vs 100%",
    ]
    print(markdown_table(head, rows))
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(f"\nother processes kept {foreign:.2f} cores busy on average during the run")


if __name__ == "__main__":
    main()
