"""The set-up of the static inverse: the float64 Gram of each chunk and its factor.

:func:`factorize_gform_groups` makes one pass over G: for each group of blocks (see
``_layout``) and each chunk of its columns, the chunk's Gram matrices are summed in
float64 (piece by piece, so no float64 copy of G is ever whole: products of float32 or
2-byte values are exact in float64), and factorised in float64 (``_capacitance``).
Groups of blocks no wider than m keep the float64 inverses of their blocks' Cholesky
factors (``_gform.DenseBlockFactors``); wider ones keep the factor stack over G itself
(``_gform.GFormFactor``). Nothing of size m x d is written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _capacitance, _dense_blocks, _engine, _pieces
from ._compat import Array, device, is_writeable_array
from ._gform import DenseBlockFactors, GFormFactor
from ._gram import columns_gram, rows_gram
from ._group_factors import GroupFactor
from ._layout import BlockGroup, Piece, checked_gram, chunk_culprit, chunks

__all__ = ["SetupResult", "factorize_gform_groups"]


@dataclass
class _Tracker:
    """Progress over the set-up's pass over G, and kappa over every factor."""

    callback: Callable[[int, int], None] | None
    total: int
    done: int = 0
    kappa_lo: float = 1.0
    kappa_hi: float = 1.0
    #: kappa_lo over each kind of factor: each kind has its own warning rule.
    woodbury_lo: float = 1.0
    dense_lo: float = 1.0
    #: The most columns the callback was told of: a group redone on the general path
    #: (``_dense_factors``) counts its columns again from where it began, unreported until
    #: it is back there, so that the callback's ``done`` never goes down.
    reported: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.callback is not None and self.done >= self.reported:
            self.reported = self.done
            self.callback(self.done, self.total)

    def add(self, factor: _capacitance.CapacitanceFactor, *, dense: bool) -> None:
        self.add_bounds(factor.kappa if factor.kappa is not None else (1.0, 1.0), dense=dense)

    def add_bounds(self, kappa: tuple[float, float], *, dense: bool) -> None:
        lo, hi = kappa
        self.kappa_lo, self.kappa_hi = max(self.kappa_lo, lo), max(self.kappa_hi, hi)
        if dense:
            self.dense_lo = max(self.dense_lo, lo)
        else:
            self.woodbury_lo = max(self.woodbury_lo, lo)


@dataclass(frozen=True)
class SetupResult:
    """The factors of every group, and bounds of the largest condition number.

    ``woodbury_lo`` and ``dense_lo`` are ``kappa_lo`` over the Woodbury factors (groups
    wider than m) and over the dense blocks' (no wider than m) alone, 1.0 where there are
    none: each kind warns by its own rule (``_capacitance.is_imprecise``).
    """

    factors: tuple[GroupFactor, ...]
    kappa_lo: float
    kappa_hi: float
    woodbury_lo: float = 1.0
    dense_lo: float = 1.0


def _checked_gram(
    xp: Any,
    G: Array,
    group: BlockGroup,
    chunk: list[Piece],
    product: Any,
    track: _Tracker,
    check: bool,
    gram: Callable[[int, int], Any] | None = None,
) -> Any:
    return checked_gram(
        xp, G, group, chunk, product, check=check, progress=track.advance, gram=gram
    )


