"""The reductions of :class:`~mfac_core.ShardedDynamicIHVP` over the d coordinates.

Every contraction over d of a column-sharded window is this rank's part summed
over the ranks; the helpers here make each such sum one checked reduction
(``reduce_checked``) with a status word and a tag of the operation and the
operator's replicated state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _engine, _pieces
from ._compat import SHARDED_SUMS, Array, array_namespace, refuse_derivatives, stored
from ._compat import device as device_of
from ._dynamic_setup import default_namespace
from ._finite import check_finite
from ._layout import BlockGroup, pieces
from ._sharding import ShardLayout, dask_refusal, host_values, identity_draw, reduce_checked
from ._validation import check_count, namespace_of
from .distributed import Communicator

#: Entries of the row each rank contributes when a sharded operator is built: its width,
#: then the settings that must agree on every rank (see :func:`settings`), then its
#: identity draw (rank 0's names the operator in its tags, :func:`tag`).
NUM_SETTINGS = 10

# The operations of the sharded reductions (``reduce_checked``). Their tag is the
# operation and the operator's whole count of state edits (:func:`tag`), so
# that ranks calling different operations with reductions of one length, or whose
# replicated states diverged (``reset`` on some ranks only, any number of times),
# raise instead of mixing their sums.
OP_UPDATE, OP_PRODUCT, OP_REMOVE, OP_SET_DAMP = 1, 2, 3, 4
OP_LOAD, OP_FROM_WINDOW, OP_INIT, OP_COLUMNS, OP_CHECK_STATE = 5, 6, 7, 8, 9

#: The operations that the window's methods name (``DynamicIHVP._reduced``), by code.
OPERATIONS = {
    "update": OP_UPDATE,
    "product": OP_PRODUCT,
    "remove": OP_REMOVE,
    "set_damp": OP_SET_DAMP,
    "load_state_dict": OP_LOAD,
    # Its own code: one rank's check beside the others' load raises on every rank.
    "check_state_dict": OP_CHECK_STATE,
}

#: The class's name in the messages of its collective checks.
OWNER = "ShardedDynamicIHVP"


def reduction_space(xp: Any, device: Any) -> tuple[Any, Any]:
    """The namespace and device of a set-up reduction, NumPy's when ``xp`` is unusable.

    A rank whose ``xp`` is wrong must still join the reduction that reports it.
    """
    try:
        return (default_namespace() if xp is None else array_namespace(xp.empty(0))), device
    except (AttributeError, TypeError):
        return default_namespace(), None


def rows(total: Array, size: int) -> list[tuple[float, ...]]:
    """A reduced rank-by-rank table (each rank filled its own row) as host tuples."""
    values = host_values(total)
    width = len(values) // size
    return [tuple(values[r * width : (r + 1) * width]) for r in range(size)]


def agreed_rows(comm: Communicator, G: Array, num_grads: int | None, check: bool) -> int | None:
    """``from_window``'s first reduction: G checked on every rank, one k for all.

    Returns ``num_grads`` (None stays None). Every rank raises if a rank's G is
    malformed or not finite (``check``: unless ``check_finite`` is False), or if
    the ranks hold different numbers of gradients.
    """
    try:
        found = array_namespace(G), device_of(G)
    except TypeError:
        found = default_namespace(), None
    space_xp, space_device, refusal = dask_refusal(*found, OWNER)

    def local() -> Array:
        if refusal is not None:
            raise refusal
        xp = namespace_of(G, "G")
        refuse_derivatives(G, "G", SHARDED_SUMS, tangent_only=True)
        stored(G, "G")  # refused under torch.func.grad here, on every rank
        if G.ndim != 2:
            raise ValueError(f"G must be 2-D (k, d), got shape {tuple(G.shape)}")
        k = int(G.shape[0])
        if num_grads is not None and k > check_count(num_grads, "num_grads"):
            raise ValueError(f"G holds {k} gradients, more than num_grads={num_grads}")
        if check:
            check_finite(xp, G, "G", shard=(1, None))  # its start: from this reduction
        flat = [0.0] * comm.size
        flat[comm.rank] = float(k)
        return xp.asarray(flat, dtype=xp.float64, device=device_of(G))

    total = reduce_checked(
        comm,
        space_xp,
        local,
        length=comm.size,
        dtype=space_xp.float64,
        device=space_device,
        what=f"{OWNER}.from_window",
        tag=("DynamicIHVP", OP_FROM_WINDOW),
    )
    ks = [int(v) for v in host_values(total)]
    if len(set(ks)) != 1:
        raise ValueError(
            f"{OWNER}.from_window: the ranks hold the columns of different "
            f"numbers of gradients, rank by rank {ks}"
        )
    return num_grads


def settings(op: Any) -> list[float]:
    """This rank's width and the settings every rank must share, as numbers."""
    return [
        float(op.dim),
        float(op.num_grads),
        op.damp,
        # The compute dtype's bits and the storage: float16 and bfloat16 windows
        # both compute in float32 and must not pass for each other.
        float(op._xp.finfo(op.dtype).bits)
        + 1000.0 * (None, "float16", "bfloat16").index(op.storage_dtype),
        float(op.zero_init),
        float(op.update_method == "incremental"),
        float(op.refactor_every),
        float(op.refine),
        float(op.check_finite),
        float(identity_draw()),
    ]


