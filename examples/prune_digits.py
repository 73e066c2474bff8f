"""One-shot pruning of a trained digits MLP: magnitude, OBD and M-FAC OBS.

A 64-128-10 MLP is trained on scikit-learn's bundled digits (SGD with
momentum, 20 epochs; nothing is downloaded), then both weight matrices
(9472 weights, biases kept) are pruned globally to 50-95% sparsity *without
any retraining*, by:

- magnitude pruning;
- OBD: the diagonal-Fisher saliency ``theta_i^2 F_ii / 2``, no update;
- the M-FAC saliency ``theta_i^2 / (2 [F^{-1}]_ii)`` without any update;
- M-FAC OBS (the paper's summed single-weight update) with the full Fisher
  and with a block-wise Fisher (blocks of 128);
- M-FAC OBS with the joint multi-weight update in each block of 128;
- M-FAC OBS (blocks of 128) reaching the sparsity in 8 steps, with fresh
  gradients at each (the paper's "recomputations"; still no retraining).

The Fisher uses m = 64 gradients, each of a batch of 16 training images (the
paper's setting), in float64 (the best damping is tiny, which makes F too
ill-conditioned for float32 products). Its damping is chosen on the *training* loss: the value of
a small grid with the lowest training loss after one-shot OBS pruning to 90%
(first seed). Results are averaged over ``--seeds`` independently trained
models. Prints tables and writes, to ``--out`` (default
``~/.cache/mfac_core-examples``), ``prune_digits.png`` and ``prune_digits.md``/``.json``
(the tables, the command, the machine and the library versions). Usage::

    python examples/prune_digits.py [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Digits,
    ShuffledBatches,
    add_output_options,
    environment,
    evaluate,
    load,
    make_mlp,
    markdown_table,
    train,
    write_summary,
)

from mfac_core.torch import MFACPruner

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
NUM_GRADS = 64
GRAD_BATCH = 16
BLOCK = 128
DAMP_GRID = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)

#: name -> (MFACPruner options, number of pruning steps)
METHODS: dict[str, tuple[dict[str, Any], int]] = {
    "magnitude": ({"saliency": "magnitude", "update": "none"}, 1),
    "OBD (diagonal F)": ({"saliency": "obd", "update": "none"}, 1),
    "M-FAC saliency, no update": ({"saliency": "obs", "update": "none", "block_size": BLOCK}, 1),
    "M-FAC OBS, full F": ({"saliency": "obs", "update": "single", "block_size": None}, 1),
    f"M-FAC OBS, B={BLOCK}": ({"saliency": "obs", "update": "single", "block_size": BLOCK}, 1),
    f"M-FAC OBS joint, B={BLOCK}": ({"saliency": "obs", "update": "joint", "block_size": BLOCK}, 1),
    f"M-FAC OBS, B={BLOCK}, 8 recomp.": (
        {"saliency": "obs", "update": "single", "block_size": BLOCK},
        8,
    ),
}


def dense_model(data: Digits, seed: int) -> torch.nn.Module:
    model = make_mlp(seed)
    train(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), data, epochs=20, seed=seed
    )
    return model.eval()


def prune_copy(
    model: torch.nn.Module,
    data: Digits,
    sparsity: float,
    damp: float,
    options: dict[str, Any],
    steps: int,
    seed: int,
) -> tuple[float, float]:
    """(test accuracy, training loss) of a pruned copy of ``model``."""
    pruned = copy.deepcopy(model)
    pruner = MFACPruner(pruned, num_grads=NUM_GRADS, damp=damp, dtype=torch.float64, **options)
    loader = ShuffledBatches(data, GRAD_BATCH, seed=1000 + seed)
    pruner.prune(loader, F.cross_entropy, sparsity=sparsity, steps=steps, schedule="exponential")
    assert abs(pruner.sparsity() - sparsity) < 1e-3
    train_loss = evaluate(pruned, data.X_train, data.y_train)[0]
    return evaluate(pruned, data.X_test, data.y_test)[1], train_loss


def choose_damp(model: torch.nn.Module, data: Digits) -> tuple[float, str]:
    """The damping of ``DAMP_GRID`` with the lowest training loss, and the sweep's table."""
    print(f"Damping sweep (seed 0, one-shot M-FAC OBS B={BLOCK} to 90%, no test data used):")
    print(f"  {'damp':>8s} {'train loss':>11s} {'(test acc)':>11s}")
    best = None
    losses, accs = [], []
    for damp in DAMP_GRID:
        acc, loss = prune_copy(model, data, 0.9, damp, METHODS[f"M-FAC OBS, B={BLOCK}"][0], 1, 0)
        print(f"  {damp:8.0e} {loss:11.4f} {acc:11.4f}")
        losses.append(f"{loss:.4f}")
        accs.append(f"{acc:.4f}")
        if best is None or loss < best[1]:
            best = (damp, loss)
    print(f"  -> damp = {best[0]:g}\n")
    sweep = markdown_table(
        ["damp", *(f"{d:.0e}" for d in DAMP_GRID)],
        [["training loss", *losses], ["(test accuracy)", *accs]],
    )
    return best[0], sweep


