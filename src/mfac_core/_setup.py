"""The streaming set-up of the static inverse: Gram, capacitance factor and ``W``, chunk by chunk.

The in-memory operator (the G-form, ``_gform``) needs only the first two:
:func:`factorize_gform_groups` sums each chunk's Gram in float64 and factorises it,
and writes nothing of size m x d. The W-form below (:func:`factorize_groups`) serves
the operators that still store ``W``: ``stream_to``, the column-sharded and the Dask
set-ups.

For each group of blocks (see ``_layout``) and each chunk of its columns the
set-up builds the chunk's Gram matrices in float64 (piece by piece, so no
float64 copy of G is ever whole), factorises them (``_capacitance``), and
either keeps the dense inverses (blocks no wider than m) or writes the chunk's
columns of ``W = U^{-T} G`` into a *sink* chosen once for the whole set-up:

- :class:`WritableSink` over G itself (``overwrite_G``: no second m x d array)
  or over a preallocated array of the library;
- :class:`AssembledSink`, which collects the pieces and joins them at the end,
  for libraries whose arrays cannot be written (JAX).

A chunk is finished, Gram to W, before the next is read, so the float64 work
arrays never exceed a chunk and an in-place W never overwrites columns of G
that are still to be read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _capacitance, _linalg
from ._compat import Array, device, is_writeable_array
from ._errors import FactorizationError
from ._gform import DenseBlockFactors, GFormFactor
from ._group_factors import DenseBlockInverses, GroupFactor, WoodburyFactor
from ._layout import (
    BlockGroup,
    Piece,
    checked_gram,
    chunks,
    mixed_chunk_gram,
    piece_columns,
    piece_stack,
)

__all__ = [
    "AssembledSink",
    "SetupResult",
    "WritableSink",
    "choose_sink",
    "factorize_gform_groups",
    "factorize_groups",
]

#: float64 entries in one column piece of the set-up (32 MiB).
PIECE_ENTRIES = 2**22


class Sink(Protocol):
    """Where the set-up writes ``W = U^{-T} G``, piece by piece."""

    def store(self, columns: tuple[int, int], Linv: Array, X: Array) -> None:
        """Write ``Linv @ X`` (stacks ``(b, m, m)`` and ``(b, m, w)``) to ``columns``."""

    def finish(self) -> Array:
        """The whole ``(m, n)`` array W, once every piece is stored."""


def _stacked_product(xp: Any, Linv: Array, X: Array) -> Any:
    """``Linv @ X`` for stacks, laid out as the ``(m, b * w)`` columns of W."""
    b, m, w = X.shape
    if b == 1:
        return Linv[0, ...] @ X[0, ...]
    return xp.reshape(xp.permute_dims(Linv @ X, (1, 0, 2)), (m, b * w))


@dataclass
class WritableSink:
    """Writes W into ``target`` (G itself, or a preallocated ``(m, n)`` array)."""

    xp: Any
    target: Array

    def store(self, columns: tuple[int, int], Linv: Array, X: Array) -> None:
        lo, hi = columns
        if X.shape[0] == 1:
            # One block: the product goes straight into W, without a temporary.
            _linalg.matmul_into(self.xp, Linv[0, ...], X[0, ...], self.target[:, lo:hi])
        else:
            self.target[:, lo:hi] = _stacked_product(self.xp, Linv, X)

    def finish(self) -> Array:
        return self.target


@dataclass
class AssembledSink:
    """Collects the pieces of W and joins them at the end (for immutable arrays)."""

    xp: Any
    parts: list[Any] = field(default_factory=list)

    def store(self, columns: tuple[int, int], Linv: Array, X: Array) -> None:
        self.parts.append(_stacked_product(self.xp, Linv, X))

    def finish(self) -> Array:
        return self.parts[0] if len(self.parts) == 1 else self.xp.concat(self.parts, axis=1)


def choose_sink(xp: Any, G: Array, n: int, *, overwrite_G: bool, device: Any) -> Sink:
    """The sink for the first ``n`` columns of W (the Woodbury groups' columns)."""
    if overwrite_G:
        return WritableSink(xp, G)
    if is_writeable_array(xp.empty((0,), dtype=G.dtype, device=device)):
        # The library's arrays are mutable (G itself may be read-only).
        return WritableSink(xp, xp.empty((G.shape[0], n), dtype=G.dtype, device=device))
    return AssembledSink(xp)


@dataclass
class _Tracker:
    """Progress over the two passes of the set-up, and kappa over every factor."""

    callback: Callable[[int, int], None] | None
    total: int
    done: int = 0
    kappa_lo: float = 1.0
    kappa_hi: float = 1.0
    #: Chunks whose single-precision Gram failed its check and was recomputed in float64.
    recomputed: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)

    def add(self, factor: _capacitance.CapacitanceFactor) -> None:
        lo, hi = factor.kappa if factor.kappa is not None else (1.0, 1.0)
        self.kappa_lo, self.kappa_hi = max(self.kappa_lo, lo), max(self.kappa_hi, hi)