def one_hot(op: Any, comm: Communicator, values: list[float]) -> Array:
    """A ``size x len(values)`` table, flattened, holding ``values`` in this rank's row.

    Summed over ranks it tells every rank every rank's values exactly (each entry
    is one rank's value plus zeros).
    """
    flat = [0.0] * (comm.size * len(values))
    flat[comm.rank * len(values) : (comm.rank + 1) * len(values)] = values
    return op._xp.asarray(flat, dtype=op._xp.float64, device=op.device)


def agreed_layout(
    comm: Communicator, xp: Any, device: Any, build: Callable[[], Any]
) -> tuple[ShardLayout, int]:
    """The constructor's reduction: ``build()`` on every rank, then its settings compared.

    ``build()`` builds this rank's operator (it may raise) and returns it. Every
    rank raises if one rank's build failed or if the ranks' settings differ;
    otherwise returns the layout of every rank's width and the operator's
    identity (rank 0's draw, the same on every rank).
    """
    row: list[float] = []
    space_xp, space_device, refusal = dask_refusal(*reduction_space(xp, device), OWNER)

    def local() -> Array:
        if refusal is not None:
            raise refusal
        op = build()
        row.extend(settings(op))
        return one_hot(op, comm, row)

    total = reduce_checked(
        comm,
        space_xp,
        local,
        length=comm.size * NUM_SETTINGS,
        dtype=space_xp.float64,
        device=space_device,
        what=OWNER,
        tag=("DynamicIHVP", OP_INIT),
    )
    table = rows(total, comm.size)
    if any(r[3] != table[0][3] for r in table):
        raise TypeError(
            f"{OWNER} must be built with the same dtype on every rank; "
            f"rank by rank (bits of the compute dtype + 1000 x storage code, 1: float16, "
            f"2: bfloat16): {[r[3] for r in table]}"
        )
    last = NUM_SETTINGS - 1  # the identity draws differ
    if any(r[1:last] != table[0][1:last] for r in table):
        raise ValueError(
            f"{OWNER} must be built with the same num_grads, damp, dtype, "
            "zero_init, update_method, refactor_every, refine and check_finite on every "
            f"rank; rank by rank: {[r[1:last] for r in table]}"
        )
    if sum(int(r[0]) for r in table) == 0:
        raise ValueError(f"{OWNER}: every rank holds 0 columns (dim=0)")
    return ShardLayout(comm.rank, tuple(int(r[0]) for r in table)), int(table[0][last])


def tag(op: Any, code: int) -> tuple[Any, ...]:
    """The tag of operation ``code`` on this operator's replicated state.

    The whole count of state edits, not a residue that two ``reset`` calls
    on one rank would bring back: ranks whose counts differ raise, whatever
    the sequence of local edits. ``load_state_dict`` replaces the state, so
    its tag is the operation's alone: loading every rank from one checkpoint
    mends diverged states (and restarts the count on every rank); so is that of
    ``check_state_dict``, which may check a state for diverged windows. Every tag
    holds the operator's identity, so that ranks applying two windows in
    different orders raise instead of adding one's sums to the other's.
    """
    if code in (OP_LOAD, OP_CHECK_STATE):
        return ("DynamicIHVP", code, op._identity)
    return ("DynamicIHVP", code, op._identity, op._version)


def reduced(
    op: Any,
    local: Any,
    length: int,
    what: str,
    code: int,
    *,
    agree: Any = None,
    disagree: tuple[type[Exception], str] | None = None,
    agreed_into: list[bool] | None = None,
    state: object = None,
    diverged: Callable[[], str] | None = None,
) -> Any:
    """``local()`` (1-D float64) summed over the ranks with a status word.

    Every rank raises if ``local()`` raised on any rank, if the ranks called
    different operations (``code``) or hold diverged states, or if ``agree()``
    differs between ranks and ``agreed_into`` is not given; where it is, whether
    ``agree()`` agreed is appended to it (``reduce_checked``). ``state``, where not
    None, is the caller's replicated state, compared in the tag with the window's;
    ``diverged()`` is then the message where the tags differ.
    """
    xp = op._xp
    return reduce_checked(
        op.comm,
        xp,
        local,
        length=length,
        dtype=xp.float64,
        device=op.device,
        what=what,
        tag=tag(op, code) if state is None else (*tag(op, code), state),
        agree=agree,
        disagree=disagree,
        agreed_into=agreed_into,
        diverged=diverged,
    )


