"""Train a 64-128-10 MLP on scikit-learn's digits with SGD, SGD+momentum, Adam and M-FAC.

The data (1797 8x8 handwritten digits, bundled with scikit-learn, nothing is
downloaded) are split 75/25 into train and test sets. Every optimizer starts
from the same initial weights and sees the same batches (size 32); each run is
repeated for ``--seeds`` seeds (initialisation and batch order).

The learning rates (and M-FAC's damping) were picked with ``--tune``: a small
grid, one seed, 10 epochs, choosing the lowest final training loss. The chosen
values are the ``OPTIMIZERS`` table below; ``README.md`` lists the grid.

Prints a table and writes, to ``--out`` (default ``~/.cache/mfac_core-examples``),
``train_digits.png`` (training loss and test accuracy per epoch) and
``train_digits.md``/``.json`` (the table, the command, the machine and the library
versions; ``--tune`` writes ``train_digits-tune.md``/``.json``). Usage::

    python examples/train_digits.py [--epochs 20] [--seeds 3] [--out DIR] [--tune]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    History,
    add_output_options,
    environment,
    load,
    make_mlp,
    markdown_table,
    train,
    write_summary,
)

from mfac_core.torch import MFAC

Factory = Callable[[Any], torch.optim.Optimizer]

#: The compared optimizers, with the hyper-parameters chosen by ``--tune``.
OPTIMIZERS: dict[str, tuple[str, Factory]] = {
    "SGD": ("lr=1.0", lambda p: torch.optim.SGD(p, lr=1.0)),
    "SGD+momentum": ("lr=0.1, momentum=0.9", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "Adam": ("lr=0.01", lambda p: torch.optim.Adam(p, lr=0.01)),
    "M-FAC": ("m=64, damp=1e-2, lr=0.03", lambda p: MFAC(p, lr=0.03, num_grads=64, damp=1e-2)),
    # The paper's default damping, with the best learning rate of the grid for it at m=64.
    "M-FAC (damp=1e-5)": (
        "m=64, damp=1e-5, lr=1e-2",
        lambda p: MFAC(p, lr=1e-2, num_grads=64, damp=1e-5),
    ),
}

REPORT_EPOCHS = (1, 2, 3, 5, 10, 20)


def tune_grid() -> dict[str, Factory]:
    """The grid searched by ``--tune``."""
    grid: dict[str, Factory] = {}
    for lr in (0.05, 0.1, 0.2, 0.5, 1.0):
        grid[f"SGD lr={lr}"] = lambda p, lr=lr: torch.optim.SGD(p, lr=lr)
    for lr in (0.02, 0.05, 0.1):
        grid[f"SGD+momentum lr={lr}"] = lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9)
    for lr in (1e-3, 3e-3, 1e-2):
        grid[f"Adam lr={lr}"] = lambda p, lr=lr: torch.optim.Adam(p, lr=lr)
    for m, damp, lr in itertools.product((32, 64, 128), (1e-5, 1e-3, 1e-2), (1e-3, 1e-2, 3e-2)):
        grid[f"M-FAC m={m} damp={damp:g} lr={lr:g}"] = lambda p, m=m, damp=damp, lr=lr: MFAC(
            p, lr=lr, num_grads=m, damp=damp
        )
    return grid


def run_tuning(epochs: int, out: Path, env: dict[str, Any]) -> None:
    data = load()
    print(f"Tuning grid: seed 0, {epochs} epochs; criterion = final training loss\n")
    print(f"{'configuration':36s} {'loss@1':>8s} {'loss@3':>8s} {'final':>8s} {'test acc':>8s}")
    rows, results = [], {}
    for name, make in tune_grid().items():
        model = make_mlp(0)
        h = train(model, make(model.parameters()), data, epochs=epochs)
        loss = h.train_loss + [float("nan")] * 3  # a diverged run stops early
        print(
            f"{name:36s} {loss[1]:8.4f} {loss[3]:8.4f} {h.train_loss[-1]:8.4f} "
            f"{h.test_acc[-1]:8.4f}",
            flush=True,
        )
        rows.append(
            [
                name,
                f"{loss[1]:.4f}",
                f"{loss[3]:.4f}",
                f"{h.train_loss[-1]:.4f}",
                f"{h.test_acc[-1]:.4f}",
            ]
        )
        results[name] = {"train_loss": h.train_loss, "test_acc": h.test_acc}
    table = markdown_table(
        ["configuration", "loss ep1", "loss ep3", f"loss ep{epochs}", "test acc"], rows
    )
    path = write_summary(
        out,
        "train_digits-tune",
        env,
        [
            f"Tuning grid: seed 0, {epochs} epochs (training loss on the full "
            "training set; NaN: diverged).",
            table,
        ],
        {"runs": results},
    )
    print(f"\nwrote {path}")


def summarise(runs: dict[str, list[History]], epochs: int) -> str:
    """Print the results and return them as a markdown table."""
    cols = [e for e in REPORT_EPOCHS if e <= epochs]
    header = (
        f"{'optimizer':20s} "
        + " ".join(f"{'ep' + str(e):>7s}" for e in cols)
        + f" {'test acc (final)':>18s} {'s/epoch':>8s}"
    )
    print("\nTraining loss (mean over seeds; full training set, end of epoch)\n")
    print(header)
    print("-" * len(header))
    rows = []
    for name, hists in runs.items():
        losses = []
        for e in cols:
            vals = [h.train_loss[e] for h in hists if e < len(h.train_loss)]
            losses.append(statistics.fmean(vals) if vals else float("nan"))
        accs = [h.test_acc[-1] for h in hists]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_epoch = statistics.fmean(h.seconds / max(1, len(h.train_loss) - 1) for h in hists)
        print(
            f"{name:20s} "
            + " ".join(f"{v:7.4f}" for v in losses)
            + f" {statistics.fmean(accs):11.4f} ±{spread:.4f} {per_epoch:8.3f}"
        )
        rows.append(
            [
                name,
                *(f"{v:.4f}" for v in losses),
                f"{statistics.fmean(accs):.4f} ± {spread:.4f}",
                f"{per_epoch:.3f}",
            ]
        )
    print("\nHyper-parameters:")
    for name, (desc, _) in OPTIMIZERS.items():
        print(f"  {name:20s} {desc}")
    return markdown_table(["optimizer", *(f"ep{e}" for e in cols), "test acc", "s/epoch"], rows)


def plot(runs: dict[str, list[History]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, hists in runs.items():
        n = min(len(h.train_loss) for h in hists)
        epochs = list(range(n))
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_acc")):
            series = [getattr(h, key)[:n] for h in hists]
            mean = [statistics.fmean(v) for v in zip(*series, strict=True)]
            lo = [min(v) for v in zip(*series, strict=True)]
            hi = [max(v) for v in zip(*series, strict=True)]
            (line,) = ax.plot(epochs, mean, label=name)
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.15)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0.8, 1.0)
    ax_loss.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle("64-128-10 MLP on sklearn digits (mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tune", action="store_true", help="run the tuning grid instead")
    add_output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    if args.tune:
        run_tuning(10, args.out, env)
        return
    data = load()
    n_params = sum(p.numel() for p in make_mlp().parameters())
    intro = (
        f"digits: {data.X_train.shape[0]} training, {data.X_test.shape[0]} test images; "
        f"MLP 64-128-10 ({n_params} parameters); batches of 32, {args.epochs} epochs, "
        f"{args.seeds} seed(s)"
    )
    print(intro)
    start = time.perf_counter()
    runs: dict[str, list[History]] = {}
    for name, (_, make) in OPTIMIZERS.items():
        runs[name] = []
        for seed in range(args.seeds):
            model = make_mlp(seed)
            runs[name].append(
                train(model, make(model.parameters()), data, epochs=args.epochs, seed=seed)
            )
    table = summarise(runs, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "train_digits.png"
    plot(runs, path)
    hyper = "\n".join(f"- {name}: {desc}" for name, (desc, _) in OPTIMIZERS.items())
    md = write_summary(
        args.out,
        "train_digits",
        env,
        [
            intro + ".",
            "Training loss on the full training set at the end of each epoch (mean "
            "over seeds), final test accuracy (mean ± std over seeds) and seconds per epoch:",
            table,
            "Hyper-parameters:\n\n" + hyper,
        ],
        {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "runs": {
                name: [
                    {"train_loss": h.train_loss, "test_acc": h.test_acc, "seconds": h.seconds}
                    for h in hists
                ]
                for name, hists in runs.items()
            },
        },
    )
    print(f"\nwrote {path} and {md} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
