"""The state and collectives of :class:`~mfac_core.ShardedStaticIHVP` (column-sharded, SPMD).

Each rank holds a contiguous range of the d columns of G (ranks in rank order)
and the same range of every vector. docs/scaling.rst states the design; in short:

- **replicated**: m, the damping, the layout, and every m x m quantity: the
  Gram matrix is summed over ranks (one reduction), and every rank factorises
  the same reduced bits into the same float64 factor;
- **sharded**: G (kept by reference, as the single-process G-form keeps it) and
  the dense block factors, each rank's columns only; no ``W`` is stored;
- **full operator** (one block across the shards): a product reduces the m x k
  float64 projection ``G X`` (one reduction), then combines locally, both passes
  summed in float64 by the pass engine (``_engine``); ``entries`` reduces the G
  columns of the pairs (one) and whitens them in float64; ``diagonal`` whitens
  this rank's columns, locally;
- **block-wise** (``block_size``): shard boundaries fall on block boundaries,
  so each rank's blocks are whole and its products are local (no reduction).

Errors are collective: every check of a rank's inputs runs inside the reduction
that is due anyway (``_sharding.reduce_checked``), and every decision about m x m
data is taken from reduced values, so all ranks raise, or none does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _capacitance, _engine, _pieces, _setup
from ._compat import SHARDED_SUMS, Array, array_namespace, device, refuse_derivatives
from ._dtypes import half_dtype_name
from ._errors import FactorizationError
from ._finite import check_finite, entry_name, first_non_finite
from ._gform import GFormFactor, whitened_pairs
from ._gram import rows_gram
from ._layout import BlockGroup, block_groups, chunk_gram, chunks
from ._refine import fisher_residual
from ._refine import refine as refine_steps
from ._sharding import ShardLayout, dask_refusal, host_values, identity_draw, reduce_checked
from ._validation import (
    check_count,
    check_damp,
    check_flag,
    check_floating,
    check_index_array,
    check_operand,
)
from .distributed import Communicator

__all__ = ["ShardedStatic", "build"]

# The tags of the reductions (``reduce_checked``): one per operation, so that ranks
# calling different operations whose reductions have one length (a product and the
# set-up, say) raise instead of mixing their sums. After the first reduction each tag
# also holds the operator's identity (``Agreed.identity``), so that ranks applying two
# operators in different orders raise too. The operator's replicated state is fixed
# once built, so the tags need no count of edits.
_TAG_AGREE = ("StaticIHVP", "set-up options")
_TAG_GRAM = ("StaticIHVP", "set-up Gram")
_TAG_BUILD = ("StaticIHVP", "set-up factor")
_TAG_PRODUCT = ("StaticIHVP", "product")
_TAG_COLUMNS = ("StaticIHVP", "matmat columns")
_TAG_INDICES = ("StaticIHVP", "entries indices")
_TAG_ENTRIES = ("StaticIHVP", "entries")

#: Per-rank fields of the set-up's first reduction, in this order (rank 0's identity
#: draw names the operator).
_FIELDS = ("m", "width", "dtype", "damp", "block_size", "refine", "check_finite", "identity")
_DTYPE_CODES = {"float32": 1, "float64": 2}
#: Per-rank fields of the set-up's last reduction.
_DONE_FIELDS = ("kappa_lo", "kappa_hi", "failed", "woodbury_lo", "dense_lo")


def _gathered(total: Array, size: int, k: int) -> list[list[float]]:
    values = host_values(total)
    return [values[r * k : (r + 1) * k] for r in range(size)]


def _own_row(xp: Any, dev: Any, comm: Communicator, row: list[float]) -> Array:
    flat = [0.0] * (comm.size * len(row))
    flat[comm.rank * len(row) : (comm.rank + 1) * len(row)] = row
    return xp.asarray(flat, dtype=xp.float64, device=dev)


def _same_everywhere(rows: list[list[float]], field: int, name: str, kind: type[Exception]) -> None:
    values = [row[field] for row in rows]
    if len(set(values)) > 1:
        # Every digit: dampings that differ past the sixth must not print alike.
        shown = ", ".join(str(int(v)) if v.is_integer() else repr(v) for v in values)
        raise kind(
            f"{name} must be the same on every rank; got ({shown}) on ranks 0..{len(rows) - 1}"
        )


def aligned_widths(dim: int, block_size: int, size: int) -> tuple[int, ...]:
    """Shard widths whose boundaries fall on block boundaries, blocks spread evenly."""
    blocks = -(-dim // block_size)
    per, extra = divmod(blocks, size)
    bounds = [0]
    for r in range(size):
        bounds.append(min(dim, bounds[-1] + (per + (r < extra)) * block_size))
    return tuple(b - a for a, b in itertools.pairwise(bounds))


@dataclass(frozen=True)
class Agreed:
    """What the first reduction of the set-up settles: the same on every rank."""

    layout: ShardLayout
    num_grads: int
    damp: float
    block_size: int
    refine: int
    check_finite: bool
    #: Rank 0's draw, the same on every rank (``_sharding.identity_draw``); 0 in an
    #: operator pickled before it existed.
    identity: int = 0

    def tag(self, operation: tuple[str, str]) -> tuple[object, ...]:
        """The tag of ``operation`` on this operator."""
        return (*operation, self.identity)

    @property
    def full(self) -> bool:
        """One block across all shards: products need a reduction."""
        return self.block_size >= self.layout.dim


def agree(
    comm: Communicator,
    xp: Any,
    dev: Any,
    G: Array,
    *,
    damp: Any,
    block_size: Any,
    refine: Any,
    check_finite: Any,
    overwrite_G: Any,
    progress: Any,
    refusal: Exception | None = None,
) -> Agreed:
    """Check this rank's arguments, exchange them and check that the ranks agree (one reduction).

    ``refusal``: this rank's G_local is no array (``xp`` is None); the reduction runs
    in NumPy and every rank raises.
    """
    size = comm.size
    if refusal is not None:
        xp, dev = array_namespace(np.empty(0)), None
    xp, dev, dask_error = dask_refusal(xp, dev, "ShardedStaticIHVP")
    refusal = refusal or dask_error

    def local() -> Array:
        if refusal is not None:
            raise refusal
        if G.ndim != 2 or G.shape[0] == 0:
            raise ValueError(
                "G_local must be a 2-D array of shape (m, d_local) with m >= 1: this rank's "
                f"columns of the m gradients; got shape {tuple(G.shape)}"
            )
        if half_dtype_name(xp, G.dtype) is not None:
            raise TypeError(
                f"{half_dtype_name(xp, G.dtype)} gradients are not supported with comm= "
                "(2-byte storage is single-process only); cast G_local to float32"
            )
        check_floating(xp, G, "G_local")
        # overwrite_G is a deprecated no-op (no W is written), still checked as a flag.
        flags = [check_flag(check_finite, "check_finite"), check_flag(overwrite_G, "overwrite_G")]
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")
        steps = check_count(refine, "refine", minimum=0)
        bs = 0 if block_size is None else check_count(block_size, "block_size")
        code = _DTYPE_CODES["float32" if G.dtype == xp.float32 else "float64"]
        checked = check_damp(damp, num_grads=int(G.shape[0]))
        row = [G.shape[0], G.shape[1], code, checked, bs, steps, float(flags[0])]
        row.append(identity_draw())
        return _own_row(xp, dev, comm, [float(v) for v in row])

    k = len(_FIELDS)
    total = reduce_checked(
        comm,
        xp,
        local,
        length=size * k,
        dtype=xp.float64,
        device=dev,
        what="the set-up",
        tag=_TAG_AGREE,
    )
    rows = _gathered(total, size, k)
    _same_everywhere(rows, 0, "the number of gradients m (rows of G_local)", ValueError)
    _same_everywhere(rows, 2, "G_local's dtype (1: float32, 2: float64)", TypeError)
    _same_everywhere(rows, 3, "damp", ValueError)
    _same_everywhere(rows, 4, "block_size (0: None)", ValueError)
    _same_everywhere(rows, 5, "refine", ValueError)
    _same_everywhere(rows, 6, "check_finite", ValueError)
    layout = ShardLayout(comm.rank, tuple(int(row[1]) for row in rows))
    if layout.dim == 0:
        raise ValueError("every rank's G_local has 0 columns: the gradients have no coordinate")
    first = rows[0]
    bs = int(first[4])
    block = layout.dim if bs == 0 else min(bs, layout.dim)
    agreed = Agreed(
        layout, int(first[0]), first[3], block, int(first[5]), bool(first[6]), int(first[7])
    )
    if not agreed.full:
        bounds = [sum(layout.widths[: r + 1]) for r in range(size)]
        cut = [b for b in bounds if b % block and b != layout.dim]
        if cut:
            raise ValueError(
                f"block_size={block} needs shard boundaries on block boundaries (multiples of "
                f"{block}, or d={layout.dim}), so that each rank's blocks are whole; the widths "
                f"{layout.widths} put one at column {cut[0]}. Shard G's columns as, e.g., "
                f"widths {aligned_widths(layout.dim, block, size)}"
            )
    return agreed


# -- the set-up --------------------------------------------------------------------------------


def _non_finite_entry(xp: Any, G: Array, offset: int) -> str | None:
    """``"G_local[2, 7] (global column 17) is inf"``: the shard's first NaN or infinity, or None.

    Row-major, read in pieces (``_finite.first_non_finite``); ``offset`` is the first
    global column of the shard.
    """
    found = first_non_finite(xp, G)
    if found is None:
        return None
    index, value = found
    return entry_name("G_local", index, value, note=f" (global column {offset + index[1]})")


def _non_finite(xp: Any, G: Array, offset: int) -> ValueError:
    entry = _non_finite_entry(xp, G, offset)
    if entry is not None:
        return ValueError(f"G_local must not contain NaN or infinity: {entry}")
    return ValueError(
        "the squared norms of G_local's rows overflow float64: G is finite but too large; "
        "rescale the gradients (the damping scales with them)"
    )


def _local_gram(
    xp: Any,
    G: Array,
    offset: int,
    *,
    check: bool,
    advance: Callable[[int], None] | None,
) -> Array:
    """This rank's part of ``G G^T``, summed in float64, flattened."""
    m, n = G.shape
    if n == 0:
        return xp.zeros((m * m,), dtype=xp.float64, device=device(G))
    group = BlockGroup(0, 1, n)
    # The single-process set-up's rule, for this rank's m x n shard; one block: one chunk.
    (chunk,) = list(chunks(group, _pieces.gram_piece_width(xp, G)))

    def product(X: Array) -> Array:
        return rows_gram(xp, X)

    gram = chunk_gram(xp, G, group, chunk, product, advance, gram=_engine.gram_kernel(xp, G))
    # A NaN or infinity in this rank's columns makes its Gram diagonal non-finite.
    if check and not bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram)))):
        raise _non_finite(xp, G, offset)
    return xp.reshape(gram, (-1,))