def table(
    title: str, results: dict[str, dict[float, list[float]]], dense: list[float], fmt: str
) -> str:
    """Print the means over models and return them as a markdown table."""
    print(title)
    header = f"{'method':34s}" + "".join(f"{f'{s:.0%}':>9s}" for s in SPARSITIES)
    print(header)
    print("-" * len(header))
    print(f"{'dense (0%)':34s}" + f"{statistics.fmean(dense):9{fmt}}")
    rows = []
    for name, per in results.items():
        print(f"{name:34s}" + "".join(f"{statistics.fmean(per[s]):9{fmt}}" for s in SPARSITIES))
        rows.append([name, *(f"{statistics.fmean(per[s]):{fmt}}" for s in SPARSITIES)])
    print()
    return markdown_table(["method", *(f"{s:.0%}" for s in SPARSITIES)], rows)


def plot(results: dict[str, dict[float, list[float]]], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = [100 * s for s in SPARSITIES]
    for name, per in results.items():
        style = "--" if "no update" in name or name in ("magnitude", "OBD (diagonal F)") else "-"
        ax.plot(xs, [statistics.fmean(per[s]) for s in SPARSITIES], style, marker="o", label=name)
    ax.axhline(dense, color="k", lw=0.8, ls=":", label="dense")
    ax.set_xlabel("sparsity of the weight matrices (%)")
    ax.set_ylabel("test accuracy, no retraining")
    ax.set_title("One-shot pruning of a 64-128-10 MLP on sklearn digits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    add_output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    start = time.perf_counter()
    data = load()
    models = [dense_model(data, seed) for seed in range(args.seeds)]
    dense_acc = [evaluate(m, data.X_test, data.y_test)[1] for m in models]
    dense_loss = [evaluate(m, data.X_train, data.y_train)[0] for m in models]
    intro = (
        f"{args.seeds} dense model(s): test accuracy {statistics.fmean(dense_acc):.4f}, "
        f"training loss {statistics.fmean(dense_loss):.4f}; Fisher from m={NUM_GRADS} "
        f"gradients of batches of {GRAD_BATCH}, float64"
    )
    print(intro + "\n")
    damp, sweep = choose_damp(models[0], data)
    acc: dict[str, dict[float, list[float]]] = {n: {s: [] for s in SPARSITIES} for n in METHODS}
    loss: dict[str, dict[float, list[float]]] = {n: {s: [] for s in SPARSITIES} for n in METHODS}
    for seed, model in enumerate(models):
        for name, (options, steps) in METHODS.items():
            for s in SPARSITIES:
                a, ell = prune_copy(model, data, s, damp, options, steps, seed)
                acc[name][s].append(a)
                loss[name][s].append(ell)
    acc_table = table(
        f"Test accuracy after one-shot pruning (mean of {args.seeds} models, "
        f"{data.X_test.shape[0]} test images)",
        acc,
        dense_acc,
        ".4f",
    )
    loss_table = table(
        "Training loss after one-shot pruning (what OBS minimises)", loss, dense_loss, ".4f"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prune_digits.png"
    plot(acc, statistics.fmean(dense_acc), path)
    md = write_summary(
        args.out,
        "prune_digits",
        env,
        [
            intro + ".",
            f"Damping sweep (first model, one-shot M-FAC OBS B={BLOCK} to 90%; "
            f"chosen on the training loss): damp = {damp:g}.",
            sweep,
            f"Test accuracy after pruning (mean of {args.seeds} model(s), "
            f"{data.X_test.shape[0]} test images; dense: {statistics.fmean(dense_acc):.4f}):",
            acc_table,
            f"Training loss after pruning (dense: {statistics.fmean(dense_loss):.4f}):",
            loss_table,
        ],
        {
            "seeds": args.seeds,
            "damp": damp,
            "damp_grid": list(DAMP_GRID),
            "dense_test_acc": dense_acc,
            "dense_train_loss": dense_loss,
            "test_acc": {n: {str(s): v for s, v in per.items()} for n, per in acc.items()},
            "train_loss": {n: {str(s): v for s, v in per.items()} for n, per in loss.items()},
        },
    )
    print(f"damp={damp:g}; wrote {path} and {md} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