def _dense_chunk_factors(
    xp: Any, G: Array, group: BlockGroup, *, damp: float, check: bool, track: _Tracker
) -> Iterator[tuple[int, int, Array]]:
    """``(b0, b1, Linv)``: the inverse Cholesky factors of ``F_b``, blocks ``b0:b1`` of a chunk.

    ``F_b = damp I + G_b^T G_b / m`` is only size x size (size <= m): factorised densely,
    from its Gram over whole blocks (at most m columns each: O(m^2) memory per block).
    """
    m = G.shape[0]
    for chunk in chunks(group, max(_pieces.gram_piece_width(xp, G), group.size)):
        gram = _checked_gram(xp, G, group, chunk, lambda X: columns_gram(xp, X), track, check)
        factor = _capacitance.factorize(
            xp,
            gram,
            shift=damp,
            scale=1.0 / m,
            damp=damp,
            locate=chunk_culprit(xp, G, group, chunk),
        )
        Linv = factor.lower_inverse()  # F_b^{-1} = Linv^T Linv; no product of the two
        # factorize's lower bound assumes lambda_min(F_b) = damp, as in the Woodbury form;
        # gradients that span a block make F_b far better conditioned than that.
        # From the Gram scaled by a power of two (its products may overflow where its
        # eigenvalues do not); an overflowing bound is inf, left to the checks of G's
        # squared norms and the factor, not a RuntimeWarning (errstate is local here).
        with np.errstate(over="ignore", invalid="ignore"):
            excess, _ = _capacitance.excess_bounds(xp, gram, shift=1.0, scale=1.0 / m)
            lo = _capacitance.dense_kappa_lower(xp, damp + excess, Linv)
        hi = factor.kappa[1] if factor.kappa is not None else math.inf
        track.add(dataclasses.replace(factor, kappa=(lo, hi)), dense=True)
        yield chunk[0][0], chunk[-1][1], Linv


def _dense_factors(
    xp: Any, G: Array, group: BlockGroup, damp: float, dtype: Any, check: bool, track: _Tracker
) -> DenseBlockFactors:
    """The float64 ``L_b^{-1}`` of each block's ``F_b = L_b L_b^T`` (blocks no wider than m)."""
    s = group.size
    writeable = is_writeable_array(xp.empty((0,), dtype=xp.float64, device=device(G)))
    out = xp.empty((group.count, s, s), dtype=xp.float64, device=device(G)) if writeable else None
    if out is not None and _dense_blocks.serves(xp, G, group):
        before = track.done
        kappa = _dense_blocks.fill_block_inverses(G, group, out, damp=damp, progress=track.advance)
        if kappa is not None:
            track.add_bounds(kappa, dense=True)
            return DenseBlockFactors(group, out, dtype)
        # A non-finite Gram or a failed factor: the general path below raises the error
        # that says which (or, should NumPy's factorisation succeed where LAPACK's did
        # not, gives the factors).
        track.done = before
    parts = []
    for b0, b1, Linv in _dense_chunk_factors(xp, G, group, damp=damp, check=check, track=track):
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

    The set-up is one pass over G: each chunk's Gram matrices summed in float64
    (docs/mathematics.rst, "Exact passes": products of float32 or 2-byte values are
    exact in float64), by the C extension from G in its storage dtype where it serves
    (``_engine.gram_kernel``), else from float64 column pieces; factorised in float64.
    Groups of blocks no wider than m keep the float64 inverses of their Cholesky factors
    (:class:`DenseBlockFactors`), the others the factor stack of their blocks
    (:class:`GFormFactor`), over G itself; results are in ``dtype``.
    """
    m = G.shape[0]
    track = _Tracker(progress, G.shape[1])
    kernel = _engine.gram_kernel(xp, G)

    def product(X: Array) -> Array:
        return rows_gram(xp, X)

    factors: list[GroupFactor] = []
    for group in groups:
        if group.size <= m:
            factors.append(_dense_factors(xp, G, group, damp, dtype, check_finite, track))
            continue
        stacks = []
        kappa_lo = kappa_hi = 1.0
        for chunk in chunks(group, _pieces.gram_piece_width(xp, G)):
            gram = _checked_gram(xp, G, group, chunk, product, track, check_finite, kernel)
            factor = _capacitance.factorize(
                xp,
                gram,
                shift=m * damp,
                scale=1.0,
                damp=damp,
                locate=chunk_culprit(xp, G, group, chunk),
            )
            track.add(factor, dense=False)
            lo, hi = factor.kappa if factor.kappa is not None else (1.0, 1.0)
            kappa_lo, kappa_hi = max(kappa_lo, lo), max(kappa_hi, hi)
            stacks.append(factor.U)
        U = stacks[0] if len(stacks) == 1 else xp.concat(stacks, axis=0)
        whole = _capacitance.CapacitanceFactor(U, m * damp, 1.0, (kappa_lo, kappa_hi))
        factors.append(GFormFactor(group, G, whole, damp, dtype))
    return SetupResult(
        tuple(factors), track.kappa_lo, track.kappa_hi, track.woodbury_lo, track.dense_lo
    )
