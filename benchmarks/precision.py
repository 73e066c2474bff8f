"""Benchmark of storage precision: float32 and 2-byte gradients in the static and dynamic IHVP.

Usage::

    python benchmarks/precision.py                 # d = 1e6, m = 64
    python benchmarks/precision.py --m 256 --d 2e6 --repeat 5
    python benchmarks/precision.py --quick         # CI smoke run, d = 2e5, m = 32, < 1 min

Both operators keep the gradients in their storage dtype (the static one by reference,
no ``W``) and read them twice per product, summed in float64 (the pass engine: the C
extension's ``project64``/``combine64`` for NumPy and PyTorch-CPU float32 and 2-byte
storage where it is built, float64 column pieces otherwise; the ``passes`` column says
which). Per backend (NumPy, PyTorch on the CPU) and storage dtype (float32; float16;
PyTorch's bfloat16), interleaved with the floors they are held to, in the same run:

**IHVP**: ``op.matvec(x)`` over the *float32 two-pass floor*: the library's own
``G32 @ x`` plus ``G32.T @ a`` on a float32 m x d array (two reads of ``4 m d`` bytes).
Targets as in benchmarks/exact.py: 1.15x for float32 storage; 0.6x for 2-byte storage,
which reads ``2 m d`` bytes per pass.

**Dynamic step**: ``DynamicIHVP.update_and_matvec(g)`` (the optimizer's step: insert a
float32 gradient into a full window of m, return ``F^{-1} g``) over the same float32
two-pass floor: the step reads the window twice (``G [g_stored, g]``, then ``G^T a``),
summed in float64 like the static product; same targets.

**Set-up**: the constructor over its floor, the float64 Gram ``G G^T`` of a float64
copy of G made beforehand (NumPy: SciPy's ``dsyrk``; PyTorch: ``G64 @ G64.T``), whatever
the storage dtype: the set-up is that Gram, summed in float64 from float64 pieces of G,
and its m x m Cholesky factor; no ``L^{-1} G`` is computed or stored.

**Error**: on a small problem (m = 32, d = 4000) at three condition numbers, the
normwise relative error of ``F^{-1} x`` against the extended-precision inverse of the
*stored* gradients (``mfac_core.testing.extended_precision_inverse``), for a random x
and for the gradients' mean (a vector in their span, where a float32-summed pass would
cancel), without and with one step of ``refine``; the last columns are the worst error
in units of eps of the result dtype. Float32 and 2-byte products are at float32
rounding (about eps32 / 2) at each of these kappas (the bound of docs/mathematics.rst,
"Exact passes", holds up to about 1e7), so ``refine=1`` buys nothing there; a float64
row shows where it still helps (float64 storage, errors growing with kappa).

**Memory**: NumPy only (tracemalloc sees NumPy's buffers): bytes the operator keeps (its
float64 m x m factor; G is kept by reference), and the constructor's peak (bounded
float64 pieces of G), relative to size(G) in its own dtype; for the dynamic window, the
bytes kept and the peak of construction plus m steps, relative to ``m d`` float32
entries (``4 m d`` bytes).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
import warnings
from typing import Any

import _common as common
import numpy as np
from scipy.linalg import blas as sblas

import mfac_core as mfac
from mfac_core import _engine
from mfac_core._compat import array_namespace
from mfac_core.testing import extended_precision_inverse

KAPPA = 1e4


def make_grads(m: int, d: int, damp: float, seed: int) -> np.ndarray:
    """Gaussian float32 gradients with ``||G||_F^2 / (m damp)`` about ``KAPPA``."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d), dtype=np.float32)
    G *= np.float32(np.sqrt(KAPPA * damp / d))
    return G


def backends(G32: np.ndarray) -> list[tuple[str, str, Any, Any]]:
    """``(backend, dtype, G in that dtype, float32 G of that backend)`` for every case."""
    out: list[tuple[str, str, Any, Any]] = [
        ("numpy", "float32", G32, G32),
        ("numpy", "float16", G32.astype(np.float16), G32),
    ]
    try:
        import torch
    except ImportError:
        return out
    T32 = torch.from_numpy(G32)
    out += [
        ("torch", "float32", T32, T32),
        ("torch", "float16", T32.to(torch.float16), T32),
        ("torch", "bfloat16", T32.to(torch.bfloat16), T32),
    ]
    return out


