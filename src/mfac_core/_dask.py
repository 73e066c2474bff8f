"""The static inverse over Dask arrays chunked along d (docs/dask.rst).

``StaticIHVP(G, ...)`` with a ``dask.array.Array`` G builds :class:`DaskStaticIHVP`
(registered with ``_static`` at package import). G must hold all m rows in every
chunk; its column chunks decide how the work is split. Two layouts:

*one Woodbury block over every chunk* (the full operator, ``d > m``)
    the float64 Gram ``sum_c G_c G_c^T`` is one reduction over the chunks
    (each chunk's part built on its worker as the NumPy set-up builds it,
    mixed precision included), computed and factorised eagerly on the client
    in NumPy float64 (``_capacitance``); ``W = U^{-T} G`` is then one
    triangular product per chunk, *persisted*, so that products read W and
    never G's graph again. A product is the reduction ``C = W X`` (m x k) and
    ``(X - W^T C) / damp`` per chunk.
*independent chunks of whole blocks* (block-wise operators, and ``d <= m``)
    blocks never cross a chunk boundary, so each chunk is a block-diagonal
    operator of its own: its worker runs the NumPy set-up on it (Gram,
    factors, dense inverses or its W) and keeps the result, persisted as one
    object per chunk; products, the diagonal and entries are tasks on those.

Everything dask needs on a worker is a module-level function here, so that
``dask.distributed`` can send it by reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _capacitance, _layout, _setup, _static
from ._compat import Array, array_namespace, is_dask_array
from ._group_factors import GroupFactor, WoodburyFactor
from ._layout import BlockGroup, block_groups
from ._static import StaticIHVP
from ._validation import check_count, check_flag, check_index_array, check_same_space

__all__ = ["DaskStaticIHVP"]

#: The array-api-compat NumPy namespace, in which the workers run the NumPy set-up.
_NP = array_namespace(np.empty(0))


# -- on the workers: NumPy functions of one chunk of G's columns ---------------------------


def _non_finite_error(G: Any, offset: int) -> ValueError | None:
    """The error naming G's first NaN or infinity (columns from ``offset``), or None."""
    bad = ~np.isfinite(G)
    if not bad.any():
        return None
    col = int(np.argmax(bad.any(axis=0)))
    row = int(np.argmax(bad[:, col]))
    return ValueError(
        f"G must not contain NaN or infinity: G[{row}, {col + offset}] is {float(G[row, col])}"
    )


