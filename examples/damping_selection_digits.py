"""Choosing the pruning damping by a held-out loss: brute-force grid search vs one pass.

The damping of the Fisher decides what one-shot M-FAC OBS pruning does, and its
best value depends on the scale of the gradients (``prune_digits.py`` and
``damp_and_m.py``). The plain way to choose it is a grid search: prune a copy of
the model once per damping (a set-up of the inverse Fisher each time) and keep
the one with the lowest loss on held-out data. ``MFACPruner.prune(...,
dampings=GRID, select_damp=...)`` gives the same choice from one
:class:`~mfac_core.SpectralIHVP` set-up: the diagonals of ``F^{-1}`` for the
whole grid in one pass, one OBS update per damping, and the held-out loss of
each candidate (:func:`mfac_core.pruning.select_damping`).

The 64-128-10 MLP of the other examples is trained (SGD with momentum, 20
epochs) on 80% of the training images; the other 20% (270 images) are the
held-out set that picks the damping; the 450 test images only report the
accuracy. Both weight matrices (9472 weights) are pruned globally to 90% and
95%, blocks of 128, m = 64 gradients of batches of 16, float64, no retraining.
Prints the tables and writes ``damping_selection_digits.png`` (test accuracy
and held-out loss against the damping, with the chosen damping marked) and
``damping_selection_digits.md``/``.json`` to ``--out`` (default
``~/.cache/mfac_core-examples``). Usage::

    python examples/damping_selection_digits.py [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
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

SPARSITIES = (0.9, 0.95)
GRID = tuple(10.0**e for e in range(-10, -1))  # 1e-10 ... 1e-2, as in damp_and_m.py
NUM_GRADS = 64
GRAD_BATCH = 16
BLOCK = 128


def split(data: Digits, seed: int) -> tuple[Digits, tuple[torch.Tensor, torch.Tensor]]:
    """80% of the training images to fit, 20% held out (stratified); the test set unchanged."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(data.X_train.shape[0])
    fit, val = train_test_split(
        idx, test_size=0.2, stratify=data.y_train.numpy(), random_state=seed
    )
    fit_t, val_t = torch.from_numpy(fit), torch.from_numpy(val)
    fitted = Digits(data.X_train[fit_t], data.y_train[fit_t], data.X_test, data.y_test)
    return fitted, (data.X_train[val_t], data.y_train[val_t])


def pruner(model: torch.nn.Module, damp: float = 1e-5) -> MFACPruner:
    return MFACPruner(model, num_grads=NUM_GRADS, block_size=BLOCK, damp=damp, dtype=torch.float64)


def brute_force(
    model: torch.nn.Module, data: Digits, held_out: tuple, sparsity: float, seed: int
) -> dict:
    """A pruned copy per damping (a set-up each); the damping of the lowest held-out loss."""
    val, acc = [], []
    start = time.perf_counter()
    for damp in GRID:
        m = copy.deepcopy(model)
        loader = ShuffledBatches(data, GRAD_BATCH, seed=1000 + seed)
        pruner(m, damp).prune(loader, F.cross_entropy, sparsity=sparsity)
        val.append(evaluate(m, *held_out)[0])
        acc.append(evaluate(m, data.X_test, data.y_test)[1])
    seconds = time.perf_counter() - start
    best = int(np.argmin(val))
    return {"damp": GRID[best], "acc": acc[best], "seconds": seconds, "val": val, "accs": acc}


