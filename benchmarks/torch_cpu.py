"""Benchmark of PyTorch CPU tensors against the same operators over NumPy arrays, all threads.

Usage::

    python benchmarks/torch_cpu.py                  # d = 1e6, m = 64
    python benchmarks/torch_cpu.py --m 256 --repeat 9
    python benchmarks/torch_cpu.py --quick          # CI smoke run, d = 2e5, m = 16

The library reads a PyTorch CPU tensor through a NumPy view of its memory, and its C
extension's passes do the O(dm) work on the library's own threads (all the CPUs this
process may use, unless ``MFAC_CORE_NUM_THREADS`` says fewer). Any PyTorch operation
that runs on PyTorch's intra-op (OpenMP) team in the same call wakes that team, whose
threads then spin for 5-10 ms on the cores the passes want (libgomp's default wait
policy): a finiteness check over x, a 64 x 64 x 2 product, a triangular solve for
several right-hand sides each cost a product of 10**6 float32 entries 3-6 ms on 2 cores
(docs/guidance.rst, "CPU threads").

Each row times one operation on an operator over NumPy arrays and on the same operator
over PyTorch tensors that share the NumPy arrays' memory (``torch.from_numpy``: the same
pages, so the same memory speed), interleaved in one process, with the operators'
default options (``check_finite=True``); before each timed run the process sleeps 30 ms,
so that every run starts with PyTorch's team asleep and pays only for what its own call
wakes. The floor of a row is its NumPy twin, which no PyTorch operation touches: a ratio
near 1.00x says the PyTorch route adds nothing. A window allocates its own buffer, over
NumPy's memory in both libraries (``_host_rows.zeros``).

The *idle threads* columns say what each call wakes (Linux only): the CPU time per call
of the process's threads that outlive it (PyTorch's team, NumPy's and SciPy's OpenBLAS
threads; the library's own threads end with each call), over three calls 0.3 s apart.
OpenBLAS's woken threads spin for about 0.1 s, PyTorch's for 5-10 ms; 0 ms is the
target. BLAS runs with the environment's settings (no ``OPENBLAS_THREAD_TIMEOUT`` is
set here): what a user's process does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The installed package, not a source tree next to the script; then the helpers.
sys.path.append(str(Path(__file__).resolve().parent))
import _common as common

from mfac_core import DynamicIHVP, StaticIHVP, _compat, _fused


def _quiet() -> None:
    """Let PyTorch's intra-op threads, woken by an earlier run, go to sleep first."""
    time.sleep(0.03)


def idle_threads_ms(fn: Any, calls: int = 3) -> float | None:
    """CPU ms per call of the threads (not this one) that outlive ``fn``'s calls."""
    time.sleep(0.3)  # what an earlier candidate woke sleeps first
    spent = common.other_threads_cpu_ms([lambda: fn(None)] * calls, pause=0.3)
    return None if spent is None else spent / calls


def pairs(torch: Any, m: int, d: int, k: int, rng: np.random.Generator) -> dict[str, Any]:
    """The candidates: for each operation, its NumPy twin then its PyTorch form."""
    G = rng.standard_normal((m, d), dtype=np.float32)
    x = rng.standard_normal(d, dtype=np.float32)
    X = np.ascontiguousarray(rng.standard_normal((d, k), dtype=np.float32))
    Gt, xt, Xt = torch.from_numpy(G), torch.from_numpy(x), torch.from_numpy(X)
    damp = 1e-3
    static = {"NumPy": StaticIHVP(G, damp=damp), "PyTorch": StaticIHVP(Gt, damp=damp)}
    windows = {
        "NumPy": DynamicIHVP(m, d, damp=damp, dtype="float32"),
        "PyTorch": DynamicIHVP(m, d, damp=damp, dtype="float32", xp=_compat.array_namespace(xt)),
    }
    for g, gt in zip(G, Gt, strict=True):
        windows["NumPy"].update(g)
        windows["PyTorch"].update(gt)
    operands = {"NumPy": (G, x, X), "PyTorch": (Gt, xt, Xt)}
    cands: dict[str, Any] = {}
    for lib in ("NumPy", "PyTorch"):
        rows, vec, block = operands[lib]
        op, window = static[lib], windows[lib]
        cands[f"product|{lib}"] = (lambda _, op=op, vec=vec: op @ vec, _quiet)
        cands[f"{k} vectors|{lib}"] = (lambda _, op=op, block=block: op @ block, _quiet)
        cands[f"window step|{lib}"] = (
            lambda _, w=window, g=rows[0]: w.update_and_matvec(g),
            _quiet,
        )
    return cands


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=float, default=None, help="coordinates (default 1e6)")
    p.add_argument("--m", type=int, default=None, help="gradients (default 64)")
    p.add_argument("--k", type=int, default=8, help="vectors of the block product (8)")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of, 9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI smoke run: d=2e5, m=16, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.m, args.repeat = args.d or 2e5, args.m or 16, args.repeat or 2
    args.d, args.m, args.repeat = int(args.d or 1e6), args.m or 64, args.repeat or 9
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to compare")
        return 0
    common.print_heading(__file__)
    print(f"- torch {torch.__version__}, intra-op threads {torch.get_num_threads()}")
    print(
        f"- C extension: {_fused.available()} ({_fused.best_isa()}), threads {_fused.max_threads()}"
    )
    print(f"- m = {args.m}, d = {args.d}, repeat = {args.repeat} (best of), interleaved\n")
    cands = pairs(torch, args.m, args.d, args.k, np.random.default_rng(args.seed))
    t = common.interleaved(cands, args.repeat)
    idle = {name: idle_threads_ms(fn) for name, (fn, _) in cands.items()}
    rows = []
    for name in dict.fromkeys(key.split("|")[0] for key in t):
        floor, cand = t[f"{name}|NumPy"].best, t[f"{name}|PyTorch"].best
        woke = [idle[f"{name}|{lib}"] for lib in ("NumPy", "PyTorch")]
        rows.append(
            [name, common.fmt_time(floor), common.fmt_time(cand), common.fmt_ratio(cand / floor)]
            + ["-" if ms is None else f"{ms:.0f} ms" for ms in woke]
        )
    print("## Float32 operators, PyTorch CPU tensors over their NumPy twins\n")
    headers = ["operation", "NumPy (floor)", "PyTorch", "/ floor", "idle threads: NumPy", "PyTorch"]
    print(common.markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
