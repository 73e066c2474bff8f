"""An Array-API linear operator with the names and semantics of SciPy's.

:class:`LinearOperator` mirrors :class:`scipy.sparse.linalg.LinearOperator`
(``shape``, ``dtype``, ``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``,
``adjoint``/``H``, ``transpose``/``T``, ``@``, ``dot``, ``+``, ``*``, ``**``) but keeps
every result in the namespace, dtype and device of the operator. It does not
subclass SciPy's class, whose methods convert every input to NumPy; a real
SciPy operator is available through :meth:`LinearOperator.to_scipy` for NumPy
data.
"""

from __future__ import annotations

import copy
import importlib
import numbers
import sys
from typing import Any

from ._attributes import delete_unless_fixed, set_unless_fixed
from ._compat import (
    Array,
    is_array_api_obj,
    is_numpy_namespace,
    library_namespace,
    namespace_name,
    picklable_device,
    restored_device,
    same_device,
)
from ._dtypes import operator_dtype
from ._finite import check_finite, float32_overflow_once, note_arithmetic_overflow
from ._scipy_export import scipy_operator
from ._torch_compile import eager_under_torch_compile
from ._validation import (
    check_count,
    check_flag,
    check_operand,
    check_strided,
    non_real_factor_error,
    numpy_matrix_error,
    reciprocal_factor,
    resolved_device,
    scale_factor,
)

__all__ = ["LinearOperator"]

#: Largest number of entries :meth:`LinearOperator.todense` builds by default.
DEFAULT_MAX_DENSE_ENTRIES = 2**26