def one_pass(
    model: torch.nn.Module, data: Digits, held_out: tuple, sparsity: float, seed: int
) -> dict:
    """One pruner call with the grid: one set-up, the held-out loss of every candidate."""
    m = copy.deepcopy(model)
    loader = ShuffledBatches(data, GRAD_BATCH, seed=1000 + seed)
    accs = []

    def held_out_loss(candidate: torch.nn.Module) -> float:
        # The test accuracy of every candidate is recorded for the figure only.
        accs.append(evaluate(candidate, data.X_test, data.y_test)[1])
        return evaluate(candidate, *held_out)[0]

    p = pruner(m)
    start = time.perf_counter()
    p.prune(loader, F.cross_entropy, sparsity=sparsity, dampings=GRID, select_damp=held_out_loss)
    seconds = time.perf_counter() - start
    assert abs(p.sparsity() - sparsity) < 1e-3
    return {
        "damp": p.selected_damps[0],
        "acc": evaluate(m, data.X_test, data.y_test)[1],
        "seconds": seconds,
        "accs": accs,
    }


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPARSITIES), figsize=(9.0, 3.6), sharey=True)
    for ax, s in zip(axes, SPARSITIES, strict=True):
        brute = [r["brute"] for r in runs[s]]
        sel = [r["select"] for r in runs[s]]
        mean = np.mean([b["accs"] for b in brute], axis=0)
        ax.semilogx(GRID, mean, "o-", color="C0", label="grid search: a prune per damping")
        ax.semilogx(
            GRID,
            np.mean([r["accs"] for r in sel], axis=0),
            "x",
            ms=9,
            color="C1",
            label="one pass: its candidates",
        )
        for b, r in zip(brute, sel, strict=True):
            ax.axvline(b["damp"], color="C0", lw=0.8, ls=":")
            ax.plot([r["damp"]], [r["acc"]], "*", ms=13, color="C3")
        ax.plot([], [], "*", ms=13, color="C3", label="chosen (one star per model)")
        ax2 = ax.twinx()
        ax2.semilogx(GRID, np.mean([b["val"] for b in brute], axis=0), "--", color="0.5")
        ax2.set_ylabel("held-out loss (dashed)", color="0.4", fontsize=8)
        ax2.tick_params(labelsize=7, colors="0.4")
        ax.set_title(f"{s:.0%} sparsity, mean of {len(brute)} model(s)", fontsize=9)
        ax.set_xlabel("damping")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after pruning")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    add_output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    start = time.perf_counter()
    runs: dict[float, list[dict]] = {s: [] for s in SPARSITIES}
    dense = []
    for seed in range(args.seeds):
        data, held_out = split(load(), seed)
        model = make_mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train(model, opt, data, epochs=20, seed=seed)
        model.eval()
        dense.append(evaluate(model, data.X_test, data.y_test)[1])
        for s in SPARSITIES:
            brute = brute_force(model, data, held_out, s, seed)
            select = one_pass(model, data, held_out, s, seed)
            runs[s].append({"brute": brute, "select": select})
            print(
                f"seed {seed}, {s:.0%}: grid search damp={brute['damp']:.0e} "
                f"acc={brute['acc']:.4f} ({brute['seconds']:.2f} s); one pass "
                f"damp={select['damp']:.0e} acc={select['acc']:.4f} ({select['seconds']:.2f} s)"
            )

    intro = (
        f"MLP 64-128-10 trained on {data.X_train.shape[0]} images (SGD+momentum, 20 epochs), "
        f"dense test accuracy {statistics.fmean(dense):.4f} (mean of {args.seeds}); "
        f"{held_out[0].shape[0]} held-out images choose the damping of one-shot M-FAC OBS "
        f"(B={BLOCK}, m={NUM_GRADS} gradients of batches of {GRAD_BATCH}, float64, no "
        f"retraining) among {len(GRID)} values, 1e-10 to 1e-2; test accuracy on "
        f"{data.X_test.shape[0]} images."
    )
    rows = []
    for s in SPARSITIES:
        for name, key in (
            ("grid search (a prune per damping)", "brute"),
            ("one pass (select_damp)", "select"),
        ):
            res = [r[key] for r in runs[s]]
            same = sum(r["brute"]["damp"] == r["select"]["damp"] for r in runs[s])
            rows.append(
                [
                    f"{s:.0%}",
                    name,
                    ", ".join(f"{r['damp']:.0e}" for r in res),
                    f"{statistics.fmean(r['acc'] for r in res):.4f}",
                    f"{statistics.fmean(r['seconds'] for r in res):.2f}",
                    f"{same}/{len(res)}" if key == "select" else "",
                ]
            )
    table = markdown_table(
        ["sparsity", "method", "chosen damping (per model)", "test acc", "seconds", "same choice"],
        rows,
    )
    speed = [r["brute"]["seconds"] / r["select"]["seconds"] for s in SPARSITIES for r in runs[s]]
    note = (
        f"Seconds: the whole pruning of one model for the {len(GRID)} dampings, gradients, "
        f"set-ups and held-out evaluations included; the one pass took "
        f"{1 / statistics.fmean(speed):.2f}x the time of the grid search on average "
        f"(range {1 / max(speed):.2f}-{1 / min(speed):.2f}x)."
    )
    print("\n" + table + "\n\n" + note)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "damping_selection_digits.png"
    plot(runs, path)
    md = write_summary(
        args.out,
        "damping_selection_digits",
        env,
        [intro, table, note],
        {
            "seeds": args.seeds,
            "grid": list(GRID),
            "dense_test_acc": dense,
            "runs": {str(s): v for s, v in runs.items()},
        },
    )
    print(f"wrote {path} and {md} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