def _chunk_gram(G: Any, *, mixed: bool) -> Any:
    """``[G G^T | weight]`` of one chunk, ``(m, m + 1)`` float64, for the Woodbury Gram.

    As ``_setup`` builds a chunk's Gram: for single precision, float32 products
    over short column pieces added in float64, with the rounding weight of
    ``_setup.mixed_gram_trusted`` in the last column; for float64, float64
    products over pieces of bounded width (weight zero).
    """
    G = np.asarray(G)
    m, w = G.shape
    group = BlockGroup(0, 1, w)

    def product(X: Any) -> Any:
        return X @ _NP.matrix_transpose(X)

    if mixed:
        gram, weight = _layout.mixed_chunk_gram(_NP, G, group, [(0, 1, 0, w)], product)
    else:
        width = max(1, _setup.PIECE_ENTRIES // m)
        gram = _layout.chunk_gram(_NP, G, group, list(_layout.pieces(group, width)), product)
        weight = np.zeros((1, m))
    return np.concatenate([gram[0], weight[0][:, None]], axis=1)


def _woodbury_diagonal(W: Any, *, damp: float) -> Any:
    return WoodburyFactor(BlockGroup(0, 1, W.shape[1]), W, damp).diagonal()


def _woodbury_entries(W: Any, rows: Any, cols: Any, *, damp: float) -> Any:
    return WoodburyFactor(BlockGroup(0, 1, W.shape[1]), W, damp).entries(rows, cols)


@dataclass(frozen=True)
class _ChunkInverse:
    """``F^{-1}`` on one chunk of whole blocks: the NumPy set-up's factors of that chunk.

    Kept on a worker; ``apply``, ``diagonal`` and ``entries`` route the chunk's
    rows to its groups as :class:`~mfac_core.StaticIHVP` does.
    """

    factors: tuple[GroupFactor, ...]
    dtype: Any
    kappa: tuple[float, float]
    recomputed: int

    def summary(self) -> tuple[float, float, int]:
        return (*self.kappa, self.recomputed)

    def _join(self, parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def apply(self, X: Any) -> Any:
        X = np.asarray(X)
        return self._join([f.apply(X[f.group.start : f.group.end, :]) for f in self.factors])

    def diagonal(self) -> Any:
        return self._join([f.diagonal() for f in self.factors])

    def entries(self, rows: Any, cols: Any) -> Any:
        """Entries for chunk-local int64 index pairs that lie in one block each."""
        out = np.zeros(rows.shape, dtype=self.dtype)
        for f in self.factors:
            g = f.group
            inside = (rows >= g.start) & (rows < g.end)
            if inside.any():
                out[inside] = f.entries(rows[inside] - g.start, cols[inside] - g.start)
        return out


def _chunk_inverse(
    G: Any, *, offset: int, damp: float, block_size: int, check_finite: bool
) -> _ChunkInverse:
    """The NumPy set-up of one chunk of whole blocks (its columns start at ``offset``)."""
    G = np.asarray(G)
    m, w = G.shape
    groups = block_groups(w, min(block_size, w))
    wood_end = max((g.end for g in groups if g.size > m), default=0)
    sink = _setup.choose_sink(_NP, G, wood_end, overwrite_G=False, device="cpu")
    try:
        result = _setup.factorize_groups(
            _NP, G, groups, damp=damp, sink=sink, check_finite=check_finite, progress=None
        )
    except ValueError:
        # The set-up names a column of the chunk; say which column of G it is.
        error = _non_finite_error(G, offset) if check_finite else None
        if error is not None:
            raise error from None
        raise
    return _ChunkInverse(
        result.factors, G.dtype, (result.kappa_lo, result.kappa_hi), result.recomputed
    )


def _apply(op: _ChunkInverse, X: Any) -> Any:
    return op.apply(X)


def _diagonal(op: _ChunkInverse) -> Any:
    return op.diagonal()


def _entries(op: _ChunkInverse, rows: Any, cols: Any) -> Any:
    return op.entries(rows, cols)


def _summary(op: _ChunkInverse) -> tuple[float, float, int]:
    return op.summary()


# -- on the client ---------------------------------------------------------------------


def _rechunk_hint(chunks: tuple[int, ...], block_size: int) -> int:
    """A chunk width of whole blocks near G's typical one."""
    typical = max(chunks)
    return block_size * max(1, round(typical / block_size))


class DaskStaticIHVP(StaticIHVP):
    r"""``F^{-1}`` of :class:`~mfac_core.StaticIHVP` for a Dask array G chunked along d.

    Built by ``StaticIHVP(G, ...)`` when G is a ``dask.array.Array`` (so
    ``isinstance(op, StaticIHVP)`` holds); the arguments are those of
    :class:`~mfac_core.StaticIHVP`. Products, ``diagonal()`` and ``entries()``
    return Dask arrays (lazy; call ``.compute()``), chunked along d like G.

    Parameters
    ----------
    G : dask.array.Array, shape (m, d)
        The float32 or float64 gradients, one per row, with **one chunk along m**
        (every chunk holds all m gradients of its columns). With
        ``block_size``, every chunk boundary must fall between blocks (chunks
        of whole blocks; the last block may be ragged).
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        As for :class:`~mfac_core.StaticIHVP`.
    overwrite_G : bool, optional
        Accepted and without effect: Dask arrays are immutable graphs, and W
        is a new persisted array (G is left as it is).
    check_finite : bool, optional
        Check G (from its Gram diagonals, at no extra pass) and each input
        vector for NaN and infinity; the vector check computes
        ``isfinite(x).all()`` at the call.
    refine : int, optional
        Must be 0: iterative refinement is not available for Dask gradients.
    progress : None, optional
        Must be ``None``: Dask's own diagnostics (the ``dask.distributed``
        dashboard, ``dask.diagnostics.ProgressBar``) show the set-up's tasks.
    out, stream_to, comm : None, optional
        Must be ``None``: W stays with Dask's workers, which also move the
        chunks and spread the work (:class:`StaticIHVP`'s options for memmap
        files, GPU streaming and column sharding do not apply).

    Attributes
    ----------
    chunks : tuple of int
        G's column chunks; products accept vectors of any chunking and
        return results with these chunks along d.
    kappa_bound, num_grads, dim, damp, block_size, dtype
        As for :class:`~mfac_core.StaticIHVP`.

    Raises
    ------
    ValueError
        As for :class:`~mfac_core.StaticIHVP`; also for G chunked along m,
        chunks that cut blocks, unknown chunk sizes, ``refine > 0`` and a
        ``progress`` callback. The message says how to rechunk.
    TypeError
        As for :class:`~mfac_core.StaticIHVP`; also for 2-byte G (cast it to
        float32).
    FactorizationError
        If the capacitance matrix cannot be factorised in float64.

    Notes
    -----
    The full operator (``d > m``) has one Woodbury block over all chunks:
    the float64 Gram :math:`G G^\top = \sum_c G_c G_c^\top` is one reduction
    over the chunks, computed at construction and factorised in NumPy on the
    client (:math:`m \times m`); :math:`W = U^{-\top} G` is one product per
    chunk, persisted (:math:`m d` entries across the workers, as the NumPy
    operator keeps them), so that a product reads W, never G's graph again:

    .. math::

        C = W X = \sum_c W_c X_c, \qquad
        Y_c = (X_c - W_c^\top C) / \lambda .

    The set-up reads G twice (Gram, then W): persist G first if its graph is
    expensive. Block-wise operators (and ``d <= m``) are independent per
    chunk: each worker runs the NumPy set-up on its chunk and keeps its
    factors. Precision is that of the NumPy operator of the same dtype.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from mfac_core import StaticIHVP
    >>> G = np.random.default_rng(0).standard_normal((8, 100))
    >>> op = StaticIHVP(da.from_array(G, chunks=(8, 25)), damp=1e-2)
    >>> isinstance(op, StaticIHVP)
    True
    >>> x = np.ones(100)
    >>> y = op.matvec(da.from_array(x, chunks=25))
    >>> bool(np.allclose(y.compute(), StaticIHVP(G, damp=1e-2).matvec(x)))
    True
    """

    def __init__(
        self,
        G: Array,
        /,
        *,
        damp: float,
        block_size: int | None = None,
        overwrite_G: bool = False,
        check_finite: bool = True,
        refine: int = 0,
        progress: Callable[[int, int], None] | None = None,
        out: Array = None,
        stream_to: Any = None,
        comm: Any = None,
    ) -> None:
        if out is not None or stream_to is not None:
            raise ValueError(
                "out= and stream_to= are not available for Dask gradients: W stays "
                "with Dask's workers (persisted), and Dask moves the chunks itself"
            )
        if comm is not None:
            raise ValueError(
                "comm= is not available for Dask gradients: Dask distributes the "
                "chunks of G itself; pass each rank's NumPy shard for comm="
            )
        check_flag(overwrite_G, "overwrite_G")
        check_finite = check_flag(check_finite, "check_finite")
        if check_count(refine, "refine", minimum=0):
            raise ValueError(
                "refine is not available for Dask gradients (its residuals would read G "
                "in float64 for every product); use refine=0"
            )
        if progress is not None:
            raise ValueError(
                "progress is not available for Dask gradients; use Dask's diagnostics "
                "(the dask.distributed dashboard, or dask.diagnostics.ProgressBar)"
            )
        if not is_dask_array(G):
            raise TypeError(f"G must be a dask.array.Array, got {type(G).__name__}")
        if any(math.isnan(s) for s in G.shape):
            raise ValueError(
                f"G has unknown chunk sizes (shape {G.shape}); call G.compute_chunk_sizes() first"
            )
        # float32 and float64 only: Dask's namespace has no 2-byte float dtype.
        self._init_layout(G, damp, block_size, check_finite, check_G=False)
        m, d, B = self.num_grads, self.dim, self.block_size
        if len(G.chunks[0]) != 1:
            raise ValueError(
                f"G is chunked along its {m} rows (row chunks {G.chunks[0]}), but every chunk "
                "must hold all m gradients of its columns: rechunk with G.rechunk({0: -1})"
            )
        if 0 in G.chunks[1] and d > 0:
            # Empty column chunks (from slicing or concatenation) hold no work, and the
            # per-chunk set-up cannot split zero columns: drop them, moving no data.
            G = G.rechunk({1: tuple(c for c in G.chunks[1] if c)})
        self.chunks: tuple[int, ...] = tuple(int(c) for c in G.chunks[1])
        self.refine = 0
        self._G = None
        self._W: Any = None
        self._parts: tuple[Any, ...] = ()
        if B == d and d > m:
            self._init_woodbury(G, check_finite)
            return
        bounds = np.cumsum(self.chunks)[:-1]
        if B == d and len(self.chunks) > 1:
            raise ValueError(
                f"with d <= m (d={d}, m={m}) the full operator is one dense d x d block, "
                "which one chunk must hold: rechunk with G.rechunk({1: -1})"
            )
        if np.any(bounds % B):
            width = _rechunk_hint(self.chunks, B)
            raise ValueError(
                f"G's column chunks {self.chunks} cut blocks of block_size={B}: every "
                f"chunk must hold whole blocks; rechunk with G.rechunk({{1: {width}}})"
            )
        self._init_chunks(G, check_finite)

    def _init_woodbury(self, G: Array, check_finite: bool) -> None:
        import dask
        import dask.array as da

        m, damp = self.num_grads, self.damp
        mixed = G.dtype != np.float64

        def gram(mixed: bool) -> Any:
            parts = [
                da.from_delayed(
                    dask.delayed(_chunk_gram, pure=True)(part, mixed=mixed),
                    shape=(m, m + 1),
                    dtype=np.float64,
                )
                for part in G.to_delayed().ravel()
            ]
            # One reduction: dask sums the chunks' parts in a tree.
            both = np.asarray(da.stack(parts).sum(axis=0).compute())
            gram = both[:, :m]
            if check_finite and not np.all(np.isfinite(np.diagonal(gram))):
                self._raise_non_finite(G)
            return gram, both[:, m]

        self._gram_recomputed = 0
        if mixed:
            factor, self._gram_recomputed = _setup.mixed_precision_factor(
                _NP, lambda: gram(True), lambda: gram(False)[0], m=m, damp=damp
            )
        else:
            factor = _capacitance.factorize(
                _NP, gram(False)[0], shift=m * damp, scale=1.0, damp=damp
            )
        Linv = factor.lower_inverse().astype(G.dtype)
        # One product per chunk (Linv has one chunk); persisted, so that no product
        # evaluates G's graph again.
        self._W = (da.from_array(Linv, chunks=-1) @ G).persist()
        assert factor.kappa is not None  # factorize always bounds kappa
        self.kappa_bound = factor.kappa[1]
        _capacitance.warn_if_hopeless(
            factor.kappa[0],
            damp=damp,
            eps=float(np.finfo(G.dtype).eps),
            dtype=self.dtype,
        )

    def _init_chunks(self, G: Array, check_finite: bool) -> None:
        import dask

        offsets = np.concatenate([[0], np.cumsum(self.chunks)[:-1]])
        parts = [
            dask.delayed(_chunk_inverse, pure=True)(
                part,
                offset=int(lo),
                damp=self.damp,
                block_size=self.block_size,
                check_finite=check_finite,
            )
            for part, lo in zip(G.to_delayed().ravel(), offsets, strict=True)
        ]
        self._parts = dask.persist(*parts)
        summaries = dask.compute(*[dask.delayed(_summary)(p) for p in self._parts])
        self.kappa_bound = max(s[1] for s in summaries)
        self._gram_recomputed = sum(s[2] for s in summaries)
        _capacitance.warn_if_hopeless(
            max(s[0] for s in summaries),
            damp=self.damp,
            eps=float(np.finfo(G.dtype).eps),
            dtype=self.dtype,
        )

    @staticmethod
    def _raise_non_finite(G: Array) -> None:
        """Say where G holds NaN or infinity, or that its squared norms overflow."""
        import dask.array as da

        bad_cols = np.asarray(da.any(~da.isfinite(G), axis=0).compute())
        if bad_cols.any():
            col = int(np.argmax(bad_cols))
            error = _non_finite_error(np.asarray(G[:, col : col + 1].compute()), col)
            assert error is not None
            raise error
        raise ValueError(
            "the squared norms of G's rows or columns overflow float64: G is finite but "
            "too large; rescale the gradients (the damping scales with them)"
        )

    # -- products --------------------------------------------------------------------

    def _matmat(self, X: Array) -> Array:
        import dask
        import dask.array as da

        X = X.rechunk({0: self.chunks, 1: -1})
        if self._W is not None:
            W = self._W
            C = W @ X  # the m x k reduction over the chunks
            return (X - W.T @ C) / self.damp
        k = X.shape[1]
        parts = [
            da.from_delayed(dask.delayed(_apply)(op, x), shape=(n, k), dtype=self.dtype)
            for op, x, n in zip(self._parts, X.to_delayed()[:, 0], self.chunks, strict=True)
        ]
        return da.concatenate(parts, axis=0)

    def _matvec(self, x: Array) -> Array:
        return self._matmat(x[:, None])[:, 0]

    # -- entries ---------------------------------------------------------------------

    def diagonal(self) -> Array:
        """The d diagonal entries of ``F^{-1}``, as a Dask array chunked like G's columns.

        Returns
        -------
        dask.array.Array, shape (d,)
            In the operator's dtype; lazy, O(d m) work over the chunks (the
            sums of squares in float64).
        """
        import dask
        import dask.array as da

        if self._W is not None:
            return self._W.map_blocks(
                _woodbury_diagonal, damp=self.damp, drop_axis=0, dtype=self.dtype
            )
        parts = [
            da.from_delayed(dask.delayed(_diagonal)(op), shape=(n,), dtype=self.dtype)
            for op, n in zip(self._parts, self.chunks, strict=True)
        ]
        return da.concatenate(parts)

    def entries(self, rows: Array, cols: Array, /) -> Array:
        """Selected entries ``[F^{-1}][rows[k], cols[k]]``, O(m) each.

        Parameters
        ----------
        rows, cols : dask.array.Array of int, of the same shape
            Indices in ``[0, d)``. They are computed at the call (to check
            them and to route them to chunks); the entries are not.

        Returns
        -------
        dask.array.Array
            The entries, with the shape of ``rows`` and the operator's dtype
            (one chunk). Entries that couple two different blocks are zero.

        Raises
        ------
        TypeError
            For indices that are not an integer Dask array.
        ValueError
            For indices of different shapes.
        IndexError
            For an index outside ``[0, d)``.
        """
        import dask
        import dask.array as da

        for idx, name in ((rows, "rows"), (cols, "cols")):
            check_same_space(self._xp, self.device, idx, name, owner="the operator")
        if rows.shape != cols.shape:
            raise ValueError(
                f"rows and cols must have the same shape, got {tuple(rows.shape)} and "
                f"{tuple(cols.shape)}"
            )
        shape = rows.shape
        r_np, c_np = dask.compute(rows, cols)
        r = check_index_array(np.asarray(r_np), "rows", xp=_NP, device="cpu", bound=self.dim)
        c = check_index_array(np.asarray(c_np), "cols", xp=_NP, device="cpu", bound=self.dim)
        r, c = r.reshape(-1), c.reshape(-1)
        if self._W is not None:
            # One block: every pair. The columns asked for, in increasing order (one task
            # per chunk of W), as one chunk; then the pairs as the NumPy factor forms them.
            n = r.shape[0]
            cols_u, where = np.unique(np.concatenate([r, c]), return_inverse=True)
            Wu = self._W[:, cols_u].rechunk({1: -1})
            vals = Wu.map_blocks(
                _woodbury_entries,
                where[:n],
                where[n:],
                damp=self.damp,
                drop_axis=0,
                chunks=((n,),),
                dtype=self.dtype,
            )
            return vals.reshape(shape)
        # Pairs within one block lie in one chunk; the others are zero.
        B = self.block_size
        ends = np.cumsum(self.chunks)
        same = r // B == c // B
        chunk = np.searchsorted(ends, r, side="right")
        order, parts = [], []
        for j, (op, end, n) in enumerate(zip(self._parts, ends, self.chunks, strict=True)):
            sel = np.flatnonzero(same & (chunk == j))
            if sel.size:
                lo = end - n
                task = dask.delayed(_entries)(op, r[sel] - lo, c[sel] - lo)
                parts.append(da.from_delayed(task, shape=(sel.size,), dtype=self.dtype))
                order.append(sel)
        across = np.flatnonzero(~same)
        parts.append(da.zeros((across.size,), dtype=self.dtype))
        order.append(across)
        # The pairs in the order of ``parts``, put back into the caller's order.
        inverse = np.argsort(np.concatenate(order), kind="stable")
        return da.concatenate(parts)[inverse].rechunk(-1).reshape(shape)


_static.register_array_type(is_dask_array, DaskStaticIHVP)
