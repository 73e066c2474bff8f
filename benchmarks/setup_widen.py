"""The static set-up's Gram: where its time goes, and NumPy's cast against ``_fused.widen64``.

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/setup_widen.py    # one thread
    OPENBLAS_NUM_THREADS=2 python benchmarks/setup_widen.py    # two (or leave unset)
    python benchmarks/setup_widen.py --m 64 --d 2e5 --repeat 3 # quick
    python benchmarks/setup_widen.py --storage "numpy float32" --no-parts

For each m and storage (NumPy float32 and float16, PyTorch float32 and bfloat16), in
one process and interleaved (best of ``--repeat``):

* ``floor``: one ``dsyrk`` of a float64 copy of G (issue 19's floor for the set-up);
* ``set-up, cast``: ``StaticIHVP(G)`` with every float64 column piece cast by
  ``xp.astype`` (NumPy's cast, one thread; before ``_engine.gram_widener``);
* ``set-up, widen64``: the same with the pieces written by ``_fused.widen64``'s threads
  (the library's choice where the extension serves G), and ``widen64 on 1 thread``
  (``MFAC_CORE_NUM_THREADS=1`` during the call: BLAS keeps its threads);
* for a PyTorch tensor, ``torch's own @``: the set-up with the Gram products in PyTorch
  (MKL's ``dgemm``), as before ``_gram`` sent them to NumPy's BLAS (``dsyrk``);
* its parts, over the set-up's own pieces: ``cast`` (``xp.astype`` of every piece),
  ``widen64`` (every piece), ``BLAS`` (the Gram product of every piece, on one float64
  piece, as the set-up computes it: ``_gram.rows_gram``); the rest of the set-up (finite
  check, kappa, the factorisation) is the set-up less its cast and BLAS parts.

The Grams of the two set-ups are compared bit for bit. The thread count is OpenBLAS's
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

from mfac_core import StaticIHVP, _engine, _fused, _gram, _pieces, _setup
from mfac_core._layout import block_groups, piece_columns, pieces


def _storages(G32: np.ndarray, only: list[str] | None) -> list[tuple[str, Any, Any]]:
    """``(name, xp, G)`` for each storage measured (PyTorch where installed)."""
    every = _every_storage(G32)
    return [case for case in every if only is None or case[0] in only]


def _every_storage(G32: np.ndarray) -> list[tuple[str, Any, Any]]:
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
    return out


def _no_widener(xp: Any, G: Any) -> None:
    return None


def factor_of(xp: Any, G: Any, old: bool) -> np.ndarray:
    """The float64 factor of the full set-up's capacitance (from its Gram), as NumPy."""
    widener = _engine.gram_widener
    _engine.gram_widener = _no_widener if old else widener
    try:
        result = _setup.factorize_gform_groups(
            xp, G, block_groups(G.shape[1], G.shape[1]), damp=1e-3, dtype=np.float32,
            check_finite=False, progress=None,
        )  # fmt: skip
    finally:
        _engine.gram_widener = widener
    return np.asarray(result.factors[0].factor.U)


def rows_for(
    m: int, d: int, repeat: int, rng: np.random.Generator, only: list[str] | None, parts: bool
) -> list[list[str]]:
    G32 = rng.standard_normal((m, d), dtype=np.float32)
    rows = []
    for name, xp, G in _storages(G32, only):
        rows.append(row(m, name, xp, G, repeat, parts))
        print("  done:", " | ".join(rows[-1]), flush=True)  # kept should a later row hang
    return rows


