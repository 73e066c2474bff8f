"""The column-sharded (SPMD) sliding window: one rank's columns of every gradient.

The class is :class:`~mfac_core.DynamicIHVP`'s window with its sums over the d
coordinates made checked reductions over a communicator (``_dynamic_sharded``):
the single-process window knows nothing about communicators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._compat import Array
from ._compat import device as device_of
from ._deprecation import register_sharded_form, show_init_signature
from ._dynamic import DynamicIHVP
from ._dynamic_setup import WindowOptions, build, fill, window_options, window_size
from ._dynamic_sharded import (
    OPERATIONS,
    OWNER,
    agreed,
    agreed_layout,
    agreed_rows,
    collective_product,
    reduced,
    sharded_residual,
    summed,
)
from ._finite import shard_overflow_once
from ._sharding import ShardLayout, copied_identity
from ._torch_compile import eager_methods_under_torch_compile
from ._validation import namespace_of
from .distributed import Communicator, check_communicator

__all__ = ["ShardedDynamicIHVP"]


@eager_methods_under_torch_compile("__init__", "from_window", "rmatvec", "rmatmat")
class ShardedDynamicIHVP(DynamicIHVP):
    r"""The sliding window of :class:`~mfac_core.DynamicIHVP`, its columns sharded over ranks.

    Every rank of ``comm`` builds the operator with its number of the d
    coordinates (a contiguous range, ranks in rank order; 0 allowed) and the
    same other arguments; every method then takes and returns this rank's
    entries, and every call is collective (docs/scaling.rst).

    Parameters
    ----------
    num_grads : int
        The window's capacity m, the same on every rank.
    dim : int
        This rank's number of coordinates (0 allowed; not all ranks 0).
    comm : Communicator
        The ranks (e.g. :class:`~mfac_core.distributed.TorchComm`).
    damp : float
        The damping ``lambda > 0``.
    dtype : dtype or str
        As for :class:`~mfac_core.DynamicIHVP`.
    xp : module, optional
        As for :class:`~mfac_core.DynamicIHVP`.
    device : optional
        As for :class:`~mfac_core.DynamicIHVP`.
    options : WindowOptions, optional
        As for :class:`~mfac_core.DynamicIHVP`, the same on every rank
        (``check_finite`` checks collectively).
    **deprecated
        As for :class:`~mfac_core.DynamicIHVP` (``comm=`` is a keyword here).

    Attributes
    ----------
    comm : Communicator
        The communicator.
    layout : ShardLayout
        ``widths`` (every rank's column count), ``start`` and ``stop`` (this
        rank's global column range) and ``dim`` (d over all ranks).
    local_shape : tuple
        ``(dim, dim)``, the shapes products take and return on this rank. Unlike
        :class:`~mfac_core.ShardedStaticIHVP`, whose ``shape`` and ``dim`` are
        global, the window is sized by the constructor's ``dim``, so ``shape``
        is this rank's too and equals ``local_shape``; the global d is
        ``layout.dim``.
    dtype, device, storage_dtype, num_grads, dim, damp
        As for :class:`~mfac_core.DynamicIHVP` (``dim`` is this rank's).

    Raises
    ------
    ValueError
        As for :class:`~mfac_core.DynamicIHVP`, on every rank alike; also for
        ranks that disagree on an argument, or that all hold 0 columns.
    TypeError
        For a ``comm`` that is no communicator (on that rank alone); for ranks
        that disagree on the dtype.

    See Also
    --------
    DynamicIHVP : The same window in one process.

    Notes
    -----
    Each rank holds its ``m x d_r`` columns of the window; every contraction
    over d is this rank's part summed by ``comm.allreduce_sum``, and
    everything m x m (Gram matrix, factor, slot order, refactorisation and
    drift decisions, warnings) is computed on every rank from the reduced,
    bit-identical numbers, so the ranks' replicated states stay identical bit
    for bit. One call, one reduction (two for :meth:`matmat`): :meth:`update` and
    :meth:`update_and_matvec` reduce the new Gram row (m numbers, its
    diagonal ``|g|^2`` included, since the row is written before the
    product), :meth:`matvec` m numbers and :meth:`matmat` ``m k`` (after a
    reduction of the status word alone, which checks ``X`` and that every
    rank passed the same k), each with
    a status word appended (how many ranks failed, per exception class, and
    digests of the operation and state), so that a bad input on one rank
    (wrong shape or dtype, NaN), or ranks calling different operations, makes
    every rank raise the same exception class and leaves every rank's window
    as it was. Each refinement step costs two more reductions of ``m k``.
    :meth:`remove` and :meth:`set_damp` reduce ``size`` numbers to check that
    every rank passed the same argument. ``state_dict()`` holds this rank's
    ``m x d`` shard of the gradients, the replicated m x m state, and the
    layout (``shard_rank``, ``shard_widths``); it loads only on the same
    rank of the same layout. :meth:`todense`, ``to_scipy()``, operator
    arithmetic and pickling are refused (``TypeError``).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import DynamicIHVP, ShardedDynamicIHVP
    >>> from mfac_core.distributed import SingleProcessComm
    >>> rng = np.random.default_rng(0)
    >>> op = ShardedDynamicIHVP(4, 50, comm=SingleProcessComm(), damp=0.1, dtype="float64")
    >>> ref = DynamicIHVP(4, 50, damp=0.1, dtype="float64")
    >>> for _ in range(6):
    ...     g = rng.standard_normal(50)
    ...     step, want = op.update_and_matvec(g), ref.update_and_matvec(g)
    >>> bool(np.allclose(step, want)), op.layout.widths
    (True, (50,))
    """

    comm: Communicator
    layout: ShardLayout
    #: Names this window in the tags of its reductions, the same on every rank.
    _identity: int
    #: How many deep copies were made of this window (each names its copy, above).
    _copies = 0
    _collective_checks = True

    def __init__(
        self,
        num_grads: int,
        dim: int,
        /,
        *,
        comm: Communicator,
        damp: float,
        dtype: Any,
        xp: Any = None,
        device: Any = None,
        options: WindowOptions | None = None,
        **deprecated: Any,
    ) -> None:
        # A bad communicator cannot join a reduction: it raises on its rank alone.
        comm = check_communicator(comm)

        def built() -> ShardedDynamicIHVP:
            # The deprecated DynamicIHVP(..., comm=comm) is built here, with its keywords.
            merged = window_options("ShardedDynamicIHVP", options, deprecated)
            build(
                self,
                num_grads,
                dim,
                damp=damp,
                dtype=dtype,
                xp=xp,
                device=device,
                options=merged,
                sharded=True,
            )
            return self

        self.layout, self._identity = agreed_layout(comm, xp, device, built)
        self.comm = comm

    @property
    def local_shape(self) -> tuple[int, int]:
        """``(dim, dim)``: this rank's shape, which ``shape`` is too."""  # numpydoc ignore=RT01
        return self.shape

    @classmethod
    def from_window(  # type: ignore[override]
        cls,
        G: Array,
        /,
        *,
        comm: Communicator,
        damp: float,
        num_grads: int | None = None,
        **options: Any,
    ) -> ShardedDynamicIHVP:
        """Build a window holding this rank's columns of the gradients in the rows of ``G``.

        Parameters
        ----------
        G : array, shape (k, d_r)
            This rank's columns of the gradients, oldest first, the same k on
            every rank; as for :meth:`DynamicIHVP.from_window`.
        comm : Communicator
            The ranks.
        damp : float
            The damping ``lambda > 0``.
        num_grads : int, optional
            The window's capacity m (default: k).
        **options
            The other keyword arguments of :class:`ShardedDynamicIHVP`.

        Returns
        -------
        ShardedDynamicIHVP
            The window, with its factor computed.

        Raises
        ------
        ValueError
            On every rank, if one rank's G is not 2-D, holds NaN or infinity,
            or has more rows than ``num_grads``, or if the ranks' k differ.
        FactorizationError
            If the window's capacitance matrix cannot be factorised in float64.
        """
        comm = check_communicator(comm)
        num_grads = agreed_rows(comm, G, num_grads, _checks_finite(options))
        xp = namespace_of(G, "G")
        d = G.shape[1]
        num_grads = window_size(G, num_grads)
        op = cls(
            num_grads,
            d,
            comm=comm,
            damp=damp,
            dtype=G.dtype,
            xp=xp,
            device=device_of(G),
            **options,
        )
        fill(op, xp, G, checked=True)
        return op

    # -- the sums over d: checked reductions over the ranks (_dynamic_sharded) -----------

    def _summed(self, x: Array) -> Array:
        return summed(self, x)

    def _reduced(
        self, operation: str, local: Callable[[], Array], length: int, **agreement: Any
    ) -> Array:
        what = f"{OWNER}.{operation}"
        return reduced(self, local, length, what, OPERATIONS[operation], **agreement)

    def _agreed(self, operation: str, local: Callable[[], Any]) -> None:
        agreed(self, f"{OWNER}.{operation}", OPERATIONS[operation], local)

    def _residual(self, X: Array, Y: Array, scale: float) -> Array | None:
        return sharded_residual(self, X, Y, scale)

    # -- copies and pickles: the communicator is shared, never pickled ----------------

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedDynamicIHVP:
        # A communicator stands for the group of processes: the copy shares it.
        memo.setdefault(id(self.comm), self.comm)
        new = super().__deepcopy__(memo)
        # The copy is another window (updates make the two differ): a name of its own in
        # the tags, so that ranks applying the original and the copy in different orders
        # raise instead of adding one's sums to the other's.
        self._copies += 1
        new._identity, new._copies = copied_identity(self._identity, self._copies), 0
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Refused here, where pickle starts, not in __getstate__: deep copies (which share
        # the communicator) go through __getstate__.
        raise TypeError(
            "a ShardedDynamicIHVP holds a communicator, which cannot be pickled; "
            "save state_dict() on every rank instead"
        )

    # -- products: this rank's entries, checked inside the reduction --------------------

    @shard_overflow_once
    def matvec(self, x: Array, /) -> Array:
        """Apply ``F^{-1}`` to this rank's entries of one vector; collective.

        Parameters
        ----------
        x : array, shape (d,) or (d, 1)
            This rank's ``d`` entries, as for :meth:`DynamicIHVP.matvec`.

        Returns
        -------
        array, shape (d,) or (d, 1)
            This rank's entries of ``F^{-1} x``.

        Raises
        ------
        TypeError, ValueError
            As :meth:`DynamicIHVP.matvec`, on every rank if one rank's ``x``
            is bad.
        """
        y = collective_product(self, x, "x", (1, 2), 1)
        return y[:, 0] if getattr(x, "ndim", 2) == 1 else y

    @shard_overflow_once
    def matmat(self, X: Array, /) -> Array:
        """Apply ``F^{-1}`` to this rank's rows of k vectors; collective.

        Parameters
        ----------
        X : array, shape (d, k)
            This rank's ``d`` rows, with the same ``k`` on every rank.

        Returns
        -------
        array, shape (d, k)
            This rank's rows of ``F^{-1} X``.

        Raises
        ------
        TypeError, ValueError
            As :meth:`DynamicIHVP.matmat`, on every rank if one rank's ``X``
            is bad.
        """
        return collective_product(self, X, "X", (2,), None)

    def rmatvec(self, x: Array, /) -> Array:
        """The adjoint product, :meth:`matvec` (the operator is symmetric); collective.

        Parameters
        ----------
        x : array, shape (d,) or (d, 1)
            As for :meth:`matvec`.

        Returns
        -------
        array
            This rank's entries of ``F^{-1} x``.
        """
        return self.matvec(x)

    def rmatmat(self, X: Array, /) -> Array:
        """The adjoint product, :meth:`matmat` (the operator is symmetric); collective.

        Parameters
        ----------
        X : array, shape (d, k)
            As for :meth:`matmat`.

        Returns
        -------
        array
            This rank's rows of ``F^{-1} X``.
        """
        return self.matmat(X)


def _checks_finite(options: dict[str, Any]) -> bool:
    """Whether ``from_window``'s keywords ask for G's check for NaN and infinity."""
    if "check_finite" in options:  # the deprecated spelling
        return options["check_finite"] is not False
    given = options.get("options")
    return not isinstance(given, WindowOptions) or given.check_finite is not False


register_sharded_form(DynamicIHVP, ShardedDynamicIHVP)
show_init_signature(ShardedDynamicIHVP)
