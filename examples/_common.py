"""Shared pieces of the digits examples: data, model, training and evaluation.

The data are scikit-learn's bundled copy of the UCI optical handwritten digits
(1797 8x8 images, 10 classes), which ships inside the ``sklearn`` package:
nothing is downloaded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Digits", "History", "ShuffledBatches", "evaluate", "load", "make_mlp", "train"]


@dataclass
class Digits:
    """Train/test tensors of the digits data (pixels scaled to [0, 1])."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int, generator: torch.Generator) -> list[tuple[torch.Tensor,
                                                                               torch.Tensor]]:
        """One epoch of shuffled training batches (the last, short batch is dropped)."""
        n = self.X_train.shape[0]
        perm = torch.randperm(n, generator=generator)
        return [(self.X_train[perm[i:i + batch_size]], self.y_train[perm[i:i + batch_size]])
                for i in range(0, n - batch_size + 1, batch_size)]


class ShuffledBatches:
    """An endless-epoch data loader: every iteration is a fresh shuffle of the training set.

    Iterating it twice gives different batches (drawn from one generator), so a
    pruner that collects gradients again draws new samples.
    """

    def __init__(self, data: Digits, batch_size: int, seed: int = 0) -> None:
        self.data = data
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(self.data.batches(self.batch_size, self.generator))


def load(seed: int = 0, test_size: float = 0.25) -> Digits:
    """The digits data, split (stratified) into train and test sets."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = data.data.astype(np.float32) / 16.0
    X_tr, X_te, y_tr, y_te = train_test_split(X, data.target, test_size=test_size,
                                              stratify=data.target, random_state=seed)
    return Digits(torch.from_numpy(X_tr), torch.from_numpy(y_tr).long(),
                  torch.from_numpy(X_te), torch.from_numpy(y_te).long())


def make_mlp(seed: int = 0, hidden: int = 128) -> nn.Module:
    """The 64-``hidden``-10 ReLU MLP, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(X, y)``."""
    out = model(X)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


@dataclass
class History:
    """Per-epoch metrics; index 0 is before training."""

    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, model: nn.Module, data: Digits) -> None:
        self.train_loss.append(evaluate(model, data.X_train, data.y_train)[0])
        loss, acc = evaluate(model, data.X_test, data.y_test)
        self.test_loss.append(loss)
        self.test_acc.append(acc)

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(v) for v in self.train_loss)


def train(model: nn.Module, opt: torch.optim.Optimizer, data: Digits, *, epochs: int,
          batch_size: int = 32, seed: int = 0,
          after_step: Callable[[], None] | None = None) -> History:
    """Train with ``opt`` for ``epochs`` epochs; the batch order depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    hist.record(model, data)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in data.batches(batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
        model.eval()
        hist.record(model, data)
        if hist.diverged:
            break
    hist.seconds = time.perf_counter() - start
    return hist