def row(m: int, name: str, xp: Any, G: Any, repeat: int, parts: bool) -> list[str]:
    """One storage's row: the floor, both set-ups, and the set-up's parts."""
    from scipy.linalg import blas

    d = G.shape[1]
    widener = _engine.gram_widener
    G64 = np.asfortranarray(np.asarray(G.float() if hasattr(G, "float") else G).T, np.float64)
    (group,) = block_groups(d, d)
    cols = [piece_columns(group, p) for p in pieces(group, _pieces.gram_piece_width(xp, G))]
    widen = widener(xp, G)
    one = xp.astype(G[:, : cols[0][1]], xp.float64)[None, ...]

    def setup(old: bool, one_thread: bool = False) -> Any:
        _engine.gram_widener = _no_widener if old else widener
        before = os.environ.get("MFAC_CORE_NUM_THREADS")
        if one_thread:  # widen64 on one thread, BLAS on its own count
            os.environ["MFAC_CORE_NUM_THREADS"] = "1"
        try:
            return StaticIHVP(G, damp=1e-3, check_finite=False)
        finally:
            _engine.gram_widener = widener
            if before is None:
                os.environ.pop("MFAC_CORE_NUM_THREADS", None)
            else:
                os.environ["MFAC_CORE_NUM_THREADS"] = before

    def own_product(_: Any) -> Any:
        # The set-up with the Gram of the array's own library (PyTorch: MKL's dgemm under
        # its OpenMP threads), as before _gram sent a CPU tensor's to NumPy's BLAS.
        view = _gram._numpy_view
        _gram._numpy_view = lambda xp, X: None
        try:
            return StaticIHVP(G, damp=1e-3, check_finite=False)
        finally:
            _gram._numpy_view = view

    def cast_all(_: Any) -> None:
        for lo, hi in cols:
            xp.astype(G[:, lo:hi][None, ...], xp.float64)

    def widen_all(_: Any) -> None:
        for lo, hi in cols:
            widen(lo, hi)

    def blas_all(_: Any) -> None:
        for _ in cols:
            _gram.rows_gram(xp, one)  # the set-up's own product (NumPy's BLAS for a CPU tensor)

    cands: dict[str, Any] = {
        "floor": (lambda _: blas.dsyrk(1.0, G64, trans=1), None),
        "old": (lambda _: setup(True), None),
        "new": (lambda _: setup(False), None),
        "new1": (lambda _: setup(False, one_thread=True), None),
        "own": (own_product, None),
        "cast": (cast_all, None),
        "widen": (widen_all, None),
        "blas": (blas_all, None),
    }
    if widen is None:
        del cands["new"], cands["new1"], cands["widen"]
    if not name.startswith("torch"):  # NumPy's product is _gram's
        del cands["own"]
    if not parts:
        for key in ("cast", "widen", "blas"):
            cands.pop(key, None)
    monitor = common.CpuMonitor()
    t = common.interleaved(cands, repeat)
    foreign = monitor.foreign_cores()
    floor = t["floor"].best
    same = "-"
    if widen is not None:
        a, b = (factor_of(xp, G, old) for old in (True, False))
        same = "yes" if np.array_equal(a.view(np.uint64), b.view(np.uint64)) else "NO"
    rest_old = t["old"].best - t["cast"].best - t["blas"].best if parts else None

    def ms(key: str) -> str:
        return common.fmt_time(t[key].best) if key in t else "-"

    def ratio(key: str) -> str:
        return f"{t[key].best / floor:.2f}x" if key in t else "-"

    return [
        f"{m}",
        name,
        ms("floor"),
        f"{ms('old')} ({ratio('old')})",
        f"{ms('new')} ({ratio('new')})",
        f"{ms('new1')} ({ratio('new1')})",
        f"{ms('own')} ({ratio('own')})" if "own" in t else "-",
        ms("cast"),
        ms("widen"),
        ms("blas"),
        common.fmt_time(rest_old) if rest_old is not None else "-",
        same,
        f"{foreign:.2f}" if foreign is not None else "-",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=float, default=1e6)
    p.add_argument("--m", type=int, action="append", default=None)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--storage", action="append", default=None, help="e.g. 'numpy float32'")
    p.add_argument("--no-parts", action="store_true", help="the set-ups and floor only")
    args = p.parse_args(argv)
    print("# benchmarks/setup_widen.py")
    for key, value in common.machine_facts():
        print(f"- {key}: {value}")
    print(f"- threads: {_fused.max_threads()}, d = {int(args.d)}, best of {args.repeat}")
    print(f"- load average at start: {os.getloadavg()}\n")
    rows: list[list[str]] = []
    rng = np.random.default_rng(0)
    for m in args.m or [64, 256]:
        rows += rows_for(m, int(args.d), args.repeat, rng, args.storage, not args.no_parts)
    headers = [
        "m", "G", "floor dsyrk", "set-up, cast (before)", "set-up, widen64",
        "widen64 on 1 thread", "torch's own @ (before)", "cast", "widen64", "BLAS", "rest",
        "same Gram", "other cores",
    ]  # fmt: skip
    print(common.markdown_table(headers, rows))
    print(f"\n- load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
