"""The dynamic M-FAC operator: the inverse Fisher of a sliding window of gradients.

The operator is window bookkeeping plus an editable capacitance factor. One
vocabulary for the rows of the m x d buffer: a *slot* is a buffer row; the
*window slots* hold the window's gradients, oldest first; the *free slots* hold
none (the last one is filled next); the *factor slots* are the window slots in
the row order of the Cholesky factor, which differs from the window order
because an edit moves the replaced slot to the end of the factor.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import _capacitance, _engine
from ._capacitance import CapacitanceFactor
from ._compat import Array, array_namespace, detached
from ._compat import device as device_of
from ._errors import FactorizationError, NotPositiveDefinite
from ._layout import BlockGroup, chunk_gram, pieces
from ._operator import DEFAULT_MAX_DENSE_ENTRIES, LinearOperator
from ._refine import fisher_residual, refine
from ._sharding import ShardLayout, host_values, reduce_checked
from ._validation import (
    check_choice,
    check_count,
    check_damp,
    check_finite,
    check_flag,
    check_operand,
    check_same_space,
    check_writeable,
    half_dtype_name,
    namespace_of,
)
from .distributed import Communicator, check_communicator

__all__ = ["DynamicIHVP"]

_STATE_VERSION = 2
#: Relative drift of diag(U^T U) against diag(C) that triggers a full refactorisation.
_DRIFT_TOL = 1e-10
#: Columns of an edited factor checked for drift after each edit (O(m) each).
_DRIFT_SAMPLE = 32
#: Columns of a loaded factor that ``load_state_dict`` checks against the Gram matrix.
_FACTOR_SAMPLE = 8
#: The rounding of a Gram entry, in units of (d + ranks) eps |g_i| |g_j|, that
#: ``load_state_dict`` allows between the stored Gram and the one recomputed from the
#: stored gradients: each of the two sums errs by at most one unit (a float64 sum of
#: d exact products, then of one partial sum per rank), and the norms taken from the
#: recomputed diagonal by a little more.
_GRAM_ROUNDING = 4
#: float64 entries in one piece of the initial Gram product of ``from_window``.
_PIECE_ENTRIES = 2**22


class _Refused(ValueError):
    """A gradient refused for its values; ``finite`` tells a range error from NaN/infinity."""

    def __init__(self, message: str, *, finite: bool) -> None:
        super().__init__(message)
        self.finite = finite


class _StepCheck(NamedTuple):
    """What :meth:`DynamicIHVP._update_and_matvec_checked` found.

    status : {"ok", "not finite", "not representable"}
        ``"ok"``: ``g`` was inserted. ``"not finite"``: ``g`` holds NaN or
        infinity. ``"not representable"``: ``g`` is finite but an entry is
        beyond the range of the window's 2-byte storage. The window is
        unchanged unless ``"ok"``.
    s : array or None
        ``F^{-1} g`` for the window that includes ``g`` (``"ok"`` only).
    s_finite : bool
        Whether ``s`` holds no NaN or infinity (False when ``s`` is None).
    error : ValueError or None
        The exception :meth:`DynamicIHVP.update_and_matvec` raises for this
        ``g`` (None when ``"ok"``).
    """

    status: str
    s: Any
    s_finite: bool
    error: ValueError | None


class _Speculation:
    """The step's product, computed with an edited factor before the step's checks are read.

    ``compute`` returns the product's finiteness as a 0-d array, read with the
    row edit's checks in one transfer (:meth:`DynamicIHVP._edited`); the product
    stands only if the edit is kept (``s`` is None otherwise).
    """

    def __init__(self, op: DynamicIHVP) -> None:
        self._op = op
        self.X: Any = None
        self.P: Any = None
        self.s: Any = None
        self.finite = False

    def compute(self, factor: _SlotFactor) -> Array:
        op, xp = self._op, self._op._xp
        self.s = op._refined(self.X, op._finish(self.X, self.P, factor), factor)[:, 0]
        return xp.all(xp.isfinite(self.s))


def _default_namespace() -> Any:
    import numpy as np

    return array_namespace(np.empty(0))


def _window_dtypes(xp: Any, dtype: Any) -> tuple[Any, Any, str | None]:
    """The buffer's dtype, the compute dtype and the 2-byte storage name (or None).

    float32 and float64 windows compute in their own dtype; a 2-byte window
    (docs/mathematics.rst, "2-byte storage") stores float16 or bfloat16 and
    computes in float32.
    """
    wanted = "float32 or float64, or float16/bfloat16 storage where the library has it"
    if isinstance(dtype, str):
        if dtype not in ("float32", "float64", "float16", "bfloat16"):
            raise TypeError(f"dtype must be {wanted}, got {dtype!r}")
        named = getattr(xp, dtype, None)
        if named is None or (
            dtype in ("float16", "bfloat16") and half_dtype_name(xp, named) is None
        ):
            raise TypeError(
                f"dtype {dtype!r}: this array library ({xp.__name__}) has no {dtype} "
                "storage that DynamicIHVP supports (NumPy and CuPy have float16, PyTorch "
                "float16 and bfloat16)"
            )
        dtype = named
    if dtype in (xp.float32, xp.float64):
        return dtype, dtype, None
    name = half_dtype_name(xp, dtype)
    if name is None:
        hint = ""
        if getattr(type(dtype), "__module__", "").split(".")[0] == "torch":
            # torch.float32 given with the default (NumPy) namespace: the dtype names
            # another library than xp, which only xp=torch can mean.
            hint = f" (the namespace is {xp.__name__}: pass xp=torch for PyTorch buffers)"
        raise TypeError(f"dtype must be {wanted}{hint}, got {dtype!r}")
    return dtype, xp.float32, name


#: Entries of the row each rank contributes when a sharded operator is built: its width,
#: then the settings that must agree on every rank (see ``DynamicIHVP._settings``).
_NUM_SETTINGS = 9

# The operations of the sharded reductions (``reduce_checked``). Their tag is the
# operation and the operator's whole count of state edits (``DynamicIHVP._tag``), so
# that ranks calling different operations with reductions of one length, or whose
# replicated states diverged (``reset`` on some ranks only, any number of times),
# raise instead of mixing their sums.
_OP_UPDATE, _OP_PRODUCT, _OP_REMOVE, _OP_SET_DAMP = 1, 2, 3, 4
_OP_LOAD, _OP_FROM_WINDOW, _OP_INIT = 5, 6, 7


def _reduction_space(xp: Any, device: Any) -> tuple[Any, Any]:
    """The namespace and device of a set-up reduction, NumPy's when ``xp`` is unusable.

    A rank whose ``xp`` is wrong must still join the reduction that reports it.
    """
    try:
        return (_default_namespace() if xp is None else array_namespace(xp.empty(0))), device
    except (AttributeError, TypeError):
        return _default_namespace(), None


def _rows(total: Array, size: int) -> list[tuple[float, ...]]:
    """A reduced rank-by-rank table (each rank filled its own row) as host tuples."""
    values = host_values(total)
    width = len(values) // size
    return [tuple(values[r * width : (r + 1) * width]) for r in range(size)]


def _evenly_spaced(k: int, count: int) -> list[int]:
    """Up to ``count`` evenly spaced positions in ``range(k)``, both ends included."""
    if k <= count:
        return list(range(k))
    return sorted({round(i * (k - 1) / (count - 1)) for i in range(count)})


def _local_gram(xp: Any, G: Array) -> Array:
    """``G G^T`` of this rank's columns of the rows of ``G``, accumulated in float64.

    O(m^2 d): column pieces of G converted to float64 (32 MiB at most), one
    BLAS-3 product each; products of float32 or 2-byte values are exact in
    float64, so each entry errs by at most d eps64 |g_i| |g_j|.
    """
    m, d = G.shape
    if not d:  # a shard without columns
        return xp.zeros((m, m), dtype=xp.float64, device=device_of(G))
    whole = BlockGroup(0, 1, d)
    chunk = list(pieces(whole, max(1, _PIECE_ENTRIES // m)))
    return chunk_gram(xp, G, whole, chunk, lambda X: X @ xp.matrix_transpose(X))[0, ...]


@dataclass(frozen=True)
class _SlotFactor:
    """The capacitance factor of the window, with the slot of each of its rows.

    Attributes
    ----------
    factor : CapacitanceFactor
        ``C = shift I + Gram[slots][:, slots] = U^T U``.
    slots : tuple of int
        The factor slots: the slot of each row of ``U``.
    slot_index : array
        ``slots`` as an int64 array on the device.
    position : array
        For each of the m slots its row in ``U``, or k for slots outside the
        factor (which read an appended zero).
    """

    factor: CapacitanceFactor
    slots: tuple[int, ...]
    slot_index: Any
    position: Any

    @classmethod
    def build(cls, factor: CapacitanceFactor, slots: Iterable[int], num_slots: int) -> _SlotFactor:
        xp = factor.xp
        slots = tuple(slots)
        dev = device_of(factor.U)
        where = [len(slots)] * num_slots
        for row, slot in enumerate(slots):
            where[slot] = row
        return cls(
            factor,
            slots,
            xp.asarray(list(slots), dtype=xp.int64, device=dev),
            xp.asarray(where, dtype=xp.int64, device=dev),
        )

    def moved_last(self, factor: CapacitanceFactor, row: int) -> _SlotFactor:
        """The slot factor whose ``factor`` holds this one's rows with ``row`` moved last.

        What a row edit of the factor returns; the index arrays are derived from this
        one's on the device (no array made from host data on the hot path).
        """
        xp = factor.xp
        k = len(self.slots)
        si, pos = self.slot_index, self.position
        slot_index = xp.concat([si[:row], si[row + 1 :], si[row : row + 1]])
        # Rows after ``row`` move up one, ``row`` goes last; slots outside the factor
        # (position k) stay.
        up = xp.astype((pos > row) & (pos < k), xp.int64)
        last = xp.astype(pos == row, xp.int64)
        position = pos - up + last * (k - 1 - row)
        slots = self.slots[:row] + self.slots[row + 1 :] + self.slots[row : row + 1]
        return _SlotFactor(factor, slots, slot_index, position)

    def coefficients(self, P: Array) -> Array:
        """``C^{-1} P`` in slot order (zero rows for slots outside the factor)."""
        xp = self.factor.xp
        coef = self.factor.solve(xp.take(P, self.slot_index, axis=0))
        zero = xp.zeros((1, coef.shape[1]), dtype=coef.dtype, device=device_of(coef))
        return xp.take(xp.concat([coef, zero], axis=0), self.position, axis=0)


def _agreed_rows(G: Array, num_grads: int | None, options: Mapping[str, Any]) -> int | None:
    """``from_window(comm=...)``'s first reduction: G checked on every rank, one k for all.

    Returns ``num_grads`` (None stays None). Every rank raises if a rank's G is
    malformed or not finite, or if the ranks hold different numbers of gradients.
    """
    comm = check_communicator(options["comm"])
    try:
        space = array_namespace(G), device_of(G)
    except TypeError:
        space = _default_namespace(), None

    def local() -> Array:
        xp = namespace_of(G, "G")
        if G.ndim != 2:
            raise ValueError(f"G must be 2-D (k, d), got shape {tuple(G.shape)}")
        k = int(G.shape[0])
        if num_grads is not None and k > check_count(num_grads, "num_grads"):
            raise ValueError(f"G holds {k} gradients, more than num_grads={num_grads}")
        if options.get("check_finite", True) is not False:
            check_finite(xp, G, "G")
        flat = [0.0] * comm.size
        flat[comm.rank] = float(k)
        return xp.asarray(flat, dtype=xp.float64, device=device_of(G))

    total = reduce_checked(
        comm,
        space[0],
        local,
        length=comm.size,
        dtype=space[0].float64,
        device=space[1],
        what="DynamicIHVP.from_window",
        tag=("DynamicIHVP", _OP_FROM_WINDOW),
    )
    ks = [int(v) for v in host_values(total)]
    if len(set(ks)) != 1:
        raise ValueError(
            f"DynamicIHVP.from_window(comm=...): the ranks hold the columns of different "
            f"numbers of gradients, rank by rank {ks}"
        )
    return num_grads


class DynamicIHVP(LinearOperator):
    r"""The inverse damped Fisher of a sliding window of the last gradients.

    ``F = damp * I + (1/k) * sum(g g^T)`` over the ``k <= num_grads``
    gradients currently in the window (``k = num_grads`` once it is full).
    Inserting a gradient into a full window replaces the oldest one. Every
    buffer is created once, in the given namespace and on the given device.

    Parameters
    ----------
    num_grads : int
        The window's capacity m.
    dim : int
        The number of coordinates d.
    damp : float
        The damping ``lambda > 0``.
    dtype : dtype or str
        Storage dtype of the gradients (``"float32"`` or ``"float64"`` or the
        namespace's dtype object). All m x m work is float64. 2-byte storage
        (``"float16"`` for NumPy and CuPy, ``"float16"`` or ``"bfloat16"``
        for PyTorch) keeps the window in 2 bytes per entry: each gradient is
        rounded to it once when it is inserted, the operator is the inverse
        Fisher of the stored (rounded) gradients, it computes in float32 and
        its ``dtype`` is float32 (docs/mathematics.rst, "2-byte storage").
    xp : module, optional
        The array namespace (default: NumPy). Any Array-API namespace, or
        the library module itself (``torch``, ``cupy``, ...).
    device : optional
        The device of the buffers (default: the namespace's default).
    zero_init : bool, optional
        Reproduce the authors' convention: the window starts as ``num_grads``
        zero gradients and the normalisation is fixed at ``1/num_grads``.
        Removing a gradient then sets it to zero.
    update_method : {"incremental", "refactor"}, optional
        ``"incremental"`` (default) edits the float64 Cholesky factor of the
        m x m capacitance matrix in O(m^2) per replaced gradient;
        ``"refactor"`` refactorises it in O(m^3), as a reference.
    refactor_every : int, optional
        Refactorise in full after this many incremental edits (default m),
        which bounds the drift of the factor; a cheap drift check after each
        edit refactorises earlier if needed.
    check_finite : bool, optional
        Refuse gradients and vectors holding NaN or infinity (default True).
    refine : int, optional
        Steps of iterative refinement in every product (default 0), each with
        the residual ``x - F y`` computed from the window in float64. For a
        float64 window one step brings the error of vectors near the window's
        span (such as its mean) down to ``eps * kappa``; float32 and 2-byte
        products are already at float32's rounding (see Notes). A step costs
        about two more products and two float64 passes over the window.
    comm : Communicator, optional
        Shard the window by columns over the ranks of ``comm`` (see
        :mod:`mfac_core.distributed`): ``dim`` is then this rank's number of
        coordinates (0 allowed), and every method takes and returns this
        rank's entries; see Notes. Every other argument must be the same on
        every rank.

    Attributes
    ----------
    layout : ShardLayout or None
        With ``comm``: ``widths`` (every rank's column count), ``start`` and
        ``stop`` (this rank's global column range) and ``dim`` (d over all
        ranks). None otherwise.
    local_shape : tuple
        ``(dim, dim)``, the shapes products take and return on this rank. Unlike
        :class:`StaticIHVP`, whose ``shape`` and ``dim`` are global, a sharded
        window is sized by the constructor's ``dim``, so ``shape`` is this
        rank's too and equals ``local_shape``; the global d is ``layout.dim``.
    dtype, device
        The dtype of products and vectors (the storage dtype, or float32 for
        2-byte storage) and the device.
    storage_dtype : str or None
        ``"float16"`` or ``"bfloat16"`` for a 2-byte window, else ``None``.
    num_grads, dim, damp
        m, d and lambda.

    See Also
    --------
    StaticIHVP : The same inverse for a fixed set of gradients.

    Notes
    -----
    With the window's gradients in the rows of ``G`` (k x d) and the
    capacitance matrix ``C = k lambda I + G G^T = U^T U`` (float64),

    .. math:: F^{-1} x = (x - G^T C^{-1} G x) / \lambda .

    Replacing a gradient g by g' changes one row and column of ``G G^T``:
    one product ``G g'`` (O(dm)) and an O(m^2) edit of ``U`` (delete a row and
    column by a rank-one update, append one by a triangular solve). The
    optimiser step :meth:`update_and_matvec` shares ``G g'`` between the
    update and the product, so it reads the m x d window twice, the floor.
    While the window fills up (or after a removal) the normalisation ``1/k``
    changes every diagonal entry of ``C`` and the factor is recomputed
    (O(k^3)); with ``zero_init=True`` it never changes.

    Precision: both passes over the window (the new Gram row ``G g'``, which
    is also the step's projection, and ``g - G^T a``) read it in its storage
    dtype and accumulate in float64, the result rounded once
    (docs/mathematics.rst, "Exact passes"); the factor and all m x m work are
    float64. So every Gram row is exact to float64 rounding, and for float32
    and 2-byte windows products are within ``8 eps(float32)`` of the exact
    inverse of the Fisher of the stored gradients for kappa up to 1e6 (1e7
    for gradients with a shared mean and independent spread).
    A 2-byte window computes the row from the *rounded* gradient, so that
    factor and stored window agree.

    Sharded (``comm=``), each rank holds its ``m x d_r`` columns of the window;
    every contraction over d is this rank's part summed by
    ``comm.allreduce_sum``, and everything m x m (Gram matrix, factor, slot
    order, refactorisation and drift decisions, warnings) is computed on every
    rank from the reduced, bit-identical numbers, so the ranks' replicated
    states stay identical bit for bit. One call, one reduction: :meth:`update`
    and :meth:`update_and_matvec` reduce the new Gram row (m numbers, its
    diagonal ``|g|^2`` included, since the row is written before the product),
    :meth:`matvec` m numbers and :meth:`matmat` ``m k``, each with a status
    word appended (6 numbers: how many ranks failed, per exception class, and a
    tag of the operation and state), so that a bad input on one rank (wrong
    shape or dtype, NaN), or ranks calling different operations, makes every
    rank raise the same exception class and leaves every rank's window as it
    was. Each refinement step costs two more reductions of ``m k``.
    :meth:`remove` and :meth:`set_damp` reduce ``size`` numbers to check that
    every rank passed the same argument. :meth:`todense`, ``to_scipy()`` and
    operator arithmetic are refused (``TypeError``), as for every
    column-sharded operator.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import DynamicIHVP, StaticIHVP
    >>> rng = np.random.default_rng(0)
    >>> op = DynamicIHVP(4, 50, damp=0.1, dtype="float64")
    >>> for _ in range(6):
    ...     step = op.update_and_matvec(rng.standard_normal(50))
    >>> len(op), op.window().shape
    (4, (4, 50))
    >>> x = rng.standard_normal(50)
    >>> bool(np.allclose(op @ x, StaticIHVP(op.window(), damp=0.1) @ x))
    True
    """

    def __init__(
        self,
        num_grads: int,
        dim: int,
        /,
        *,
        damp: float,
        dtype: Any,
        xp: Any = None,
        device: Any = None,
        zero_init: bool = False,
        update_method: str = "incremental",
        refactor_every: int | None = None,
        check_finite: bool = True,
        refine: int = 0,
        comm: Communicator | None = None,
    ) -> None:
        options = dict(
            damp=damp,
            dtype=dtype,
            xp=xp,
            device=device,
            zero_init=zero_init,
            update_method=update_method,
            refactor_every=refactor_every,
            check_finite=check_finite,
            refine=refine,
        )
        self._comm: Communicator | None = None
        self.layout: ShardLayout | None = None
        if comm is None:
            self._build(num_grads, dim, **options)
            return
        comm = check_communicator(comm)
        row: list[float] = []

        def local() -> Array:
            self._build(num_grads, dim, sharded=True, **options)
            row.extend(self._settings())
            return self._one_hot(comm, row)

        space = _reduction_space(xp, device)
        total = reduce_checked(
            comm,
            space[0],
            local,
            length=comm.size * _NUM_SETTINGS,
            dtype=space[0].float64,
            device=space[1],
            what="DynamicIHVP(comm=...)",
            tag=("DynamicIHVP", _OP_INIT),
        )
        rows = _rows(total, comm.size)
        if any(r[3] != rows[0][3] for r in rows):
            raise TypeError(
                "DynamicIHVP(comm=...) must be built with the same dtype on every rank; "
                f"rank by rank (bits of the compute dtype + 1000 x storage code, 1: float16, "
                f"2: bfloat16): {[r[3] for r in rows]}"
            )
        if any(r[1:] != rows[0][1:] for r in rows):
            raise ValueError(
                "DynamicIHVP(comm=...) must be built with the same num_grads, damp, dtype, "
                "zero_init, update_method, refactor_every, refine and check_finite on every "
                f"rank; rank by rank: {[r[1:] for r in rows]}"
            )
        if sum(int(r[0]) for r in rows) == 0:
            raise ValueError("DynamicIHVP(comm=...): every rank holds 0 columns (dim=0)")
        self._comm = comm
        self.layout = ShardLayout(comm.rank, tuple(int(r[0]) for r in rows))

    def _build(
        self,
        num_grads: int,
        dim: int,
        *,
        damp: float,
        dtype: Any,
        xp: Any,
        device: Any,
        zero_init: bool,
        update_method: str,
        refactor_every: int | None,
        check_finite: bool,
        refine: int,
        sharded: bool = False,
    ) -> None:
        num_grads = check_count(num_grads, "num_grads")
        self.refine = check_count(refine, "refine", minimum=0)
        # A shard may hold no column (more ranks than coordinates).
        dim = check_count(dim, "dim", minimum=0 if sharded else 1)
        self.damp = check_damp(damp)
        self.update_method = check_choice(
            update_method, "update_method", ("incremental", "refactor")
        )
        self.refactor_every = (
            num_grads if refactor_every is None else check_count(refactor_every, "refactor_every")
        )
        self.zero_init = check_flag(zero_init, "zero_init")
        if xp is None:
            xp = _default_namespace()
        else:
            try:
                xp = array_namespace(xp.empty(0))
            except (AttributeError, TypeError):
                raise TypeError(
                    f"xp must be an array namespace or library module (numpy, "
                    f"torch, cupy, ...), got {xp!r}"
                ) from None
        dtype, compute, storage = _window_dtypes(xp, dtype)
        G = xp.zeros((num_grads, dim), dtype=dtype, device=device)
        check_writeable(G, "window buffer", why="DynamicIHVP (a window edited in place)")
        #: The 2-byte storage dtype's name ("float16", "bfloat16"), or None.
        self.storage_dtype = storage
        super().__init__(
            shape=(dim, dim),
            # The library's dtype object, as G's, whatever form was given; for 2-byte
            # storage the compute dtype (float32).
            dtype=G.dtype if storage is None else compute,
            xp=xp,
            device=device_of(G),
            symmetric=True,
            check_finite=check_flag(check_finite, "check_finite"),
        )
        self.num_grads, self.dim = num_grads, dim
        self._G = G
        self._gram = xp.zeros((num_grads, num_grads), dtype=xp.float64, device=self.device)
        # Whether every Gram entry was accumulated in float64 (float64 storage, an empty
        # window, from_window, or a Gram recomputed after a failed edit; see _place).
        self._exact_gram = True
        # Once the window is full, factors ping-pong between two C-ordered buffers
        # created once: no allocation per step, and row-wise writes.
        self._buffers: tuple[Any, Any] | None = None
        # Counts the edits of the replicated state (see _tag); reset adds one.
        self._version = 0
        self.reset()

    def _settings(self) -> list[float]:
        """This rank's width and the settings every rank must share, as numbers."""
        return [
            float(self.dim),
            float(self.num_grads),
            self.damp,
            # The compute dtype's bits and the storage: float16 and bfloat16 windows
            # both compute in float32 and must not pass for each other.
            float(self._xp.finfo(self.dtype).bits)
            + 1000.0 * (None, "float16", "bfloat16").index(self.storage_dtype),
            float(self.zero_init),
            float(self.update_method == "incremental"),
            float(self.refactor_every),
            float(self.refine),
            float(self.check_finite),
        ]

    def _one_hot(self, comm: Communicator, values: list[float]) -> Array:
        """A ``size x len(values)`` table, flattened, holding ``values`` in this rank's row.

        Summed over ranks it tells every rank every rank's values exactly (each entry
        is one rank's value plus zeros).
        """
        flat = [0.0] * (comm.size * len(values))
        flat[comm.rank * len(values) : (comm.rank + 1) * len(values)] = values
        return self._xp.asarray(flat, dtype=self._xp.float64, device=self.device)

    @property
    def comm(self) -> Communicator | None:
        """The communicator of a sharded operator, or None."""  # numpydoc ignore=RT01
        return self._comm

    @property
    def local_shape(self) -> tuple[int, int]:
        """``shape``: a sharded window's shape is already this rank's."""  # numpydoc ignore=RT01
        return self.shape

    @classmethod
    def from_window(
        cls, G: Array, /, *, damp: float, num_grads: int | None = None, **options: Any
    ) -> DynamicIHVP:
        """Build a window holding the gradients in the rows of ``G`` (oldest first).

        The set-up is BLAS-3: one Gram product (accumulated in float64) and one
        factorisation.

        Parameters
        ----------
        G : array, shape (k, d)
            The gradients, oldest first; the operator takes G's namespace,
            device and dtype (a 2-byte G gives a 2-byte window).
        damp : float
            The damping ``lambda > 0``.
        num_grads : int, optional
            The window's capacity m (default: k).
        **options
            The other keyword arguments of :class:`DynamicIHVP`.

        Returns
        -------
        DynamicIHVP
            The window, with its factor computed.

        Raises
        ------
        ValueError
            If G is not 2-D, holds NaN or infinity, or has more rows than
            ``num_grads``.
        FactorizationError
            If the window's capacitance matrix cannot be factorised in float64.
        """
        if options.get("comm") is not None:
            num_grads = _agreed_rows(G, num_grads, options)
        xp = namespace_of(G, "G")
        if G.ndim != 2:
            raise ValueError(f"G must be 2-D (k, d), got shape {tuple(G.shape)}")
        k, d = G.shape
        num_grads = k if num_grads is None else check_count(num_grads, "num_grads")
        if k > num_grads:
            raise ValueError(f"G holds {k} gradients, more than num_grads={num_grads}")
        op = cls(num_grads, d, damp=damp, dtype=G.dtype, xp=xp, device=device_of(G), **options)
        if k == 0:
            return op
        if op.check_finite and op._comm is None:  # a sharded G was checked collectively
            check_finite(xp, G, "G")
        G = detached(G)
        gram = op._summed(_local_gram(xp, G))
        # Both conventions put the k gradients into slots 0..k-1, oldest first.
        if op.zero_init:
            window = list(range(k, num_grads)) + list(range(k))
            free: list[int] = []
        else:
            window, free = list(range(k)), list(range(num_grads - 1, k - 1, -1))
        full_gram = xp.zeros((num_grads, num_grads), dtype=xp.float64, device=op.device)
        full_gram[:k, :k] = gram
        factor = op._factorized(full_gram, window)  # raises before anything changes
        op._G[:k, ...] = G
        op._gram = full_gram
        op._exact_gram = True
        op._window, op._free = deque(window), free
        op._commit(factor, refactored=True)
        return op

    # -- bookkeeping -------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the window (or, with ``zero_init``, fill it with zero gradients)."""
        m = self.num_grads
        self._G[...] = 0
        self._gram[...] = 0
        self._exact_gram = True
        self._edits = 0
        self._version += 1
        self.refactor_count = 0
        if self.zero_init:
            self._window: deque[int] = deque(range(m))
            self._free: list[int] = []
        else:
            self._window = deque()
            self._free = list(range(m - 1, -1, -1))
        self._commit(self._factorized(self._gram, list(self._window)), refactored=True)

    def __len__(self) -> int:
        """Return the number of gradients in the window.

        Returns
        -------
        int
            ``k``, at most ``num_grads``.
        """
        return len(self._window)

    @property
    def is_full(self) -> bool:
        """Whether the window holds ``num_grads`` gradients."""  # numpydoc ignore=RT01
        return len(self._window) == self.num_grads

    @property
    def slots(self) -> list[int]:
        """The window slots: buffer rows of its gradients, oldest first."""  # numpydoc ignore=RT01
        return list(self._window)

    def window(self) -> Array:
        """Return the window's gradients, oldest first.

        Returns
        -------
        array, shape (k, d)
            A new array (not a view of the buffer), in the storage dtype.
        """
        idx = self._xp.asarray(list(self._window), dtype=self._xp.int64, device=self.device)
        return self._xp.take(self._G, idx, axis=0)

    def _shift(self, k: int, damp: float | None = None) -> float:
        return (self.num_grads if self.zero_init else k) * (self.damp if damp is None else damp)

    # -- the factor --------------------------------------------------------------------

    def _free_buffer(self) -> Any:
        """The one of the two m x m factor buffers that does not hold the factor."""
        if self._buffers is None:
            m = self.num_grads
            self._buffers = (
                self._xp.empty((m, m), dtype=self._xp.float64, device=self.device),
                self._xp.empty((m, m), dtype=self._xp.float64, device=self.device),
            )
        first, second = self._buffers
        # Before the first factor exists, either buffer is free.
        current = getattr(self, "_factor", None)
        return second if current is not None and current.factor.U is first else first

    def _factorized(
        self, gram: Array, slots: list[int], damp: float | None = None, *, exact: bool = False
    ) -> _SlotFactor:
        """The factor of the capacitance matrix of ``slots``, in full (O(k^3)).

        With the operator's damping unless ``damp`` is given. Raises
        ``FactorizationError``; nothing of the operator changes.
        """
        damp = self.damp if damp is None else damp
        xp = self._xp
        k = len(slots)
        idx = xp.asarray(slots, dtype=xp.int64, device=self.device)
        sub = xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
        out = self._free_buffer() if k == self.num_grads else None
        factor = _capacitance.factorize(
            xp,
            sub,
            shift=self._shift(k, damp),
            scale=1.0,
            damp=damp,
            gram_dtype="float64" if exact or self._exact_gram else "float32",
            out=out,
        )
        self._warn_if_hopeless(factor)
        return _SlotFactor.build(factor, slots, self.num_grads)

    def _warn_if_hopeless(self, factor: CapacitanceFactor) -> None:
        """Warn, once until the window recovers, when eps(float64) * kappa >= 1.

        The passes and the factor are float64 whatever the storage dtype
        (docs/mathematics.rst, "Exact passes"), so the storage's own eps does not
        decide when digits run out.

        Checked at every full factorisation (at least every ``refactor_every``
        edits), where the kappa bounds come for free.
        """
        if factor.kappa is None:
            return
        eps = float(self._xp.finfo(self._xp.float64).eps)
        hopeless = eps * factor.kappa[0] >= 1.0
        if hopeless and not getattr(self, "_warned_hopeless", False):
            _capacitance.warn_if_hopeless(
                factor.kappa[0],
                damp=factor.shift / max(factor.size, 1)
                if not self.zero_init
                else factor.shift / self.num_grads,
                eps=eps,
                dtype="float64 (the passes' accumulation)",
            )
        self._warned_hopeless = hopeless

    def _edited(
        self,
        slot: int,
        b: Array,
        *,
        gram: Array | None = None,
        pending: Any = None,
        speculation: _Speculation | None = None,
    ) -> tuple[_SlotFactor, bool]:
        """The factor after ``slot`` gets Gram row ``b``: an O(m^2) edit where possible.

        Returns ``(factor, refactored)``; raises ``FactorizationError``; nothing
        of the operator changes (the free factor buffer is scratch). With
        ``gram`` (a recomputed Gram matrix, row ``slot`` included) the factor is
        computed from it in full. ``pending`` is the gradient's deferred check
        (:meth:`_check_gradient`), judged here before anything else can fail: the
        row edit reads it in the same transfer as its own checks, so that a step
        synchronises with the device once. A ``speculation`` computes the step's
        product with the edited factor, whose finiteness joins that read; it is
        discarded (``speculation.s`` None) unless the edit is kept.
        """
        current = self._factor
        slots = [s for s in current.slots if s != slot] + [slot]
        k = len(slots)
        if gram is not None:
            self._judge(pending, [])
            return self._factorized(gram, slots, exact=True), True
        if (
            self.update_method == "incremental"
            and len(current.slots) == k == self.num_grads
            and self._edits < self.refactor_every
        ):
            xp = self._xp
            row = current.slots.index(slot)
            si = current.slot_index
            others = xp.take(b, xp.concat([si[:row], si[row + 1 :]]), axis=0)
            margin = None
            try:
                if _engine.is_accelerator(xp, b):
                    # The pivot's check joins the step's one read (see _judge).
                    factor, margin = current.factor.replace_row_deferred(
                        row, others, b[slot] + self._shift(k), out=self._free_buffer()
                    )
                else:
                    # On the host a read costs nothing, and NaN never reaches NumPy's
                    # arithmetic (whose warnings would be errors in strict code).
                    self._judge(pending, [])
                    pending = None
                    factor = current.factor.replace_row(
                        row, others, float(b[slot]) + self._shift(k), out=self._free_buffer()
                    )
            except NotPositiveDefinite:
                pass  # the full factorisation below decides, and words any error
            else:
                edited = current.moved_last(factor, row)
                drift = self._drift(edited, b[slot])
                checks = [drift] if margin is None else [margin, drift]
                if speculation is not None:
                    checks.append(speculation.compute(edited))
                values = self._judge(pending, checks)
                if speculation is not None:
                    speculation.finite = values.pop() > 0
                pivot_ok = margin is None or values[0] > 0
                if pivot_ok and not values[-1] > _DRIFT_TOL:
                    return edited, False
                pending = None  # judged above
                if speculation is not None:
                    speculation.s = None  # made with the edit that was just refused
        self._judge(pending, [])
        gram = self._xp.asarray(self._gram, copy=True)
        gram[slot, :] = b
        gram[:, slot] = b
        return self._factorized(gram, slots), True

    def _drift(self, edited: _SlotFactor, new_diagonal: Array) -> Array:
        """How far diag(U^T U) drifted from diag(C) on a sample of columns (O(32 m)).

        The edited slot is the factor's last; its Gram diagonal is ``new_diagonal``.
        A 0-d array: it is read with the step's other checks (:meth:`_judge`).
        """
        xp = self._xp
        k = len(edited.slots)
        pos = self._drift_positions(k)
        want = xp.take(xp.linalg.diagonal(self._gram), xp.take(edited.slot_index, pos), axis=0)
        want = xp.where(pos == k - 1, new_diagonal, want)
        return edited.factor.column_drift_array(pos, want + self._shift(k))

    def _drift_positions(self, k: int) -> Array:
        """The sampled columns of :meth:`_drift`, made on the device once per ``k``."""
        cache = self.__dict__.setdefault("_drift_sample", {})
        if k not in cache:
            xp = self._xp
            cache[k] = xp.asarray(
                _evenly_spaced(k, _DRIFT_SAMPLE), dtype=xp.int64, device=self.device
            )
        return cache[k]

    def _judge(self, pending: Any, checks: list[Array]) -> list[float]:
        """Read ``checks`` (0-d arrays) and a gradient's deferred check in one transfer.

        Raises the gradient's error if its check fails (before ``checks`` are looked
        at); returns the values of ``checks``.
        """
        if pending is None and not checks:
            return []
        xp = self._xp
        arrays = checks if pending is None else [pending[1], *checks]
        values = host_values(xp.stack([xp.astype(xp.reshape(a, ()), xp.float64) for a in arrays]))
        if pending is not None:
            self._judge_gradient(pending[0], values[0], finite=pending[2])
            values = values[1:]
        return values

    def __copy__(self) -> DynamicIHVP:
        # The window is edited in place: a copy that shared its buffers would corrupt the
        # original at its next update, so every copy is a deep one.
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> DynamicIHVP:
        # The communicator is shared, not copied: it stands for the group of processes.
        state = LinearOperator.__getstate__(self)
        comm = state.pop("_comm", None)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(state, memo))
        new._comm = comm
        return new

    def __getstate__(self) -> dict[str, Any]:
        if self._comm is not None:
            raise TypeError(
                "a sharded DynamicIHVP holds a communicator, which cannot be pickled; "
                "save state_dict() on every rank instead"
            )
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles made before operators could be sharded have neither attribute.
        super().__setstate__({"_comm": None, "layout": None, "_version": 0, **state})

    def _commit(self, factor: _SlotFactor, *, refactored: bool) -> None:
        self._factor = factor
        self._version += 1
        if refactored:
            self._edits = 0
            self.refactor_count += 1
        else:
            self._edits += 1

    # -- updates -----------------------------------------------------------------------

    def _check_gradient(self, g: Array, *, deferred: bool = False, finite: bool = False) -> Any:
        """``g`` checked (shape, library, dtype; NaN, infinity and range where asked).

        NaN and infinity are refused with ``check_finite`` or ``finite``. With
        ``deferred``, returns ``(g, pending)``: the value checks need a number read
        from the device, which ``pending`` (``(g, max |g|, refuse NaN)``, the maximum
        a 0-d array; or None) leaves to :meth:`_judge`, so that a step reads all its
        checks at once.
        """
        # The window stores gradients, never their autograd history.
        g = detached(check_operand(self._xp, self.device, self.dtype, g, "g", owner=repr(self)))
        if g.ndim != 1 or g.shape[0] != self.dim:
            raise ValueError(f"g must have shape ({self.dim},), got {tuple(g.shape)}")
        finite = finite or self.check_finite
        needed = finite or self.storage_dtype is not None
        # A rank of a sharded window may hold no coordinates: nothing to check.
        pending = (g, self._xp.max(self._xp.abs(g)), finite) if needed and g.shape[0] else None
        if deferred:
            return g, pending
        if pending is not None:
            self._judge_gradient(g, float(pending[1]), finite=finite)
        return g

    def _judge_gradient(self, g: Array, biggest: float, *, finite: bool) -> None:
        """Raise if ``g``, whose largest magnitude is ``biggest``, is refused.

        NaN and infinity propagate to ``biggest``: one number decides both checks.
        They are refused with ``finite``, and always by a 2-byte window.
        """
        if finite and not math.isfinite(biggest):
            raise _Refused("g must not contain NaN or infinity", finite=False)
        if self.storage_dtype is not None:
            self._check_representable(g, biggest)

    def _check_representable(self, g: Array, biggest: float) -> None:
        """Refuse a gradient that the 2-byte storage would turn into infinity."""
        xp = self._xp
        info = xp.finfo(self._G.dtype)
        top, eps = float(info.max), float(info.eps)
        # Magnitudes from the largest finite value plus half its spacing upwards round
        # to infinity (the spacing there is 2**emax * eps, and top = (2 - eps) 2**emax).
        limit = top + top * eps / (2 * (2 - eps))
        if not biggest < limit:
            if not math.isfinite(biggest):  # a NaN or infinity given is reported as such
                raise _Refused("g must not contain NaN or infinity", finite=False)
            raise _Refused(
                f"g does not fit the window's {self.storage_dtype} storage: an entry "
                f"({biggest:g}) overflows its range (largest finite {top:g}); scale the "
                "gradients or store them in a wider dtype",
                finite=True,
            )

    def _products(self, slot: int, g: Array) -> tuple[Any, Any]:
        """The Gram row of ``slot`` (float64) and ``G g`` (float64, ``(m, 1)``), one pass.

        ``G g`` is ``None`` when it is the Gram row. With 2-byte storage the row
        is that of the stored (rounded) gradient, so that factor and window
        agree, and ``G g`` that of ``g`` as given, for the product of
        :meth:`update_and_matvec`: both columns in one float32 pass.
        """
        xp = self._xp
        if self.storage_dtype is None:
            return _engine.project(xp, self._G, g[:, None])[:, 0], None
        stored = xp.astype(self._G[slot, ...], self.dtype)
        P = _engine.project_rows(xp, self._G, xp.stack([stored, g], axis=0))
        return P[:, 0], P[:, 1:]

    def _place(
        self,
        slot: int,
        g: Array,
        b: Array | None = None,
        *,
        pending: Any = None,
        speculation: _Speculation | None = None,
    ) -> tuple[Array, Any, Any]:
        """Put gradient ``g`` into ``slot``; return it (checked) and its Gram row (float64).

        Also returns ``G g`` (float64, ``(m, 1)``) for the product of
        :meth:`update_and_matvec` (``None`` when ``b`` is given). A 2-byte
        window rounds ``g`` here, once.

        The row is written first so that one product ``G g`` gives the whole
        Gram row, the diagonal included: entries of one kernel keep a
        duplicated gradient's 2 x 2 block exactly singular, not indefinite by
        rounding. ``b`` may be given when it is known (a zero gradient). If
        the new factor cannot be computed, the old row is put back and the
        operator is as it was. A sharded operator checks ``g`` here, inside the
        reduction of the row, so that every rank raises if one rank's ``g`` is bad.
        ``pending`` is an unsharded ``g``'s deferred check (:meth:`_check_gradient`),
        judged before the operator changes. ``speculation`` is handed the product's
        operands and computes it with the edited factor (see :meth:`_edited`).
        """
        xp = self._xp
        old = xp.asarray(self._G[slot, ...], copy=True)
        gram = None
        product = None
        try:
            if b is None:
                g, b, product = self._written_row(slot, g)
                if speculation is not None:
                    speculation.X = g[:, None]
                    speculation.P = b[:, None] if product is None else product
            else:
                self._G[slot, ...] = g
            try:
                factor, refactored = self._edited(slot, b, pending=pending, speculation=speculation)
            except FactorizationError:
                if self._exact_gram:
                    raise
                # The row is exact (the engine sums in float64), but the rest of a Gram
                # loaded from an older checkpoint may hold single-precision rounding
                # that makes nearly collinear windows indefinite: recompute it, once.
                gram = self._exact_gram_matrix()
                b = xp.asarray(gram[slot, :], copy=True)
                factor, refactored = self._edited(slot, b, gram=gram)
        except BaseException:
            self._G[slot, ...] = old
            raise
        if gram is not None:
            self._gram = gram
            self._exact_gram = True
        self._gram[slot, :] = b
        self._gram[:, slot] = b
        self._commit(factor, refactored=refactored)
        return g, b, (b[:, None] if product is None else product)

    # -- reductions over the d coordinates (every one goes through here) ---------------

    def _written_row(self, slot: int, g: Array) -> tuple[Array, Any, Any]:
        """Write ``g`` into ``slot``; return it, its Gram row and ``G g`` (float64, summed).

        ``G g`` (``(m, 1)``) is ``None`` when it is the row (see :meth:`_products`).
        Unsharded, ``g`` was checked by the caller. Sharded, it is checked here and the
        row reduced with the status word: one reduction of m + 20 numbers (2 m + 20 for a
        2-byte window, whose row and ``G g`` differ).
        """
        xp = self._xp
        m = self.num_grads
        checked = [g]

        def local() -> Array:
            if self._comm is not None:
                checked[0] = self._check_gradient(g)
            self._G[slot, ...] = checked[0]
            row, product = self._products(slot, checked[0])
            return row if product is None else xp.concat([row, product[:, 0]])

        if self.storage_dtype is None:
            return checked[0], self._reduced(local, m, "DynamicIHVP.update", _OP_UPDATE), None
        total = self._reduced(local, 2 * m, "DynamicIHVP.update", _OP_UPDATE)
        return checked[0], total[:m], total[m:][:, None]

    def _tag(self, op: int) -> tuple[Any, ...]:
        """The tag of operation ``op`` on this operator's replicated state.

        The whole count of state edits, not a residue that two ``reset`` calls
        on one rank would bring back: ranks whose counts differ raise, whatever
        the sequence of local edits. ``load_state_dict`` replaces the state, so
        its tag is the operation's alone: loading every rank from one checkpoint
        mends diverged states (and restarts the count on every rank).
        """
        if op == _OP_LOAD:
            return ("DynamicIHVP", op)
        return ("DynamicIHVP", op, self._version)

    def _reduced(
        self,
        local: Any,
        length: int,
        what: str,
        op: int,
        *,
        agree: Any = None,
        disagree: tuple[type[Exception], str] | None = None,
    ) -> Any:
        """``local()`` (1-D float64) summed over the ranks with a status word.

        Every rank raises if ``local()`` raised on any rank, if the ranks called
        different operations (``op``) or hold diverged states, or if ``agree()``
        differs between ranks (``reduce_checked``).
        """
        if self._comm is None:
            return local()
        xp = self._xp
        return reduce_checked(
            self._comm,
            xp,
            local,
            length=length,
            dtype=xp.float64,
            device=self.device,
            what=what,
            tag=self._tag(op),
            agree=agree,
            disagree=disagree,
        )

    def _summed(self, x: Array) -> Array:
        """``x`` (float64, computed from this rank's columns) summed over the ranks."""
        if self._comm is None:
            return x
        xp = self._xp
        total = self._comm.allreduce_sum(xp.reshape(x, (-1,)))
        return xp.reshape(total, x.shape)

    def _agreed(self, what: str, op: int, local: Any) -> None:
        """Check collectively that ``local()`` (one number; it may raise) agrees on every rank.

        For arguments that must be the same on every rank of a sharded operator (a
        slot, a damping), whose replicated state would otherwise diverge silently:
        one reduction of ``size`` numbers. Unsharded, just ``local()``.
        """
        if self._comm is None:
            local()
            return
        comm = self._comm
        total = self._reduced(lambda: self._one_hot(comm, [float(local())]), comm.size, what, op)
        values = host_values(total)
        if any(v != values[0] for v in values):
            raise ValueError(
                f"{what} must be called with the same argument on every rank of a sharded "
                f"operator; rank by rank: {values}"
            )

    def _pieces(self) -> list[Any]:
        """The column pieces of the buffer for its float64 passes (32 MiB each at most)."""
        if not self.dim:  # a shard without columns
            return []
        whole = BlockGroup(0, 1, self.dim)
        return list(pieces(whole, max(1, _PIECE_ENTRIES // self.num_grads)))

    def _exact_gram_matrix(self) -> Any:
        """The buffer's Gram matrix accumulated in float64 (O(m^2 d), on the rare path)."""
        return self._summed(_local_gram(self._xp, self._G))

    def _insert(self, g: Array, *, speculation: _Speculation | None = None) -> tuple[Array, Any]:
        """Insert gradient ``g``; return it (checked) and ``G g`` (float64, ``(m, 1)``).

        With a ``speculation`` (unsharded only), NaN and infinity are refused
        whatever ``check_finite``, and the step's product may be computed before
        the checks are read (:meth:`_edited`).
        """
        pending = None
        if self._comm is None:  # sharded, g is checked inside the reduction of its row
            finite = speculation is not None
            # On a device the gradient's check waits for the row edit's, to be read
            # with it in one transfer; on the host it runs first.
            if _engine.is_accelerator(self._xp, self._G):
                g, pending = self._check_gradient(g, deferred=True, finite=finite)
            else:
                g = self._check_gradient(g, finite=finite)
        slot = self._window[0] if self.is_full else self._free[-1]
        g, _, product = self._place(slot, g, pending=pending, speculation=speculation)
        if self.is_full:
            self._window.popleft()
        else:
            self._free.pop()
        self._window.append(slot)
        return g, product

    def update(self, g: Array, /) -> None:
        """Insert gradient ``g``; a full window drops its oldest.

        A gradient holding NaN or infinity, or one that makes the window's
        capacitance matrix singular in float64, is refused and the window is
        left unchanged.

        Parameters
        ----------
        g : array, shape (d,)
            The gradient, in the operator's namespace and device; float32 into
            a float64 window is promoted; float32 (or 2-byte) into a 2-byte
            window is rounded to its storage dtype, once.

        Raises
        ------
        ValueError
            For a wrong shape, NaN or infinity, or another device; for an
            entry beyond the range of a 2-byte storage dtype (float16's
            largest finite value is 65504).
        TypeError
            For another library or a lossy dtype.
        FactorizationError
            If the window's capacitance matrix cannot be factorised with it.
        """
        self._insert(g)

    def update_and_matvec(self, g: Array, /) -> Array:
        """Insert ``g``, then return ``F^{-1} g`` for the window that includes it.

        The optimiser step: the product ``G g`` serves both the update of the
        Gram matrix and the product, so the m x d window is read twice in all.

        Parameters
        ----------
        g : array, shape (d,)
            The gradient, as for :meth:`update`.

        Returns
        -------
        array, shape (d,)
            ``F^{-1} g`` in the operator's dtype (after ``refine`` steps),
            for ``g`` as given (a 2-byte window stores it rounded: ``F`` is
            the Fisher of the stored gradients).

        Raises
        ------
        ValueError, TypeError, FactorizationError
            As :meth:`update`; the window is then unchanged.
        """
        g, product = self._insert(g)
        X = g[:, None]
        return self._refined(X, self._finish(X, product))[:, 0]

    def _update_and_matvec_checked(self, g: Array, /) -> _StepCheck:
        """:meth:`update_and_matvec` for an optimiser step that must not fail on bad values.

        NaN and infinity in ``g`` are refused whatever ``check_finite``, and
        reported with a 2-byte window's range error as a status, not raised;
        whether the product is finite is returned with it. On a device, the
        steady-state step (a full window and a row edit) reads the gradient's
        check, the edit's and the product's finiteness in one transfer: the
        product is computed with the edited factor before that read and
        discarded if the step is refused. Unsharded windows only (a sharded
        gradient is checked collectively, inside the reduction of its row).

        Parameters
        ----------
        g : array, shape (d,)
            The gradient, as for :meth:`update`.

        Returns
        -------
        _StepCheck
            The status, the product and whether it is finite.

        Raises
        ------
        TypeError, ValueError
            For a wrong library, dtype, device or shape, as :meth:`update`.
        FactorizationError
            As :meth:`update`; the window is then unchanged.
        """
        if self._comm is not None:
            raise ValueError("_update_and_matvec_checked is for unsharded windows only")
        speculation = _Speculation(self)
        try:
            g, product = self._insert(g, speculation=speculation)
        except _Refused as exc:
            status = "not representable" if exc.finite else "not finite"
            return _StepCheck(status, None, False, exc)
        if speculation.s is not None:
            return _StepCheck("ok", speculation.s, speculation.finite, None)
        # Not a row edit (filling up, a refactorisation): the product, then its read.
        xp = self._xp
        X = g[:, None]
        s = self._refined(X, self._finish(X, product))[:, 0]
        return _StepCheck("ok", s, bool(xp.all(xp.isfinite(s))), None)

    def remove_oldest(self) -> None:
        """Remove the oldest gradient of the window."""
        if not self._window:
            raise ValueError("the window is empty")
        self.remove(self._window[0])

    def remove(self, slot: int, /) -> None:
        """Remove the gradient in buffer row ``slot`` (see :attr:`slots`).

        With ``zero_init`` the slot is set to a zero gradient and becomes the
        next one to be replaced.

        Parameters
        ----------
        slot : int
            One of :attr:`slots`.

        Raises
        ------
        ValueError
            If ``slot`` holds no gradient.
        FactorizationError
            If the remaining window cannot be factorised (it is then unchanged).
        """
        given = slot

        def check() -> int:
            try:
                index = operator.index(given) if not isinstance(given, bool) else -1
            except TypeError:
                index = -1  # not an integer: reported as holding no gradient below
            if index not in self._window:
                raise ValueError(
                    f"slot {given!r} holds no gradient; the window's slots are {list(self._window)}"
                )
            return index

        self._agreed("DynamicIHVP.remove", _OP_REMOVE, check)
        slot = check()
        xp = self._xp
        if self.zero_init:
            self._place(
                slot,
                xp.zeros((self.dim,), dtype=self.dtype, device=self.device),
                xp.zeros((self.num_grads,), dtype=xp.float64, device=self.device),
            )
            self._window.remove(slot)
            self._window.appendleft(slot)
            return
        # The normalisation 1/k changes: refactorise without the slot (its Gram row
        # is not read), then clear it; a failure leaves the window as it was.
        factor = self._factorized(self._gram, [s for s in self._window if s != slot])
        self._window.remove(slot)
        self._free.append(slot)
        self._G[slot, ...] = 0
        self._gram[slot, :] = 0
        self._gram[:, slot] = 0
        self._commit(factor, refactored=True)

    # -- products ----------------------------------------------------------------------

    def _finish(self, X: Array, P: Array, factor: _SlotFactor | None = None) -> Any:
        """``(X - G^T C^{-1} P) / damp`` given ``P = G X`` (float64, slot order).

        With the operator's factor unless ``factor`` is given (see :meth:`_edited`).
        """
        factor = self._factor if factor is None else factor
        if not factor.slots:
            return X / self.damp
        A = factor.coefficients(P)
        return _engine.combine(self._xp, self._G, X, A, alpha=1.0 / self.damp, dtype=self.dtype)

    def _solve(self, X: Array, factor: _SlotFactor | None = None) -> Array:
        return self._finish(X, self._summed(_engine.project(self._xp, self._G, X)), factor)

    def _matmat(self, X: Array) -> Array:
        return self._refined(X, self._solve(X))

    def _refined(self, X: Array, Y: Array, factor: _SlotFactor | None = None) -> Array:
        """``Y ~ F^{-1} X`` after ``refine`` steps of iterative refinement.

        With the operator's factor unless ``factor`` is given; the window's size
        must be the one ``factor`` is for.
        """
        factor = self._factor if factor is None else factor
        if not self.refine or not factor.slots:
            return Y  # an empty window's F = damp I is applied exactly
        scale = 1.0 / (self.num_grads if self.zero_init else len(self._window))
        whole = (BlockGroup(0, 1, self.dim),)

        def residual(X: Array, Y64: Array) -> Array:
            if self._comm is not None:
                return self._sharded_residual(X, Y64, scale)
            return fisher_residual(self._xp, self._G, whole, X, Y64, damp=self.damp, scale=scale)

        return refine(self._xp, lambda R: self._solve(R, factor), residual, X, Y, self.refine)

    def _sharded_residual(self, X: Array, Y: Array, scale: float) -> Array:
        """This rank's rows of ``X - F Y`` in float64, with ``G Y`` summed over the ranks.

        As ``fisher_residual`` (one block, bounded float64 column pieces), with the one
        reduction of the m x k product that the sum over d needs.
        """
        xp = self._xp
        spans = [(c0, c1) for _, _, c0, c1 in self._pieces()]
        P = xp.zeros((self.num_grads, Y.shape[1]), dtype=xp.float64, device=self.device)
        for c0, c1 in spans:
            P = P + xp.astype(self._G[:, c0:c1], xp.float64) @ Y[c0:c1, ...]
        P = self._summed(P)
        X64 = xp.astype(X, xp.float64)
        parts = [
            X64[c0:c1, ...]
            - self.damp * Y[c0:c1, ...]
            - scale * (xp.matrix_transpose(xp.astype(self._G[:, c0:c1], xp.float64)) @ P)
            for c0, c1 in spans
        ]
        if not parts:
            return xp.zeros(X.shape, dtype=xp.float64, device=self.device)
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    # -- the sharded products: the input is checked inside the reduction ---------------

    def _collective_product(self, X: Array, name: str, ndims: tuple[int, ...], k: int) -> Array:
        """``F^{-1} X`` of a sharded operator: one reduction of ``m k`` numbers + status.

        ``X`` is checked inside the reduction, so that every rank raises if one
        rank's part is bad; ``k`` (the number of columns) must be the same on every
        rank, as the length of a collective.
        """
        xp, n = self._xp, self.shape[1]
        checked: list[Array] = []

        def local() -> Array:
            Xc = self._check_input(X, name, n, ndims)
            if name == "x" and Xc.ndim == 2 and Xc.shape[1] != 1:
                raise ValueError(
                    f"x must have shape ({n},) or ({n}, 1), got {tuple(Xc.shape)}; "
                    "use matmat for several vectors"
                )
            X2 = Xc[:, None] if Xc.ndim == 1 else Xc
            if X2.shape[1] != k:
                raise ValueError(f"X must have {k} columns on every rank, got {X2.shape[1]}")
            checked.append(X2)
            return xp.reshape(_engine.project(xp, self._G, X2), (-1,))

        what = "DynamicIHVP.matvec" if name == "x" else "DynamicIHVP.matmat"
        P = self._reduced(local, self.num_grads * k, what, _OP_PRODUCT)
        X2 = checked[0]
        return self._refined(X2, self._finish(X2, xp.reshape(P, (self.num_grads, k))))

    def matvec(self, x: Array, /) -> Array:
        """Apply ``F^{-1}`` to one vector (a sharded operator: this rank's entries).

        Parameters
        ----------
        x : array, shape (d,) or (d, 1)
            In the operator's namespace, device and dtype (or float32 for a
            float64 operator); sharded, this rank's ``d`` entries.

        Returns
        -------
        array, shape (d,) or (d, 1)
            ``F^{-1} x``, with as many dimensions as ``x``.

        Raises
        ------
        TypeError, ValueError
            As :meth:`LinearOperator.matvec`; sharded, on every rank if one
            rank's ``x`` is bad.
        """
        if self._comm is None:
            return super().matvec(x)
        y = self._collective_product(x, "x", (1, 2), 1)
        return y[:, 0] if getattr(x, "ndim", 2) == 1 else y

    def matmat(self, X: Array, /) -> Array:
        """Apply ``F^{-1}`` to the columns of a matrix (sharded: this rank's rows).

        Parameters
        ----------
        X : array, shape (d, k)
            In the operator's namespace, device and dtype (or float32 for a
            float64 operator); sharded, this rank's ``d`` rows, with the same
            ``k`` on every rank.

        Returns
        -------
        array, shape (d, k)
            ``F^{-1} X``.

        Raises
        ------
        TypeError, ValueError
            As :meth:`LinearOperator.matmat`; sharded, on every rank if one
            rank's ``X`` is bad.
        """
        if self._comm is None:
            return super().matmat(X)
        shape = tuple(getattr(X, "shape", ()))
        k = int(shape[1]) if len(shape) == 2 else 1
        return self._collective_product(X, "X", (2,), k)

    def rmatvec(self, x: Array, /) -> Array:
        """The adjoint product, :meth:`matvec` (the operator is symmetric).

        Parameters
        ----------
        x : array, shape (d,) or (d, 1)
            As for :meth:`matvec`.

        Returns
        -------
        array
            ``F^{-1} x``.
        """
        return self.matvec(x)

    def rmatmat(self, X: Array, /) -> Array:
        """The adjoint product, :meth:`matmat` (the operator is symmetric).

        Parameters
        ----------
        X : array, shape (d, k)
            As for :meth:`matmat`.

        Returns
        -------
        array
            ``F^{-1} X``.
        """
        return self.matmat(X)

    def todense(self, *, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Array:
        """Build ``F^{-1}`` as a dense ``(d, d)`` array (not for a sharded operator).

        Parameters
        ----------
        max_entries : int, optional
            As for :meth:`LinearOperator.todense`.

        Returns
        -------
        array, shape (d, d)
            ``F^{-1}``.

        Raises
        ------
        TypeError
            For a sharded operator, whose columns of the identity live on several
            ranks (as every column-sharded operator refuses it); and as
            :meth:`LinearOperator.todense`.
        ValueError
            As :meth:`LinearOperator.todense`.
        """
        return super().todense(max_entries=max_entries)

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the window's state as plain arrays and numbers (for checkpoints).

        Restoring it with :meth:`load_state_dict` reproduces the operator bit
        for bit, including its Cholesky factor.

        Returns
        -------
        dict
            Copies of the gradients, the float64 Gram matrix and factor, the
            slot lists (``window_slots``, ``free_slots``, ``factor_slots``),
            the sizes, ``damp``, ``zero_init``, the edit count,
            ``exact_gram`` (whether every Gram entry was accumulated in
            float64 from the stored gradients) and a format ``version``.
            Sharded: ``grads`` is this rank's ``m x d`` shard, the rest is the
            replicated m x m state, and ``shard_rank`` and ``shard_widths``
            (every rank's width) record the layout.
        """
        xp = self._xp
        shard = (
            {}
            if self.layout is None
            else {"shard_rank": self.layout.rank, "shard_widths": list(self.layout.widths)}
        )
        return {
            **shard,
            "version": _STATE_VERSION,
            "num_grads": self.num_grads,
            "dim": self.dim,
            "damp": self.damp,
            "zero_init": self.zero_init,
            "grads": xp.asarray(self._G, copy=True),
            "gram": xp.asarray(self._gram, copy=True),
            "factor": xp.asarray(self._factor.factor.U, copy=True),
            "window_slots": list(self._window),
            "free_slots": list(self._free),
            "factor_slots": list(self._factor.slots),
            "edits": self._edits,
            "exact_gram": bool(self._exact_gram),
        }

    def set_damp(self, damp: float, /) -> None:
        """Change the damping, refactorising from the stored Gram matrix (O(m^3), no pass over G).

        Parameters
        ----------
        damp : float
            The new damping ``lambda > 0``.

        Raises
        ------
        FactorizationError
            If the window's capacitance matrix cannot be factorised with the
            new damping; the operator keeps the old one.
        """
        given = damp
        self._agreed("DynamicIHVP.set_damp", _OP_SET_DAMP, lambda: check_damp(given))
        damp = check_damp(damp)
        factor = self._factorized(self._gram, list(self._factor.slots), damp)
        self.damp = damp
        self._commit(factor, refactored=True)

    def check_state_dict(self, state: Mapping[str, Any], /, *, damp: float | None = None) -> None:
        """Check that :meth:`load_state_dict` would accept ``state``, changing nothing.

        Parameters
        ----------
        state : mapping
            A state from :meth:`state_dict`.
        damp : float, optional
            As for :meth:`load_state_dict` (the refactorisation is not tried).

        Raises
        ------
        ValueError, TypeError
            As :meth:`load_state_dict`.
        """
        _LoadedState.check(self, state, damp=damp, refactor=False)

    def load_state_dict(self, state: Mapping[str, Any], /, *, damp: float | None = None) -> None:
        """Restore a state from :meth:`state_dict` (same sizes, dtype and device).

        Everything is checked before anything changes: a state that is
        malformed, or whose gradients, Gram matrix and factor do not agree,
        raises and leaves the operator exactly as it was. The whole Gram
        matrix is recomputed from the stored gradients (accumulated in
        float64, O(m^2 d), the cost of :meth:`from_window`'s set-up) and must
        match the stored one to the rounding of its sums: within
        ``4 (d + ranks) eps |g_i| |g_j|`` per entry, with float64's eps for
        a state whose ``exact_gram`` is set (every state this version saves)
        and the window's compute dtype's for older states, whose Gram rows
        were summed in that dtype. The factor is checked against the Gram
        matrix on a sample of columns and its whole diagonal (O(m^2)).

        Parameters
        ----------
        state : mapping
            A state from :meth:`state_dict`; its ``damp`` must equal the
            operator's unless ``damp`` is given.
        damp : float, optional
            Resume with this damping: the state is checked against its own
            damping, then its factor is recomputed from the stored Gram matrix
            with this one (O(m^3), no pass over the gradients); the operator
            takes this damping.

        Raises
        ------
        ValueError
            For a malformed or inconsistent state, or one of other sizes or
            damping.
        TypeError
            For arrays of another library or dtype.
        FactorizationError
            If the window cannot be factorised with the new ``damp``.
        """
        loaded = _LoadedState.check(self, state, damp=damp, refactor=True)
        self.damp = loaded.damp
        self._G[...] = loaded.grads
        self._gram = loaded.gram
        self._exact_gram = loaded.exact
        self._window, self._free = deque(loaded.window), list(loaded.free)
        self._factor = loaded.factor
        self._edits = loaded.edits
        self._version = 0


@dataclass(frozen=True)
class _LoadedState:
    """A state dict checked against an operator, ready to be committed."""

    grads: Array
    gram: Array
    window: tuple[int, ...]
    free: tuple[int, ...]
    factor: _SlotFactor
    edits: int
    damp: float
    #: Whether every Gram entry was accumulated in float64 (the operator's ``_exact_gram``).
    exact: bool

    @classmethod
    def check(
        cls, op: DynamicIHVP, state: Mapping[str, Any], *, damp: float | None, refactor: bool
    ) -> _LoadedState:
        """Every check of ``load_state_dict``; raises ``ValueError`` naming what is wrong.

        With ``damp`` the state is checked against its own damping and, with
        ``refactor``, its factor recomputed for ``damp``. Sharded, every rank's
        local checks and its part of the recomputed Gram matrix are reduced with
        one status word (every rank raises if one fails), which also compares a
        digest of the replicated m x m state, bit for bit, across the ranks.
        """
        parts: list[Any] = []
        m, xp = op.num_grads, op._xp

        def local() -> Array:
            parts.append(cls._check_local(op, state, damp))
            # This rank's columns of the stored gradients' Gram matrix, in float64.
            return xp.reshape(_local_gram(xp, parts[0][0]), (-1,))

        def replicated() -> tuple[Any, ...]:
            # Everything but the gradients (each rank's own columns), bit for bit.
            _, gram, U, window, free, slots, edits, saved_damp, target, exact = parts[0]
            return gram, U, window, free, slots, edits, saved_damp, target, exact

        total = op._reduced(
            local,
            m * m,
            "load_state_dict",
            _OP_LOAD,
            agree=replicated,
            disagree=(
                ValueError,
                "the ranks' state_dicts disagree on the replicated window state (slot lists, "
                "edit count, damping, Gram matrix or factor): load every rank's state from "
                "one checkpoint",
            ),
        )
        grads, gram, U, window, free, slots, edits, saved_damp, target, exact = parts[0]
        k = len(window)
        cls._check_gram(op, gram, xp.reshape(total, (m, m)), exact=exact)
        gram = xp.asarray(gram, copy=True)
        if refactor and target != saved_damp:
            return cls(
                xp.asarray(grads, copy=True),
                gram,
                window,
                free,
                op._factorized(gram, list(slots), target),
                0,
                target,
                exact,
            )
        factor = CapacitanceFactor(xp.asarray(U, copy=True), op._shift(k, saved_damp), 1.0)
        return cls(
            xp.asarray(grads, copy=True),
            gram,
            window,
            free,
            _SlotFactor.build(factor, slots, op.num_grads),
            edits,
            saved_damp,
            exact,
        )

    @staticmethod
    def _check_layout(op: DynamicIHVP, state: Mapping[str, Any]) -> None:
        """The state's shard layout against the operator's (both unsharded, or the same)."""
        widths = state.get("shard_widths")
        if op.layout is None:
            if widths is not None:
                raise ValueError(
                    f"state_dict holds rank {state.get('shard_rank')}'s shard of a window split "
                    f"over {len(widths)} ranks; this operator is not sharded"
                )
            return
        if widths is None:
            raise ValueError(
                "state_dict is of an unsharded window; this operator holds rank "
                f"{op.layout.rank}'s shard of {len(op.layout.widths)} ranks (build it "
                "without comm, or save the state of a sharded operator)"
            )
        try:
            saved = (int(state.get("shard_rank", -1)), tuple(int(w) for w in widths))
        except (TypeError, ValueError):
            raise ValueError("state_dict's shard_rank and shard_widths must be integers") from None
        if saved != (op.layout.rank, op.layout.widths):
            raise ValueError(
                f"state_dict holds rank {saved[0]}'s shard of a window whose {sum(saved[1])} "
                f"columns were split over {len(saved[1])} ranks as {list(saved[1])}; this "
                f"operator is rank {op.layout.rank} of {len(op.layout.widths)} with widths "
                f"{list(op.layout.widths)}: a sharded state loads only at the same world size "
                "and layout, on the rank that saved it"
            )

    @classmethod
    def _check_local(
        cls, op: DynamicIHVP, state: Mapping[str, Any], damp: float | None
    ) -> tuple[Any, ...]:
        """The checks of one rank's state that need no other rank's data."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping from state_dict(), got {type(state).__name__}"
            )
        version = state.get("version")
        if version == 1:
            # Version 1 named the slot lists by age and permutation.
            state = {
                **state,
                "window_slots": state.get("age_order"),
                "factor_slots": state.get("factor_order"),
                "edits": state.get("since_refactor"),
            }
        elif version != _STATE_VERSION:
            raise ValueError(
                f"not a DynamicIHVP state_dict of a known version (got version "
                f"{version!r}, expected {_STATE_VERSION})"
            )
        keys = (
            "num_grads",
            "dim",
            "damp",
            "zero_init",
            "grads",
            "gram",
            "factor",
            "window_slots",
            "free_slots",
            "factor_slots",
            "edits",
        )
        missing = [k for k in keys if state.get(k) is None]
        if missing:
            raise ValueError(f"DynamicIHVP state_dict lacks {', '.join(missing)}")
        cls._check_layout(op, state)
        m, d, xp = op.num_grads, op.dim, op._xp
        if (state["num_grads"], state["dim"]) != (m, d):
            raise ValueError(
                f"state_dict is for num_grads, dim = "
                f"{(state['num_grads'], state['dim'])}, this operator has {(m, d)}"
            )
        if bool(state["zero_init"]) != op.zero_init:
            raise ValueError("state_dict and operator disagree on zero_init")
        try:
            saved_damp = check_damp(state["damp"])
        except TypeError as exc:
            raise ValueError(f"state['damp']: {exc}") from None
        if damp is None and saved_damp != op.damp:
            raise ValueError(
                f"state_dict has damp={state['damp']}, this operator "
                f"damp={op.damp}; pass load_state_dict(..., damp=...) to resume with "
                "another damping"
            )
        target = saved_damp if damp is None else check_damp(damp)
        grads, gram, U = (detached(state[k]) for k in ("grads", "gram", "factor"))
        for name, array, dtype in (
            ("grads", grads, op._G.dtype),
            ("gram", gram, xp.float64),
            ("factor", U, xp.float64),
        ):
            check_same_space(xp, op.device, array, f"state['{name}']", owner=repr(op))
            if array.dtype != dtype:
                raise TypeError(f"state['{name}'] has dtype {array.dtype}, expected {dtype}")
        try:
            window, free, slots = (
                tuple(check_count(s, f"state['{key}'] entries", minimum=0) for s in state[key])
                for key in ("window_slots", "free_slots", "factor_slots")
            )
            edits = check_count(state["edits"], "state['edits']", minimum=0)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        k = len(window)
        if (
            sorted(slots) != sorted(window)
            or len(set(window)) != k
            or sorted(window + free) != list(range(m))
            or (op.zero_init and k != m)
        ):
            raise ValueError("state_dict slot lists are inconsistent")
        for name, array, shape in (
            ("grads", grads, (m, d)),
            ("gram", gram, (m, m)),
            ("factor", U, (k, k)),
        ):
            if tuple(array.shape) != shape:
                raise ValueError(
                    f"state['{name}'] has shape {tuple(array.shape)}, expected {shape}"
                )
        if not (
            bool(xp.all(xp.isfinite(grads)))
            and bool(xp.all(xp.isfinite(gram)))
            and bool(xp.all(xp.isfinite(U)))
        ):
            name = next(
                n
                for n, a in (("grads", grads), ("gram", gram), ("factor", U))
                if not bool(xp.all(xp.isfinite(a)))
            )
            raise ValueError(f"state['{name}'] holds NaN or infinity")
        cls._check_factor(op, gram, U, list(slots), k, saved_damp)
        # States saved before the Gram rows were summed in float64 lack the flag; a
        # float64 window's Gram always was.
        exact = state.get("exact_gram") is True or op._G.dtype == xp.float64
        return grads, gram, U, window, free, slots, edits, saved_damp, target, exact

    @staticmethod
    def _check_gram(op: DynamicIHVP, gram: Array, recomputed: Array, *, exact: bool) -> None:
        """The whole stored Gram matrix against the one recomputed from the stored gradients.

        Both are sums of d exact products in float64 (then of one partial sum per
        rank), so each entry errs by at most ``(d + ranks) eps |g_i| |g_j|``; a Gram
        saved before the rows were summed in float64 (``exact`` False) carries the
        rounding of the window's compute dtype instead. A negated, swapped or
        replaced gradient moves its whole Gram row by far more (unless it is
        orthogonal to every other to within that rounding, where the Gram is
        correct to it).
        """
        xp = op._xp
        ranks = 1 if op.layout is None else len(op.layout.widths)
        dim = op.dim if op.layout is None else op.layout.dim
        eps = float(xp.finfo(xp.float64 if exact else op.dtype).eps)
        norms = xp.sqrt(xp.clip(xp.linalg.diagonal(recomputed), 0.0, None))
        bound = (_GRAM_ROUNDING * (dim + ranks) * eps) * (norms[:, None] * norms[None, :])
        excess = xp.abs(gram - recomputed) - bound
        if bool(xp.any(excess > 0)):
            flat = int(xp.argmax(xp.reshape(excess, (-1,))))
            i, j = divmod(flat, int(gram.shape[0]))
            raise ValueError(
                f"state_dict's Gram matrix does not match its gradients: entry ({i}, {j}) is "
                f"{float(gram[i, j]):.17g}, the stored gradients give "
                f"{float(recomputed[i, j]):.17g}, more than the rounding of the sums allows "
                f"({float(bound[i, j]):.3g}); a gradient was changed, moved or replaced after "
                "the Gram matrix was computed"
            )

    @staticmethod
    def _check_factor(
        op: DynamicIHVP, gram: Array, U: Array, slots: list[int], k: int, damp: float
    ) -> None:
        """The factor against the Gram matrix, on a sample of evenly spaced columns.

        The columns of ``U^T U`` against those of the capacitance matrix (within the
        rounding of a Cholesky factor, a small multiple of ``k eps`` relative to the
        matrix, or the drift that incremental edits may accumulate before a
        refactorisation).
        """
        xp = op._xp
        if not k:
            return
        eps64 = float(xp.finfo(xp.float64).eps)
        pos = _evenly_spaced(k, _FACTOR_SAMPLE)
        idx = xp.asarray(slots, dtype=xp.int64, device=op.device)
        C = xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
        C = C + op._shift(k, damp) * xp.eye(k, dtype=xp.float64, device=op.device)
        cols = xp.asarray(pos, dtype=xp.int64, device=op.device)
        got = xp.matrix_transpose(U) @ xp.take(U, cols, axis=1)
        want = xp.take(C, cols, axis=1)
        scale = float(xp.max(xp.abs(xp.linalg.diagonal(C))))
        tol = max(64 * k * eps64, 1e3 * _DRIFT_TOL) * scale
        # Sampled columns of U^T U, and its whole diagonal (O(k^2)), against C.
        diag_err = xp.abs(xp.sum(U * U, axis=0) - xp.linalg.diagonal(C))
        if float(xp.max(xp.abs(got - want))) > tol or float(xp.max(diag_err)) > tol:
            raise ValueError(
                "state_dict's factor does not match its Gram matrix (a permuted "
                "slot order or a corrupted factor)"
            )
