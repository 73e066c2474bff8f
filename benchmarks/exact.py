"""Benchmark of the exact passes: products summed in float64 against single-precision floors.

Usage::

    python benchmarks/exact.py                  # d = 1e6, m = 64 and 256
    python benchmarks/exact.py --m 64 --d 2e6 --repeat 7
    python benchmarks/exact.py --quick          # CI smoke run, d = 2e5, m = 32, < 1 min

Every table runs its candidates interleaved with the floor they are held to, in the same
process (docs/design.rst, "Speed: how it is measured"). For the products, OpenBLAS's idle
threads are told to sleep at once (``OPENBLAS_THREAD_TIMEOUT=4``, unless the environment
sets it), so that a candidate does not share its cores with the floor's spinning threads.
The set-up tables, BLAS-3 against BLAS-3, run in a child process with OpenBLAS's own
setting (or the environment's): there the wake-up after each small LAPACK call of the
block-wise set-up would cost it 20 %.

**Product** (``StaticIHVP(G) @ x``, ``DynamicIHVP.update_and_matvec(g)``): over the
*float32 two-pass floor*, ``G32 @ x`` then ``G32.T @ a`` through BLAS (sgemv, sgemv^T) on
the same float32 m x d array. The operator reads G twice with float64 accumulation (the C
extension's ``project64`` and ``combine64``); target <= 1.15x. 2-byte storage (PyTorch
bfloat16, NumPy float16) reads half the bytes; target <= 0.6x of the same float32 floor.
A Fortran-ordered float32 G (``Gt.T``), which the kernels read as its transpose (one
vector: its rows in place; several: in tiles), over the same floor of the C-ordered array
(BLAS over the Fortran-ordered one took 2x as long at m = 256): target <= 1.7x.

**Set-up** (``StaticIHVP(G)``): over one ``dsyrk`` of a float64 copy of G (the Gram in
float64, which is the whole set-up once no W is built); target <= 1.2x. The block-wise
set-up (m = 256, B = 128: dense blocks) over its compute floor, the float64 ``G_b^T G_b``
of every block as one batched product of a float64 copy; target <= 4x.

**Error**: the normwise relative error of ``F^{-1} x`` for x = the gradients' mean (a
vector in their span), against the extended-precision inverse of the stored float32
gradients (m = 64, d = 1e5 unless --quick), at three condition numbers, for
StaticIHVP, DynamicIHVP, and the float32-summed passes of earlier versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# OpenBLAS's idle threads spin for about 0.1 s (2**28 cycles) after each call. Interleaved
# with a BLAS floor, the next candidate would share the cores with them and pay for the
# floor's threads (docs/design.rst, "Speed: how it is measured"); let them sleep at once.
# OpenBLAS reads this when it loads, hence before NumPy; a value in the environment wins.
# The set-up tables' child keeps the environment's value, or none.
_SETUP_CHILD = "--setup-child"
_ENV_BLAS_TIMEOUT = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
if _SETUP_CHILD not in sys.argv:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

# The installed package, not a source tree next to the script; then the helpers.
sys.path.append(str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import mfac_core  # noqa: E402
from mfac_core import DynamicIHVP, StaticIHVP, WindowOptions, _engine, _fused  # noqa: E402
from mfac_core.testing import extended_precision_inverse  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def make_grads(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    """m float32 gradients with a shared mean direction, ||G||_2^2 / m = 1."""
    G = rng.standard_normal(d) + rng.standard_normal((m, d))
    G /= np.linalg.norm(G, 2) / np.sqrt(m)
    return G.astype(np.float32)


def product_rows(m: int, d: int, repeat: int, rng: np.random.Generator) -> list[list[str]]:
    G32 = make_grads(rng, m, d)
    x = rng.standard_normal(d).astype(np.float32)
    a = rng.standard_normal(m).astype(np.float32)
    damp = 1e-3
    ops: dict[str, Any] = {"float32": StaticIHVP(G32, damp=damp, check_finite=False)}
    window = DynamicIHVP(
        m, d, damp=damp, dtype="float32", options=WindowOptions(check_finite=False)
    )
    for g in G32:
        window.update(g)
    cands: dict[str, Any] = {
        "floor": (lambda _: G32.T @ (G32 @ x + a), None),
        "StaticIHVP float32": (lambda _: ops["float32"] @ x, None),
        "DynamicIHVP step float32": (lambda _: window.update_and_matvec(G32[0]), None),
    }
    # A Fortran-ordered G (``Gt.T`` of a (d, m) array of gradients as columns, a .npy saved
    # from one): the kernels read it as its transpose (one vector: its rows in place, in
    # memory order; several: in tiles); target 1.7x the floor.
    ops["float32 F"] = StaticIHVP(np.asfortranarray(G32), damp=damp, check_finite=False)
    cands["StaticIHVP float32 Fortran-ordered"] = (lambda _: ops["float32 F"] @ x, None)
    G16 = G32.astype(np.float16)
    ops["float16"] = StaticIHVP(G16, damp=damp, check_finite=False)
    cands["StaticIHVP float16 (NumPy)"] = (lambda _: ops["float16"] @ x, None)
    bf16 = mfac_core._dtypes.numpy_bfloat16()  # ml_dtypes' (JAX's gradients in NumPy)
    if bf16 is not None:
        ops["bfloat16 (NumPy)"] = StaticIHVP(G32.astype(bf16), damp=damp, check_finite=False)
        cands["StaticIHVP bfloat16 (NumPy)"] = (lambda _: ops["bfloat16 (NumPy)"] @ x, None)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        # G over NumPy memory, as the floor's: NumPy asks Linux for transparent huge pages,
        # PyTorch's CPU allocator does not, and with 4 KiB pages both passes (the floor's
        # too) run about 1.2x slower (docs/design.rst, "A window's buffer").
        Gb = torch.from_numpy(np.empty(G32.shape, dtype=np.uint16)).view(torch.bfloat16)
        Gb.copy_(torch.from_numpy(G32))
        xt = torch.from_numpy(x)
        ops["bfloat16"] = StaticIHVP(Gb, damp=damp, check_finite=False)
        cands["StaticIHVP bfloat16 (torch)"] = (lambda _: ops["bfloat16"] @ xt, None)
        xpt = mfac_core._compat.array_namespace(xt)
        wb = DynamicIHVP(
            m, d, damp=damp, dtype="bfloat16", xp=xpt, options=WindowOptions(check_finite=False)
        )
        Gt = torch.from_numpy(G32)
        for g in Gt:
            wb.update(g)
        cands["DynamicIHVP step bfloat16 (torch)"] = (lambda _: wb.update_and_matvec(Gt[0]), None)
    t = common.interleaved(cands, repeat)
    floor = t["floor"].best
    rows = [[f"{m}", "floor: sgemv + sgemv^T", common.fmt_time(floor), "1.00x", "-"]]
    for name, timing in t.items():
        if name == "floor":
            continue
        target = 0.6 if ("16" in name) else 1.7 if "Fortran" in name else 1.15
        kernels = (
            "kernels"
            if _engine.uses_kernels(_storage_ns(ops, name), _storage(ops, name))
            else "pieces"
        )
        rows.append(
            [
                f"{m}",
                f"{name} [{kernels}]",
                common.fmt_time(timing.best),
                common.fmt_ratio(timing.best / floor, target),
                f"{target}x",
            ]
        )
    return rows


def _storage(ops: dict[str, Any], name: str) -> Any:
    key = "bfloat16" if "bfloat16" in name else "float16" if "float16" in name else "float32"
    if key == "bfloat16" and "(NumPy)" in name:
        key = "bfloat16 (NumPy)"
    if "Fortran" in name:
        key = "float32 F"
    return ops[key]._G


def _storage_ns(ops: dict[str, Any], name: str) -> Any:
    return mfac_core._compat.array_namespace(_storage(ops, name))


def setup_rows(m: int, d: int, repeat: int, rng: np.random.Generator) -> list[list[str]]:
    from scipy.linalg import blas

    G32 = make_grads(rng, m, d)
    G64 = np.asfortranarray(G32.T, dtype=np.float64)  # d x m, column-major: syrk's A^T A
    cands: dict[str, Any] = {
        "floor": (lambda _: blas.dsyrk(1.0, G64, trans=1), None),
        "set-up": (lambda _: StaticIHVP(G32, damp=1e-3, check_finite=False), None),
    }
    t = common.interleaved(cands, repeat)
    floor = t["floor"].best
    return [
        [f"{m}", "floor: dsyrk of a float64 copy", common.fmt_time(floor), "1.00x", "-"],
        [
            f"{m}",
            "StaticIHVP(G) float32",
            common.fmt_time(t["set-up"].best),
            common.fmt_ratio(t["set-up"].best / floor, 1.2),
            "1.2x",
        ],
    ]


def block_rows(m: int, B: int, d: int, repeat: int, rng: np.random.Generator) -> list[list[str]]:
    G32 = make_grads(rng, m, d)
    n = (d // B) * B
    G32 = np.ascontiguousarray(G32[:, :n])
    stack64 = np.ascontiguousarray(
        np.transpose(G32.reshape(m, n // B, B), (1, 0, 2)), dtype=np.float64
    )
    cands: dict[str, Any] = {
        "floor": (lambda _: np.swapaxes(stack64, -1, -2) @ stack64, None),
        "set-up": (lambda _: StaticIHVP(G32, damp=1e-3, block_size=B, check_finite=False), None),
    }
    t = common.interleaved(cands, repeat)
    floor = t["floor"].best
    return [
        [f"{m}, B={B}", "floor: batched float64 G_b^T G_b", common.fmt_time(floor), "1.00x", "-"],
        [
            f"{m}, B={B}",
            "StaticIHVP(G, block_size=B) float32",
            common.fmt_time(t["set-up"].best),
            common.fmt_ratio(t["set-up"].best / floor, 4.0),
            "4x",
        ],
    ]


def error_rows(m: int, d: int, rng: np.random.Generator) -> list[list[str]]:
    rows = []
    G32 = make_grads(rng, m, d)
    G = G32.astype(np.float64)
    x = G.mean(axis=0).astype(np.float32).astype(np.float64)
    top = float(np.linalg.norm(G, 2)) ** 2
    for kappa in (1e3, 1e5, 1e7):
        damp = top / (m * (kappa - 1.0))
        want = extended_precision_inverse(G, damp, x)

        def err(y: Any, want: np.ndarray = want) -> str:
            e = float(np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want))
            return f"{e:.1e} ({e / EPS32:.2g} eps)"

        static = StaticIHVP(G32, damp=damp) @ x.astype(np.float32)
        window = DynamicIHVP(m, d, damp=damp, dtype="float32")
        for g in G32:
            window.update(g)
        dynamic = window @ x.astype(np.float32)
        # The passes of earlier versions: float64 factor, passes summed in float32.
        C = G @ G.T + m * damp * np.eye(m)
        coef = np.linalg.solve(C, G @ x).astype(np.float32)
        before = (x.astype(np.float32) - G32.T @ coef) / np.float32(damp)
        rows.append([f"{kappa:.0e}", err(static), err(dynamic), err(before)])
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=float, default=None, help="coordinates (default 1e6)")
    p.add_argument("--m", type=int, action="append", default=None, help="default 64 and 256")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--error-d", type=float, default=None, help="d of the error table (1e5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI smoke run: d=2e5, m=32, 2 repeats")
    p.add_argument(_SETUP_CHILD, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.d = args.d or 2e5
        args.m = args.m or [32]
        args.repeat = args.repeat or 2
        args.error_d = args.error_d or 2e4
    args.d = int(args.d or 1e6)
    args.m = args.m or [64, 256]
    args.repeat = args.repeat or 5
    args.error_d = int(args.error_d or 1e5)
    return args


def setup_tables(args: argparse.Namespace, rng: np.random.Generator) -> list[list[str]]:
    """The rows of the set-up tables: the full set-up, then the block-wise one."""
    rows = []
    for m in args.m:
        rows += setup_rows(m, args.d, args.repeat, rng)
    for m, B in [(32, 16)] if args.quick else [(256, 128)]:
        rows += block_rows(m, B, args.d, args.repeat, rng)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.setup_child:
        print(json.dumps({"rows": setup_tables(args, rng)}))
        return 0
    common.print_heading(__file__)
    print(
        f"- C extension: {_fused.available()} ({_fused.best_isa()}), threads {_fused.max_threads()}"
    )
    print(f"- d = {args.d}, repeat = {args.repeat} (best of), interleaved with the floors\n")
    headers = ["m", "candidate", "best", "/ floor", "target"]
    rows: list[list[str]] = []
    for m in args.m:
        rows += product_rows(m, args.d, args.repeat, rng)
    print("## Products over the float32 two-pass floor\n")
    print(common.markdown_table(headers, rows) + "\n")
    env = dict(os.environ)
    if _ENV_BLAS_TIMEOUT is None:
        del env["OPENBLAS_THREAD_TIMEOUT"]
    argv = [__file__, _SETUP_CHILD, "--d", str(args.d), "--repeat", str(args.repeat)]
    argv += ["--seed", str(args.seed)] + [f"--m={m}" for m in args.m]
    rows = common.run_child(argv + (["--quick"] if args.quick else []), env=env)["rows"]
    print(
        "## Set-up over its float64 Gram floor (a child process, OPENBLAS_THREAD_TIMEOUT: "
        f"{_ENV_BLAS_TIMEOUT or '(unset)'})\n"
    )
    print(common.markdown_table(headers, rows) + "\n")
    m = min(args.m)
    print(
        f"## Error for x = the gradients' mean (m = {m}, d = {args.error_d}, float32 "
        "storage, against the extended-precision inverse of the stored gradients)\n"
    )
    print(
        common.markdown_table(
            ["kappa", "StaticIHVP", "DynamicIHVP", "float32-summed passes (before)"],
            error_rows(m, args.error_d, rng),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
