"""The column-sharded (SPMD) static inverse: one rank's columns of G over a communicator.

The operator is a thin object over ``_sharded_static`` (the collective set-up and
products); it shares only G's bookkeeping with :class:`~mfac_core.StaticIHVP`, so
that the single-process operators know nothing about communicators.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from . import _sharded_static, _static
from ._compat import SHARDED_SUMS, Array, device, refuse_derivatives, stored
from ._deprecation import legacy_options, register_sharded_form, warn_deprecated
from ._finite import shard_overflow_once
from ._jax_mode import check_float64_available
from ._operator import LinearOperator
from ._sharding import ShardLayout
from ._torch_compile import eager_methods_under_torch_compile
from ._validation import namespace_of
from .distributed import Communicator, check_communicator

__all__ = ["ShardedStaticIHVP"]


@eager_methods_under_torch_compile("__init__")
class ShardedStaticIHVP(_static._BlockOperatorBase):
    r"""``F^{-1}`` of :class:`~mfac_core.StaticIHVP`, G's columns sharded over ranks.

    Every rank of ``comm`` builds the operator with its contiguous range of
    G's columns (ranks in rank order; a rank may hold no column) and the same
    options; products then take and return this rank's shards of every
    vector, and every call is collective (docs/scaling.rst).

    Parameters
    ----------
    G_local : array, shape (m, d_local)
        This rank's columns of the gradients, float32 or float64, kept by
        reference (G_local must not be modified while the operator is in use).
    comm : Communicator
        The ranks (e.g. :class:`~mfac_core.distributed.TorchComm`).
    damp : float
        The damping ``lambda > 0``, the same on every rank.
    block_size : int, optional
        As for :class:`~mfac_core.StaticIHVP`; shard boundaries must fall on
        block boundaries.
    check_finite : bool, optional
        As for :class:`~mfac_core.StaticIHVP`, checked collectively.
    refine : int, optional
        As for :class:`~mfac_core.StaticIHVP`.
    progress : callable, optional
        As for :class:`~mfac_core.StaticIHVP`, for this rank's share of the set-up.
    **deprecated
        ``overwrite_G=True`` is ignored (a ``DeprecationWarning``); ``out``
        and ``stream_to`` are refused.

    Attributes
    ----------
    shape : tuple
        ``(d, d)``, d the global number of coordinates.
    local_shape : tuple
        ``(d_local, d_local)``: the shapes products take and return on this rank.
    comm : Communicator
        The communicator.
    layout : ShardLayout
        ``widths`` (every rank's column count), ``start`` and ``stop`` (this
        rank's global column range) and ``dim`` (d).
    dtype, device, num_grads, dim, damp, block_size, kappa_bound
        As for :class:`~mfac_core.StaticIHVP` (``dim`` is the global d).

    Raises
    ------
    ValueError
        As for :class:`~mfac_core.StaticIHVP`, on every rank alike; also for
        ranks that disagree on m or an option, and shard boundaries that cut
        a block.
    TypeError
        For a ``comm`` that is no communicator (on that rank alone); for a
        G_local that is no array, on every rank (that rank's reduction runs
        in NumPy, which the engine must take: gloo does, NCCL does not); for
        2-byte gradients.
    FactorizationError
        As for :class:`~mfac_core.StaticIHVP`, on every rank.

    See Also
    --------
    StaticIHVP : The same inverse in one process.

    Notes
    -----
    Everything m x m is replicated: the float64 Gram matrix is summed over
    the ranks (one reduction of m^2 numbers), and every rank factorises the
    same bits into the same factor; each rank keeps its columns of G (by
    reference) and of the dense block factors. ``matvec`` and ``matmat`` take
    and return this rank's shards (``local_shape``) and reduce the float64
    projection ``G X`` (m k numbers) between the two float64-summed passes
    (``matmat`` after a reduction of the status word alone, which checks
    that every rank passed the same k);
    ``diagonal()`` returns this rank's entries without communication;
    ``entries`` takes *global* indices (the same on every rank) and returns
    the same values on every rank (one reduction of ``2 m k`` float64
    numbers). With ``block_size``, each rank's blocks are whole and products
    exchange nothing. The full operator is always in the Woodbury form (also
    for ``d <= m``). Errors are collective: a bad shard on one rank makes
    every rank raise an exception of the same class. Not with 2-byte
    gradients; no ``todense``, ``to_scipy`` or operator arithmetic (they
    would mix shards and whole vectors). Pickling keeps the communicator (a
    ``TorchComm`` of the default group is re-bound where it is loaded).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import ShardedStaticIHVP, StaticIHVP
    >>> from mfac_core.distributed import SingleProcessComm
    >>> G = np.random.default_rng(0).standard_normal((4, 30))
    >>> op = ShardedStaticIHVP(G, comm=SingleProcessComm(), damp=0.1)
    >>> x = np.ones(30)
    >>> bool(np.allclose(op.matvec(x), StaticIHVP(G, damp=0.1).matvec(x)))
    True
    """

    comm: Communicator
    layout: ShardLayout

    def __init__(
        self,
        G_local: Array,
        /,
        *,
        comm: Communicator,
        damp: float,
        block_size: int | None = None,
        check_finite: bool = True,
        refine: int = 0,
        progress: Callable[[int, int], None] | None = None,
        **deprecated: Any,
    ) -> None:
        legacy = legacy_options(
            "ShardedStaticIHVP", deprecated, ("overwrite_G", "out", "stream_to")
        )
        if legacy["out"] is not None or legacy["stream_to"] is not None:
            # Raised before any reduction: SPMD code passes the same options on
            # every rank, so every rank raises here alike.
            raise ValueError(
                "out= and stream_to= are not available for a column-sharded "
                "operator; each rank keeps its columns of G in memory"
            )
        # A bad communicator cannot join a reduction: it raises on its rank alone.
        comm = check_communicator(comm)
        refusal: Exception | None = None
        G = G_local
        try:
            xp = namespace_of(G, "G_local")
            refuse_derivatives(G, "G", SHARDED_SUMS, tangent_only=True)
            G = stored(G, "G")
        except (TypeError, ValueError) as exc:
            # A G_local that is no array (None from a loader, a list, a masked array), or
            # one that derivatives flow through (a tangent; under torch.func.grad), joins
            # the set-up's first reduction in NumPy, where it is refused, so that every
            # rank raises instead of the others waiting in it.
            xp, refusal = None, exc
        else:
            check_float64_available(xp)
        overwrite_G = legacy["overwrite_G"]
        if overwrite_G is True:
            warn_deprecated("overwrite_G=True (ignored: no W is stored)", "the call without it")
        shard = _sharded_static.build(
            comm,
            xp,
            G,
            damp=damp,
            block_size=block_size,
            overwrite_G=overwrite_G,
            check_finite=check_finite,
            refine=refine,
            progress=progress,
            refusal=refusal,
        )
        agreed = shard.agreed
        self.comm = comm
        self.layout = agreed.layout
        self._shard = shard
        self.damp = agreed.damp
        self.num_grads, self.dim = agreed.num_grads, agreed.layout.dim
        self.block_size = agreed.block_size
        self.storage_dtype = None
        self.refine = agreed.refine
        self.kappa_bound = shard.kappa_hi
        d = self.dim
        LinearOperator.__init__(
            self,
            shape=(d, d),
            dtype=G.dtype,
            xp=xp,
            device=device(G),
            symmetric=True,
            check_finite=agreed.check_finite,
        )
        self._warn_if_hopeless(shard.woodbury_lo, shard.dense_lo)

    @property
    def local_shape(self) -> tuple[int, int]:
        """The local shape ``(d_local, d_local)``."""  # numpydoc ignore=RT01
        n = self.layout.widths[self.layout.rank]
        return (n, n)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        layout, comm = self.layout, self.comm
        if (comm.rank, comm.size) != (layout.rank, len(layout.widths)):
            raise ValueError(
                f"this column-sharded operator was saved by rank {layout.rank} of "
                f"{len(layout.widths)}, but its communicator is now rank {comm.rank} of "
                f"{comm.size}: load each rank's operator on the same rank of a group of the "
                "same size"
            )

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedStaticIHVP:
        # A communicator is a handle to a process group, shared by the copy, not copied.
        memo.setdefault(id(self.comm), self.comm)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # -- products: this rank's shards, checked inside the collective ------------------
    # Each public call says an overflow once, when it returns (shard_overflow_once), as
    # the single-process operators do: said inside, by a step, a warning that is an error
    # stopped one rank while the others waited in the refinement's reductions.

    def _apply(self, x: Any, *, vector: bool) -> Array:
        # F^{-1} is symmetric: the adjoint products are the products.
        return self._shard.apply(
            self.comm,
            self._xp,
            self.device,
            self.dtype,
            x,
            vector=vector,
            check=self.check_finite,
            owner=self,
        )

    @shard_overflow_once
    def matvec(self, x: Array, /) -> Array:
        """Apply ``F^{-1}`` to this rank's shard of a vector; collective.

        Parameters
        ----------
        x : array, shape (d_local,) or (d_local, 1)
            This rank's shard.

        Returns
        -------
        array
            This rank's shard of ``F^{-1} x``, with the shape of ``x``.
        """
        return self._apply(x, vector=True)

    @shard_overflow_once
    def rmatvec(self, x: Array, /) -> Array:
        """Apply ``F^{-1}`` as :meth:`matvec` does (the operator is symmetric); collective.

        Parameters
        ----------
        x : array, shape (d_local,) or (d_local, 1)
            This rank's shard.

        Returns
        -------
        array
            This rank's shard of ``F^{-1} x``.
        """
        return self._apply(x, vector=True)

    @shard_overflow_once
    def matmat(self, X: Array, /) -> Array:
        """Apply ``F^{-1}`` to this rank's rows of k vectors; collective.

        Parameters
        ----------
        X : array, shape (d_local, k)
            This rank's rows; every rank passes the same k.

        Returns
        -------
        array, shape (d_local, k)
            This rank's rows of ``F^{-1} X``.
        """
        return self._apply(X, vector=False)

    @shard_overflow_once
    def rmatmat(self, X: Array, /) -> Array:
        """Apply ``F^{-1}`` as :meth:`matmat` does (the operator is symmetric); collective.

        Parameters
        ----------
        X : array, shape (d_local, k)
            This rank's rows; every rank passes the same k.

        Returns
        -------
        array, shape (d_local, k)
            This rank's rows of ``F^{-1} X``.
        """
        return self._apply(X, vector=False)

    @shard_overflow_once
    def diagonal(self) -> Array:
        """Return this rank's ``d_local`` diagonal entries of ``F^{-1}``; no communication.

        Returns
        -------
        array, shape (d_local,)
            As :meth:`StaticIHVP.diagonal <mfac_core.StaticIHVP.diagonal>`
            computes them, for this rank's columns.
        """
        return self._shard.diagonal(self._xp, self.device, self.dtype)

    @shard_overflow_once
    def entries(self, rows: Array, cols: Array, /) -> Array:
        """Selected entries ``[F^{-1}][rows[k], cols[k]]`` at global indices; collective.

        Parameters
        ----------
        rows, cols : array of int, of the same shape
            Global indices in ``[0, d)``, the same on every rank.

        Returns
        -------
        array
            The entries, the same on every rank (one reduction of ``2 m k``
            float64 numbers; temporaries of ``O(m k)``).
        """
        return self._shard.entries(self.comm, self._xp, self.device, self.dtype, rows, cols)


register_sharded_form(_static.StaticIHVP, ShardedStaticIHVP)