def vector(like: Any, n: int, seed: int) -> Any:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    if isinstance(like, np.ndarray):
        return x
    import torch

    return torch.from_numpy(x)


def target(dt: str) -> float:
    """The product's target over the float32 two-pass floor (benchmarks/exact.py)."""
    return 1.15 if dt == "float32" else 0.6


def passes(G: Any) -> str:
    """Which passes the engine runs over G: the C extension's kernels or float64 pieces."""
    return "C kernels" if _engine.uses_kernels(array_namespace(G), G) else "float64 pieces"


def gram_floor(lib: str, F32: Any) -> dict[str, tuple[Any, Any]]:
    """Candidates for the float64 Gram of a float64 copy of G, made here (not timed)."""
    if lib == "numpy":
        G64T = np.asfortranarray(F32.T, dtype=np.float64)  # d x m, column-major
        G64 = G64T.T
        return {
            "gram:dsyrk": (lambda _: sblas.dsyrk(1.0, G64T, trans=1, lower=1), None),
            "gram:G64 @ G64.T": (lambda _: G64 @ G64.T, None),
        }
    T64 = F32.double()
    return {"gram:G64 @ G64.T": (lambda _: T64 @ T64.T, None)}


def timing_rows(G32: np.ndarray, damp: float, repeat: int) -> tuple[list, list]:
    m, d = G32.shape
    ihvp_rows, setup_rows = [], []
    cases = backends(G32)
    for lib in ("numpy", "torch"):
        mine = [c for c in cases if c[0] == lib]
        if not mine:
            continue
        F32 = mine[0][3]
        x = vector(F32, d, 1)
        a = vector(F32, m, 2)
        grams = gram_floor(lib, F32)
        ops = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _, dt, G, _ in mine:
                ops[dt] = mfac.StaticIHVP(G, damp=damp)
        cands: dict[str, tuple[Any, Any]] = {
            "floor:two passes": (lambda _, F=F32, x=x, a=a: (F @ x, F.T @ a), None),
            **grams,
        }
        for dt, op in ops.items():
            cands[f"ihvp:{dt}"] = (lambda _, op=op, x=x: op.matvec(x), None)
        for _, dt, G, _ in mine:
            cands[f"setup:{dt}"] = (lambda _, G=G: mfac.StaticIHVP(G, damp=damp), None)
        print(f"... {lib}: timings", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = common.interleaved(cands, repeat)
        floor2 = t["floor:two passes"].best
        gram = min(grams, key=lambda n: t[n].best)
        floor = t[gram].best
        for _, dt, G, _ in mine:
            ratio = t[f"ihvp:{dt}"].best / floor2
            ihvp_rows.append(
                [
                    lib,
                    dt,
                    passes(G),
                    common.fmt_time(t[f"ihvp:{dt}"].best),
                    common.fmt_time(t[f"ihvp:{dt}"].median),
                    common.fmt_time(floor2),
                    common.fmt_ratio(ratio, target(dt)),
                ]
            )
            setup_rows.append(
                [
                    lib,
                    dt,
                    common.fmt_time(t[f"setup:{dt}"].best),
                    common.fmt_time(floor),
                    f"float64 Gram ({gram[5:]})",
                    common.fmt_ratio(t[f"setup:{dt}"].best / floor),
                ]
            )
        del ops, cands
        gc.collect()
    return ihvp_rows, setup_rows


def dynamic_rows(G32: np.ndarray, damp: float, repeat: int) -> list:
    """The dynamic step per backend and storage dtype, against the float32 two-pass floor."""
    m, d = G32.shape
    rows = []
    cases = backends(G32)
    for lib in ("numpy", "torch"):
        mine = [c for c in cases if c[0] == lib]
        if not mine:
            continue
        F32 = mine[0][3]
        x, a = vector(F32, d, 1), vector(F32, m, 2)
        cands: dict[str, tuple[Any, Any]] = {
            "floor:two passes": (lambda _, F=F32, x=x, a=a: (F @ x, F.T @ a), None),
        }
        ops = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _, dt, G, _ in mine:
                ops[dt] = mfac.DynamicIHVP.from_window(G, damp=damp)
        for dt, op in ops.items():
            # The window's own gradients again, in turn: it stays m distinct gradients.
            turn = iter(range(10**9))

            def step(_: Any, op: Any = op, turn: Any = turn, F: Any = F32) -> Any:
                return op.update_and_matvec(F[next(turn) % m])

            cands[f"step:{dt}"] = (step, None)
        print(f"... {lib}: dynamic step", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = common.interleaved(cands, repeat)
        floor2 = t["floor:two passes"].best
        for dt in ops:
            rows.append(
                [
                    lib,
                    dt,
                    common.fmt_time(t[f"step:{dt}"].best),
                    common.fmt_time(t[f"step:{dt}"].median),
                    common.fmt_time(floor2),
                    common.fmt_ratio(t[f"step:{dt}"].best / floor2, target(dt)),
                ]
            )
        del ops, cands
        gc.collect()
    return rows


def dynamic_memory_rows(G32: np.ndarray, damp: float) -> list:
    """Bytes a NumPy window keeps, and its peak, over construction plus m steps."""
    m, d = G32.shape
    rows = []
    for dt in ("float32", "float16"):
        gc.collect()
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = mfac.DynamicIHVP(m, d, damp=damp, dtype=dt, zero_init=True)
            for g in G32:
                op.update_and_matvec(g)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        size = 4 * m * d
        rows.append(
            ["numpy", dt, common.fmt_bytes(kept), f"{kept / size:.3f}", f"{peak / size:.3f}"]
        )
        del op
    return rows


def error_rows(seed: int) -> list:
    """Errors against the extended-precision inverse of the stored gradients."""
    m, d = 32, 4000
    rng = np.random.default_rng(seed)
    # Correlated gradients (a shared mean direction), as real ones are.
    G0 = rng.standard_normal((m, d)) + 3.0 * rng.standard_normal(d)
    G0 *= 1.0 / np.sqrt(d)
    rows = []
    cases = [("numpy", "float64", G0, None), *backends(G0.astype(np.float32))]
    for kappa_target in (1e2, 1e4, 1e6):
        lam_max = np.linalg.eigvalsh(G0 @ G0.T)[-1]
        damp = lam_max / (m * (kappa_target - 1))
        for lib, dt, G, _ in cases:
            G64 = np.asarray(G, dtype=np.float64) if lib == "numpy" else G.double().numpy()
            kappa = 1 + np.linalg.eigvalsh(G64 @ G64.T)[-1] / (m * damp)
            xdt = np.float64 if dt == "float64" else np.float32
            xs = [rng.standard_normal(d).astype(xdt), G64.mean(axis=0).astype(xdt)]
            wants = [extended_precision_inverse(G64, damp, x.astype(np.float64)) for x in xs]
            errs = []
            for refine in (0, 1):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    op = mfac.StaticIHVP(G, damp=damp, refine=refine)
                for x, want in zip(xs, wants, strict=True):
                    arg = x if lib == "numpy" else __import__("torch").from_numpy(x)
                    got = np.asarray(op.matvec(arg), dtype=np.float64)
                    errs.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
            eps = float(np.finfo(xdt).eps)
            rows.append(
                [
                    lib,
                    dt,
                    f"{kappa:.2g}",
                    *(f"{e:.1e}" for e in errs),
                    f"{max(errs[:2]) / eps:.2g}",
                    f"{max(errs[2:]) / eps:.2g}",
                ]
            )
    return rows


def memory_rows(G32: np.ndarray, damp: float) -> list:
    rows = []
    for dt in ("float32", "float16"):
        G = G32 if dt == "float32" else G32.astype(np.float16)
        gc.collect()
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = mfac.StaticIHVP(G, damp=damp)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append(
            [
                "numpy",
                dt,
                common.fmt_bytes(G.nbytes),
                common.fmt_bytes(kept),
                f"{kept / G.nbytes:.3f}",
                f"{peak / G.nbytes:.3f}",
            ]
        )
        del op
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=float, default=None, help="parameters (default 1e6)")
    p.add_argument("--m", type=int, default=None, help="gradients (default 64)")
    p.add_argument("--repeat", type=int, default=None, help="timing rounds (default 3)")
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: PyTorch's; on a shared, "
        "oversubscribed machine 1 avoids OpenMP barriers stalling)",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke run: d=2e5, m=32, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.m, args.repeat = args.d or 2e5, args.m or 32, args.repeat or 2
    args.d, args.m, args.repeat = int(args.d or 1e6), args.m or 64, args.repeat or 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    monitor = common.CpuMonitor()
    print("# Storage precision benchmark (benchmarks/precision.py)\n")
    for name, value in common.machine_facts():
        print(f"{name + ':' if name else '':28s} {value}")
    try:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        print(f"{'torch:':28s} {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        print(f"{'torch:':28s} not installed (its rows are skipped)")
    print(
        f"{'parameters:':28s} d={args.d}, m={args.m}, damp={args.damp:g}, "
        f"best of {args.repeat} (interleaved), kappa~{KAPPA:g}, "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    G32 = make_grads(args.m, args.d, args.damp, args.seed)
    ihvp_rows, setup_rows = timing_rows(G32, args.damp, args.repeat)
    dyn_rows = dynamic_rows(G32, args.damp, args.repeat)
    print(
        "\n## IHVP: op.matvec(x), G read twice summed in float64, vs the float32 two-pass "
        "floor (targets 1.15x for float32, 0.6x for 2-byte storage)\n"
    )
    print(
        common.markdown_table(
            ["backend", "storage", "passes", "matvec (best)", "(median)", "float32 floor", "ratio"],
            ihvp_rows,
        )
    )
    print(
        "\n## Dynamic step: update_and_matvec(g) on a full window vs the float32 floor "
        "(same targets)\n"
    )
    print(
        common.markdown_table(
            ["backend", "storage", "step (best)", "(median)", "float32 floor", "ratio"], dyn_rows
        )
    )
    print("\n## Set-up: constructor vs the float64 Gram of a float64 copy of G\n")
    print(
        common.markdown_table(
            ["backend", "storage", "set-up (best)", "floor", "floor is", "ratio"], setup_rows
        )
    )
    print(
        "\n## Error vs the extended-precision inverse of the stored gradients (m=32, "
        "d=4000); float32 and 2-byte results are at float32 rounding (about eps32 / 2) at "
        "each kappa here, refine=1 helps float64 storage only\n"
    )
    print(
        common.markdown_table(
            [
                "backend",
                "storage",
                "kappa",
                "random",
                "mean g",
                "random, refine=1",
                "mean g, refine=1",
                "worst / eps",
                "worst / eps, refine=1",
            ],
            error_rows(args.seed),
        )
    )
    print(
        "\n## Memory (NumPy, tracemalloc, in this process): the operator keeps its float64 "
        "m x m factor (G by reference); the set-up peak is bounded float64 pieces of G\n"
    )
    print(
        common.markdown_table(
            ["backend", "storage", "size(G)", "kept", "kept / size(G)", "peak / size(G)"],
            memory_rows(G32, args.damp),
        )
    )
    print("\n## Memory of the dynamic window (NumPy, construction + m steps)\n")
    print(
        common.markdown_table(
            ["backend", "storage", "kept", "kept / (4 m d)", "peak / (4 m d)"],
            dynamic_memory_rows(G32, args.damp),
        )
    )
    print("\nNotes:")
    print(
        "- every operator here keeps G itself in its storage dtype (the static one by "
        "reference, no W) and reads it twice per product, summed in float64: 2-byte storage "
        "halves the bytes read and the memory, at the same float32-rounding accuracy."
    )
    print(
        "- eps is that of the result dtype (float32 for 2-byte storage). refine=1 costs "
        "two more float64 passes over G and a second product (benchmarks/refinement.py) "
        "and buys nothing for float32 and 2-byte storage."
    )
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(f"- other processes kept {foreign:.2f} cores busy on average during this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
