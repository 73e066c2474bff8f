"""Accuracy and cost of iterative refinement (``refine=``) of ``mfac_core.StaticIHVP``.

Usage::

    python benchmarks/refinement.py            # accuracy at m = 64, d = 1000; cost at d = 1e6
    python benchmarks/refinement.py --quick    # CI smoke run

The operator's products read G twice, summed in float64 (the pass engine), and round
the result once: float32 and 2-byte storage give products at float32 rounding (about
eps32 / 2) for kappa up to about 1e7, which refinement cannot improve (beyond, the float64
factor's rounding shows, and one step reduces it: docs/mathematics.rst, "Exact passes",
"Iterative refinement"). Float64 storage is summed by BLAS in float64 and loses about
``c * eps64 * sqrt(kappa) * r`` (``r`` below, up to kappa) for vectors near the gradients'
span (the mean, kappa = 1e7: 1.1e-6, 500 eps64 * kappa);
one step of refinement (the residual ``x - F y`` from G in float64) brings that down.

**Accuracy**: the relative error of ``F^{-1} x`` for x = the gradients' mean (the hard
case: the product nearly cancels) with 0, 1 and 2 refinement steps, for float64 and
float32 storage at several kappa, against a reference computed by Woodbury's identity
in extended precision (``numpy.longdouble``, 80-bit on x86-64) from the stored
gradients. The gradients share a strong common mean and have a decaying spectrum, like
real per-sample gradients. ``eps*kappa`` is the classical bound, ``eps*r`` is
``eps(dtype) * ||x|| / (damp ||F^{-1} x||)``, the level one step reaches for float64
storage; float32 rows sit at float32 rounding with or without refinement.

**Cost**: ``op.matvec(x)`` with ``refine=0`` and ``refine=1`` on float32 and on float64
gradients over the two-pass streaming floor (``2 m d itemsize`` bytes over the copy
bandwidth measured in the same run, interleaved). A step costs a second product and two
float64 passes over G (the residual): for float32 storage that is cost without gain.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

if __package__ in (None, ""):  # run as a script: python benchmarks/refinement.py
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

from mfac_core import IllConditionedWarning, StaticIHVP
from mfac_core.testing import extended_precision_inverse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--m", type=int, default=None, help="gradients (default 64)")
    p.add_argument("--d", type=int, default=None, help="coordinates of the accuracy table")
    p.add_argument("--cost-d", type=float, default=None, help="coordinates of the cost table")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run")
    args = p.parse_args(argv)
    quick = args.quick
    args.m = args.m or (16 if quick else 64)
    args.d = args.d or (200 if quick else 1000)
    args.cost_d = int(args.cost_d or (1e5 if quick else 1e6))
    args.repeat = args.repeat or (3 if quick else 5)
    return args


def gradients(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    """Per-sample-like gradients: a strong common mean plus a decaying spectrum."""
    return 0.1 * rng.standard_normal((m, d)) * np.exp(
        -np.arange(d) / (d / 10)
    ) + rng.standard_normal(d)


def accuracy_rows(args: argparse.Namespace) -> list[list[str]]:
    rng = np.random.default_rng(args.seed)
    rows = []
    for dtype, kappas in (("float64", (1e5, 1e7, 1e9)), ("float32", (1e3, 1e5))):
        for kappa in kappas:
            G = gradients(rng, args.m, args.d).astype(dtype)
            G64 = G.astype(np.float64)
            damp = float(np.linalg.norm(G64, 2)) ** 2 / (args.m * (kappa - 1))
            x = G.mean(axis=0)
            want = extended_precision_inverse(G64, damp, x.astype(np.float64))
            errors = []
            for steps in (0, 1, 2):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", IllConditionedWarning)
                    y = StaticIHVP(G, damp=damp, refine=steps).matvec(x)
                errors.append(float(np.linalg.norm(y - want) / np.linalg.norm(want)))
            eps = float(np.finfo(dtype).eps)
            r = float(np.linalg.norm(x) / (damp * np.linalg.norm(want)))
            rows.append(
                [
                    dtype,
                    f"{kappa:.0e}",
                    f"{eps * kappa:.1e}",
                    f"{eps * r:.1e}",
                    *(f"{e:.1e}" for e in errors),
                ]
            )
    return rows


def cost_rows(args: argparse.Namespace) -> list[list[str]]:
    rng = np.random.default_rng(args.seed)
    m, d = args.m, args.cost_d
    G32 = (rng.standard_normal((m, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    ops = {}
    for dtype in ("float32", "float64"):
        G = G32.astype(dtype)
        x = G.mean(axis=0)
        for steps in (0, 1):
            ops[dtype, steps] = (StaticIHVP(G, damp=1e-3, refine=steps), x, G.nbytes)
    cands, bandwidth = bandwidth_candidates(max(256 * 2**20, G32.nbytes))
    for (dtype, steps), (op, x, _) in ops.items():
        cands[f"{dtype} refine={steps}"] = (lambda _, op=op, x=x: op.matvec(x), None)
    timings = interleaved(cands, args.repeat)
    copy = bandwidth(timings).copy
    rows = []
    for (dtype, steps), (_, _, nbytes) in ops.items():
        best = timings[f"{dtype} refine={steps}"].best
        floor = 2 * nbytes / copy
        rows.append(
            [dtype, f"refine={steps}", fmt_time(best), fmt_time(floor), fmt_ratio(best / floor)]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    monitor = CpuMonitor()
    print("# Iterative refinement of StaticIHVP products\n")
    for key, value in machine_facts():
        print(f"- {key}: {value}")
    print(
        f"\n## Accuracy: x = the gradients' mean, m = {args.m}, d = {args.d} (float32: at "
        "float32 rounding without refinement; float64: one step reaches eps*r)\n"
    )
    print(
        markdown_table(
            ["storage", "kappa", "eps*kappa", "eps*r", "refine=0", "refine=1", "refine=2"],
            accuracy_rows(args),
        )
    )
    print(f"\n## Cost: matvec, m = {args.m}, d = {args.cost_d:.3g}, best of {args.repeat}\n")
    print(
        markdown_table(
            ["storage", "product", "time", "floor (2 passes, copy bw)", "time/floor"],
            cost_rows(args),
        )
    )
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(f"\nOther processes used {foreign:.2f} cores on average during this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
