"""MFAC's distributed glue: the construction's reduction, DTensor parameters (FSDP2), the
window's columns, the all-gather.

Functions of the optimizer (``opt``, an :class:`mfac_core.torch.MFAC`) that
:mod:`mfac_core.torch` calls; nothing here is public.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._compat import array_namespace
from ._dynamic_setup import WindowOptions
from ._sharded_dynamic import ShardedDynamicIHVP
from ._sharding import digest, host_values, reduce_checked
from .distributed import TorchComm

#: What each rank tells the others of its layout at construction (:func:`layout_row`):
#: its number of parameters, of their coordinates and of kept ones, and the digests of
#: the parameters' shapes and dtypes by group and of the masks.
LAYOUT_FIELDS = 5
#: Bits of the digests in the reduction's payload: exact in float64.
ROW_DIGEST_BITS = 52


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


def agreed_construction(opt: Any, error: Exception | None, given: Sequence[Any]) -> None:
    """The construction's first reduction: every rank's checks, ``errors`` and layout.

    Every error of the construction is collective (docs/scaling.rst): each rank runs
    its checks first (``error``: what they raised, None if they passed) and then joins
    this reduction whether they passed or not, so that one rank given a bad argument
    raises its own error and the others one of its class naming how many ranks failed,
    instead of waiting for it in the window's reduction (a hang until the group's
    timeout). It also compares what the ranks must share beyond the window's own
    options (which the window compares): ``errors``, and the layout of the flat vector
    (:func:`layout_row`), without which the ranks' window columns and steps would be
    other coordinates on other ranks. One reduction of a ``size x LAYOUT_FIELDS`` table
    (each rank fills its row) and the status word; ``given``: the parameters (or
    groups) this rank was given, for :func:`reduction_device`.
    """
    comm = opt._comm
    device = reduction_device(opt, given)
    xp = array_namespace(torch.empty(0, device=device))

    def local() -> torch.Tensor:
        if error is not None:
            raise error
        table = [0.0] * (comm.size * LAYOUT_FIELDS)
        table[comm.rank * LAYOUT_FIELDS : (comm.rank + 1) * LAYOUT_FIELDS] = layout_row(opt)
        return torch.tensor(table, dtype=torch.float64, device=device)

    errors = opt.__dict__.get("defaults", {}).get("errors")  # None: the checks failed first
    total = reduce_checked(
        comm,
        xp,
        local,
        length=comm.size * LAYOUT_FIELDS,
        dtype=xp.float64,
        device=device,
        what="MFAC",
        tag=("MFAC", "init"),
        # errors is the step's, and its decisions are collective: a strict step refuses
        # a gradient whose step is not finite before the window commits to it, a lenient
        # one keeps it (and may step with the previous window, one more reduction).
        agree=lambda: errors,
        disagree=(
            ValueError,
            f"MFAC must be built with the same errors on every rank (this rank's is "
            f"{errors!r}): its steps decide collectively whether the window takes a "
            "gradient",
        ),
    )
    values = host_values(total)
    table = [tuple(values[r * LAYOUT_FIELDS : (r + 1) * LAYOUT_FIELDS]) for r in range(comm.size)]
    check_same_layout(opt, table)


def layout_row(opt: Any) -> list[float]:
    """This rank's row of :func:`agreed_construction`'s table.

    The number of parameters, of their coordinates and of the kept ones, then the
    digests (``ROW_DIGEST_BITS``) of their shapes and dtypes by group and of the masks.
    Global shapes (a DTensor's ``shape``), the same on every rank. A mask that keeps
    every coordinate differs from none here (not in a load): a masked parameter is
    moved by other operations, which round otherwise, and the replicas would drift.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    shapes = [
        [(tuple(int(n) for n in p.shape), str(p.dtype)) for p in group["params"]]
        for group in opt.param_groups
    ]
    masks = [opt._masks.get(p) for p in params]
    shift = 64 - ROW_DIGEST_BITS
    return [
        float(len(params)),
        float(sum(p.numel() for p in params)),
        float(opt.dim),
        float(digest(shapes) >> shift),
        float(digest(masks) >> shift),
    ]


def check_same_layout(opt: Any, table: Sequence[tuple[float, ...]]) -> None:
    """Refuse, on every rank, ranks whose parameters or masks differ (``table``: every
    rank's :func:`layout_row`, in rank order)."""
    comm = opt._comm
    params = [[int(r[0]), int(r[1])] for r in table]
    differ = [k for k, r in enumerate(table) if r[:2] != table[0][:2] or r[3] != table[0][3]]
    if differ:
        shapes = [tuple(p.shape) for group in opt.param_groups for p in group["params"]]
        listed = ", ".join(map(str, shapes[:6])) + (", ..." if len(shapes) > 6 else "")
        raise ValueError(
            "MFAC must be built over the same parameters on every rank (replicas of one "
            "model with comm=, as under DistributedDataParallel; shards of one model for "
            "DTensor parameters): the same shapes and dtypes, group by group, in the same "
            f"order; rank(s) {differ} differ from rank 0 (rank by rank, the number of "
            f"parameters and of their coordinates: {params}; rank {comm.rank}'s shapes: "
            f"{listed}): their window columns and steps would be other coordinates on "
            "other ranks, and the ranks would diverge"
        )
    differ = [k for k, r in enumerate(table) if r[2:] != table[0][2:]]
    if differ:
        kept = [int(r[2]) for r in table]
        raise ValueError(
            "MFAC must be built with the same masks on every rank (the same parameters "
            f"masked, by equal masks): rank(s) {differ} differ from rank 0 (rank by rank, "
            f"the coordinates kept: {kept}): their window columns and steps would be other "
            "coordinates on other ranks (or, for a mask that keeps every coordinate beside "
            "none, the same ones moved by operations that round otherwise), and the "
            "replicas would diverge; pass every rank the same masks"
        )


def first_tensor(given: Sequence[Any]) -> torch.Tensor | None:
    """The first parameter of the given ``params`` (or of their first group), if a tensor.

    ``given`` is empty where the ``params`` could not be listed.
    """
    found = given[0] if given else None
    if isinstance(found, Mapping):
        found = found.get("params")
        if isinstance(found, Sequence) and found:
            found = found[0]
    if isinstance(found, tuple) and len(found) == 2 and isinstance(found[0], str):
        found = found[1]  # named_parameters()' (name, parameter), as torch.optim takes
    return found if isinstance(found, torch.Tensor) else None


def reduction_device(opt: Any, given: Sequence[Any]) -> torch.device:
    """The device of :func:`agreed_construction`'s reduction on this rank: the parameters'.

    A rank whose checks failed before the layout set ``opt.device`` takes the first
    parameter's it was given, else one that its process group reduces on (NCCL alone:
    the current CUDA device).
    """
    device = opt.__dict__.get("device")
    if isinstance(device, torch.device):
        return device
    found = first_tensor(given)
    if found is not None and not found.is_meta:
        return found.device
    comm = opt._comm
    if isinstance(comm, TorchComm):
        import torch.distributed as dist

        if str(dist.get_backend(comm.group)) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mesh_comm(p: torch.Tensor | None) -> TorchComm | None:
    """The group of ``p``'s 1-D device mesh, where ``p`` is such a DTensor, else None.

    Found from the first parameter before the construction's checks, so that they
    raise on every rank alike (:func:`check_dtensors` checks the others, and sets the
    same group where this found none).
    """
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(p, dtensor) or p.device_mesh.ndim != 1:
        return None
    return TorchComm(p.device_mesh.get_group())


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
    # Built after the construction's first reduction (agreed_construction), which
    # compared the ranks' checks, errors and layouts; the window compares its own options.
    return ShardedDynamicIHVP(num_grads, width, comm=opt._comm, options=checked, **options)


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
