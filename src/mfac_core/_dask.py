"""The static inverse over Dask arrays chunked along d (docs/dask.rst).

:class:`DaskStaticIHVP` is built explicitly, ``DaskStaticIHVP(G, damp=...)``
(the deprecated ``StaticIHVP(G, ...)`` with a Dask G still builds it: this module
registers it with ``_static`` at package import). G must hold all m rows in every
chunk; its column chunks decide how the work is split. Two layouts:

*one Woodbury block over every chunk* (the full operator, ``d > m``)
    the float64 Gram ``sum_c G_c G_c^T`` is one reduction over the chunks
    (each chunk's part summed in float64 on its worker), computed and
    factorised eagerly on the client in NumPy float64 (``_capacitance``); G is
    *persisted* first, so that its graph is evaluated once, by the set-up, and
    never again by the Gram or a product. A product is
    the G-form of the pass engine on every chunk: the reduction of the float64
    projections ``P = sum_c G_c X_c`` (m x k), one task ``A = C^{-1} P``, and
    ``(X_c - G_c^T A) / damp`` per chunk, summed in float64 and rounded once.
*independent chunks of whole blocks* (block-wise operators, and ``d <= m``)
    blocks never cross a chunk boundary, so each chunk is a block-diagonal
    operator of its own: its worker runs the NumPy set-up on it (the G-form's
    float64 factors, over the chunk's columns) and keeps the result, persisted
    as one object per chunk; products, the diagonal and entries are tasks on
    those.

Everything dask needs on a worker is a module-level function here, so that
``dask.distributed`` can send it by reference.
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _capacitance, _engine, _layout, _pieces, _setup, _static
from ._compat import Array, array_namespace, is_dask_array
from ._deprecation import legacy_options, warn_deprecated
from ._errors import FactorizationError
from ._finite import (
    entry_error,
    entry_name,
    first_non_finite,
    non_finite_entry,
    non_finite_error,
    raise_non_finite,
)
from ._gform import GFormFactor
from ._group_factors import GroupFactor
from ._layout import BlockGroup, block_groups
from ._static import StaticIHVP
from ._torch_compile import eager_methods_under_torch_compile
from ._validation import check_count, check_flag, check_index_array, check_same_space

__all__ = ["DaskStaticIHVP"]

#: The array-api-compat NumPy namespace, in which the workers run the NumPy set-up.
_NP = array_namespace(np.empty(0))


# -- on the workers: NumPy functions of one chunk of G's columns ---------------------------


def _non_finite_error(G: Any, offset: int) -> ValueError | None:
    """The error naming G's first NaN or infinity (columns from ``offset``), or None."""
    return non_finite_error(_NP, G, "G", offset=offset)


def _chunk_first_non_finite(G: Any, offset: int) -> tuple[list[int], float] | None:
    """The index in G (columns from ``offset``) and value of the chunk's first NaN or inf."""
    found = first_non_finite(_NP, np.asarray(G))
    if found is not None:
        found[0][-1] += offset
    return found


def _chunk_gram(G: Any) -> Any:
    """``G G^T`` of one chunk, ``(m, m)``, summed in float64 over pieces of bounded width."""
    G = np.asarray(G)
    m, w = G.shape
    group = BlockGroup(0, 1, w)

    def product(X: Any) -> Any:
        return X @ _NP.matrix_transpose(X)

    width = _pieces.piece_width(_NP, G, m, host=_pieces.LARGE_PIECE_ENTRIES)
    chunk = list(_layout.pieces(group, width))
    # The C extension's Gram in levels where it serves: BLAS's sum over a piece of 2e6
    # columns leans one way for gradients with a shared mean (_dynamic_setup.local_gram).
    gram = _engine.gram_kernel(_NP, G)
    return _layout.chunk_gram(_NP, G, group, chunk, product, gram=gram)[0]


def _gram_sum(parts: Any, axis: Any = None, keepdims: bool = False, **_: Any) -> Any:
    """The sum of the chunks' Gram parts over ``axis``: ``np.sum``, without its warnings.

    Parts whose sum overflows (or whose infinities cancel to NaN) leave a non-finite
    diagonal, which the set-up reports as the error that says so; NumPy's RuntimeWarning
    would come first, and be the error where warnings are errors, as in ``chunk_gram``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sum(parts, axis=axis, keepdims=keepdims)


def _whole(G: Any, factor: _capacitance.CapacitanceFactor, damp: float) -> GFormFactor:
    """One chunk's columns of the full operator's G-form (the factor is the whole one)."""
    G = np.asarray(G)
    return GFormFactor(BlockGroup(0, 1, G.shape[1]), G, factor, damp, G.dtype)


def _project_chunk(G: Any, X: Any) -> Any:
    return _engine.project(_NP, np.asarray(G), np.asarray(X))


def _solve(factor: _capacitance.CapacitanceFactor, *parts: Any) -> Any:
    """``C^{-1} sum(parts)``: the chunks' projections added in their order, then solved."""
    P = parts[0]
    for part in parts[1:]:
        P = P + part
    return factor.solve(P[None, ...])[0, ...]