def summed(op: Any, x: Array) -> Array:
    """``x`` (float64, computed from this rank's columns) summed over the ranks."""
    xp = op._xp
    total = op.comm.allreduce_sum(xp.reshape(x, (-1,)))
    return xp.reshape(total, x.shape)


def agreed(op: Any, what: str, code: int, local: Any) -> None:
    """Check collectively that ``local()`` (one number; it may raise) agrees on every rank.

    For arguments that must be the same on every rank of a sharded operator (a
    slot, a damping), whose replicated state would otherwise diverge silently:
    one reduction of ``size`` numbers.
    """
    comm = op.comm
    total = reduced(op, lambda: one_hot(op, comm, [float(local())]), comm.size, what, code)
    values = host_values(total)
    if any(v != values[0] for v in values):
        raise ValueError(
            f"{what} must be called with the same argument on every rank of a sharded "
            f"operator; rank by rank: {values}"
        )


def pieces_of(op: Any) -> list[Any]:
    """The column pieces of the buffer for its float64 passes (the engine's rule: 32 MiB
    each at most on the host, one device piece on an accelerator)."""
    if not op.dim:  # a shard without columns
        return []
    whole = BlockGroup(0, 1, op.dim)
    width = _pieces.piece_width(op._xp, op._G, op.num_grads, host=_pieces.LARGE_PIECE_ENTRIES)
    return list(pieces(whole, width))


def sharded_residual(op: Any, X: Array, Y: Array, scale: float) -> Array | None:
    """This rank's rows of ``X - F Y`` in float64, with ``G Y`` summed over the ranks.

    As ``fisher_residual`` (one block, bounded float64 column pieces), with the one
    reduction of the m x k product that the sum over d needs. None on every rank
    where the reduced ``G Y`` is not finite (``_refine.refine``, collective).
    """
    xp = op._xp
    spans = [(c0, c1) for _, _, c0, c1 in pieces_of(op)]
    P = xp.zeros((op.num_grads, Y.shape[1]), dtype=xp.float64, device=op.device)
    for c0, c1 in spans:
        P = P + xp.astype(op._G[:, c0:c1], xp.float64) @ Y[c0:c1, ...]
    P = summed(op, P)
    if not bool(xp.all(xp.isfinite(P))):
        return None
    X64 = xp.astype(X, xp.float64)
    parts = [
        X64[c0:c1, ...]
        - op.damp * Y[c0:c1, ...]
        - scale * (xp.matrix_transpose(xp.astype(op._G[:, c0:c1], xp.float64)) @ P)
        for c0, c1 in spans
    ]
    if not parts:
        return xp.zeros(X.shape, dtype=xp.float64, device=op.device)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


# -- the sharded products: the input is checked inside the reduction ---------------


def collective_product(
    op: Any, X: Array, name: str, ndims: tuple[int, ...], k: int | None
) -> Array:
    """``F^{-1} X`` of a sharded operator: one reduction of ``m k`` numbers + status.

    ``X`` is checked inside the reduction, so that every rank raises if one
    rank's part is bad. ``k``, the number of columns, is 1 for ``matvec``; None
    for ``matmat``, whose ``X`` is checked, and its k compared between the
    ranks, in a reduction of the status word alone first.
    """
    xp, n = op._xp, op.shape[1]
    checked: list[Array] = []

    def check() -> Array:
        Xc = op._check_input(X, name, n, ndims, several="matmat" if name == "x" else "")
        refuse_derivatives(Xc, name, SHARDED_SUMS)
        X2 = Xc[:, None] if Xc.ndim == 1 else Xc
        if k is not None and X2.shape[1] != k:
            raise ValueError(f"X must have {k} columns on every rank, got {X2.shape[1]}")
        checked.append(X2)
        return xp.zeros((0,), dtype=xp.float64, device=op.device)

    what = f"{OWNER}.matvec" if name == "x" else f"{OWNER}.matmat"
    if k is None:
        # The payload's length m k must be the same on every rank: ranks whose k differ
        # would reduce arrays of different lengths, which an engine cannot report (gloo
        # aborts the process, the other ranks wait). So X is checked and k compared in
        # a reduction of the status word alone first.
        reduced(
            op,
            check,
            0,
            what,
            OP_COLUMNS,
            agree=lambda: int(checked[0].shape[1]),
            disagree=(
                ValueError,
                f"{what} is collective: every rank must pass X with the same number of "
                "columns k (the length of the reduction is m k), but they differ between ranks",
            ),
        )
        k = int(checked[0].shape[1])

    def local() -> Array:
        if not checked:
            check()
        return xp.reshape(_engine.project(xp, op._G, checked[0], constant_G=False), (-1,))

    P = reduced(op, local, op.num_grads * k, what, OP_PRODUCT)
    X2 = checked[0]
    return op._refined(X2, op._finish(X2, xp.reshape(P, (op.num_grads, k))))
