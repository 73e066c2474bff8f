"""The static set-up's Gram: the C extension's rows' Gram against float64 pieces and BLAS.

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/setup_gram.py    # one thread
    OPENBLAS_NUM_THREADS=2 python benchmarks/setup_gram.py    # two (or leave unset)
    python benchmarks/setup_gram.py --m 64 --m 512 --storage "numpy float32"
    python benchmarks/setup_gram.py --quick                   # a smoke run

For each m and storage (NumPy float32 and float16, PyTorch float32 and bfloat16), in
one process and interleaved (best of ``--repeat``):

* ``floor``: one ``dsyrk`` of a float64 copy of G (issue 19's floor for the set-up);
* ``set-up, pieces``: ``StaticIHVP(G)`` with ``_engine.gram_kernel`` turned off: every
  column piece cast to float64 by ``xp.astype`` and its Gram summed by BLAS (the library's
  route for m above ``_engine.GRAM_KERNEL_MAX_ROWS``, and for the arrays the kernels do
  not read);
* ``set-up, kernel``: ``StaticIHVP(G)`` with the Gram summed by ``_fused.rows_gram64``
  from G in its storage dtype (the library's route up to that m), whatever m is here;
* ``kernel``: ``_fused.rows_gram64`` over all of G alone.

The kernel's Gram is compared with the float64 Gram of the cast pieces: the largest
difference relative to the rows' norms (``|A - B|_ij / (|g_i| |g_j|)``), which float64's
rounding bounds by about d * 1.1e-16. The thread count is OpenBLAS's
(``OPENBLAS_NUM_THREADS``), which ``_fused`` follows; PyTorch is set to the same count
(this script, not the library, sets it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent))
import _common as common

from mfac_core import StaticIHVP, _engine, _fused
from mfac_core._engine import host_view


def _storages(G32: np.ndarray, only: list[str] | None) -> list[tuple[str, Any, Any]]:
    """``(name, xp, G)`` for each storage measured (PyTorch where installed)."""
    out: list[tuple[str, Any, Any]] = [("numpy float32", np, G32)]
    try:
        import torch
        from array_api_compat import array_namespace
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(_fused.max_threads())
        t32 = torch.from_numpy(G32)
        out.append(("torch float32", array_namespace(t32), t32))
        tb = t32.to(torch.bfloat16)
        out.append(("torch bfloat16", array_namespace(tb), tb))
    out.append(("numpy float16", np, G32.astype(np.float16)))
    return [case for case in out if only is None or case[0] in only]


def _kernel_any_m(xp: Any, G: Any) -> Any:
    """``_engine.gram_kernel`` without its limit on m (so that the table can show where the
    limit should be)."""
    view, storage = host_view(xp, G)

    def gram(lo: int, hi: int) -> Any:
        out = np.empty((G.shape[0], G.shape[0]))
        _fused.rows_gram64(view, out, start=lo, stop=hi, storage=storage)
        return _engine.as_library(xp, out)

    return gram


def _setup(xp: Any, G: Any, kernel: bool) -> Any:
    saved = _engine.gram_kernel
    _engine.gram_kernel = _kernel_any_m if kernel else (lambda xp, G: None)
    try:
        return StaticIHVP(G, damp=1e-3, check_finite=False)
    finally:
        _engine.gram_kernel = saved


def row(m: int, name: str, xp: Any, G: Any, repeat: int) -> list[str]:
    """One storage's row: the floor, both set-ups, the kernel alone, and their Grams' gap."""
    from scipy.linalg import blas

    d = G.shape[1]
    host = np.asarray(G.float() if hasattr(G, "float") else G)
    G64 = np.asfortranarray(host.T, np.float64)
    view, storage = host_view(xp, G)
    out = np.empty((m, m))
    cands: dict[str, Any] = {
        "floor": (lambda _: blas.dsyrk(1.0, G64, trans=1), None),
        "pieces": (lambda _: _setup(xp, G, False), None),
        "kernel set-up": (lambda _: _setup(xp, G, True), None),
        "kernel": (lambda _: _fused.rows_gram64(view, out, start=0, stop=d, storage=storage), None),
    }
    monitor = common.CpuMonitor()
    t = common.interleaved(cands, repeat)
    foreign = monitor.foreign_cores()
    floor = t["floor"].best
    _fused.rows_gram64(view, out, start=0, stop=d, storage=storage)
    want = G64.T @ G64
    norms = np.sqrt(np.diagonal(want))
    gap = float(np.max(np.abs(out - want) / np.outer(norms, norms)))

    def cell(key: str) -> str:
        return f"{common.fmt_time(t[key].best)} ({t[key].best / floor:.2f}x)"

    return [
        f"{m}",
        name,
        common.fmt_time(floor),
        cell("pieces"),
        cell("kernel set-up"),
        cell("kernel"),
        f"{gap:.1e}",
        f"{foreign:.2f}" if foreign is not None else "-",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=float, default=1e6)
    p.add_argument("--m", type=int, action="append", default=None)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--storage", action="append", default=None, help="e.g. 'numpy float32'")
    p.add_argument("--quick", action="store_true", help="a smoke run: d = 2e4, m = 16 and 40")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.repeat, args.m = 2e4, 2, args.m or [16, 40]
    if not _fused.available():
        print("the C extension was not built: there is no kernel to measure")
        return 0
    print("# benchmarks/setup_gram.py")
    for key, value in common.machine_facts():
        print(f"- {key}: {value}")
    print(f"- threads: {_fused.max_threads()}, d = {int(args.d)}, best of {args.repeat}")
    print(f"- the library's kernel serves m <= {_engine.GRAM_KERNEL_MAX_ROWS}")
    print(f"- load average at start: {os.getloadavg()}\n")
    rows: list[list[str]] = []
    rng = np.random.default_rng(0)
    for m in args.m or [64, 256, 384, 512]:
        G32 = rng.standard_normal((m, int(args.d)), dtype=np.float32)
        for name, xp, G in _storages(G32, args.storage):
            rows.append(row(m, name, xp, G, args.repeat))
            print("  done:", " | ".join(rows[-1]), flush=True)
    headers = [
        "m", "G", "floor dsyrk", "set-up, float64 pieces", "set-up, kernel", "kernel alone",
        "Gram gap / (|g_i| |g_j|)", "other cores",
    ]  # fmt: skip
    print(common.markdown_table(headers, rows))
    print(f"\n- load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
