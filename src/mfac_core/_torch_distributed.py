"""MFAC's distributed glue: DTensor parameters (FSDP2), the window's columns, the all-gather.

Functions of the optimizer (``opt``, an :class:`mfac_core.torch.MFAC`) that
:mod:`mfac_core.torch` calls; nothing here is public.
"""

from __future__ import annotations

from typing import Any

import torch

from ._dynamic_setup import WindowOptions
from ._sharded_dynamic import ShardedDynamicIHVP
from ._sharding import reduce_checked
from .distributed import TorchComm


def dtensor_class() -> Any:
    """DTensor's class, or None where this PyTorch has no torch.distributed.tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return None
    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes reach the DTensor), else ``t``."""
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t


def check_dtensors(opt: Any, flat: list[torch.Tensor]) -> bool:
    """Whether the parameters are DTensors sharded on dimension 0 (FSDP2); sets the comm."""
    dtensor = dtensor_class()
    kinds = {dtensor is not None and isinstance(p, dtensor) for p in flat}
    if kinds == {False}:
        return False
    from torch.distributed.tensor import Shard

    mesh = flat[0].device_mesh  # type: ignore[attr-defined]
    # Equal, not the same object: fully_shard without mesh= makes a mesh per call (a
    # layer's, then the root's), all over the same ranks.
    one_mesh = all(p.device_mesh == mesh for p in flat if isinstance(p, dtensor))
    if len(kinds) > 1 or not one_mesh or mesh.ndim != 1:
        raise ValueError(
            "MFAC over DTensor parameters needs all parameters to be DTensors of one "
            "1-D device mesh (as torch.distributed.fsdp.fully_shard makes them)"
        )
    for p in flat:
        if tuple(p.placements) != (Shard(0),):  # type: ignore[attr-defined]
            raise ValueError(
                "MFAC over DTensor parameters needs them sharded on dimension 0 "
                f"(placements (Shard(0),)), got {tuple(p.placements)}"  # type: ignore[attr-defined]
            )
    if opt._comm is None:
        opt._comm = TorchComm(mesh.get_group())
    elif (opt._comm.rank, opt._comm.size) != (mesh.get_local_rank(), mesh.size()):
        raise ValueError(
            f"comm is rank {opt._comm.rank} of {opt._comm.size}, but the parameters' "
            f"device mesh has this process at {mesh.get_local_rank()} of {mesh.size()}"
        )
    return True


def sharded_window(
    opt: Any, width: int, zero_init: bool, options: dict[str, Any]
) -> ShardedDynamicIHVP:
    """This rank's ``width`` columns of the window, over the optimizer's communicator.

    ``options`` are the window's other keywords; gradients and products are checked
    collectively, so that a bad gradient on one rank makes every rank refuse the step.
    """
    checked = WindowOptions(zero_init=zero_init, check_finite=True)
    num_grads = opt.defaults["num_grads"]
    window = ShardedDynamicIHVP(num_grads, width, comm=opt._comm, options=checked, **options)
    check_same_errors(opt, options["xp"], options["device"])
    return window


def check_same_errors(opt: Any, xp: Any, device: Any) -> None:
    """Refuse, on every rank, ranks built with different ``errors``.

    The window compares its own options at construction; ``errors`` is the step's, and
    its decisions are collective: a strict step refuses a gradient whose step is not
    finite before the window commits to it, a lenient one keeps it, and only a lenient
    step takes one the window cannot take with the previous window (one more
    reduction). Ranks that differ would leave their replicated windows diverged, or
    wait for each other. One reduction of the status word, at construction.
    """
    comm = opt._comm
    errors = opt.defaults["errors"]
    reduce_checked(
        comm,
        xp,
        lambda: xp.zeros((0,), dtype=xp.float64, device=device),
        length=0,
        dtype=xp.float64,
        device=device,
        what="MFAC",
        tag=("MFAC", "errors"),
        agree=lambda: errors,
        disagree=(
            ValueError,
            f"MFAC must be built with the same errors on every rank (this rank's is "
            f"{errors!r}): its steps decide collectively whether the window takes a "
            "gradient",
        ),
    )


def window_columns(opt: Any, width: int) -> tuple[int, int]:
    """The columns of the flat gradient this rank's window holds.

    Replicated parameters (DDP) with ``comm``: this rank's chunk, as
    :func:`torch.chunk` splits the d coordinates (as DTensor's ``Shard``); otherwise
    every coordinate of the flat (local) gradient.
    """
    if opt._comm is None or opt._sharded:
        return 0, width
    size, rank = opt._comm.size, opt._comm.rank
    chunk = -(-width // size)
    return min(rank * chunk, width), min((rank + 1) * chunk, width)


def all_gather(opt: Any, s: torch.Tensor) -> torch.Tensor:
    """The whole step from every rank's chunk (DDP): one all-gather of d numbers."""
    comm = opt._comm
    assert comm is not None
    d, size = opt.dim, comm.size
    chunk = -(-d // size)
    lo, hi = opt._columns
    if isinstance(comm, TorchComm):
        import torch.distributed as dist

        padded = torch.zeros(chunk, dtype=s.dtype, device=s.device)
        padded[: hi - lo] = s
        out = torch.empty(chunk * size, dtype=s.dtype, device=s.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, padded, group=comm.group)
        return out[:d]
    # Any other communicator: a sum in which each entry is one rank's value plus zeros.
    full = torch.zeros(d, dtype=s.dtype, device=s.device)
    full[lo:hi] = s
    return comm.allreduce_sum(full)