@dataclass(frozen=True)
class SetupResult:
    """The factors of every group, and bounds of the largest condition number."""

    factors: tuple[GroupFactor, ...]
    kappa_lo: float
    kappa_hi: float
    recomputed: int = 0


def _piece_width(G: Array) -> int:
    # float64 pieces of at most 32 MiB and at most 1/64 of G's entries (1/32 of a
    # float32 G's bytes), so that the set-up's peak memory stays near size(G).
    m, d = G.shape
    return max(1, min(PIECE_ENTRIES, m * d // 64) // m)


def _checked_gram(
    xp: Any,
    G: Array,
    group: BlockGroup,
    chunk: list[Piece],
    product: Any,
    track: _Tracker,
    check: bool,
) -> Any:
    return checked_gram(xp, G, group, chunk, product, check=check, progress=track.advance)


def _dense_chunk_factors(
    xp: Any, G: Array, group: BlockGroup, *, damp: float, check: bool, track: _Tracker
) -> Iterator[tuple[int, int, _capacitance.CapacitanceFactor]]:
    """``(b0, b1, factor)``: the Cholesky factor of ``F_b`` for the blocks ``b0:b1`` of a chunk.

    ``F_b = damp I + G_b^T G_b / m`` is only size x size (size <= m): factorised densely,
    from its Gram over whole blocks (at most m columns each: O(m^2) memory per block).
    """
    m = G.shape[0]
    for chunk in chunks(group, max(_piece_width(G), group.size)):
        gram = _checked_gram(
            xp, G, group, chunk, lambda X: xp.matrix_transpose(X) @ X, track, check
        )
        factor = _capacitance.factorize(xp, gram, shift=damp, scale=1.0 / m, damp=damp)
        track.add(factor)
        yield chunk[0][0], chunk[-1][1], factor


def _dense_inverses(
    xp: Any,
    G: Array,
    group: BlockGroup,
    *,
    damp: float,
    check: bool,
    track: _Tracker,
) -> DenseBlockInverses:
    s = group.size
    dtype = G.dtype
    # The inverses go chunk by chunk into one array of ``dtype`` where the
    # library's arrays can be written: no join of per-chunk parts at the end, which
    # would hold the group's inverses twice.
    writeable = is_writeable_array(xp.empty((0,), dtype=dtype, device=device(G)))
    out = xp.empty((group.count, s, s), dtype=dtype, device=device(G)) if writeable else None
    parts = []
    for b0, b1, factor in _dense_chunk_factors(xp, G, group, damp=damp, check=check, track=track):
        # From the Cholesky factor (LAPACK's potri where the backend has it), in float64,
        # rounded to the storage dtype once.
        parts.append(
            _linalg.cholesky_inverse(
                xp, factor.U, dtype, out=None if out is None else out[b0:b1, ...]
            )
        )
        track.advance((b1 - b0) * s)  # the W-form counts a second pass over the columns
    if out is not None:
        return DenseBlockInverses(group, out)
    return DenseBlockInverses(group, parts[0] if len(parts) == 1 else xp.concat(parts))


def mixed_gram_trusted(xp: Any, factor: _capacitance.CapacitanceFactor, weight: Array) -> bool:
    """Whether a factor of a single-precision Gram keeps the stated accuracy.

    The a-posteriori check of docs/mathematics.rst ("Mixed-precision Gram"):
    ``u * scale * weight[j]`` estimates the rounding error of row ``j`` of the
    Gram matrix (``u`` the unit roundoff of float32), and the ``j``-th pivot
    ``U_jj^2`` (a Schur complement of C) is what that error is amplified
    against. The factor is kept when every ratio is at most
    ``eps(float32) * kappa``: the products then err by at most about what the
    float32 passes over G already do. Otherwise (nearly collinear gradients
    with a small damping) the caller recomputes the Gram in float64.
    """
    u = float(xp.finfo(xp.float32).eps) / 2
    pivots = xp.linalg.diagonal(factor.U) ** 2
    ratio = float(xp.max(weight / pivots)) * u * factor.scale
    kappa_lo = factor.kappa[0] if factor.kappa is not None else 1.0
    return ratio <= 2 * u * kappa_lo


def _woodbury_factor(
    xp: Any,
    G: Array,
    group: BlockGroup,
    chunk: list[Piece],
    *,
    damp: float,
    check: bool,
    track: _Tracker,
) -> _capacitance.CapacitanceFactor:
    """The chunk's capacitance factor, from a single-precision Gram where that is accurate."""
    m = G.shape[0]

    def product(X: Array) -> Array:
        return X @ xp.matrix_transpose(X)

    if G.dtype != xp.float64:
        factor, recomputed = mixed_precision_factor(
            xp,
            lambda: mixed_chunk_gram(xp, G, group, chunk, product, track.advance),
            # This chunk's Gram again, in float64 (progress already counted).
            lambda: _checked_gram(xp, G, group, chunk, product, _Tracker(None, 0), check),
            m=m,
            damp=damp,
        )
        track.recomputed += recomputed
        return factor
    gram = _checked_gram(xp, G, group, chunk, product, track, check)
    return _capacitance.factorize(xp, gram, shift=m * damp, scale=1.0, damp=damp)


def mixed_precision_factor(
    xp: Any,
    single: Callable[[], tuple[Array, Array]],
    double: Callable[[], Array],
    *,
    m: int,
    damp: float,
) -> tuple[_capacitance.CapacitanceFactor, int]:
    """The capacitance factor by the mixed-precision rule (docs/mathematics.rst).

    ``single()`` gives the Gram from float32 products summed in float64 and its
    weights; its factor is kept when :func:`mixed_gram_trusted` says so. Otherwise
    ``double()``, the float64 Gram, is factorised (and words any error). Returns
    the factor and 1 if ``double()`` was needed, else 0. The static set-up, its
    sharded form (from reduced Grams, so every rank decides alike) and the Dask
    set-up share this rule.
    """
    gram, weight = single()
    if bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram)))):
        try:
            factor = _capacitance.factorize(
                xp, gram, shift=m * damp, scale=1.0, damp=damp, gram_dtype="float32"
            )
        except FactorizationError:
            pass  # recomputed in float64 below, which words any error
        else:
            if mixed_gram_trusted(xp, factor, weight):
                return factor, 0
    gram = double()
    return _capacitance.factorize(xp, gram, shift=m * damp, scale=1.0, damp=damp), 1


