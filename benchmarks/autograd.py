"""Benchmark of products that PyTorch's autograd sees, against the same product without it.

Usage::

    python benchmarks/autograd.py                  # d = 1e6, m = 64, float32 G
    python benchmarks/autograd.py --quick          # CI smoke run, d = 2e5, m = 16

Where ``x`` requires grad, a product's passes over G run in the C extension's kernels under
autograd Functions (``mfac_core._pass_derivatives``) whose gradients are passes again
(``SpectralIHVP`` then takes its combinations rather than its ``lift``, which has none).
``DynamicIHVP`` keeps the float64 pieces: its rows change in place while a graph may hold
them.
Each row times, interleaved in one process: the product without autograd (the floor), the
product of an ``x`` that requires grad, and that product followed by its backward
(``y.backward(v)``: two more passes). The last is about twice the floor: a backward is a
second product.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The installed package, not a source tree next to the script; then the helpers.
sys.path.append(str(Path(__file__).resolve().parent))
import _common as common

from mfac_core import DynamicIHVP, EmpiricalFisher, SpectralIHVP, StaticIHVP, _fused


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=float, default=None, help="coordinates (default 1e6)")
    p.add_argument("--m", type=int, default=None, help="gradients (default 64)")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: d = 2e5, m = 16")
    args = p.parse_args(argv)
    args.d = int(args.d or (2e5 if args.quick else 1e6))
    args.m = args.m or (16 if args.quick else 64)
    args.repeat = args.repeat or (2 if args.quick else 7)
    return args


def operators(torch: Any, G: Any) -> dict[str, Any]:
    m, d = G.shape
    window = DynamicIHVP(m, d, damp=1e-3, dtype=G.dtype, xp=torch)
    for g in G:
        window.update(g)
    return {
        "StaticIHVP": StaticIHVP(G, damp=1e-3, check_finite=False),
        "DynamicIHVP": window,
        "EmpiricalFisher": EmpiricalFisher(G, damp=1e-3, check_finite=False),
        "SpectralIHVP": SpectralIHVP(G, damp=1e-3, check_finite=False),
    }


def rows(torch: Any, args: argparse.Namespace) -> list[list[str]]:
    rng = np.random.default_rng(0)
    # Over NumPy's memory (2 MiB pages), as exact.py's floors: PyTorch's allocator's 4 KiB
    # pages make every pass about 1.2x slower, the floor too.
    G32 = (rng.standard_normal(args.d) + rng.standard_normal((args.m, args.d))).astype(np.float32)
    G = torch.from_numpy(G32)
    x = torch.from_numpy(rng.standard_normal(args.d).astype(np.float32))
    out = []
    for name, op in operators(torch, G).items():

        def backward(_: Any, op: Any = op) -> None:
            xr = x.clone().requires_grad_(True)
            (op @ xr).backward(x)

        cands = {
            "floor": (lambda _, op=op: op @ x, None),
            "grad": (lambda _, op=op: op @ x.clone().requires_grad_(True), None),
            "backward": (backward, None),
        }
        t = common.interleaved(cands, args.repeat)
        floor = t["floor"].best
        out.append(
            [
                name,
                common.fmt_time(floor),
                f"{common.fmt_time(t['grad'].best)} ({t['grad'].best / floor:.2f}x)",
                f"{common.fmt_time(t['backward'].best)} ({t['backward'].best / floor:.2f}x)",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to measure")
        return 0
    common.print_heading(__file__)
    print(f"- C extension: {_fused.available()}, threads {_fused.max_threads()}")
    print(f"- float32 G, m = {args.m}, d = {args.d}, repeat = {args.repeat} (best of)\n")
    headers = ["operator", "no grad (floor)", "x requires grad", "and backward"]
    print(common.markdown_table(headers, rows(torch, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
