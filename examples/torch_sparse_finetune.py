"""Sparse fine-tuning: prune to 90 % with MFACPruner, then fine-tune the kept weights with M-FAC.

Run ``python examples/torch_sparse_finetune.py`` (CPU, seconds). docs/torch.rst includes
this file; tests/test_torch_sparse.py runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mfac_core.torch import MFAC, MFACPruner


def window_bytes(opt: MFAC) -> int:
    """The window's memory: num_grads gradients of the optimizer's dim coordinates."""
    return opt.num_grads * opt.dim * opt.grad_dtype.itemsize


def train(model: torch.nn.Module, opt: MFAC, data: list, epochs: int) -> None:
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def main() -> None:
    torch.manual_seed(0)
    X = torch.randn(512, 32)
    Y = (X @ torch.randn(32, 4)).argmax(1)  # a linear teacher's labels
    data = [(X[i : i + 64], Y[i : i + 64]) for i in range(0, 512, 64)]
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(X), Y).item()

    dense = MFAC(model.parameters(), lr=0.05, num_grads=16)
    train(model, dense, data, epochs=3)
    size = window_bytes(dense)
    print(f"dense:  loss {loss():.3f}, window {size:,} bytes ({dense.dim:,} coordinates)")

    # One-shot M-FAC pruning of both weight matrices to 90 % sparsity.
    pruner = MFACPruner(model, num_grads=16, block_size=128, damp=1e-4)
    pruner.prune(data, F.cross_entropy, sparsity=0.9)
    print(f"pruned: loss {loss():.3f}, sparsity {pruner.sparsity():.0%}")

    # Fine-tune the kept weights (and the biases, which have no mask): the window holds
    # their coordinates only, and the pruned weights are never moved.
    sparse = MFAC(model.parameters(), lr=0.05, num_grads=16, masks=pruner.param_masks())
    train(model, sparse, data, epochs=3)
    still_zero = all(
        bool((w[~pruner.masks[name]] == 0).all()) for name, w in pruner.weights.items()
    )
    ratio = window_bytes(sparse) / window_bytes(dense)
    print(
        f"sparse: loss {loss():.3f}, window {window_bytes(sparse):,} bytes ({sparse.dim:,} "
        f"coordinates, {ratio:.0%} of dense); pruned weights still zero: {still_zero}"
    )
    if not still_zero:
        raise SystemExit("a pruned weight moved")


if __name__ == "__main__":
    main()
