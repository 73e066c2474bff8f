"""Benchmark of the ``mfac_core.torch.MFAC`` optimizer step against SGD and its floor.

Usage::

    python benchmarks/optimizer.py               # MLP 784-1024-256-10 (~1.07e6 params), m = 256
    python benchmarks/optimizer.py --m 64 --m 256 --repeat 9
    python benchmarks/optimizer.py --quick       # smoke run (< 30 s): MLP 784-256-10, m = 32

The model is a ReLU MLP on a synthetic batch (the timings do not depend on the
data), float32, on the CPU with ``--threads`` torch threads (default 1: on the
2-core development machine, with another process busy, two threads made every
kernel, SGD's included, 5-20x slower). Measured, all
interleaved round-robin with the same best-of-``repeat`` rule:

- **SGD step** / **M-FAC step**: ``optimizer.step()`` alone (the backward pass
  that fills the gradients is set-up, not timed);
- **SGD iteration** / **M-FAC iteration**: forward, backward and step;
- **IHVP**: ``DynamicIHVP.update_and_matvec(g)`` alone, the part of the M-FAC
  step that reads the window;
- **copy**: ``dst.copy_(src)`` of a large float32 tensor, which gives the
  copy bandwidth ``2 * nbytes / t`` (one read and one write per byte).

The **dynamic floor** of an M-FAC step is two passes over the m x d window
(``G g`` and ``G^T c``): ``2 m d * 4`` bytes at the copy bandwidth measured in
the same run. The M-FAC step also gathers the gradients into one flat vector
and adds the step back to the parameters (three more passes over d, negligible
next to 2m passes). The last lines say how many cores other processes kept
busy during the run; timings taken while that is well above zero are not
trustworthy on a small machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: python benchmarks/optimizer.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    CpuMonitor,
    fmt_ratio,
    fmt_time,
    interleaved,
    machine_facts,
    markdown_table,
)

from mfac_core.torch import MFAC

MiB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--m",
        type=int,
        action="append",
        default=None,
        help="window sizes (repeatable; default 256)",
    )
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=None,
        help="hidden layer widths (default 1024 256: ~1.07e6 parameters)",
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument(
        "--copy-mib", type=int, default=None, help="size of the bandwidth probe (default 512 MiB)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a small shared machine, more threads "
        "than idle cores make every kernel wait; see the module docstring)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.m = args.m or [32]
        args.hidden = args.hidden or [256]
        args.repeat = args.repeat or 3
        args.copy_mib = args.copy_mib or 64
    args.m = args.m or [256]
    args.hidden = args.hidden or [1024, 256]
    args.repeat = args.repeat or 7
    args.copy_mib = args.copy_mib or 512
    return args


def make_mlp(widths: list[int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def run(args: argparse.Namespace, m: int) -> tuple[list[list[str]], dict[str, float]]:
    widths = [784, *args.hidden, 10]
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(args.batch, 784, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    sgd_model, mfac_model = make_mlp(widths), make_mlp(widths)
    d = sum(p.numel() for p in sgd_model.parameters())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)
    mfac = MFAC(mfac_model.parameters(), lr=1e-4, num_grads=m, damp=args.damp)

    def backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(X), y).backward()

    def iteration(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        backward(model, opt)
        opt.step()

    # Fill the window with real gradients (zero_init keeps it full from the start, so the
    # steps below already take the steady-state path: replace the oldest, O(m^2) edit).
    for _ in range(3):
        iteration(mfac_model, mfac)
        iteration(sgd_model, sgd)

    n = args.copy_mib * MiB // 4
    src = torch.ones(n)
    dst = torch.zeros(n)
    cands = {
        "copy": (lambda _: dst.copy_(src), None),
        "SGD step": (lambda _: sgd.step(), lambda: backward(sgd_model, sgd)),
        "SGD iteration": (lambda _: iteration(sgd_model, sgd), None),
        # A fresh gradient each time: inserting one twice would make the window singular.
        "IHVP (update_and_matvec)": (
            lambda g: mfac.ihvp.update_and_matvec(g),
            lambda: 1e-2 * torch.randn(d, generator=gen),
        ),
        "M-FAC step": (lambda _: mfac.step(), lambda: backward(mfac_model, mfac)),
        "M-FAC iteration": (lambda _: iteration(mfac_model, mfac), None),
    }
    t = interleaved(cands, args.repeat)
    copy_bw = 2 * src.numel() * 4 / t["copy"].best
    floor = 2 * m * d * 4 / copy_bw
    sgd_iter = t["SGD iteration"].best
    rows = []
    for name in (
        "SGD step",
        "SGD iteration",
        "IHVP (update_and_matvec)",
        "M-FAC step",
        "M-FAC iteration",
    ):
        best, med = t[name].best, t[name].median
        rows.append(
            [
                f"{m}",
                name,
                fmt_time(best),
                fmt_time(med),
                fmt_ratio(best / floor) if "SGD" not in name else "-",
                fmt_ratio(best / sgd_iter),
            ]
        )
    rows.append(
        [
            f"{m}",
            "dynamic floor (2 passes over m x d)",
            fmt_time(floor),
            "-",
            "1.00x",
            fmt_ratio(floor / sgd_iter),
        ]
    )
    info = {"d": d, "copy_bw": copy_bw, "window_bytes": m * d * 4}
    return rows, info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    monitor = CpuMonitor()
    print("# M-FAC optimizer step on the CPU\n")
    facts = [*machine_facts(), ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads")]
    print(markdown_table(["machine", ""], facts))
    all_rows = []
    for m in args.m:
        rows, info = run(args, m)
        all_rows += rows
        print(
            f"\nm = {m}: d = {info['d']:,} parameters, window {info['window_bytes'] / MiB:.0f} "
            f"MiB, copy bandwidth {info['copy_bw'] / 1e9:.1f} GB/s (torch copy_ of "
            f"{args.copy_mib} MiB)"
        )
    print(
        f"\nBest of {args.repeat} runs (median shown as noise indicator); batch "
        f"{args.batch}, hidden {args.hidden}, float32, damp {args.damp:g}\n"
    )
    print(markdown_table(["m", "what", "best", "median", "vs floor", "vs SGD iteration"], all_rows))
    print(
        "\n'vs floor' below 1 is possible: the two passes only read the window, and reading "
        "streams faster than copying (which also writes)."
    )
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(f"\nother processes kept {foreign:.2f} cores busy on average during the run")


if __name__ == "__main__":
    main()
