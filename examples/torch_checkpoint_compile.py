"""A compiled M-FAC training loop, checkpointed and resumed bit for bit (CPU, seconds).

Run ``python examples/torch_checkpoint_compile.py [backend]`` (default: inductor, which
needs a C++ compiler; ``eager`` and ``aot_eager`` need none). docs/torch.rst includes
this file; tests/test_torch_contracts.py runs it.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from mfac_core.torch import MFAC


def build(seed: int) -> tuple[torch.nn.Module, MFAC]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    # Defaults: num_grads=64, damp=1e-3 (docs/guidance.rst).
    return model, MFAC(model.parameters(), lr=0.05, num_grads=16, momentum=0.5)


def compiled_step(model: torch.nn.Module, opt: MFAC, backend: str):
    @torch.compile(backend=backend)
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()  # runs eagerly: the one graph break of the step
        return loss.detach()

    return step


def main(backend: str = "inductor") -> None:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 20, generator=gen)
    Y = (X @ torch.randn(20, 4, generator=gen)).argmax(1)  # a linear teacher's labels
    data = [(X[i : i + 64], Y[i : i + 64]) for i in range(0, 256, 64)] * 5
    model, opt = build(0)
    step = compiled_step(model, opt, backend)
    start = F.cross_entropy(model(X), Y).item()
    for x, y in data[:10]:
        step(x, y)

    # Checkpoint: the model and the optimizer, window and momentum included.
    path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    torch.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, path)

    # Resume into fresh objects (another seed: everything comes from the checkpoint).
    resumed, resumed_opt = build(1)
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    set_optimizer_state_dict(resumed, resumed_opt, ckpt["optim"])
    resumed_step = compiled_step(resumed, resumed_opt, backend)

    for x, y in data[10:]:
        step(x, y)
        resumed_step(x, y)
    pairs = zip(model.parameters(), resumed.parameters(), strict=True)
    same = all(torch.equal(p, q) for p, q in pairs)
    end = F.cross_entropy(model(X), Y).item()
    print(
        f"loss {start:.3f} -> {end:.3f} in {opt.steps} compiled steps, "
        f"resumed after 10: identical parameters {same}"
    )
    if not same:
        raise SystemExit("the resumed run differs")


if __name__ == "__main__":
    main(*sys.argv[1:])