def _full_factor(
    comm: Communicator,
    xp: Any,
    G: Array,
    agreed: Agreed,
    *,
    progress: Callable[[int, int], None] | None,
) -> _capacitance.CapacitanceFactor:
    """The capacitance factor from the reduced float64 Gram: bit for bit the same on every rank.

    The set-up is this one pass over G (progress counts its columns): nothing of size
    m x d is written.
    """
    m, n = G.shape
    damp = agreed.damp
    done = [0]

    def advance(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(done[0], n)

    total = reduce_checked(
        comm,
        xp,
        lambda: _local_gram(xp, G, agreed.layout.start, check=agreed.check_finite, advance=advance),
        length=m * m,
        dtype=xp.float64,
        device=device(G),
        what="the set-up's Gram matrix",
        tag=agreed.tag(_TAG_GRAM),
    )
    gram = xp.reshape(total, (1, m, m))
    if agreed.check_finite and not bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram)))):
        # Each rank's part was finite (else it said so): their sum overflowed.
        raise _non_finite(xp, G[:, :0], agreed.layout.start)
    return _capacitance.factorize(xp, gram, shift=m * damp, scale=1.0, damp=damp)


def status_alone(
    comm: Communicator,
    xp: Any,
    dev: Any,
    check: Callable[[], None],
    *,
    what: str,
    tag: Any,
    agree: Callable[[], Any],
    disagree: tuple[type[Exception], str],
) -> None:
    """One reduction of the status word alone: ``check()`` run on every rank (every rank
    raises if it raised on one) and ``agree()`` compared between the ranks.

    For a call whose next reduction's length depends on its input (``matmat``'s k,
    ``entries``' number of pairs): ranks that disagree on it must raise before that
    reduction, which an engine cannot report (gloo aborts the process).
    """

    def local() -> Array:
        check()
        return xp.zeros((0,), dtype=xp.float64, device=dev)

    reduce_checked(
        comm,
        xp,
        local,
        length=0,
        dtype=xp.float64,
        device=dev,
        what=what,
        tag=tag,
        agree=agree,
        disagree=disagree,
    )