def _woodbury_columns(
    xp: Any, G: Array, group: BlockGroup, sink: Sink, *, damp: float, check: bool, track: _Tracker
) -> None:
    for chunk in chunks(group, _piece_width(G)):
        factor = _woodbury_factor(xp, G, group, chunk, damp=damp, check=check, track=track)
        track.add(factor)
        Linv = xp.astype(factor.lower_inverse(), G.dtype)
        first = chunk[0][0]  # Linv holds the chunk's blocks only
        for piece in chunk:
            b0, b1, c0, c1 = piece
            sink.store(
                piece_columns(group, piece),
                Linv[b0 - first : b1 - first, ...],
                piece_stack(xp, G, group, piece),
            )
            track.advance((b1 - b0) * (c1 - c0))


def factorize_groups(
    xp: Any,
    G: Array,
    groups: tuple[BlockGroup, ...],
    *,
    damp: float,
    sink: Sink,
    check_finite: bool,
    progress: Callable[[int, int], None] | None,
) -> SetupResult:
    """Factorise every group of blocks of ``F = damp I + G^T G / m``.

    Groups of blocks no wider than m become :class:`DenseBlockInverses`, the
    others :class:`WoodburyFactor` over the columns of W in ``sink`` (which
    must cover the Woodbury groups, the leading columns of the layout).
    """
    m, d = G.shape
    track = _Tracker(progress, 2 * d)
    dense = {g: g.size <= m for g in groups}
    built: dict[BlockGroup, DenseBlockInverses] = {}
    for group in groups:
        if dense[group]:
            built[group] = _dense_inverses(xp, G, group, damp=damp, check=check_finite, track=track)
        else:
            _woodbury_columns(xp, G, group, sink, damp=damp, check=check_finite, track=track)
    W = None if all(dense.values()) else sink.finish()
    factors: list[GroupFactor] = []
    for g in groups:
        factors.append(
            built[g] if W is None or dense[g] else WoodburyFactor(g, W[:, g.start : g.end], damp)
        )
    return SetupResult(tuple(factors), track.kappa_lo, track.kappa_hi, track.recomputed)