def _combine_chunk(G: Any, X: Any, A: Any, *, damp: float, dtype: Any) -> Any:
    return _engine.combine(_NP, np.asarray(G), np.asarray(X), A, alpha=1.0 / damp, dtype=dtype)


def _woodbury_diagonal(G: Any, *, factor: _capacitance.CapacitanceFactor, damp: float) -> Any:
    return _whole(G, factor, damp).diagonal()


def _woodbury_entries(
    G: Any, rows: Any, cols: Any, *, factor: _capacitance.CapacitanceFactor, damp: float
) -> Any:
    return _whole(G, factor, damp).entries(rows, cols)


@dataclass(frozen=True)
class _ChunkInverse:
    """``F^{-1}`` on one chunk of whole blocks: the NumPy set-up's factors of that chunk.

    Kept on a worker; ``apply``, ``diagonal`` and ``entries`` route the chunk's
    rows to its groups as :class:`~mfac_core.StaticIHVP` does.
    """

    factors: tuple[GroupFactor, ...]
    dtype: Any
    kappa: tuple[float, float]
    #: kappa's lower bound over the chunk's Woodbury and dense factors (``SetupResult``).
    kinds: tuple[float, float] = (1.0, 1.0)

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
    groups = block_groups(G.shape[1], min(block_size, G.shape[1]))
    try:
        result = _setup.factorize_gform_groups(
            _NP, G, groups, damp=damp, dtype=G.dtype, check_finite=check_finite, progress=None
        )
    except ValueError as exc:
        # The set-up names a column of the chunk; say which column of G it is.
        if check_finite:
            error = _non_finite_error(G, offset)
            if error is not None:
                raise error from None
        elif isinstance(exc, FactorizationError):
            # Unchecked NaN or infinity: the factorisation's error, its index in G's columns.
            entry = non_finite_entry(_NP, G, "G", offset=offset)
            if entry is not None:
                raise _capacitance.non_finite_gram_error(damp, entry) from None
        raise
    kinds = (result.woodbury_lo, result.dense_lo)
    return _ChunkInverse(result.factors, G.dtype, (result.kappa_lo, result.kappa_hi), kinds)


def _apply(op: _ChunkInverse, X: Any) -> Any:
    return op.apply(X)


def _diagonal(op: _ChunkInverse) -> Any:
    return op.diagonal()


def _entries(op: _ChunkInverse, rows: Any, cols: Any) -> Any:
    return op.entries(rows, cols)


def _summary(op: _ChunkInverse) -> tuple[float, float, float, float]:
    return (*op.kappa, *op.kinds)


# -- on the client ---------------------------------------------------------------------


def _rechunk_hint(chunks: tuple[int, ...], block_size: int) -> int:
    """A chunk width of whole blocks near G's typical one."""
    typical = max(chunks)
    return block_size * max(1, round(typical / block_size))


def _check_numpy_chunks(G: Any) -> None:
    """Refuse a Dask array whose chunks are not NumPy arrays, judged by its ``_meta``.

    The workers run the NumPy operator on each chunk; CuPy chunks would fail
    there, in a task, with an error about mixing CuPy and NumPy arrays.
    """
    meta = getattr(G, "_meta", None)
    if isinstance(meta, np.ndarray):
        return
    kind = f"{type(meta).__module__}.{type(meta).__name__}"
    hint = (
        "; for a GPU, gather G into one CuPy array (G.compute()) and build StaticIHVP on "
        "it, or move the chunks to the host with G.map_blocks(cupy.asnumpy)"
        if type(meta).__module__.split(".")[0] == "cupy"
        else "; convert them with G.map_blocks(numpy.asarray)"
    )
    raise TypeError(
        f"G's chunks are {kind} arrays (its _meta), but the operator over Dask computes "
        f"on NumPy chunks on the workers{hint}"
    )


