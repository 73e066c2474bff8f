"""Benchmark of ``mfac_core.SpectralIHVP`` against ``StaticIHVP`` and measured floors.

Usage::

    python benchmarks/spectral.py                  # d = 1e6, m = 64 and 256, float32
    python benchmarks/spectral.py --m 64 --d 5e5 --repeat 5
    python benchmarks/spectral.py --quick          # CI smoke run, d = 1e5, m = 32

It prints the machine facts and three markdown tables (every timed call after a pause of
``PAUSE`` s without BLAS calls, so that no candidate runs beside another pool's spinning
threads):

**Set-up**: ``SpectralIHVP(G)`` and ``StaticIHVP(G)`` (both ``damp=1e-5``) against the
floor measured in the same run, interleaved: one ``dsyrk`` of a float64 copy of G (the
float64 Gram, which with the O(m^3) ``eigh`` or Cholesky is the whole set-up: neither
operator stores a derived m x d array).

**Products**: one product of each operator, the spectral operator's products for K
dampings (``sweep``: G x once, then all K results from one more read of G; target
<= 1.6x one spectral product), K separate products (``with_damp`` each time) for
comparison, and the diagonal at one and at K dampings (columns whitened in float64
on the fly, O(d m^2)); against the float32 two-pass floor ``G @ x`` then
``G.T @ a`` through BLAS on the same array (sgemv, sgemv^T for float32), timed in
the same run.

**Accuracy**: relative errors of one product of each operator against the float64
spectral oracle (:class:`mfac_core.testing.SpectralOracle`), on a smaller problem
(``--acc-d``), for a random vector and for the gradients' mean (the direction where the
error is largest), at several condition numbers ``kappa = 1 + ||G||_2^2 / (m damp)``
set through the damping; and the relative error of ``log det F - d log(damp)`` (the part
that depends on G) from ``logdet`` against the same sum from float64 singular values.
Where float64 cannot factorise the Cholesky form, its cell says so.

The last lines say how many cores other processes used during the run: timings taken
while that number is well above zero are not trustworthy on a small machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: python benchmarks/spectral.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as common
else:  # python -m benchmarks.spectral
    from . import _common as common

import mfac_core
from mfac_core.testing import SpectralOracle

SWEEP_TARGET = 1.6
DAMP = 1e-5
#: Seconds without BLAS calls before each timed call (not timed): OpenBLAS's idle threads
#: spin for about 0.1 s after each threaded call and hold the cores, and NumPy's and SciPy's
#: OpenBLAS are two pools, so whichever candidate followed the SciPy floor ran on a
#: contended machine (1.5x slower set-ups and products in one run).
PAUSE = 0.15


def pause() -> None:
    time.sleep(PAUSE)


def make_grads(m: int, d: int, dtype: Any, seed: int, kappa: float = 1e4) -> np.ndarray:
    """Gaussian gradients scaled so that ``||G||_F^2 / (m DAMP)`` is about ``kappa``."""
    G = np.random.default_rng(seed).standard_normal((m, d), dtype=dtype)
    G *= dtype(np.sqrt(kappa * DAMP / d))
    return G


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=float, default=1e6, help="dimension (default 1e6)")
    p.add_argument("--m", type=int, action="append", help="gradients (repeatable; 64, 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--k", type=int, default=8, help="dampings in one sweep (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--acc-d", type=float, default=20_000, help="d of the accuracy table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI smoke run (well under a minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.m, args.repeat, args.acc_d = 1e5, [32], 2, 4000
    args.m = args.m or [64, 256]
    args.d = int(args.d)
    args.acc_d = int(args.acc_d)
    return args


def timing_rows(
    m: int, d: int, dtype: Any, k: int, repeat: int, seed: int
) -> tuple[list[list[Any]], list[list[Any]], str]:
    from scipy.linalg import blas

    G = make_grads(m, d, dtype, seed)
    G64: Any = np.asfortranarray(G.T, dtype=np.float64)  # d x m, column-major: syrk's A^T A
    setup = {
        "floor": (lambda _: blas.dsyrk(1.0, G64, trans=1), pause),
        "SpectralIHVP": (lambda _: mfac_core.SpectralIHVP(G, damp=DAMP), pause),
        "StaticIHVP": (lambda _: mfac_core.StaticIHVP(G, damp=DAMP), pause),
    }
    t = common.interleaved(setup, repeat)
    floor = t["floor"].best
    G64 = None  # free the copy before the products
    setup_rows = [
        [
            m,
            name,
            common.fmt_time(t[name].best),
            common.fmt_time(t[name].median),
            common.fmt_time(floor),
            common.fmt_ratio(t[name].best / floor),
        ]
        for name in ("SpectralIHVP", "StaticIHVP")
    ]
    del setup

    spec = mfac_core.SpectralIHVP(G, damp=DAMP)
    chol = mfac_core.StaticIHVP(G, damp=DAMP)
    x = np.random.default_rng(seed + 1).standard_normal(d).astype(dtype)
    damps = [DAMP * 10.0 ** (j / 2) for j in range(k)]
    ops = [spec.with_damp(dp) for dp in damps]
    a = np.random.default_rng(seed + 2).standard_normal(m).astype(dtype)
    cands = {
        "floor": (lambda _: G.T @ (G @ x + a), pause),
        "spectral matvec": (lambda _: spec.matvec(x), pause),
        "static matvec": (lambda _: chol.matvec(x), pause),
        f"spectral sweep, {k} dampings": (lambda _: spec.sweep(x, damps=damps), pause),
        f"spectral, {k} separate products": (lambda _: [op.matvec(x) for op in ops], pause),
        "spectral diagonal": (lambda _: spec.diagonal(), pause),
        f"spectral diagonal, {k} dampings": (lambda _: spec.diagonal(damps=damps), pause),
        "static diagonal": (lambda _: chol.diagonal(), pause),
    }
    t = common.interleaved(cands, max(repeat, 5))
    floor = t["floor"].best
    prod_rows = []
    for name in cands:
        if name == "floor":
            continue
        best = t[name].best
        # K dampings are compared with the same call at one damping.
        one = t["spectral diagonal" if "diagonal" in name else "spectral matvec"].best
        multi = "sweep" in name or "diagonal, " in name
        prod_rows.append(
            [
                m,
                name,
                common.fmt_time(best),
                common.fmt_time(t[name].median),
                common.fmt_time(floor),
                common.fmt_ratio(best / floor),
                common.fmt_ratio(best / one, SWEEP_TARGET if multi else None),
            ]
        )
    kind = np.dtype(dtype).name
    note = f"m={m}: floor (G @ x, then G.T @ a, BLAS in {kind}) {common.fmt_time(floor)}"
    return setup_rows, prod_rows, note


def _rel(a: Any, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - ref) / np.linalg.norm(ref))


def accuracy_rows(m: int, d: int, seed: int) -> list[list[Any]]:
    rows = []
    base = np.random.default_rng(seed).standard_normal((m, d)) / np.sqrt(d)
    top = float(np.linalg.eigvalsh(base @ base.T)[-1])
    x = np.random.default_rng(seed + 1).standard_normal(d)
    for dtype, kappas in (("float32", (1e2, 1e4, 1e6)), ("float64", (1e4, 1e8, 1e12, 1e15))):
        G = base.astype(dtype)
        G64 = G.astype(np.float64)
        for kappa in kappas:
            damp = top / (m * (kappa - 1.0))
            oracle = SpectralOracle(G64, damp)
            spec = mfac_core.SpectralIHVP(G, damp=damp)
            sv = np.linalg.svd(G64, compute_uv=False)
            ref_part = float(np.sum(np.log1p(sv**2 / (m * damp))))
            row: list[Any] = [m, dtype, f"{kappa:.0e}"]
            for v in (x, G64.mean(axis=0)):
                v_s = v.astype(dtype)
                ref = oracle.matvec(v_s.astype(np.float64))
                row.append(f"{_rel(spec.matvec(v_s), ref):.1e}")
                try:
                    chol = mfac_core.StaticIHVP(G, damp=damp)
                    row.append(f"{_rel(chol.matvec(v_s), ref):.1e}")
                except mfac_core.FactorizationError:
                    row.append("fails")
            # log det F - d log(damp) = sum log1p(Lambda / (m damp)): the part that depends on G.
            part = -spec.logdet() - d * np.log(damp)
            row.append(f"{abs(part - ref_part) / abs(ref_part):.1e}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", category=UserWarning)  # IllConditionedWarning etc.
    monitor = common.CpuMonitor()
    dtype = np.dtype(args.dtype).type
    print("# SpectralIHVP benchmark (benchmarks/spectral.py)\n")
    for name, value in common.machine_facts():
        print(f"{name + ':' if name else '':28s} {value}")
    print(
        f"{'parameters:':28s} d={args.d}, m={args.m}, dtype={args.dtype}, damp={DAMP:g}, "
        f"K={args.k} dampings, best of {args.repeat} (interleaved)"
    )
    setup_rows, prod_rows, notes = [], [], []
    for m in args.m:
        print(f"... m={m}: timings", file=sys.stderr, flush=True)
        s, p, note = timing_rows(m, args.d, dtype, args.k, args.repeat, args.seed)
        setup_rows += s
        prod_rows += p
        notes.append(note)

    print("\n## Set-up vs one dsyrk of a float64 copy of G (same run)\n")
    print(common.markdown_table(["m", "operator", "best", "median", "floor", "ratio"], setup_rows))
    print(
        f"\n## Products and diagonals (floor: G @ x then G.T @ a through BLAS, same run); "
        f"target for K dampings in one pass <= {SWEEP_TARGET}x the same call at one damping\n"
    )
    print(
        common.markdown_table(
            ["m", "call", "best", "median", "floor", "/ floor", "/ spectral, one damping"],
            prod_rows,
        )
    )
    print()
    for note in notes:
        print("- " + note)

    print(
        f"\n## Accuracy vs the float64 spectral oracle (d={args.acc_d}): relative 2-norm "
        "errors of one product; relative error of log det F - d log(damp) against the "
        "float64 singular values\n"
    )
    rows = []
    for m in args.m:
        rows += accuracy_rows(m, args.acc_d, args.seed)
    print(
        common.markdown_table(
            [
                "m",
                "dtype",
                "kappa",
                "spectral, random x",
                "Cholesky, random x",
                "spectral, mean grad",
                "Cholesky, mean grad",
                "spectral logdet",
            ],
            rows,
        )
    )
    foreign = monitor.foreign_cores()
    print(
        f"\nOther processes kept {foreign:.1f} cores busy during this run"
        if foreign is not None
        else "\nLoad of other processes: unknown"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
