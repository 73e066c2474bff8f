"""How the damping and the number of gradients m move M-FAC's results on the digits MLP.

Two small sweeps on the 64-128-10 MLP of the other examples (scikit-learn's
bundled digits, nothing is downloaded), one seed:

- **Training** with :class:`mfac_core.torch.MFAC` (batches of 32, ``--epochs``
  epochs, no momentum): the damping at m = 128, each with the best learning
  rate of a small grid; then m at the damping that sweep chose, again with the
  best learning rate of a grid for each m. Reported: the final training loss,
  the test accuracy, seconds per epoch and the window's memory
  (``m d`` float32 values plus ``3 m^2`` float64, the size
  :class:`~mfac_core.torch.MFAC` logs).
- **Pruning** with :class:`mfac_core.torch.MFACPruner` (one-shot M-FAC OBS,
  blocks of 128, float64, to 90% sparsity, no retraining) of a model trained
  with SGD+momentum: the damping at m = 64, then m at the damping that sweep
  chose. Reported: the training loss after pruning (the criterion; no test
  data is used to choose), the test accuracy, the seconds of the whole
  pruning step (collecting the gradients included) and the memory of the
  ``m x d`` gradient matrix.

To compare dampings across models, each sweep also reports the scale of the
gradients, ``s = ||G||_2^2 / m`` (the largest eigenvalue of ``G^T G / m``, G the
gradients of the sweep's batches, at the initial weights for training and at
the trained weights for pruning): ``kappa = 1 + s / damp`` is the condition
number of F, and ``damp / s`` is the damping in units of the gradients.

Prints tables and writes ``damp_and_m.md``/``.json`` to ``--out`` (default
``~/.cache/mfac_core-examples``). Usage::

    python examples/damp_and_m.py [--epochs 10] [--out DIR] [--quick]

``--quick`` (3 epochs, smaller grids) is a smoke test, not the setting of the
documented numbers.
"""

from __future__ import annotations

import argparse
import copy
import math
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

from mfac_core.torch import MFAC, MFACPruner

TRAIN_M = 128
TRAIN_DAMPS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TRAIN_LRS = (1e-3, 1e-2, 3e-2, 0.1, 0.3)
TRAIN_MS = (8, 16, 32, 64, 128, 256, 512)
M_LRS = (1e-2, 3e-2, 0.1, 0.3)

PRUNE_M = 64
PRUNE_DAMPS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
PRUNE_MS = (16, 32, 64, 128, 256, 512)
GRAD_BATCH = 16
BLOCK = 128
SPARSITY = 0.9


def gradient_scale(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    params: list[torch.Tensor],
) -> float:
    """``||G||_2^2 / m`` for the gradients of ``params`` on ``batches`` (float64)."""
    rows = []
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    G = torch.stack(rows)
    return float(torch.linalg.eigvalsh(G @ G.T)[-1]) / G.shape[0]


def window_bytes(m: int, d: int) -> int:
    # The size MFAC logs: the float32 window and three float64 m x m matrices.
    return m * d * 4 + 3 * m * m * 8