class LinearOperator:
    """Base class of the operators in :mod:`mfac_core`.

    Subclasses call ``super().__init__`` with the shape, dtype, namespace and
    device, and implement ``_matmat`` (and ``_rmatmat`` unless the operator is
    symmetric). The public methods validate their input, so that subclasses
    receive arrays of the right library, device, dtype and shape.

    Parameters
    ----------
    shape : tuple of int
        ``(M, N)``.
    dtype : dtype or str
        The dtype of the operator, a real floating one of its array namespace (or its name).
    xp : module
        The (array-api-compat wrapped) namespace of the operator's arrays, as
        ``array_api_compat.array_namespace`` gives it; the library module
        itself (``numpy``, ``torch``, ``cupy``, ``dask.array``) stands for it.
    device : object
        The device on which the operator's arrays live.
    symmetric : bool, optional
        Whether the operator equals its transpose; then ``rmatvec`` is
        ``matvec`` and ``adjoint()`` returns the operator itself.
    check_finite : bool, optional
        Whether inputs to ``matvec``/``matmat`` are checked for NaN and
        infinity (one extra read of the input).

    Notes
    -----
    ``x @ A`` and ``x * A`` with an array on the left reach the operator only
    where the array's library hands an unknown right operand over to it, as
    NumPy, PyTorch, JAX and Dask do; array-api-strict raises ``TypeError``
    ("Expected Array or Python scalar") itself. ``A.T @ x`` (and
    ``(A.T @ X.T).T`` for a stack of rows) is the same product everywhere.

    A SciPy operator ``S`` is refused as an operand of ``+``, ``-``, ``@`` and
    ``*`` (``TypeError``): ``A.to_scipy() + S`` is the SciPy operator, for a
    NumPy-backed ``A``.
    """

    ndim = 2
    # NumPy must hand ``ndarray @ op`` (and other binary operators) to this class.
    __array_ufunc__ = None
    #: Where this rank's columns lie, for an operator whose products take and return
    #: one rank's shards (docs/scaling.rst), else None. Such an operator provides its
    #: own products; the base class only refuses what would mix shards and whole
    #: vectors (``todense``, ``to_scipy``, arithmetic).
    layout: Any = None
    # Scratch buffers that a subclass rebuilds on demand: not pickled, not deep-copied.
    _transient: tuple[str, ...] = ()
    __setattr__, __delattr__ = set_unless_fixed, delete_unless_fixed

    def __init__(
        self,
        *,
        shape: tuple[int, int],
        dtype: Any,
        xp: Any,
        device: Any,
        symmetric: bool = False,
        check_finite: bool = True,
    ) -> None:
        # Any integers (NumPy's too, as SciPy takes them), not bools, as Python ints.
        if len(shape) != 2 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ValueError(f"shape must be a pair of non-negative ints, got {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self._xp = library_namespace(xp)
        self.dtype = operator_dtype(self._xp, dtype)
        # As its arrays report it: None and names ("cpu") as the namespace means them.
        self.device = resolved_device(self._xp, device)
        self._symmetric = bool(symmetric)
        self.check_finite = check_flag(check_finite, "check_finite")

    # -- pickling: the namespace is a module, which pickle cannot store -----------------

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in self._transient}
        state["_xp"] = self._xp.__name__
        state["device"] = picklable_device(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_xp"] = importlib.import_module(state["_xp"])
        state["device"] = restored_device(state["device"])
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> LinearOperator:
        # deepcopy's default, through the pickling state (a module cannot be deep-copied).
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # -- to be provided by subclasses -------------------------------------------------

    def _matmat(self, X: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat")

    def _rmatmat(self, X: Array) -> Array:
        if self._symmetric:
            return self._matmat(X)
        raise NotImplementedError(f"{type(self).__name__} does not implement _rmatmat")

    def _matvec(self, x: Array) -> Array:
        return self._matmat(x[:, None])[:, 0]

    def _rmatvec(self, x: Array) -> Array:
        return self._rmatmat(x[:, None])[:, 0]

    def _refuse_sharded(self, what: str) -> None:
        if self.layout is not None:
            raise TypeError(
                f"{what} is not available for a column-sharded operator ({self!r} "
                "takes and returns this rank's shards; see docs/scaling.rst): apply "
                "it with matvec/matmat and combine the shards yourself"
            )

    # -- validation --------------------------------------------------------------------

    @property
    def xp(self) -> Any:  # numpydoc ignore=RT01
        """The array namespace of the operator (array-api-compat wrapped)."""
        return self._xp

    def _check_input(
        self, x: Array, name: str, n: int, ndims: tuple[int, ...], *, several: str = ""
    ) -> Any:
        """``x`` checked, promoted where lossless; one vector where ``several`` names matmat."""
        x = check_operand(self._xp, self.device, self.dtype, x, name, owner=self)
        wide = bool(several) and x.shape[1:] not in ((), (1,))
        if x.ndim not in ndims or x.shape[0] != n or wide:
            cols = "1" if several else "k"
            want = " or ".join({1: f"({n},)", 2: f"({n}, {cols})"}[k] for k in ndims)
            # NaN: a Dask array's unknown length (from boolean indexing).
            unknown = any(s != s for s in x.shape)
            hint = f" (unknown: call {name}.compute_chunk_sizes())" if unknown else ""
            if several and x.ndim == 2 and x.shape[0] == n:
                hint = f"; use {several} for several vectors"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}{hint}")
        if self.check_finite:
            shard = None if self.layout is None else (0, self.layout.start)  # a rank's part
            check_finite(self._xp, x, name, shard=shard)
        return x

    # -- the SciPy interface ---------------------------------------------------------

    def _vector(self, x: Array, n: int, apply: Any, several: str) -> Any:
        """Apply ``apply`` to a vector given as ``(n,)`` or ``(n, 1)``, keeping the shape."""
        x = self._check_input(x, "x", n, (1, 2), several=several)
        return apply(x) if x.ndim == 1 else apply(x[:, 0])[:, None]

    @float32_overflow_once
    def matvec(self, x: Array, /) -> Array:
        """Apply the operator to one vector: ``A @ x``.

        Parameters
        ----------
        x : array, shape (N,) or (N, 1)
            In the operator's namespace and device, and its dtype (or float32 for a float64
            operator).

        Returns
        -------
        array, shape (M,) or (M, 1)
            ``A @ x``, with as many dimensions as ``x``, in the operator's namespace, dtype and
            device.

        Raises
        ------
        TypeError
            If ``x`` is not an array of the operator's library, or has a floating dtype that
            would lose precision in the operator's dtype (float32 is promoted to a float64
            operator's dtype; the reverse is refused).
        ValueError
            If ``x`` is on another device, has the wrong shape, or (with ``check_finite``) holds
            NaN or infinity.
        """
        return self._vector(x, self.shape[1], self._matvec, "matmat")

    @float32_overflow_once
    def rmatvec(self, x: Array, /) -> Array:
        """Apply the adjoint to one vector: ``A^H @ x``.

        Parameters
        ----------
        x : array, shape (M,) or (M, 1)
            In the operator's namespace and device, and its dtype (or float32 for a float64
            operator).

        Returns
        -------
        array, shape (N,) or (N, 1)
            ``A^H @ x``, with as many dimensions as ``x``, in the operator's namespace, dtype
            and device.

        Raises
        ------
        TypeError
            If ``x`` is not an array of the operator's library, or has a floating dtype that
            would lose precision in the operator's dtype (float32 is promoted to a float64
            operator's dtype; the reverse is refused).
        ValueError
            If ``x`` is on another device, has the wrong shape, or (with ``check_finite``) holds
            NaN or infinity.
        """
        return self._vector(x, self.shape[0], self._rmatvec, "rmatmat")

    @float32_overflow_once
    def matmat(self, X: Array, /) -> Array:
        """Apply the operator to the columns of a matrix: ``A @ X``.

        Parameters
        ----------
        X : array, shape (N, k)
            In the operator's namespace and device, and its dtype (or float32 for a float64
            operator).

        Returns
        -------
        array, shape (M, k)
            ``A @ X`` in the operator's namespace, dtype and device.

        Raises
        ------
        TypeError
            If ``X`` is not an array of the operator's library, or has a floating dtype that
            would lose precision in the operator's dtype (float32 is promoted to a float64
            operator's dtype; the reverse is refused).
        ValueError
            If ``X`` is on another device, has the wrong shape, or (with ``check_finite``) holds
            NaN or infinity.
        """
        return self._matmat(self._check_input(X, "X", self.shape[1], (2,)))

    @float32_overflow_once
    def rmatmat(self, X: Array, /) -> Array:
        """Apply the adjoint to the columns of a matrix: ``A^H @ X``.

        Parameters
        ----------
        X : array, shape (M, k)
            In the operator's namespace and device, and its dtype (or float32 for a float64
            operator).

        Returns
        -------
        array, shape (N, k)
            ``A^H @ X`` in the operator's namespace, dtype and device.

        Raises
        ------
        TypeError
            If ``X`` is not an array of the operator's library, or has a floating dtype that
            would lose precision in the operator's dtype (float32 is promoted to a float64
            operator's dtype; the reverse is refused).
        ValueError
            If ``X`` is on another device, has the wrong shape, or (with ``check_finite``) holds
            NaN or infinity.
        """
        return self._rmatmat(self._check_input(X, "X", self.shape[0], (2,)))

    @eager_under_torch_compile
    def dot(self, x: Array, /) -> Any:
        """Multiply by an operator, a scalar or an array, as SciPy's ``dot`` does.

        Calling the operator, ``A(x)``, is the same.

        Parameters
        ----------
        x : LinearOperator, float or array
            Another operator (of the same library, device and dtype), a finite
            real scalar, or an array of shape ``(N,)``, ``(N, 1)`` or ``(N, k)``.

        Returns
        -------
        LinearOperator or array
            For an operator, the product operator ``A B``; for a scalar, the
            scaled operator ``x A``; for an array, :meth:`matvec` of a vector
            (1-D or ``(N, 1)``) or :meth:`matmat` of a matrix.

        Raises
        ------
        TypeError
            If ``x`` is none of these, or is an operator over another library,
            device or dtype; and as :meth:`matvec` and :meth:`matmat`.
        ValueError
            If ``x`` is an array of more than two dimensions, an operator
            whose shape does not fit, or a scalar that is NaN or infinite; and
            as :meth:`matvec` and :meth:`matmat`.
        """
        if isinstance(x, LinearOperator):
            return _ProductOperator(self, x)
        if isinstance(x, numbers.Real) and not isinstance(x, bool):
            return _ScaledOperator(self, scale_factor(x))
        if isinstance(x, numbers.Number):
            raise non_real_factor_error("A * c", x)
        if not is_array_api_obj(x):
            foreign = _foreign_operator_error("A @ S", x)
            if foreign is not None:
                raise foreign
            raise TypeError(
                "expected an array, a scalar or an mfac_core LinearOperator, got "
                f"{type(x).__name__}"
            )
        # Before x.shape, which a nested tensor's raises (RuntimeError, no argument named).
        check_strided(x, "x")
        if x.ndim == 1 or (x.ndim == 2 and x.shape[1] == 1):
            return self.matvec(x)
        if x.ndim == 2:
            return self.matmat(x)
        raise ValueError(f"expected a 1-D or 2-D array, got shape {tuple(x.shape)}")

    __call__ = dot

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        # Without it NumPy takes an operator for a 0-d object array: np.asarray(A) "works",
        # np.dot(x, A) returns an object array of scaled operators, and SciPy's
        # ``S @ A`` fails on that array ("expected 1-d or 2-d array ... got array(<...>)").
        raise TypeError(
            f"{type(self).__name__} is an operator, not an array, and NumPy cannot convert "
            "it: apply it with @ or matvec/matmat, build its matrix with todense(), or pass "
            "to_scipy() to SciPy (whose operators compose with it)"
        )

    @eager_under_torch_compile
    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, numbers.Number):
            raise ValueError("scalar operands are not allowed with @, use * instead")
        return self.dot(other)

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, numbers.Number):
            raise ValueError("scalar operands are not allowed with @, use * instead")
        if isinstance(other, LinearOperator):
            return _ProductOperator(other, self)
        if is_array_api_obj(other):
            return _row_product(self, other)
        _raise_if_foreign_operator("S @ A", other)
        return NotImplemented

    def __mul__(self, other: Any) -> Any:
        _raise_if_foreign_operator("A * S", other)
        return self.dot(other)

    def __rmul__(self, other: Any) -> Any:
        if isinstance(other, numbers.Number):
            return self.dot(other)  # c * A is A * c, a real c's scaled operator
        if is_array_api_obj(other):
            # SciPy's x * A is x @ A, as A * x is A @ x.
            return self.__rmatmul__(other)
        _raise_if_foreign_operator("S * A", other)
        return NotImplemented

    def __truediv__(self, other: Any) -> Any:
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            return _ScaledOperator(self, reciprocal_factor(other))
        if isinstance(other, numbers.Number):
            raise non_real_factor_error("A / c", other)
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    def __add__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _SumOperator(self, other)
        _raise_if_foreign_operator("A + S", other)
        return NotImplemented

    def __radd__(self, other: Any) -> Any:
        # Reached for S + A where S's own __add__ declines (SciPy's takes only its own).
        _raise_if_foreign_operator("S + A", other)
        return NotImplemented

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _SumOperator(self, _ScaledOperator(other, -1.0))
        _raise_if_foreign_operator("A - S", other)
        return NotImplemented

    def __rsub__(self, other: Any) -> Any:
        _raise_if_foreign_operator("S - A", other)
        return NotImplemented

    def __pow__(self, p: Any) -> Any:
        # SciPy's A ** p: a non-negative integer power of a square operator.
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            if isinstance(p, numbers.Number):
                raise TypeError(f"the power of an operator must be an int, got {p!r}")
            return NotImplemented
        return _PowerOperator(self, int(p))

    def adjoint(self) -> LinearOperator:
        """Return the Hermitian adjoint ``A^H`` (the transpose: operators here are real).

        Returns
        -------
        LinearOperator
            The operator itself if it is symmetric, otherwise an ``(N, M)``
            operator whose products are this one's adjoint products (no
            data are copied).
        """
        if self._symmetric:
            return self
        return _AdjointOperator(self)

    def transpose(self) -> LinearOperator:
        """Return the transpose ``A^T``, equal to :meth:`adjoint` for real operators.

        Returns
        -------
        LinearOperator
            ``self.adjoint()``.
        """
        return self.adjoint()

    # Through lambdas, so that a subclass's own adjoint()/transpose() is used.
    H = property(lambda self: self.adjoint(), doc="The adjoint, as :meth:`adjoint`.")
    T = property(lambda self: self.transpose(), doc="The transpose, as :meth:`transpose`.")

    @float32_overflow_once
    def todense(self, *, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> Array:
        """Build the operator as a dense ``(M, N)`` array of its namespace and device.

        Parameters
        ----------
        max_entries : int, optional
            Refuse (``ValueError``) to build a matrix with more entries than
            this; the default allows 2**26 entries (256 MiB in float32).

        Returns
        -------
        array, shape (M, N)
            ``A @ I``, in the operator's namespace, dtype and device.

        Raises
        ------
        ValueError
            If ``M * N`` exceeds ``max_entries``, or ``max_entries`` is
            negative.
        TypeError
            If ``max_entries`` is not an int, or the operator is column-sharded.
        """
        self._refuse_sharded("todense()")
        m, n = self.shape
        max_entries = check_count(max_entries, "max_entries", minimum=0)
        if m * n > max_entries:
            raise ValueError(
                f"todense() would build a {m} x {n} matrix ({m * n} entries), more than "
                f"max_entries={max_entries}; use matvec/matmat, diagonal() or entries() instead, "
                "or raise max_entries"
            )
        return self._matmat(self._xp.eye(n, dtype=self.dtype, device=self.device))

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` that calls this operator.

        Only NumPy-backed operators can be exported: SciPy's operators convert
        their inputs to NumPy, which would copy data off a GPU or out of
        another library. SciPy's solvers hand in float64 work vectors; they are
        cast to the operator's dtype here, where the SciPy contract asks for
        it. A complex vector is applied to its real and imaginary parts (the
        operators are real), as SciPy's own real operators do.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator
            With this operator's shape and dtype, and its ``matvec``, ``matmat``,
            ``rmatvec`` and ``rmatmat``.

        Raises
        ------
        TypeError
            If the operator works on arrays of another library than NumPy, or is
            column-sharded (SciPy's solvers would take local shards for whole
            vectors).
        """
        self._refuse_sharded("to_scipy()")
        if not is_numpy_namespace(self._xp):
            raise TypeError(
                f"to_scipy needs a NumPy-backed operator, but {self!r} works on "
                f"{namespace_name(self._xp)} arrays; SciPy would copy every vector into NumPy. "
                "Build the operator from NumPy arrays, or call its matvec directly"
            )

        return scipy_operator(self)

    def __repr__(self) -> str:
        m, n = self.shape
        options = "".join(f"{item}, " for item in self._repr_options())
        return (
            f"<{m}x{n} {type(self).__name__} with {options}dtype={self.dtype}, "
            f"namespace={namespace_name(self._xp)}, device={self.device!r}>"
        )

    def _repr_options(self) -> tuple[str, ...]:
        """``key=value`` items that tell this operator from others of its class in its repr."""
        return ()


def _foreign_operator_error(expression: str, other: Any) -> TypeError | None:
    """The refusal of an operator of another library (SciPy's) as an operand, or None.

    Operators of this library and SciPy's do not combine: SciPy's arithmetic takes only
    its own operators, and this class's only its own (whose library, device, dtype and
    finiteness a SciPy operator does not answer for). Exported with ``to_scipy()``, this
    operator is SciPy's, and so is the expression. ``expression`` shows the operation,
    with ``A`` for this operator and ``S`` for the other.
    """
    if isinstance(other, LinearOperator) or is_array_api_obj(other):
        return None
    if (matrix := numpy_matrix_error("x", other)) is not None:
        return matrix
    # A SciPy sparse matrix or array (only where SciPy's sparse module is loaded: no import).
    sparse = sys.modules.get("scipy.sparse")
    if sparse is not None and sparse.issparse(other):
        kind, scipy_form = "a SciPy sparse matrix", expression.replace("S", "aslinearoperator(S)")
    elif hasattr(other, "matvec") and hasattr(other, "shape"):
        kind, scipy_form = "another library's operator", expression
    else:
        return None
    scipy_form = scipy_form.replace("A", "A.to_scipy()", 1)
    return TypeError(
        f"{expression} with S a {type(other).__name__}, {kind}: mfac_core operators "
        f"combine only with their own; export A to SciPy first: {scipy_form} is a "
        "scipy.sparse.linalg.LinearOperator (A must be NumPy-backed)"
    )


def _raise_if_foreign_operator(expression: str, other: Any) -> None:
    error = _foreign_operator_error(expression, other)
    if error is not None:
        raise error


def _row_product(A: LinearOperator, x: Array) -> Array:
    """``x @ A`` for a row or a stack of rows ``x``: ``(A^T @ x^T)^T``, ``x`` checked as given.

    A shape other than ``(M,)`` or ``(k, M)`` is refused here, as ``A @ x`` refuses it
    (the row's own ``matvec`` would offer ``(M, 1)``, which ``x @ A`` does not take, and
    an array of 0 or 3 dimensions was left to Python's "unsupported operand").

    ``matmat`` of ``x^T`` checks it, but its messages would name the transpose:
    "X must have shape (M, k), got (N, 2)" for an x of shape (2, N), and
    ``X[j, i] is nan`` for ``x[i, j]``. The shape is checked here; the values are
    read once, by ``matmat``, and again only where it refuses them, to name
    ``x``'s own entry (a second read on every product would be for the failure
    only). A column-sharded operator's own ``matmat`` checks its local shards.
    """
    T = A.transpose()
    if A.layout is not None:
        return T.matvec(x) if x.ndim == 1 else T.matmat(x.T).T
    m = A.shape[0]
    x = check_operand(A._xp, A.device, A.dtype, x, "x", owner=A)
    if x.ndim not in (1, 2) or x.shape[-1] != m:
        raise ValueError(f"x @ A needs x of shape ({m},) or (k, {m}), got {tuple(x.shape)}")
    if A.check_finite and not T.check_finite:
        check_finite(A._xp, x, "x")  # a subclass's transpose that does not check
    if x.ndim == 1:
        return T.matvec(x)  # its messages name x as given
    try:
        return T.matmat(x.T).T
    except ValueError:
        if A.check_finite:
            check_finite(A._xp, x, "x")  # x's own index where matmat named x^T's
        raise


def _check_compatible(a: LinearOperator, b: LinearOperator, what: str) -> None:
    if a._xp is not b._xp or not same_device(a.device, b.device):
        raise TypeError(
            f"cannot {what} operators over different array libraries or devices: {a!r} and {b!r}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"cannot {what} operators with different dtypes: {a.dtype} and {b.dtype}")


class _AdjointOperator(LinearOperator):
    def __init__(self, A: LinearOperator) -> None:
        A._refuse_sharded("the adjoint of a non-symmetric operator")
        super().__init__(
            shape=(A.shape[1], A.shape[0]),
            dtype=A.dtype,
            xp=A._xp,
            device=A.device,
            check_finite=A.check_finite,
        )
        self.A = A

    def _matmat(self, X: Array) -> Array:
        return self.A._rmatmat(X)

    def _rmatmat(self, X: Array) -> Array:
        return self.A._matmat(X)

    def _matvec(self, x: Array) -> Array:
        return self.A._rmatvec(x)

    def _rmatvec(self, x: Array) -> Array:
        return self.A._matvec(x)

    def adjoint(self) -> LinearOperator:
        return self.A


def _same_space(A: LinearOperator) -> dict[str, Any]:
    """The constructor's arguments for an operator of ``A``'s shape, space and symmetry."""
    return {
        "shape": A.shape,
        "dtype": A.dtype,
        "xp": A._xp,
        "device": A.device,
        "symmetric": A._symmetric,
        "check_finite": A.check_finite,
    }


class _ScaledOperator(LinearOperator):
    def __init__(self, A: LinearOperator, alpha: float) -> None:
        A._refuse_sharded("Scaling (*, /, -)")
        super().__init__(**_same_space(A))
        self.A, self.alpha = A, alpha

    def _scaled(self, Y: Array) -> Array:
        # A finite Y times alpha may leave the dtype's range: said as the operators say it.
        out = self.alpha * Y
        note_arithmetic_overflow(out, Y)
        return out

    def _matmat(self, X: Array) -> Array:
        return self._scaled(self.A._matmat(X))

    def _rmatmat(self, X: Array) -> Array:
        return self._scaled(self.A._rmatmat(X))

    def _matvec(self, x: Array) -> Array:
        return self._scaled(self.A._matvec(x))

    def _rmatvec(self, x: Array) -> Array:
        return self._scaled(self.A._rmatvec(x))


class _SumOperator(LinearOperator):
    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        A._refuse_sharded("Adding operators (+, -)")
        B._refuse_sharded("Adding operators (+, -)")
        _check_compatible(A, B, "add")
        if A.shape != B.shape:
            raise ValueError(f"cannot add operators of shapes {A.shape} and {B.shape}")
        super().__init__(
            shape=A.shape,
            dtype=A.dtype,
            xp=A._xp,
            device=A.device,
            symmetric=A._symmetric and B._symmetric,
            check_finite=A.check_finite or B.check_finite,
        )
        self.args = (A, B)

    @staticmethod
    def _sum(Y: Array, Z: Array) -> Array:
        # Two finite terms may sum beyond the dtype's range: said as the operators say it.
        out = Y + Z
        note_arithmetic_overflow(out, Y, Z)
        return out

    def _matmat(self, X: Array) -> Array:
        return self._sum(self.args[0]._matmat(X), self.args[1]._matmat(X))

    def _rmatmat(self, X: Array) -> Array:
        return self._sum(self.args[0]._rmatmat(X), self.args[1]._rmatmat(X))

    def _matvec(self, x: Array) -> Array:
        return self._sum(self.args[0]._matvec(x), self.args[1]._matvec(x))

    def _rmatvec(self, x: Array) -> Array:
        return self._sum(self.args[0]._rmatvec(x), self.args[1]._rmatvec(x))


class _ProductOperator(LinearOperator):
    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        A._refuse_sharded("Multiplying operators (@, dot)")
        B._refuse_sharded("Multiplying operators (@, dot)")
        _check_compatible(A, B, "multiply")
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"cannot multiply operators of shapes {A.shape} and {B.shape}")
        super().__init__(
            shape=(A.shape[0], B.shape[1]),
            dtype=A.dtype,
            xp=A._xp,
            device=A.device,
            check_finite=A.check_finite or B.check_finite,
        )
        self.args = (A, B)

    def _matmat(self, X: Array) -> Array:
        return self.args[0]._matmat(self.args[1]._matmat(X))

    def _rmatmat(self, X: Array) -> Array:
        return self.args[1]._rmatmat(self.args[0]._rmatmat(X))

    def _matvec(self, x: Array) -> Array:
        return self.args[0]._matvec(self.args[1]._matvec(x))

    def _rmatvec(self, x: Array) -> Array:
        return self.args[1]._rmatvec(self.args[0]._rmatvec(x))


class _PowerOperator(LinearOperator):
    """``A ** p``: ``p`` products with ``A`` (the identity for ``p = 0``), as SciPy's."""

    def __init__(self, A: LinearOperator, p: int) -> None:
        A._refuse_sharded("Powers of operators (**)")
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"only a square operator has powers, got shape {A.shape}")
        if p < 0:
            hint = (
                f"{type(A).__name__}.inverse() is its inverse"
                if callable(getattr(A, "inverse", None))
                else "mfac_core's inverse operators are separate classes, e.g. StaticIHVP "
                "for EmpiricalFisher"
            )
            raise ValueError(f"the power of an operator must be >= 0, got {p} ({hint})")
        super().__init__(**_same_space(A))
        self.A, self.p = A, p

    def _power(self, apply: Any, X: Array) -> Array:
        # A copy for p = 0, so that the result never aliases the input (as SciPy's).
        Y = self._xp.asarray(X, copy=True) if self.p == 0 else X
        for _ in range(self.p):
            Y = apply(Y)
        return Y

    def _matmat(self, X: Array) -> Array:
        return self._power(self.A._matmat, X)

    def _rmatmat(self, X: Array) -> Array:
        return self._power(self.A._rmatmat, X)

    def _matvec(self, x: Array) -> Array:
        return self._power(self.A._matvec, x)

    def _rmatvec(self, x: Array) -> Array:
        return self._power(self.A._rmatvec, x)