def build(
    comm: Communicator,
    xp: Any,
    G: Array,
    *,
    damp: Any,
    block_size: Any,
    overwrite_G: Any,
    check_finite: Any,
    refine: Any,
    progress: Any,
    refusal: Exception | None = None,
) -> ShardedStatic:
    """The sharded set-up (docs/scaling.rst): collective, and the same decisions on every rank.

    ``refusal``: why this rank's G_local is no array (``xp`` is then None); every rank
    raises in the first reduction.
    """
    dev = None if refusal is not None else device(G)
    agreed = agree(
        comm,
        xp,
        dev,
        G,
        damp=damp,
        block_size=block_size,
        refine=refine,
        check_finite=check_finite,
        overwrite_G=overwrite_G,
        progress=progress,
        refusal=refusal,
    )
    n = G.shape[1]
    size = comm.size
    state: dict[str, Any] = {}
    if agreed.full:
        factor = _full_factor(comm, xp, G, agreed, progress=progress)

        def local() -> Array:
            # This rank's columns of the G-form over the replicated factor.
            whole = GFormFactor(BlockGroup(0, 1, n), G, factor, agreed.damp, G.dtype)
            state["factors"] = (whole,)
            lo, hi = factor.kappa if factor.kappa is not None else (1.0, 1.0)
            # One Woodbury factor; judged by the dense rule where d <= m, as StaticIHVP's
            # full operator is then one dense block.
            kinds = [1.0, lo] if agreed.layout.dim <= G.shape[0] else [lo, 1.0]
            return _own_row(xp, dev, comm, [lo, hi, 0.0, *kinds])

        groups: tuple[BlockGroup, ...] = (BlockGroup(0, 1, n),)
    else:
        groups = block_groups(n, agreed.block_size) if n else ()
        start = agreed.layout.start

        def local() -> Array:
            try:
                result = _setup.factorize_gform_groups(
                    xp,
                    G,
                    groups,
                    damp=agreed.damp,
                    dtype=G.dtype,
                    check_finite=agreed.check_finite,
                    progress=progress,
                )
            except FactorizationError as exc:
                # Not raised here: every rank must raise a FactorizationError, not the
                # generic class that reduce_checked would give the others. Unchecked
                # NaN or infinity is named as the check names it: in global columns.
                entry = None if agreed.check_finite else _non_finite_entry(xp, G, start)
                state["error"] = (
                    exc if entry is None else _capacitance.non_finite_gram_error(agreed.damp, entry)
                )
                return _own_row(xp, dev, comm, [1.0, 1.0, 1.0, 1.0, 1.0])
            except ValueError as exc:
                # Name the global columns; another ValueError (progress's) is the caller's.
                if agreed.check_finite and (
                    _non_finite_entry(xp, G, start) is not None
                    or str(exc).startswith("the squared norms of")
                ):
                    raise _non_finite(xp, G, start) from None
                raise
            state["factors"] = result.factors
            row = [result.kappa_lo, result.kappa_hi, 0.0, result.woodbury_lo, result.dense_lo]
            return _own_row(xp, dev, comm, row)

    k = len(_DONE_FIELDS)
    total = reduce_checked(
        comm,
        xp,
        local,
        length=size * k,
        dtype=xp.float64,
        device=dev,
        what="the set-up",
        tag=agreed.tag(_TAG_BUILD),
        # The full operator's factor, computed on every rank: its bits must agree.
        agree=(lambda: factor.U) if agreed.full else None,
        disagree=(
            RuntimeError,
            "the ranks computed different capacitance factors from the same reduced Gram "
            "matrix: every rank must run the same array library build on the same kind of "
            "device (the factor is computed on each rank and must agree bit for bit)",
        ),
    )
    rows = _gathered(total, size, k)
    failed = [r for r, row in enumerate(rows) if row[2]]
    if failed:
        if "error" in state:
            raise state["error"]
        raise FactorizationError(
            f"the damped Fisher of the blocks of rank(s) {failed} is not numerically positive "
            f"definite (damp={agreed.damp:g}); their errors name the condition number. "
            "Increase damp, or remove duplicated or nearly collinear gradients"
        )
    return ShardedStatic(
        agreed=agreed,
        groups=groups,
        factors=state["factors"],
        factor=factor if agreed.full else None,
        G=G,
        kappa_lo=max(row[0] for row in rows),
        kappa_hi=max(row[1] for row in rows),
        woodbury_lo=max(row[3] for row in rows),
        dense_lo=max(row[4] for row in rows),
    )


