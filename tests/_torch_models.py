"""The small model, batches and training loop that the torch optimizer tests share."""

from __future__ import annotations

import torch

nn = torch.nn
F = torch.nn.functional


def make_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batches(seed: int, n: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(n)
    ]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
