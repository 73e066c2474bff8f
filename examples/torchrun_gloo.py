"""M-FAC under DistributedDataParallel on CPUs: ``torchrun --nproc-per-node 2 <this file>``.

The gloo backend; each rank's window holds its chunk of the d coordinates. docs/torch.rst
includes this file; tests/test_torch_contracts.py runs it with two processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mfac_core.distributed import TorchComm
from mfac_core.torch import MFAC


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets the rank, world size and address
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model = DistributedDataParallel(net)
    opt = MFAC(net.parameters(), lr=0.05, num_grads=16, momentum=0.5, comm=TorchComm())
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 20, generator=gen)
    Y = (X @ torch.randn(20, 4, generator=gen)).argmax(1)  # a linear teacher's labels
    batch = 64
    for i in range(20):
        x, y = X[i % 4 * batch :][:batch], Y[i % 4 * batch :][:batch]
        rows = slice(rank * batch // size, (rank + 1) * batch // size)  # this rank's share
        opt.zero_grad()
        loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()  # DDP averages the gradients over the ranks
        opt.step()
    loss = F.cross_entropy(net(X), Y)
    print(
        f"rank {rank} of {size}: loss {loss.item():.3f} on all data after {opt.steps} steps, "
        f"window columns {opt.ihvp.dim} of {opt.dim}",
        flush=True,
    )
    # Every rank is past its last collective before any tears gloo down (one that exits
    # while a peer still talks to it aborts: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