def train_mfac(data: Digits, m: int, damp: float, lr: float, epochs: int) -> dict[str, Any]:
    model = make_mlp(0)
    h = train(
        model, MFAC(model.parameters(), lr=lr, num_grads=m, damp=damp), data, epochs=epochs, seed=0
    )
    return {
        "m": m,
        "damp": damp,
        "lr": lr,
        "train_loss": h.train_loss[-1],
        "test_acc": h.test_acc[-1],
        "diverged": h.diverged,
        "s_per_epoch": h.seconds / max(1, len(h.train_loss) - 1),
    }


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the lowest final training loss (a diverged run is never chosen)."""
    ok = [r for r in runs if not r["diverged"] and math.isfinite(r["train_loss"])]
    return min(ok, key=lambda r: r["train_loss"]) if ok else runs[0]


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def prune_once(model: torch.nn.Module, data: Digits, m: int, damp: float) -> dict[str, Any]:
    pruned = copy.deepcopy(model)
    pruner = MFACPruner(pruned, num_grads=m, damp=damp, block_size=BLOCK, dtype=torch.float64)
    loader = ShuffledBatches(data, GRAD_BATCH, seed=1000)
    t0 = time.perf_counter()
    pruner.prune(loader, F.cross_entropy, sparsity=SPARSITY)
    seconds = time.perf_counter() - t0
    loss = evaluate(pruned, data.X_train, data.y_train)[0]
    return {
        "m": m,
        "damp": damp,
        "train_loss": loss,
        "test_acc": evaluate(pruned, data.X_test, data.y_test)[1],
        "seconds": seconds,
        "grad_bytes": m * pruner.dim * 8,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--quick", action="store_true", help="3 epochs and smaller grids: a smoke test"
    )
    add_output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    train_damps, train_lrs, train_ms, m_lrs = TRAIN_DAMPS, TRAIN_LRS, TRAIN_MS, M_LRS
    prune_damps, prune_ms = PRUNE_DAMPS, PRUNE_MS
    if args.quick:
        args.epochs = 3
        train_damps, train_lrs, train_ms, m_lrs = (1e-5, 1e-2), (3e-2,), (16, 128), (3e-2,)
        prune_damps, prune_ms = (1e-8, 1e-5), (16, 64)
    start = time.perf_counter()
    data = load()
    d = sum(p.numel() for p in make_mlp().parameters())
    gen = torch.Generator().manual_seed(0)
    init = make_mlp(0)
    s_train = gradient_scale(init, data.batches(32, gen)[:TRAIN_M], list(init.parameters()))
    print(
        f"training: d={d}, gradient scale s=||G||^2/m at the initial weights "
        f"(m={TRAIN_M} batches of 32) = {s_train:.3g}"
    )

    # -- training: damping at m = TRAIN_M, then m at the chosen damping ---------------------
    damp_rows, damp_runs = [], []
    for damp in train_damps:
        runs = [train_mfac(data, TRAIN_M, damp, lr, args.epochs) for lr in train_lrs]
        best = best_of(runs)
        damp_runs.append(runs)
        damp_rows.append(
            [
                f"{damp:g}",
                f"{damp / s_train:.1e}",
                f"{1 + s_train / damp:.3g}",
                f"{best['lr']:g}",
                f"{best['train_loss']:.4f}",
                f"{best['test_acc']:.4f}",
            ]
        )
        print("  " + "  ".join(damp_rows[-1]), flush=True)
    train_damp = best_of([best_of(r) for r in damp_runs])["damp"]
    m_rows, m_runs = [], []
    for m in train_ms:
        runs = [train_mfac(data, m, train_damp, lr, args.epochs) for lr in m_lrs]
        best = best_of(runs)
        m_runs.append(runs)
        m_rows.append(
            [
                str(m),
                f"{best['lr']:g}",
                f"{best['train_loss']:.4f}",
                f"{best['test_acc']:.4f}",
                f"{best['s_per_epoch']:.3f}",
                fmt_bytes(window_bytes(m, d)),
            ]
        )
        print("  " + "  ".join(m_rows[-1]), flush=True)

    # -- pruning: damping at m = PRUNE_M, then m at the chosen damping ----------------------
    dense = make_mlp(0)
    train(dense, torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9), data, epochs=20, seed=0)
    dense.eval()
    dense_loss = evaluate(dense, data.X_train, data.y_train)[0]
    dense_acc = evaluate(dense, data.X_test, data.y_test)[1]
    weights = [dense[0].weight, dense[2].weight]
    d_pruned = sum(w.numel() for w in weights)
    s_prune = gradient_scale(
        dense, list(ShuffledBatches(data, GRAD_BATCH, seed=1000))[:PRUNE_M], weights
    )
    print(
        f"pruning: dense model training loss {dense_loss:.4f}, test accuracy {dense_acc:.4f}; "
        f"d={d_pruned} weights, gradient scale s at the trained weights (m={PRUNE_M} "
        f"batches of {GRAD_BATCH}) = {s_prune:.3g}"
    )
    pd_runs = [prune_once(dense, data, PRUNE_M, damp) for damp in prune_damps]
    pd_rows = [
        [
            f"{r['damp']:g}",
            f"{r['damp'] / s_prune:.1e}",
            f"{1 + s_prune / r['damp']:.3g}",
            f"{r['train_loss']:.4f}",
            f"{r['test_acc']:.4f}",
        ]
        for r in pd_runs
    ]
    for row in pd_rows:
        print("  " + "  ".join(row))
    prune_damp = min(pd_runs, key=lambda r: r["train_loss"])["damp"]
    pm_runs = [prune_once(dense, data, m, prune_damp) for m in prune_ms]
    pm_rows = [
        [
            str(r["m"]),
            f"{r['train_loss']:.4f}",
            f"{r['test_acc']:.4f}",
            f"{r['seconds']:.3f}",
            fmt_bytes(r["grad_bytes"]),
        ]
        for r in pm_runs
    ]
    for row in pm_rows:
        print("  " + "  ".join(row))

    sections = [
        f"MLP 64-128-10 on scikit-learn's digits (d = {d} parameters), seed 0. "
        f"`s = ||G||_2^2 / m`, `kappa = 1 + s / damp`.",
        f"**Training** (M-FAC, batches of 32, {args.epochs} epochs, no momentum). Gradient "
        f"scale at the initial weights: s = {s_train:.3g}. Damping at m = {TRAIN_M}, each "
        f"with the best lr of {{{', '.join(f'{x:g}' for x in train_lrs)}}} (lowest final "
        "training loss):",
        markdown_table(
            ["damp", "damp / s", "kappa", "best lr", "train loss", "test acc"], damp_rows
        ),
        f"m at damp = {train_damp:g}, each with the best lr of "
        f"{{{', '.join(f'{x:g}' for x in m_lrs)}}} (s/epoch includes the evaluation on "
        "the full training and test sets after each epoch; memory: the window, "
        "m d float32 + 3 m^2 float64):",
        markdown_table(["m", "best lr", "train loss", "test acc", "s/epoch", "memory"], m_rows),
        f"**Pruning** (one-shot M-FAC OBS, blocks of {BLOCK}, float64, to {SPARSITY:.0%} of "
        f"the {d_pruned} weights, no retraining; gradients of batches of {GRAD_BATCH}) of a "
        f"model trained with SGD+momentum (training loss {dense_loss:.4f}, test accuracy "
        f"{dense_acc:.4f}). Gradient scale at the trained weights: s = {s_prune:.3g}. "
        f"Damping at m = {PRUNE_M}:",
        markdown_table(["damp", "damp / s", "kappa", "train loss", "test acc"], pd_rows),
        f"m at damp = {prune_damp:g} (seconds: the whole pruning step, gradients "
        "included; memory: the m x d float64 gradient matrix):",
        markdown_table(["m", "train loss", "test acc", "seconds", "memory"], pm_rows),
    ]
    md = write_summary(
        args.out,
        "damp_and_m",
        env,
        sections,
        {
            "epochs": args.epochs,
            "quick": args.quick,
            "d": d,
            "train_scale": s_train,
            "train_damp_sweep": damp_runs,
            "train_damp": train_damp,
            "train_m_sweep": m_runs,
            "prune_scale": s_prune,
            "prune_d": d_pruned,
            "prune_damp_sweep": pd_runs,
            "prune_damp": prune_damp,
            "prune_m_sweep": pm_runs,
            "dense": {"train_loss": dense_loss, "test_acc": dense_acc},
        },
    )
    print(f"wrote {md} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
