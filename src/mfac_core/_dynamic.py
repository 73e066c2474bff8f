"""The dynamic M-FAC operator: the inverse Fisher of a sliding window of gradients.

The operator is window bookkeeping plus an editable capacitance factor. One
vocabulary for the rows of the m x d buffer: a *slot* is a buffer row; the
*window slots* hold the window's gradients, oldest first; the *free slots* hold
none (the last one is filled next); the *factor slots* are the window slots in
the row order of the Cholesky factor, which differs from the window order
because an edit moves the replaced slot to the end of the factor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from . import _deprecation, _pieces
from ._compat import Array
from ._dynamic_factor import SlotFactor, Speculation, committed, finished, redamped, refined, solved
from ._dynamic_setup import WindowOptions, build, emptied, filled, local_gram, window_options
from ._dynamic_state import LoadedState, WindowCopies, saved_state
from ._dynamic_window import StepCheck, insert, remove_slot, update_and_matvec_checked
from ._finite import float32_overflow_once
from ._gradient_repr import gradient_items
from ._layout import BlockGroup
from ._refine import fisher_residual
from ._torch_compile import eager_methods_under_torch_compile

__all__ = ["DynamicIHVP"]

# Pickles made before the operator's modules were split name the factor's class here.
_SlotFactor = SlotFactor


@eager_methods_under_torch_compile(
    "__init__",
    "from_window",
    "reset",
    "window",
    "update",
    "remove_oldest",
    "remove",
    "state_dict",
    "set_damp",
    "check_state_dict",
    "load_state_dict",
)
class DynamicIHVP(WindowCopies):
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
        The damping ``lambda > 0``: at least float64's smallest normal number
        and, for float32 and 2-byte windows, a damping with which the window
        can take a nonzero gradient (below about ``4e-106`` for float32, where
        every gradient would be refused as too large; see :meth:`update`).
    dtype : dtype or str
        Storage dtype of the gradients (``"float32"`` or ``"float64"`` or the
        namespace's dtype object). All m x m work is float64. 2-byte storage
        (``"float16"`` for NumPy and CuPy, ``"float16"`` or ``"bfloat16"``
        for PyTorch, and ``"bfloat16"`` for NumPy where ml_dtypes is installed:
        its bfloat16, JAX's) keeps the window in 2 bytes per entry: each gradient is
        rounded to it once when it is inserted, the operator is the inverse
        Fisher of the stored (rounded) gradients, it computes in float32 and
        its ``dtype`` is float32 (docs/mathematics.rst, "2-byte storage").
    xp : module, optional
        The array namespace (default: NumPy). Any Array-API namespace, or
        the library module itself (``torch``, ``cupy``, ...).
    device : optional
        The device of the buffers (default: the namespace's default).
    options : WindowOptions, optional
        The rarely changed options (default ``WindowOptions()``): the authors'
        zero-initialised window (``zero_init``), when to refactorise (``refactor_every``), the
        checks for NaN and infinity (``check_finite``) and iterative refinement (``refine``);
        see :class:`~mfac_core.WindowOptions`. They are the attributes of the same names.
    **deprecated
        ``zero_init=``, ``refactor_every=``, ``check_finite=`` and ``refine=`` (use
        ``options=WindowOptions(...)``), ``update_method="refactor"`` (use
        ``WindowOptions(refactor_every=0)``) and the sharded spelling (a communicator; it
        builds a :class:`~mfac_core.ShardedDynamicIHVP`) still work, with a
        ``DeprecationWarning``; they will be removed.

    Attributes
    ----------
    local_shape : tuple
        ``shape`` (as for :class:`~mfac_core.ShardedDynamicIHVP`).
    dtype, device
        The dtype of products and vectors (the storage dtype, or float32 for
        2-byte storage) and the device.
    storage_dtype : str or None
        ``"float16"`` or ``"bfloat16"`` for a 2-byte window, else ``None``.
    num_grads, dim, damp
        m, d and lambda.

    Raises
    ------
    ValueError
        For ``num_grads < 1``, ``dim < 1``, a damping that is not finite and > 0 (or too
        small for the dtype, above), or a window or Gram matrix no array can address.
    TypeError
        For a ``num_grads`` or ``dim`` that is not an int, a dtype that is
        not a floating one the namespace stores, an ``options`` that is not a
        :class:`~mfac_core.WindowOptions`, and an unknown keyword.

    See Also
    --------
    StaticIHVP : The same inverse for a fixed set of gradients.
    ShardedDynamicIHVP : The same window, its columns sharded over ranks.

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

    # The settings and buffers, set by ``_dynamic_setup.build``.
    num_grads: int
    dim: int
    damp: float
    zero_init: bool
    refactor_every: int
    refine: int
    # The 2-byte storage dtype's name ("float16", "bfloat16"), or None.
    storage_dtype: str | None
    _G: Any
    _gram: Any
    _buffers: tuple[Any, Any] | None
    _version: int
    # The window slots (oldest first) and free slots, set by ``_dynamic_setup.emptied``.
    _window: deque[int]
    _free: list[int]
    refactor_count: int
    #: Whether a gradient is checked inside the reduction of its Gram row, so that
    #: every rank raises alike (``ShardedDynamicIHVP``); one process checks it first.
    _collective_checks = False
    # A step's host scratch (``_dynamic_window``): not pickled, not deep-copied.
    _transient = ("_row_scratch",)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The deprecated sharded spelling builds the sharded class; Python then calls
        # its __init__ with the same arguments. No arguments: pickle's reconstruction.
        forward = _deprecation.sharded_form(cls, "DynamicIHVP", kwargs) if args else None
        return super().__new__(cls if forward is None else forward)

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
        options: WindowOptions | None = None,
        **deprecated: Any,
    ) -> None:
        options = window_options("DynamicIHVP", options, deprecated)
        build(self, num_grads, dim, damp=damp, dtype=dtype, xp=xp, device=device, options=options)

    def _repr_options(self) -> tuple[str, ...]:
        return gradient_items(self, filled=len(self._window), zero_init=self.zero_init)

    @property
    def local_shape(self) -> tuple[int, int]:
        """``shape``: the shape products take and return."""  # numpydoc ignore=RT01
        return self.shape

    @property
    def update_method(self) -> str:
        """``"refactor"`` (``refactor_every=0``) or ``"incremental"``."""  # numpydoc ignore=RT01
        return "refactor" if self.refactor_every == 0 else "incremental"

    @classmethod
    def from_window(
        cls, G: Array, /, *, damp: float, num_grads: int | None = None, **options: Any
    ) -> DynamicIHVP:
        """Build a window holding the gradients in the rows of ``G`` (oldest first).

        The set-up is one Gram product (accumulated in float64) and one factorisation.

        Parameters
        ----------
        G : array, shape (k, d)
            The gradients, oldest first; the operator takes G's namespace, device and dtype (a
            2-byte G gives a 2-byte window).
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
            If G is not 2-D, holds NaN or infinity, or has more rows than ``num_grads``; for a
            damping the constructor refuses.
        FactorizationError
            If the window's capacitance matrix cannot be factorised in float64.

        Warns
        -----
        IllConditionedWarning
            Where ``eps(float64) kappa**1.5 >= 1`` for the window built, as every set-up
            (:class:`StaticIHVP`, :meth:`set_damp`) warns: the gradients are the caller's whole
            window. :meth:`update` warns too, and from ``eps(float64) kappa >= 1`` refuses such
            a gradient, which the window would keep for m steps (docs/mathematics.rst, "When the
            set-up fails or warns").
        """
        forward = _deprecation.sharded_form(cls, "DynamicIHVP.from_window", options)
        if forward is not None:
            return forward.from_window(G, damp=damp, num_grads=num_grads, **options)
        return filled(cls, G, damp=damp, num_grads=num_grads, options=options)

    # -- bookkeeping -------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the window (or, with ``zero_init``, fill it with zero gradients)."""
        emptied(self)

    def __len__(self) -> int:
        """The number of gradients in the window, ``k <= num_grads``."""  # numpydoc ignore=RT01
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

    # -- the factor (_dynamic_factor) ---------------------------------------------------

    def _commit(self, factor: SlotFactor, *, refactored: bool) -> None:
        committed(self, factor, refactored=refactored)

    # -- sums over the d coordinates: one process holds them all ------------------------
    # (ShardedDynamicIHVP makes each a checked reduction over its ranks.)

    def _summed(self, x: Array) -> Array:
        """``x`` (float64), a sum over the coordinates: this process's is the whole."""
        return x

    def _reduced(
        self, operation: str, local: Callable[[], Array], length: int, **agreement: Any
    ) -> Array:
        """``local()``: the sum over the coordinates that ``operation`` needs, checked.

        ``length`` and the ``agree=``, ``disagree=``, ``agreed_into=``, ``state=``
        and ``diverged=`` of ``agreement`` serve the sharded operator's reduction
        (``_sharding.reduce_checked``).
        """
        return local()

    def _agreed(self, operation: str, local: Callable[[], Any]) -> None:
        """Check ``operation``'s argument with ``local()`` (it may raise)."""
        local()

    def _residual(self, X: Array, Y: Array, scale: float) -> Array | None:
        """``X - F Y`` in float64 for the refinement (``Y`` float64); sharded: or None."""
        whole = (BlockGroup(0, 1, self.dim),)
        return fisher_residual(self._xp, self._G, whole, X, Y, damp=self.damp, scale=scale)

    # -- updates (_dynamic_window) ----------------------------------------------------

    def _exact_gram_matrix(self) -> Any:
        """The buffer's Gram matrix accumulated in float64 (O(m^2 d), on the rare path)."""
        return self._summed(local_gram(self._xp, self._G))

    def update(self, g: Array, /) -> None:
        """Insert gradient ``g``; a full window drops its oldest.

        A gradient holding NaN or infinity, one so large that the window with it would leave no
        correct digit in float64 (``eps(float64) kappa >= 1`` for
        ``kappa >= 1 + |g|^2 / (k damp)``), or one that makes the window's capacitance matrix
        singular in float64, is refused and the window is left unchanged.

        Parameters
        ----------
        g : array, shape (d,)
            The gradient, in the operator's namespace and device; float32 into a float64 window
            is promoted; float32 (or 2-byte) into a 2-byte window is rounded to its storage
            dtype, once.

        Raises
        ------
        ValueError
            For a wrong shape, NaN or infinity, or another device; for an entry beyond the range
            of a 2-byte storage dtype (float16's largest finite value is 65504); for a gradient
            too large for the window (above).
        TypeError
            For another library or a lossy dtype.
        FactorizationError
            If the window's capacitance matrix cannot be factorised with it.
        """
        insert(self, g)

    @float32_overflow_once
    def update_and_matvec(self, g: Array, /) -> Array:
        """Insert ``g``, then return ``F^{-1} g`` for the window that includes it.

        The optimiser step: the product ``G g`` serves both the update of the Gram matrix and
        the product, so the m x d window is read twice in all.

        Parameters
        ----------
        g : array, shape (d,)
            The gradient, as for :meth:`update`.

        Returns
        -------
        array, shape (d,)
            ``F^{-1} g`` in the operator's dtype (after ``refine`` steps), for ``g`` as given (a
            2-byte window stores it rounded: ``F`` is the Fisher of the stored gradients).

        Raises
        ------
        ValueError, TypeError, FactorizationError
            As :meth:`update`; the window is then unchanged.
        """
        if not (self._collective_checks or _pieces.is_accelerator(self._xp, self._G)):
            # The product before the commit: an overflow error leaves the window as it was.
            speculation = Speculation(self, say_overflow=True)
            insert(self, g, speculation=speculation)
            return speculation.s
        # Sharded: said after the commit (before it, only overflowing ranks would refuse).
        g, product = insert(self, g)
        X = g[:, None]
        return self._refined(X, self._finish(X, product))[:, 0]

    def _update_and_matvec_checked(self, g: Array, /, *, strict: bool = False) -> StepCheck:
        """:meth:`update_and_matvec` for an optimiser step: bad values are a status.

        See ``_dynamic_window.update_and_matvec_checked`` (``MFAC.step`` calls this).
        """
        return update_and_matvec_checked(self, g, strict=strict)

    def remove_oldest(self) -> None:
        """Remove the oldest gradient of the window (a ValueError where it is empty)."""
        if not self._window:
            raise ValueError("the window is empty")
        self.remove(self._window[0])

    def remove(self, slot: int, /) -> None:
        """Remove the gradient in buffer row ``slot`` (see :attr:`slots`).

        With ``zero_init`` the slot is set to a zero gradient and becomes the
        next one to be replaced. Without it the smaller window warns where it is
        hopeless (``IllConditionedWarning``), as a set-up does.

        Parameters
        ----------
        slot : int
            One of :attr:`slots`.

        Raises
        ------
        TypeError
            If ``slot`` is not an int.
        ValueError
            If ``slot`` holds no gradient.
        FactorizationError
            If the remaining window cannot be factorised (it is then unchanged).
        """
        remove_slot(self, slot)

    # -- products ----------------------------------------------------------------------

    # The products' steps, functions of _dynamic_factor (the window's modules call these).

    def _finish(self, X: Array, P: Array, factor: SlotFactor | None = None) -> Any:
        return finished(self, X, P, factor)

    def _solve(self, X: Array, factor: SlotFactor | None = None) -> Array:
        return solved(self, X, factor)

    def _refined(self, X: Array, Y: Array, factor: SlotFactor | None = None) -> Array:
        return refined(self, X, Y, factor)

    def _matmat(self, X: Array) -> Array:
        return refined(self, X, solved(self, X))

    # -- checkpoints (_dynamic_state) --------------------------------------------------

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
        """
        return saved_state(self)

    def set_damp(self, damp: float, /) -> None:
        """Change the damping, refactorising from the stored Gram matrix (O(m^3), no pass over G).

        Parameters
        ----------
        damp : float
            The new damping ``lambda > 0``.

        Raises
        ------
        TypeError, ValueError
            For a damping the constructor refuses: not a finite positive real number, subnormal,
            or so small that the window could take no nonzero gradient (the message names the
            smallest that works).
        FactorizationError
            If the window's capacitance matrix cannot be factorised with the new damping.

        Warns
        -----
        IllConditionedWarning
            Where the window's gradients with the new damping make
            ``eps(float64) kappa**1.5 >= 1`` (:meth:`update` refuses gradients of their size
            from ``eps(float64) kappa >= 1``). The damping is changed all the same (after an
            error, the operator keeps its old one).
        """
        redamped(self, damp)

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
        LoadedState.check(self, state, damp=damp, refactor=False)

    def load_state_dict(self, state: Mapping[str, Any], /, *, damp: float | None = None) -> None:
        """Restore a state from :meth:`state_dict` (same sizes, dtype and device).

        Everything is checked before anything changes: a state that is malformed, or whose
        gradients, Gram matrix and factor do not agree, raises and leaves the operator exactly
        as it was. The whole Gram matrix is recomputed from the stored gradients (accumulated in
        float64, O(m^2 d), the cost of :meth:`from_window`'s set-up) and must match the stored
        one to the rounding of its sums: within ``4 (d + ranks) eps |g_i| |g_j|`` per entry,
        with float64's eps for a state whose ``exact_gram`` is set (every state this version
        saves) and the window's compute dtype's for older states, whose Gram rows were summed in
        that dtype. The factor is checked against the Gram matrix on a sample of columns and its
        whole diagonal (O(m^2)).

        Parameters
        ----------
        state : mapping
            A state from :meth:`state_dict`; its ``damp`` must equal the operator's unless
            ``damp`` is given.
        damp : float, optional
            Resume with this damping: the state is checked against its own damping, then its
            factor is recomputed from the stored Gram matrix with this one (O(m^3), no pass over
            the gradients); the operator takes this damping.

        Raises
        ------
        ValueError
            For a malformed or inconsistent state, one of other sizes or damping, or one with
            keys that no ``state_dict`` holds.
        TypeError
            For arrays of another library or dtype.
        FactorizationError
            If the window cannot be factorised with the new ``damp``.
        """
        LoadedState.check(self, state, damp=damp, refactor=True).commit(self)


_deprecation.show_init_signature(DynamicIHVP)