# -- products and entries ----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedStatic:
    """One rank's state of a column-sharded StaticIHVP, and its collective operations."""

    agreed: Agreed
    groups: tuple[BlockGroup, ...]
    factors: tuple[Any, ...]
    #: The replicated capacitance factor of the full operator (None block-wise).
    factor: _capacitance.CapacitanceFactor | None
    #: G_local, kept by reference: the products read it (the G-form).
    G: Any
    kappa_lo: float
    kappa_hi: float
    #: kappa_lo over the Woodbury and over the dense factors (``_setup.SetupResult``).
    woodbury_lo: float = 1.0
    dense_lo: float = 1.0

    @property
    def layout(self) -> ShardLayout:
        return self.agreed.layout

    @property
    def width(self) -> int:
        return self.layout.widths[self.layout.rank]

    # -- products ----------------------------------------------------------------------

    def _checked(
        self, xp: Any, dev: Any, dtype: Any, x: Any, *, vector: bool, check: bool, owner: object
    ) -> Array:
        """``x`` as a checked ``(width, k)`` array (what LinearOperator checks, for shards)."""
        name = "x" if vector else "X"
        n = self.width
        x = check_operand(xp, dev, dtype, x, name, owner=owner)
        refuse_derivatives(x, name, SHARDED_SUMS)
        if vector:
            if x.ndim not in (1, 2) or x.shape[0] != n or (x.ndim == 2 and x.shape[1] != 1):
                raise ValueError(
                    f"x must be this rank's shard, of shape ({n},) or ({n}, 1); got "
                    f"{tuple(x.shape)} (use matmat for several vectors)"
                )
        elif x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"X must be this rank's rows, of shape ({n}, k); got {tuple(x.shape)}")
        if check:
            check_finite(xp, x, name, shard=(0, self.layout.start))
        return x if x.ndim == 2 else x[:, None]

    def apply(
        self,
        comm: Communicator,
        xp: Any,
        dev: Any,
        dtype: Any,
        x: Any,
        *,
        vector: bool,
        check: bool,
        owner: object,
    ) -> Array:
        """``F^{-1}`` of this rank's shard of ``x``: collective for the full operator."""
        one_d = vector and getattr(x, "ndim", 1) == 1
        if not self.agreed.full:
            # Whole blocks on this rank: nothing to exchange, so an error is local too
            # (no rank waits for it).
            X = self._checked(xp, dev, dtype, x, vector=vector, check=check, owner=owner)
            Y = self._local_solve(xp, X)
            if self.agreed.refine:
                Y = refine_steps(
                    xp,
                    lambda R: self._local_solve(xp, R),
                    lambda X, Y: self._local_residual(xp, X, Y),
                    X,
                    Y,
                    self.agreed.refine,
                )
            return Y[:, 0] if one_d else Y
        m = self.agreed.num_grads
        G = self.G
        held: dict[str, Array] = {}
        if vector:
            k = 1
        else:
            # The payload's length m k must be the same on every rank: ranks whose k
            # differ would reduce arrays of different lengths, which an engine cannot
            # report (gloo aborts the process, the other ranks wait). So X is checked
            # and k compared in a reduction of the status word alone first.
            self._columns(comm, xp, dev, dtype, x, check=check, owner=owner, held=held)
            k = int(held["X"].shape[1])

        def local() -> Array:
            if "X" not in held:
                held["X"] = self._checked(
                    xp, dev, dtype, x, vector=vector, check=check, owner=owner
                )
            return xp.reshape(_engine.project(xp, G, held["X"]), (-1,))

        # The projection G X summed in float64 on each rank, then over the ranks.
        P = reduce_checked(
            comm,
            xp,
            local,
            length=m * k,
            dtype=xp.float64,
            device=dev,
            what="the product",
            tag=self.agreed.tag(_TAG_PRODUCT),
        )
        X = held["X"]
        Y = self._finish(xp, X, xp.reshape(P, (m, k)), dtype)
        if self.agreed.refine:

            def solve(R: Array) -> Array:
                P = comm.allreduce_sum(xp.reshape(_engine.project(xp, G, R), (-1,)))
                return self._finish(xp, R, xp.reshape(P, (m, R.shape[1])), R.dtype)

            Y = refine_steps(
                xp,
                solve,
                lambda X, Y: self._full_residual(comm, xp, X, Y),
                X,
                Y,
                self.agreed.refine,
                collective=True,
            )
        return Y[:, 0] if one_d else Y

    def _columns(
        self,
        comm: Communicator,
        xp: Any,
        dev: Any,
        dtype: Any,
        X: Any,
        *,
        check: bool,
        owner: object,
        held: dict[str, Array],
    ) -> None:
        """Check this rank's ``X`` of a full ``matmat`` and that every rank's k is the same.

        One reduction of the status word alone; the checked ``X`` goes to ``held``.
        """

        def local() -> None:
            held["X"] = self._checked(xp, dev, dtype, X, vector=False, check=check, owner=owner)

        status_alone(
            comm,
            xp,
            dev,
            local,
            what="matmat",
            tag=self.agreed.tag(_TAG_COLUMNS),
            agree=lambda: int(held["X"].shape[1]),
            disagree=(
                ValueError,
                "matmat is collective: every rank must pass X with the same number of "
                "columns k (the length of the reduction is m k), but they differ between ranks",
            ),
        )

    def _finish(self, xp: Any, X: Array, P: Array, dtype: Any) -> Array:
        """``(X - G^T C^{-1} P) / damp`` from the reduced ``P = G X``, summed in float64."""
        assert self.factor is not None  # the full operator's
        A = self.factor.solve(P[None, ...])[0, ...]
        return _engine.combine(xp, self.G, X, A, alpha=1.0 / self.agreed.damp, dtype=dtype)

    def _local_solve(self, xp: Any, X: Array) -> Array:
        if not self.factors:
            return X[:0, ...]
        parts = [f.apply(X[f.group.start : f.group.end, ...]) for f in self.factors]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    def _local_residual(self, xp: Any, X: Array, Y: Array) -> Array:
        if not self.groups:
            return xp.astype(X, xp.float64)
        return fisher_residual(
            xp,
            self.G,
            self.groups,
            X,
            Y,
            damp=self.agreed.damp,
            scale=1.0 / self.agreed.num_grads,
        )

    def _full_residual(self, comm: Communicator, xp: Any, X: Array, Y: Array) -> Array | None:
        """``X - F Y`` in float64: ``G Y`` summed over ranks (one reduction), then local.

        None on every rank where the reduced ``G Y`` is not finite: some rank's
        shard of Y overflowed (``_refine.refine``, collective).
        """
        G = self.G
        m, n = G.shape
        k = Y.shape[1]
        width = _pieces.gram_piece_width(xp, G)
        P = xp.zeros((m, k), dtype=xp.float64, device=device(Y))
        for lo in range(0, n, width):
            hi = min(lo + width, n)
            P = P + xp.astype(G[:, lo:hi], xp.float64) @ Y[lo:hi, ...]
        P = xp.reshape(comm.allreduce_sum(xp.reshape(P, (-1,))), (m, k))
        if not bool(xp.all(xp.isfinite(P))):
            return None
        X64 = xp.astype(X, xp.float64)
        parts = []
        for lo in range(0, n, width):
            hi = min(lo + width, n)
            Gp = xp.astype(G[:, lo:hi], xp.float64)
            FY = self.agreed.damp * Y[lo:hi, ...] + (xp.matrix_transpose(Gp) @ P) / m
            parts.append(X64[lo:hi, ...] - FY)
        if not parts:
            return X64
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    # -- diagonal and entries ----------------------------------------------------------

    def diagonal(self, xp: Any, dev: Any, dtype: Any) -> Array:
        """This rank's diagonal entries of ``F^{-1}`` (local: no reduction)."""
        if not self.factors or self.width == 0:
            return xp.zeros((0,), dtype=dtype, device=dev)
        parts = [f.diagonal() for f in self.factors]
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def entries(
        self, comm: Communicator, xp: Any, dev: Any, dtype: Any, rows: Any, cols: Any
    ) -> Array:
        """Entries at GLOBAL indices, the same on every rank (two reductions).

        The first carries only the status word: every rank's indices checked,
        and their dtype, shape and values compared exactly between the ranks
        (a digest), so that ranks passing different indices, or a different
        number of them, all raise before the second, whose length is the
        number of pairs, reduces the values.
        """
        agreed, layout = self.agreed, self.layout
        m = agreed.num_grads
        held: dict[str, Any] = {}

        def check() -> None:
            r = check_index_array(rows, "rows", xp=xp, device=dev, bound=layout.dim)
            c = check_index_array(cols, "cols", xp=xp, device=dev, bound=layout.dim)
            if r.shape != c.shape:
                raise ValueError(
                    f"rows and cols must have the same shape, got {tuple(r.shape)} and "
                    f"{tuple(c.shape)}"
                )
            held["shape"] = r.shape
            held["r"], held["c"] = xp.reshape(r, (-1,)), xp.reshape(c, (-1,))

        status_alone(
            comm,
            xp,
            dev,
            check,
            what="entries",
            tag=agreed.tag(_TAG_INDICES),
            agree=lambda: (rows, cols),
            disagree=(
                ValueError,
                "entries takes GLOBAL indices and is collective: every rank must pass the "
                "same rows and cols (dtype, shape and values), but they differ between ranks",
            ),
        )
        r, c = held["r"], held["c"]
        k = int(r.shape[0])
        per_pair = 2 * m if agreed.full else 1

        def local() -> Array:
            # The G columns of the pairs in float64 (exact), or the entries of the
            # block-wise form in the operator's dtype (exact in float64 too).
            if agreed.full:
                return xp.concat([xp.reshape(self._owned_columns(xp, i), (-1,)) for i in (r, c)])
            return xp.astype(self._local_entries(xp, r, c, dtype), xp.float64)

        total = reduce_checked(
            comm,
            xp,
            local,
            length=per_pair * k,
            dtype=xp.float64,
            device=dev,
            what="entries",
            tag=agreed.tag(_TAG_ENTRIES),
        )
        if agreed.full:
            # Whitened in float64: (delta_rc - w_r . w_c) / damp with w = L^{-1} g.
            assert self.factor is not None
            Linv = self.factor.lower_inverse()[0, ...]
            Wr = Linv @ xp.reshape(total[: m * k], (m, k))
            Wc = Linv @ xp.reshape(total[m * k : 2 * m * k], (m, k))
            out = xp.astype(whitened_pairs(xp, Wr, Wc, r, c, agreed.damp), dtype)
        else:
            out = xp.astype(total[:k], dtype)
        return xp.reshape(out, held["shape"])

    def _owned_columns(self, xp: Any, idx: Array) -> Array:
        """``G[:, idx - start]`` in float64 for the indices this rank holds, zeros elsewhere."""
        G = self.G
        m, n = G.shape
        if n == 0:
            return xp.zeros((m, idx.shape[0]), dtype=xp.float64, device=device(idx))
        start = self.layout.start
        mine = (idx >= start) & (idx < start + n)
        cols = xp.astype(_engine.take_columns(xp, G, xp.clip(idx - start, 0, n - 1)), xp.float64)
        return xp.where(mine[None, :], cols, xp.zeros_like(cols))

    def _local_entries(self, xp: Any, r: Array, c: Array, dtype: Any) -> Array:
        """Entries whose pair lies in one of this rank's blocks; zeros for the others."""
        out = xp.zeros(r.shape, dtype=dtype, device=device(r))
        start, n, B = self.layout.start, self.width, self.agreed.block_size
        mine = (r >= start) & (r < start + n) & (c >= start) & (c < start + n) & (r // B == c // B)
        rl, cl = r - start, c - start
        for group, factor in zip(self.groups, self.factors, strict=True):
            inside = mine & (rl >= group.start) & (rl < group.end)
            rr = xp.clip(rl, group.start, group.end - 1) - group.start
            cc = xp.clip(cl, group.start, group.end - 1) - group.start
            out = xp.where(inside, factor.entries(rr, cc), out)
        return out