def _dense_factors(
    xp: Any, G: Array, group: BlockGroup, damp: float, dtype: Any, check: bool, track: _Tracker
) -> DenseBlockFactors:
    """The float64 ``L_b^{-1}`` of each block's ``F_b = L_b L_b^T`` (blocks no wider than m)."""
    s = group.size
    writeable = is_writeable_array(xp.empty((0,), dtype=xp.float64, device=device(G)))
    out = xp.empty((group.count, s, s), dtype=xp.float64, device=device(G)) if writeable else None
    parts = []
    for b0, b1, factor in _dense_chunk_factors(xp, G, group, damp=damp, check=check, track=track):
        Linv = factor.lower_inverse()  # F_b^{-1} = Linv^T Linv; no product of the two
        if out is None:
            parts.append(Linv)
        else:
            out[b0:b1, ...] = Linv
    if out is None:
        out = parts[0] if len(parts) == 1 else xp.concat(parts)
    return DenseBlockFactors(group, out, dtype)


def factorize_gform_groups(
    xp: Any,
    G: Array,
    groups: tuple[BlockGroup, ...],
    *,
    damp: float,
    dtype: Any,
    check_finite: bool,
    progress: Callable[[int, int], None] | None,
) -> SetupResult:
    """Factorise every group of ``F = damp I + G^T G / m`` for the G-form (``_gform``).

    The set-up is one pass over G: each chunk's Gram matrices summed in float64 from
    float64 column pieces (docs/mathematics.rst, "Exact passes": products of float32
    or 2-byte values are exact in float64), factorised in float64. Groups of blocks
    no wider than m keep the float64 inverses of their Cholesky factors
    (:class:`DenseBlockFactors`),
    the others the factor stack of their blocks (:class:`GFormFactor`), over G itself;
    results are in ``dtype``.
    """
    m = G.shape[0]
    track = _Tracker(progress, G.shape[1])

    def product(X: Array) -> Array:
        return X @ xp.matrix_transpose(X)

    factors: list[GroupFactor] = []
    for group in groups:
        if group.size <= m:
            factors.append(_dense_factors(xp, G, group, damp, dtype, check_finite, track))
            continue
        stacks = []
        kappa_lo = kappa_hi = 1.0
        for chunk in chunks(group, _piece_width(G)):
            gram = _checked_gram(xp, G, group, chunk, product, track, check_finite)
            factor = _capacitance.factorize(xp, gram, shift=m * damp, scale=1.0, damp=damp)
            track.add(factor)
            lo, hi = factor.kappa if factor.kappa is not None else (1.0, 1.0)
            kappa_lo, kappa_hi = max(kappa_lo, lo), max(kappa_hi, hi)
            stacks.append(factor.U)
        U = stacks[0] if len(stacks) == 1 else xp.concat(stacks, axis=0)
        whole = _capacitance.CapacitanceFactor(U, m * damp, 1.0, (kappa_lo, kappa_hi))
        factors.append(GFormFactor(group, G, whole, damp, dtype))
    return SetupResult(tuple(factors), track.kappa_lo, track.kappa_hi, 0)