@eager_methods_under_torch_compile("__init__", "from_gradients", "diagonal", "entries")
class DaskStaticIHVP(StaticIHVP):
    r"""``F^{-1}`` of :class:`~mfac_core.StaticIHVP` for a Dask array G chunked along d.

    A subclass of :class:`~mfac_core.StaticIHVP` (so ``isinstance(op,
    StaticIHVP)`` holds), with its arguments. Products, ``diagonal()`` and ``entries()``
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
    check_finite : bool, optional
        Check G (from its Gram diagonals, at no extra pass) and each input
        vector for NaN and infinity; the vector check computes
        ``isfinite(x).all()`` at the call.
    refine : int, optional
        Must be 0: iterative refinement is not available for Dask gradients.
    progress : None, optional
        Must be ``None``: Dask's own diagnostics (the ``dask.distributed``
        dashboard, ``dask.diagnostics.ProgressBar``) show the set-up's tasks.
    **deprecated
        ``overwrite_G=True`` is ignored (a ``DeprecationWarning``); ``out``,
        ``stream_to`` and ``comm`` are refused: G stays with Dask's workers,
        which also move the chunks and spread the work.

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
        float32), and for chunks that are not NumPy arrays (CuPy chunks: the
        workers run NumPy's BLAS; the message says what to do instead).
    FactorizationError
        If the capacitance matrix cannot be factorised in float64.

    Notes
    -----
    The full operator (``d > m``) has one Woodbury block over all chunks:
    the float64 Gram :math:`G G^\top = \sum_c G_c G_c^\top` is one reduction
    over the chunks, computed at construction and factorised in NumPy on the
    client (:math:`m \times m`); G is persisted (its :math:`m d` entries
    stay on the workers), so that a product never evaluates G's graph again.
    A product is the G-form of the NumPy operator, chunk by chunk:

    .. math::

        P = \sum_c G_c X_c, \qquad A = C^{-1} P, \qquad
        Y_c = (X_c - G_c^\top A) / \lambda ,

    both passes summed in float64 on the workers and each result rounded once,
    so precision is that of the NumPy operator (docs/mathematics.rst, "Exact
    passes"); the diagonal and entries whiten G's columns in float64.
    Block-wise operators (and ``d <= m``) are independent per chunk: each
    worker runs the NumPy set-up on its chunk and keeps its factors.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from mfac_core import DaskStaticIHVP, StaticIHVP
    >>> G = np.random.default_rng(0).standard_normal((8, 100))
    >>> op = DaskStaticIHVP(da.from_array(G, chunks=(8, 25)), damp=1e-2)
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
        check_finite: bool = True,
        refine: int = 0,
        progress: Callable[[int, int], None] | None = None,
        **deprecated: Any,
    ) -> None:
        legacy = legacy_options(
            "DaskStaticIHVP", deprecated, ("overwrite_G", "out", "stream_to", "comm")
        )
        out, stream_to, comm = legacy["out"], legacy["stream_to"], legacy["comm"]
        if out is not None or stream_to is not None:
            raise ValueError(
                "out= and stream_to= are not available for Dask gradients: W stays "
                "with Dask's workers (persisted), and Dask moves the chunks itself"
            )
        if comm is not None:
            # Not a keyword of this class: only the deprecated StaticIHVP(dask_G, comm=...)
            # reaches here, so the error is the one an unexpected keyword gets.
            raise TypeError(
                "DaskStaticIHVP takes no communicator (comm=): Dask distributes the chunks "
                "of G over its workers itself. To shard G's columns over processes "
                "instead, give each rank its columns as a NumPy array: "
                "ShardedStaticIHVP(G_local, comm=comm, damp=...)"
            )
        if check_flag(legacy["overwrite_G"], "overwrite_G"):
            warn_deprecated("overwrite_G=True (ignored: no W is stored)", "the call without it")
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
        _check_numpy_chunks(G)
        if any(math.isnan(s) for s in G.shape):
            raise ValueError(
                f"G has unknown chunk sizes (shape {G.shape}); call G.compute_chunk_sizes() first"
            )
        # float32 and float64 only: Dask's namespace has no 2-byte float dtype.
        if G.dtype.name in ("float16", "bfloat16"):
            raise TypeError(
                f"G must have a real floating dtype (float32 or float64), got {G.dtype}: "
                "2-byte storage is not available for Dask arrays; cast G to float32 "
                "(G.astype('float32'))"
            )
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
        self._G: Any = None  # the full operator's persisted G
        self._factor: Any = None  # and its float64 capacitance factor
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

    @classmethod
    def from_gradients(cls, gradients: Any, /, **options: Any) -> DaskStaticIHVP:
        """Not available: gradients gathered one by one are in memory, not a Dask array.

        Parameters
        ----------
        gradients : iterable
            Not read.
        **options
            Not read.

        Raises
        ------
        TypeError
            Always, before ``gradients`` is consumed: build the in-memory operator
            with :meth:`StaticIHVP.from_gradients`, or stack the gradients into a
            Dask array (``dask.array.from_array``, chunked along d) and pass it to
            :class:`DaskStaticIHVP`.
        """
        raise TypeError(
            "DaskStaticIHVP.from_gradients is not available: it would gather the gradients "
            "in memory. Use StaticIHVP.from_gradients, or stack the gradients into a Dask "
            "array chunked along d (dask.array.from_array) and pass it to DaskStaticIHVP"
        )

    def _init_woodbury(self, G: Array, check_finite: bool) -> None:
        import dask
        import dask.array as da

        m, damp = self.num_grads, self.damp
        # Persisted first, so that the Gram, the products and any search for a NaN all
        # read the kept chunks: G's graph (a read from disk, the gradients' computation)
        # is evaluated once, not once for the Gram and again for the persist.
        G = G.persist()
        try:
            parts = [
                da.from_delayed(
                    dask.delayed(_chunk_gram, pure=True)(part), shape=(m, m), dtype=np.float64
                )
                for part in G.to_delayed(optimize_graph=False).ravel()
            ]
            # One reduction: dask sums the chunks' parts in a tree (as .sum does). No local
            # holds its graph: the failure below lets go of G's chunks through G and parts.
            gram = np.asarray(
                da.reduction(
                    da.stack(parts), _gram_sum, _gram_sum, axis=0, dtype=np.float64
                ).compute()
            )
            if check_finite and not np.all(np.isfinite(np.diagonal(gram))):
                self._raise_non_finite(G)
            factor = _capacitance.factorize(
                _NP,
                gram[None, ...],
                shift=m * damp,
                scale=1.0,
                damp=damp,
                locate=lambda: self._non_finite_entry(G),
            )
        except BaseException:
            # A failure lets the persisted G go: its traceback, which a notebook or
            # sys.last_traceback keeps, holds the frames' locals and with them G's
            # chunks, m d entries held in the cluster's memory by a failed call. The
            # lines of the traceback stay; the locals of the frames that ended go.
            G = parts = None
            traceback.clear_frames(sys.exc_info()[2])
            raise
        self._factor = factor
        self._G = G  # persisted above: no product evaluates G's graph again
        assert factor.kappa is not None  # factorize always bounds kappa
        self.kappa_bound = factor.kappa[1]
        self._warn_if_hopeless(factor.kappa[0], 1.0)  # d > m: the Woodbury form

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
        try:
            persisted = dask.persist(*parts)
            summaries = dask.compute(*[dask.delayed(_summary)(p) for p in persisted])
        except BaseException:
            # As in _init_woodbury: the traceback of a failure (a chunk's NaN or failed
            # factorisation, raised by the compute) must not hold the chunks' persisted
            # set-ups in the cluster, through the frames' locals or this half-built
            # operator, which is why they reach self only once they all succeeded.
            persisted = parts = None  # type: ignore[assignment]
            traceback.clear_frames(sys.exc_info()[2])
            raise
        self._parts = persisted
        self.kappa_bound = max(s[1] for s in summaries)
        self._warn_if_hopeless(max(s[2] for s in summaries), max(s[3] for s in summaries))

    @staticmethod
    def _raise_non_finite(G: Array) -> None:
        """Say where G holds NaN or infinity, or that its squared norms overflow."""
        entry = DaskStaticIHVP._non_finite_entry(G)
        if entry is not None:
            raise entry_error("G", entry)
        # G is finite and its squares overflow: said of one column, read for it.
        raise_non_finite(_NP, np.asarray(G[:, :1].compute()), "G")

    @staticmethod
    def _non_finite_entry(G: Array) -> str | None:
        """G's first NaN or infinity as :meth:`_raise_non_finite` names it, or None."""
        found = _first_of_chunks(G, _chunk_first_non_finite)
        return None if found is None else entry_name("G", *found)

    # -- products --------------------------------------------------------------------

    def _matmat(self, X: Array) -> Array:
        import dask
        import dask.array as da

        X = X.rechunk({0: self.chunks, 1: -1})
        k = X.shape[1]
        # Unoptimised: the optimised to_delayed of a persisted array (G, or a vector the
        # caller persisted) names its chunks by key only, without the futures that keep
        # them on a cluster, so a lazy result failed ("lost dependencies") once the
        # operator or the vector was collected.
        xs = X.to_delayed(optimize_graph=False)[:, 0]
        if self._G is not None:
            gs = self._G.to_delayed(optimize_graph=False).ravel()
            projections = [dask.delayed(_project_chunk)(g, x) for g, x in zip(gs, xs, strict=True)]
            A = dask.delayed(_solve)(self._factor, *projections)  # the m x k reduction
            combined = [
                da.from_delayed(
                    dask.delayed(_combine_chunk)(g, x, A, damp=self.damp, dtype=self.dtype),
                    shape=(n, k),
                    dtype=self.dtype,
                )
                for g, x, n in zip(gs, xs, self.chunks, strict=True)
            ]
            return da.concatenate(combined, axis=0)
        parts = [
            da.from_delayed(dask.delayed(_apply)(op, x), shape=(n, k), dtype=self.dtype)
            for op, x, n in zip(self._parts, xs, self.chunks, strict=True)
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
            In the operator's dtype; lazy, O(d m^2) BLAS-3 work over the chunks
            (the columns whitened in float64, as for the NumPy operator).
        """
        import dask
        import dask.array as da

        if self._G is not None:
            return self._G.map_blocks(
                _woodbury_diagonal,
                factor=self._factor,
                damp=self.damp,
                drop_axis=0,
                dtype=self.dtype,
            )
        parts = [
            da.from_delayed(dask.delayed(_diagonal)(op), shape=(n,), dtype=self.dtype)
            for op, n in zip(self._parts, self.chunks, strict=True)
        ]
        return da.concatenate(parts)

    def entries(self, rows: Array, cols: Array, /) -> Array:
        """Selected entries ``[F^{-1}][rows[k], cols[k]]``, O(m^2) per distinct coordinate.

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
        if _known(rows.shape) and _known(cols.shape):
            _check_same_shape(rows.shape, cols.shape)  # before any computation
        # Computed here anyway, so indices of unknown length (from boolean indexing,
        # idx[saliency < t]) are taken too: their shapes are compared once known.
        r_np, c_np = (np.asarray(v) for v in dask.compute(rows, cols))
        _check_same_shape(r_np.shape, c_np.shape)
        shape = r_np.shape
        r = check_index_array(r_np, "rows", xp=_NP, device="cpu", bound=self.dim)
        c = check_index_array(c_np, "cols", xp=_NP, device="cpu", bound=self.dim)
        r, c = r.reshape(-1), c.reshape(-1)
        if self._G is not None:
            # One block: every pair. The columns asked for, in increasing order (one task
            # per chunk of G), as one chunk; then the pairs as the NumPy G-form forms them.
            n = r.shape[0]
            cols_u, where = np.unique(np.concatenate([r, c]), return_inverse=True)
            Gu = self._G[:, cols_u].rechunk({1: -1})
            vals = Gu.map_blocks(
                _woodbury_entries,
                where[:n],
                where[n:],
                factor=self._factor,
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


def _first_of_chunks(
    G: Array, search: Callable[[Any, int], tuple[list[int], float] | None]
) -> tuple[list[int], float] | None:
    """G's first NaN or infinity in row-major order, ``search(chunk, offset)`` on every chunk.

    Each chunk is searched on its worker (in bounded pieces) and only an index comes
    back. A mask of G's d columns on the client would be as long as G, which is on a
    cluster because it is too large for one machine. The earliest index of all chunks,
    not the first chunk's: G[0, 20] comes before G[3, 2], as the NumPy operator names it.
    """
    import dask

    offsets = np.concatenate([[0], np.cumsum(G.chunks[1])[:-1]])
    parts = G.to_delayed(optimize_graph=False).ravel()
    found = dask.compute(
        *[
            dask.delayed(search, pure=True)(part, int(lo))
            for part, lo in zip(parts, offsets, strict=True)
        ]
    )
    hits = [answer for answer in found if answer is not None]
    return min(hits, key=lambda hit: hit[0]) if hits else None


def _known(shape: tuple[float, ...]) -> bool:
    """Whether a Dask shape is known (no NaN: no chunk of unknown size)."""
    return not any(math.isnan(n) for n in shape)


def _check_same_shape(rows: tuple[int, ...], cols: tuple[int, ...]) -> None:
    if tuple(rows) != tuple(cols):
        raise ValueError(
            f"rows and cols must have the same shape, got {tuple(rows)} and {tuple(cols)}"
        )


_static.register_array_type(is_dask_array, DaskStaticIHVP)
_static.show_init_signature(DaskStaticIHVP)
