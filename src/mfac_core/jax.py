r"""JAX front-end: M-FAC operators as pytrees, a functional sliding window and an optax optimizer.

This module imports :mod:`jax` and :mod:`optax`; ``import mfac_core`` does not
import them. Everything here is a pure function of arrays, so it works under
:func:`jax.jit`, :func:`jax.vmap` and :func:`jax.grad`:

- :func:`static_ihvp` builds a :class:`StaticIHVP`, the inverse damped
  empirical Fisher ``F^{-1}`` of a fixed set of gradients, as a pytree with
  :meth:`~StaticIHVP.matvec`, :meth:`~StaticIHVP.matmat` and
  :meth:`~StaticIHVP.diagonal`.
- :func:`window_init`, :func:`window_update`, :func:`window_update_and_matvec`
  and :func:`window_matvec` are the dynamic algorithm over a sliding window
  of the last m gradients; the window and its float64 Cholesky factor are a
  :class:`WindowState` pytree.
- :func:`mfac` is the M-FAC optimizer as an :class:`optax.GradientTransformation`
  whose state is the window; :func:`mfac_sgd` chains it with weight decay,
  momentum and the learning rate like :class:`mfac_core.torch.MFAC`.

**64-bit mode.** All m x m work (the Gram matrix, the Cholesky factor, the
triangular solves) is done in float64 whatever the storage dtype of the
gradients, as in the rest of :mod:`mfac_core`. JAX creates float64 arrays only
in its 64-bit mode; with the mode off it truncates float64 requests to float32
with only a warning, and the factor would silently lose its digits. The
functions here therefore refuse to run (``RuntimeError``) when the
mode is off at call or trace time. Turn it on with
``jax.config.update("jax_enable_x64", True)`` at start-up, or for a region
with ``with jax.enable_x64(True):`` (around both tracing and calling a
jitted function). float32 gradients and parameters stay float32 in that mode.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from . import _capacitance
from ._errors import FactorizationError, IllConditionedWarning
from ._validation import SMALLEST_DAMP, check_count, check_damp, check_flag, check_number

__all__ = [
    "MFACState",
    "StaticIHVP",
    "WindowState",
    "mfac",
    "mfac_sgd",
    "static_ihvp",
    "window_init",
    "window_matvec",
    "window_update",
    "window_update_and_matvec",
]

#: float64 entries of one column chunk of the static set-up's Gram product (32 MiB).
_CHUNK_ENTRIES = 2**22
#: Relative drift of diag(U^T U) against diag(C) that triggers a full refactorisation
#: (the same threshold as :class:`mfac_core.DynamicIHVP`).
_DRIFT_TOL = 1e-10
#: A new pivot below this fraction of its diagonal entry counts as a failed edit.
_PIVOT_TOL = 1e-13

_F64 = np.dtype("float64")
_EPS64 = float(np.finfo(np.float64).eps)


# -- checks --------------------------------------------------------------------------------


def _require_x64(what: str) -> None:
    """Refuse to trace or run float64 m x m work while JAX's 64-bit mode is off.

    With the mode off JAX truncates float64 to float32 with only a warning;
    a float32 Cholesky factor of ``m damp I + G G^T`` loses all digits once
    kappa nears 1e7, far earlier than the float64 one. An error that says how
    to turn the mode on is better than a silently wrong optimizer.
    """
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError(
            f"mfac_core.jax.{what} does its m x m work in float64, which needs JAX's 64-bit "
            "mode; it is off. Enable it at start-up with "
            'jax.config.update("jax_enable_x64", True), or around both the tracing and the '
            "calls with `with jax.enable_x64(True): ...`. float32 gradients and parameters "
            "stay float32 in that mode."
        )


def _check_dtype(dtype: Any, name: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype("float32"), np.dtype("float64")):
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def _check_vector(x: Any, name: str, dim: int, dtype: np.dtype, *, matrix: bool = False) -> Any:
    """``x`` as a JAX array of shape ``(dim,)`` (or ``(dim, n)``) and exactly ``dtype``."""
    x = jnp.asarray(x)
    shapes = "(d,) or (d, n)" if matrix else "(d,)"
    if x.ndim not in ((1, 2) if matrix else (1,)) or x.shape[0] != dim:
        raise ValueError(f"{name} must have shape {shapes} with d = {dim}, got {x.shape}")
    if np.dtype(x.dtype) != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the operator has dtype {dtype}; cast "
            "it explicitly first (no silent change of precision)"
        )
    return x


def _hyper(value: Any, name: str, check: Any) -> Any:
    """A numeric hyper-parameter: a Python number through ``check``, or a 0-d real array.

    Arrays are what ``optax.inject_hyperparams`` passes (and traced values under
    :func:`jax.jit`); a concrete one is checked by value like a Python number, a
    traced one cannot be and is returned as it is.
    """
    if not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return check(value)
    dtype = np.dtype(value.dtype)
    if value.ndim != 0 or dtype == np.bool_ or dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must be a real number or a 0-d real array, got an array of shape "
            f"{value.shape} and dtype {dtype}"
        )
    try:
        concrete = float(value)
    except jax.errors.ConcretizationTypeError:
        return value
    check(concrete)
    return value


def _hyper_damp(damp: Any) -> Any:
    return _hyper(damp, "damp", check_damp)


def _hyper_count(value: Any, name: str) -> Any:
    """A count >= 1 (Python int, or an integer 0-d array as :func:`_hyper` takes it)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.dtype(value.dtype).kind not in "iu":
            raise TypeError(f"{name} must be an int, got an array of dtype {value.dtype}")
        return _hyper(value, name, lambda v: check_count(int(v), name))
    return check_count(value, name)


def _concrete_true(flag: Any) -> bool:
    """``bool(flag)`` for concrete values; True under tracing (checks are then skipped)."""
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:
        return True


# -- triangular solves ---------------------------------------------------------------------
#
# The factors are stored row-major, as JAX arrays are, while LAPACK's trsm reads
# column-major: a row-major array S is the column-major matrix S^T. Passing S.T
# to the solve is therefore free (a layout bitcast), whereas passing S would make
# XLA copy and transpose the m x m matrix first, 5-10x the cost of the solve at
# m = 1024. With the upper factor U stored (C = U^T U), U.T is handed over as a
# lower triangular matrix.


def _solve_upper_t(U: Any, B: Any) -> Any:
    """``U^{-T} B`` for upper triangular ``U`` (B of shape (m,) or (m, n))."""
    vec = B.ndim == 1
    X = lax.linalg.triangular_solve(U.T, B[:, None] if vec else B, left_side=True, lower=True)
    return X[:, 0] if vec else X


def _solve_upper(U: Any, B: Any) -> Any:
    """``U^{-1} B`` for upper triangular ``U``."""
    vec = B.ndim == 1
    X = lax.linalg.triangular_solve(
        U.T, B[:, None] if vec else B, left_side=True, lower=True, transpose_a=True
    )
    return X[:, 0] if vec else X


# -- the static operator ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StaticIHVP:
    r"""The inverse damped empirical Fisher of fixed gradients, as a JAX pytree.

    Build it with :func:`static_ihvp`. For ``F = damp * I + G.T @ G / m`` and
    the float64 factor ``C = m damp I + G G^T = U^T U`` of the capacitance
    matrix,

    .. math:: F^{-1} x = (x - G^\top C^{-1} G x) / \lambda ,

    with both passes over G summed in float64 and the result rounded once to
    G's dtype (the G-form of :class:`mfac_core.StaticIHVP`; see Notes).

    The operator is a pytree whose leaves are ``G``, ``U`` and ``kappa_bound``
    and whose static part is ``damp``: it can be passed to, returned from and
    batched by jitted and vmapped functions, and :meth:`matvec` is
    differentiable (with respect to ``x`` and, through :func:`static_ihvp`,
    to ``G``).

    Attributes
    ----------
    G : jax.Array, shape (m, d)
        The gradients, as given (float32 or float64).
    U : jax.Array, shape (m, m)
        The upper Cholesky factor of ``C``, float64.
    kappa_bound : jax.Array
        ``1 + ||G||_F^2 / (m damp)`` (float64, 0-d), an upper bound of the
        condition number of F.
    damp : float
        The damping ``lambda`` (static).

    See Also
    --------
    mfac_core.StaticIHVP : The same operator for any Array-API library (not jittable).

    Notes
    -----
    Every product and sum of the passes is float64 (the products of float32
    values are exact in float64), so a float32 product is within a few
    ``eps(float32)`` of the inverse of the Fisher of the stored gradients for
    condition numbers up to about 1e7, also for vectors near the gradients'
    span, where float32 sums lose ``eps(float32) * kappa``. The passes are
    written as fused elementwise loops over G, not as ``dot_general`` with
    ``preferred_element_type=float64``: XLA's CPU backend ran that 40x slower
    than a float32 GEMV (it has no fast mixed-precision matrix-vector product),
    the fused loops about 2-2.5x. All of it needs JAX's 64-bit mode.
    """

    G: Any
    U: Any
    kappa_bound: Any
    damp: float = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int]:  # numpydoc ignore=RT01
        """The shape ``(d, d)`` of ``F^{-1}``."""
        d = self.G.shape[-1]
        return (d, d)

    @property
    def dtype(self) -> Any:  # numpydoc ignore=RT01
        """The storage dtype (G's)."""
        return self.G.dtype

    @property
    def num_grads(self) -> int:  # numpydoc ignore=RT01
        """The number m of gradients."""
        return self.G.shape[-2]

    @property
    def dim(self) -> int:  # numpydoc ignore=RT01
        """The number d of coordinates."""
        return self.G.shape[-1]

    def matvec(self, x: Any, /) -> Any:
        """``F^{-1} x`` for one vector, in O(dm): two reads of G, summed in float64.

        Parameters
        ----------
        x : array, shape (d,)
            In the operator's dtype.

        Returns
        -------
        jax.Array, shape (d,)
            ``F^{-1} x`` in the operator's dtype.

        Raises
        ------
        RuntimeError
            If JAX's 64-bit mode is off.
        ValueError
            If ``x`` does not have shape ``(d,)``, or the operator is a batch
            of operators (from :func:`jax.vmap`) applied outside of
            :func:`jax.vmap`.
        TypeError
            If ``x`` does not have the operator's dtype.
        """
        _require_x64("StaticIHVP.matvec")
        if self.G.ndim != 2:
            raise ValueError(
                "a batch of operators (from jax.vmap) must be applied under jax.vmap too"
            )
        x = _check_vector(x, "x", self.dim, np.dtype(self.G.dtype))
        return _static_apply(self.G, self.U, x, self.damp)

    def matmat(self, X: Any, /) -> Any:
        """Apply ``F^{-1}`` to the columns of ``X``, in O(dmn).

        Parameters
        ----------
        X : array, shape (d, n) or (d,)
            In the operator's dtype; a 1-D ``X`` is passed to :meth:`matvec`.

        Returns
        -------
        jax.Array, shape (d, n) or (d,)
            ``F^{-1} X`` in the operator's dtype.

        Raises
        ------
        RuntimeError
            If JAX's 64-bit mode is off.
        ValueError
            If ``X`` does not have shape ``(d, n)`` or ``(d,)``.
        TypeError
            If ``X`` does not have the operator's dtype.
        """
        _require_x64("StaticIHVP.matmat")
        X = _check_vector(X, "X", self.dim, np.dtype(self.G.dtype), matrix=True)
        if X.ndim == 1:
            return self.matvec(X)
        return _static_apply_columns(self.G, self.U, X, self.damp)

    def __matmul__(self, x: Any) -> Any:
        return self.matmat(x)

    def diagonal(self) -> Any:
        """The d diagonal entries ``(1 - ||U^{-T} g_j||^2) / damp`` of ``F^{-1}``, in O(d m^2).

        The columns ``g_j`` of G are whitened in float64 a chunk at a time (a
        triangular solve each), so the cancellation of ``1 - ||U^{-T} g_j||^2``
        at coordinates the gradients cover well costs float64 digits; the
        result has the operator's dtype.

        Returns
        -------
        jax.Array, shape (d,)
            The diagonal entries ``[F^{-1}]_{jj}`` in the operator's dtype.

        Raises
        ------
        RuntimeError
            If JAX's 64-bit mode is off.
        """
        _require_x64("StaticIHVP.diagonal")
        if self.G.ndim != 2:
            raise ValueError(
                "a batch of operators (from jax.vmap) must be applied under jax.vmap too"
            )
        return _static_diagonal(self.G, self.U, self.damp)


# Registered by a call, not as a decorator, so that the class stays a class where the
# documentation is built with JAX mocked.
jax.tree_util.register_dataclass(StaticIHVP)


def _gram_f64(G: Any) -> Any:
    """``G G^T`` accumulated in float64, over column chunks of at most 32 MiB in float64.

    Converting all of G to float64 at once would need twice the memory of a
    float32 G; the chunks keep the extra memory to a small fraction of G.
    """
    m, d = G.shape
    width = max(1, min(d, _CHUNK_ENTRIES // m))
    full = d // width

    def chunk_gram(X: Any) -> Any:
        X = X.astype(jnp.float64)
        return X @ X.T

    gram = jnp.zeros((m, m), jnp.float64)
    if full:

        def body(i: Any, acc: Any) -> Any:
            return acc + chunk_gram(lax.dynamic_slice_in_dim(G, i * width, width, axis=1))

        gram = lax.fori_loop(0, full, body, gram) if full > 1 else chunk_gram(G[:, :width])
    if full * width < d:
        gram = gram + chunk_gram(G[:, full * width :])
    return gram


def static_ihvp(G: Any, /, *, damp: float) -> StaticIHVP:
    r"""Factorise the inverse damped Fisher of the gradients in the rows of ``G``.

    The set-up is one Gram product ``G G^T`` (float64 accumulation) and one
    float64 Cholesky factorisation: O(d m^2). The operator keeps G itself (no
    derived m x d array). It is a pure function, so it can be jitted, vmapped
    (for instance over blocks of coordinates) and differentiated.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, float32 or float64 (a JAX or NumPy array).
    damp : float
        The damping ``lambda > 0`` (static: a Python number).

    Returns
    -------
    StaticIHVP
        The operator ``F^{-1}``, a pytree in G's dtype.

    Raises
    ------
    RuntimeError
        If JAX's 64-bit mode is off.
    ValueError, TypeError
        For a G that is not 2-D, is empty or not float32/float64, and for a
        bad ``damp``.
    FactorizationError
        If, outside of tracing, the capacitance matrix cannot be factorised
        in float64 (kappa near 1e16, or NaN/inf in G). Under ``jax.jit`` or
        ``jax.vmap`` the check is not possible and the operator then holds
        NaN instead.

    Warns
    -----
    IllConditionedWarning
        Outside of tracing, when ``eps(float64) * kappa >= 1`` for a lower
        estimate of kappa: the float64 factor and passes may then leave no
        correct digit.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> jax.config.update("jax_enable_x64", True)
    >>> from mfac_core.jax import static_ihvp
    >>> G = jax.random.normal(jax.random.key(0), (8, 100), dtype=jnp.float32)
    >>> op = static_ihvp(G, damp=1e-1)
    >>> x = jnp.ones(100, dtype=jnp.float32)
    >>> y = jax.jit(lambda op, x: op.matvec(x))(op, x)   # the operator is a pytree
    >>> F = 1e-1 * np.eye(100) + np.asarray(G, np.float64).T @ np.asarray(G, np.float64) / 8
    >>> bool(np.allclose(F @ np.asarray(y), 1.0, atol=1e-4))
    True
    >>> g = jax.grad(lambda x: jnp.sum(op.matvec(x) ** 2))(x)   # = 2 F^{-2} x
    >>> bool(jnp.allclose(g, 2 * op.matvec(op.matvec(x)), rtol=1e-4))
    True
    """
    _require_x64("static_ihvp")
    damp = check_damp(damp)
    G = jnp.asarray(G)
    if G.ndim != 2 or 0 in G.shape:
        raise ValueError(
            f"G must be a non-empty 2-D array of shape (m, d), one gradient per "
            f"row; got shape {G.shape}"
        )
    dtype = _check_dtype(G.dtype, "G")
    U, kappa_bound, kappa_lower, finite = _static_setup(G, damp)
    # Outside of tracing these are concrete, and a failure is an exception as in
    # mfac_core.StaticIHVP; under jit or vmap the checks are skipped (NaN results).
    if not _concrete_true(finite):
        raise FactorizationError(
            f"the damped Fisher of these gradients is not numerically positive definite in "
            f"float64 (damp={damp:g}, condition number kappa <= {float(kappa_bound):.3g}); "
            "increase damp, or remove duplicated or non-finite gradients"
        )
    del dtype
    eps = float(np.finfo(np.float64).eps)
    if not _concrete_true(eps * kappa_lower < 1.0):
        warnings.warn(
            f"F is so ill-conditioned (kappa >= {float(kappa_lower):.3g}, damp={damp:g}) that "
            "float64 (the passes' accumulation) products may have no correct digits; "
            "increase damp",
            IllConditionedWarning,
            stacklevel=2,
        )
    return StaticIHVP(G=G, U=U, kappa_bound=kappa_bound, damp=damp)


@functools.partial(jax.jit, static_argnums=1)
def _static_setup(G: Any, damp: float) -> tuple[Any, Any, Any, Any]:
    """U, the upper and a lower bound of kappa, and whether the factor is finite.

    Jitted as a whole so that an eager :func:`static_ihvp` compiles once per
    shape instead of dispatching a dozen small operations.
    """
    m = G.shape[0]
    gram = _gram_f64(G)
    C = gram + (m * damp) * jnp.eye(m, dtype=jnp.float64)
    U = jnp.linalg.cholesky(C).T
    kappa_bound = 1.0 + jnp.trace(gram) / (m * damp)
    # The same lower bound of the largest eigenvalue as mfac_core.StaticIHVP's (power
    # iterations from the largest diagonal entry, which no Gram can make vanish).
    lam, _ = _capacitance.lambda_max_bounds(jnp, gram)
    return U, kappa_bound, 1.0 + lam / (m * damp), jnp.all(jnp.isfinite(U))


# -- the passes over the gradients, summed in float64 ----------------------------------------
#
# Written as fused elementwise loops, which XLA runs as one loop over G. Measured with XLA's
# CPU backend (m = 64, d = 1e6, float32 G, 2 cores): a float32 GEMV 6-10 ms; G x summed in
# float64 by dot_general(..., preferred_element_type=float64) 330 ms, over column slabs
# 14 ms; x - G^T a in float64 by dot_general 270 ms, as a reduction over the rows 900 ms, as
# a loop over groups of 8 rows that XLA fuses 20-27 ms.

#: Rows of G per step of the loop of :func:`_combine64` (16 and more made XLA's CPU backend
#: spill the fused loop: 2.5x slower).
_ROW_GROUP = 8


#: float64 entries of the (m, w) slab of partial sums of :func:`_project64` (8 MiB).
_SLAB_ENTRIES = 2**20


def _project64(G: Any, x: Any) -> Any:
    """``G x`` for one vector ``x`` (d,), every product and sum in float64: (m,) float64.

    A loop over column slabs of G that adds each slab's products into an (m, w) float64
    slab of partial sums (an elementwise loop XLA fuses), then sums the slab: as a single
    multiply-and-reduce over d, XLA's CPU backend took 40 ms at m = 64 and 1.7 s at
    m = 256 (d = 1e6), the slabs 14 and 52 ms.
    """
    m, d = G.shape
    w = max(1, min(d, 4096, _SLAB_ENTRIES // max(m, 1)))
    full = d // w
    x64 = x.astype(jnp.float64)

    def body(c: Any, acc: Any) -> Any:
        g = lax.dynamic_slice_in_dim(G, c * w, w, axis=1).astype(jnp.float64)
        return acc + g * lax.dynamic_slice_in_dim(x64, c * w, w)

    out = jnp.sum(lax.fori_loop(0, full, body, jnp.zeros((m, w), jnp.float64)), axis=1)
    if full * w < d:
        out = out + jnp.sum(G[:, full * w :].astype(jnp.float64) * x64[full * w :], axis=1)
    return out


def _combine64(G: Any, x: Any, a: Any) -> Any:
    """``x - G^T a`` (d,) in float64 for ``a`` (m,) float64: the m terms summed first."""
    m = G.shape[0]
    full = m // _ROW_GROUP

    def body(k: Any, y: Any) -> Any:
        rows = lax.dynamic_slice_in_dim(G, k * _ROW_GROUP, _ROW_GROUP, axis=0)
        c = lax.dynamic_slice_in_dim(a, k * _ROW_GROUP, _ROW_GROUP)
        for r in range(_ROW_GROUP):
            y = y + c[r] * rows[r].astype(jnp.float64)
        return y

    y = jnp.zeros(G.shape[1:], jnp.float64)
    if full:
        y = lax.fori_loop(0, full, body, y)
    for i in range(full * _ROW_GROUP, m):
        y = y + a[i] * G[i].astype(jnp.float64)
    return x.astype(jnp.float64) - y


# Jitted (inlined into a caller's jit): called eagerly, the passes would run op by op and
# build whole float64 copies of G instead of XLA's fused loops (a 244 MiB float32 G took
# 341 MiB more memory and 6x the time).


@functools.partial(jax.jit, static_argnums=3)
def _static_apply(G: Any, U: Any, x: Any, damp: float) -> Any:
    """``F^{-1} x`` of the G-form, rounded once to G's dtype."""
    a = _solve_upper(U, _solve_upper_t(U, _project64(G, x)))
    return (_combine64(G, x, a) / damp).astype(G.dtype)


@functools.partial(jax.jit, static_argnums=3)
def _static_apply_columns(G: Any, U: Any, X: Any, damp: float) -> Any:
    """:func:`_static_apply` of each column of ``X``: a loop, not a (k, m, d) temporary."""
    return lax.map(lambda x: _static_apply(G, U, x, damp), X.T).T


@functools.partial(jax.jit, static_argnums=2)
def _static_diagonal(G: Any, U: Any, damp: float) -> Any:
    """``(1 - ||U^{-T} g_j||^2) / damp`` per column, whitened in float64 chunk by chunk."""
    m, d = G.shape
    width = max(1, min(d, _CHUNK_ENTRIES // m))
    full = d // width

    def chunk(X: Any) -> Any:
        Z = _solve_upper_t(U, X.astype(jnp.float64))
        return ((1.0 - jnp.sum(Z * Z, axis=0)) / damp).astype(G.dtype)

    out = jnp.zeros((d,), G.dtype)
    if full:

        def body(i: Any, acc: Any) -> Any:
            part = chunk(lax.dynamic_slice_in_dim(G, i * width, width, axis=1))
            return lax.dynamic_update_slice_in_dim(acc, part, i * width, axis=0)

        out = lax.fori_loop(0, full, body, out)
    if full * width < d:
        out = out.at[full * width :].set(chunk(G[:, full * width :]))
    return out


# -- the sliding window --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WindowState:
    r"""A sliding window of the last m gradients and its float64 Cholesky factor.

    Create it with :func:`window_init`; advance it with :func:`window_update`
    or :func:`window_update_and_matvec`; apply ``F^{-1}`` with
    :func:`window_matvec` (also ``state.matvec(x)`` and ``state @ x``). It is
    a pytree: the arrays, ``damp`` and ``refactor_every`` included, are its
    leaves (so they may be traced values, as ``optax.inject_hyperparams``
    makes them) and ``zero_init`` is its static part.

    Attributes
    ----------
    grads : jax.Array, shape (m, d)
        The gradients in ring order: slot ``(pos + i) % m`` holds the i-th
        oldest. Storage dtype (float32 or float64).
    gram : jax.Array, shape (m, m)
        ``G G^T`` in slot order, float64.
    factor : jax.Array, shape (m, m)
        The upper Cholesky factor U of the capacitance matrix
        ``C = U^T U = k damp I + G G^T`` in age order (oldest first), float64.
    pos : jax.Array
        The slot of the oldest gradient, the next one to be replaced (int32).
    count : jax.Array
        The number k of gradients in the window (int32; always m with
        ``zero_init``).
    since_refactor : jax.Array
        Incremental edits since the last full factorisation (int32).
    refactors : jax.Array
        Full factorisations done so far (int32), for diagnostics.
    damp : jax.Array
        The damping ``lambda`` that ``factor`` was computed with (float64,
        0-d). An update with another damping refactorises.
    zero_init : bool
        The authors' convention: the window starts as m zero gradients and
        the normalisation is fixed at ``1/m`` (static).
    refactor_every : jax.Array
        Full refactorisation after this many incremental edits (int32, 0-d).
    """

    grads: Any
    gram: Any
    factor: Any
    pos: Any
    count: Any
    since_refactor: Any
    refactors: Any
    damp: Any
    zero_init: bool = dataclasses.field(metadata={"static": True})
    refactor_every: Any

    @property
    def num_grads(self) -> int:  # numpydoc ignore=RT01
        """The window's capacity m."""
        return self.grads.shape[-2]

    @property
    def dim(self) -> int:  # numpydoc ignore=RT01
        """The number d of coordinates."""
        return self.grads.shape[-1]

    @property
    def dtype(self) -> Any:  # numpydoc ignore=RT01
        """The storage dtype of the gradients."""
        return self.grads.dtype

    @property
    def shape(self) -> tuple[int, int]:  # numpydoc ignore=RT01
        """The shape ``(d, d)`` of ``F^{-1}``."""
        return (self.dim, self.dim)

    def matvec(self, x: Any, /) -> Any:
        """Apply the window's ``F^{-1}``, as :func:`window_matvec` does.

        Parameters
        ----------
        x : array, shape (d,) or (d, n)
            In the window's storage dtype.

        Returns
        -------
        jax.Array, shape (d,) or (d, n)
            ``F^{-1} x`` in the storage dtype.

        Raises
        ------
        RuntimeError
            If JAX's 64-bit mode is off.
        ValueError
            If ``x`` does not have shape ``(d,)`` or ``(d, n)``.
        TypeError
            If ``x`` does not have the storage dtype.
        """
        return window_matvec(self, x)

    def __matmul__(self, x: Any) -> Any:
        return window_matvec(self, x)

    def gradients(self) -> Any:
        """Return the m gradient rows, oldest first.

        Without ``zero_init`` only the last ``count`` rows are gradients; the
        first ``m - count`` are the zeros of empty slots.

        Returns
        -------
        jax.Array, shape (m, d)
            A new array of the rows of ``grads`` in age order, in the
            storage dtype.
        """
        m = self.num_grads
        return jnp.take(self.grads, (self.pos + jnp.arange(m, dtype=jnp.int32)) % m, axis=0)


jax.tree_util.register_dataclass(WindowState)


def window_init(
    num_grads: int,
    dim: int,
    /,
    *,
    damp: float,
    dtype: Any,
    zero_init: bool = True,
    refactor_every: int | None = None,
) -> WindowState:
    r"""An empty sliding window of ``num_grads`` gradients of ``dim`` coordinates.

    Parameters
    ----------
    num_grads : int
        The capacity m. Memory: ``m d`` values of ``dtype`` plus two
        ``m x m`` float64 arrays.
    dim : int
        The number of coordinates d.
    damp : float or jax.Array
        The damping ``lambda > 0``: a real number or a 0-d array (it is a
        leaf of the state).
    dtype : dtype
        The storage dtype of the gradients, float32 or float64.
    zero_init : bool, optional
        The authors' convention and :class:`mfac_core.torch.MFAC`'s default
        (default ``True``): the window starts as m zero gradients with the
        normalisation fixed at ``1/m``, so every step is an O(m^2) factor
        edit. With ``False`` the normalisation is ``1/k`` for the ``k``
        gradients seen so far, and the factor is recomputed (O(m^3)) at
        each of the first m steps, as the normalisation changes.
    refactor_every : int or jax.Array, optional
        Refactorise in full after this many incremental edits (default m),
        which bounds the drift of the factor; a drift check after each edit
        refactorises earlier if needed. A leaf of the state, like ``damp``.

    Returns
    -------
    WindowState
        The empty window: zero gradients and the factor ``sqrt(m damp) I``
        (``sqrt(damp) I`` without ``zero_init``).

    Raises
    ------
    RuntimeError
        If JAX's 64-bit mode is off.
    ValueError
        If ``num_grads``, ``dim`` or ``refactor_every`` is not an int
        ``>= 1``, or ``damp`` is not finite and positive.
    TypeError
        If ``damp`` is neither a real number nor a 0-d real array, or
        ``dtype`` is neither float32 nor float64.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> jax.config.update("jax_enable_x64", True)
    >>> from mfac_core.jax import window_init, window_update_and_matvec
    >>> state = window_init(4, 50, damp=0.1, dtype=jnp.float64, zero_init=False)
    >>> step = jax.jit(window_update_and_matvec, donate_argnums=0)
    >>> for g in jax.random.normal(jax.random.key(0), (6, 50), dtype=jnp.float64):
    ...     state, s = step(state, g)
    >>> int(state.count), int(state.pos)
    (4, 2)
    >>> G = np.asarray(state.gradients())                 # the last four, oldest first
    >>> F = 0.1 * np.eye(50) + G.T @ G / 4
    >>> bool(np.allclose(F @ np.asarray(s), np.asarray(g)))  # s = F^{-1} g
    True
    """
    _require_x64("window_init")
    m = check_count(num_grads, "num_grads")
    d = check_count(dim, "dim")
    damp64 = jnp.asarray(_hyper_damp(damp), jnp.float64)
    dt = _check_dtype(dtype, "dtype")
    every = m if refactor_every is None else _hyper_count(refactor_every, "refactor_every")
    zero_init = check_flag(zero_init, "zero_init")
    shift = m * damp64 if zero_init else damp64  # without zero_init any k >= 1 gives it
    return WindowState(
        grads=jnp.zeros((m, d), dt),
        gram=jnp.zeros((m, m), jnp.float64),
        factor=jnp.sqrt(shift) * jnp.eye(m, dtype=jnp.float64),
        pos=jnp.zeros((), jnp.int32),
        count=jnp.asarray(m if zero_init else 0, jnp.int32),
        since_refactor=jnp.zeros((), jnp.int32),
        refactors=jnp.zeros((), jnp.int32),
        damp=damp64,
        zero_init=zero_init,
        refactor_every=jnp.asarray(every, jnp.int32),
    )


def _shift(state: WindowState, count: Any, damp: Any) -> Any:
    """The diagonal shift ``k damp`` of the capacitance matrix for k gradients.

    Empty slots hold zero rows, which decouple from the others in ``C``: their
    diagonal entry only has to be positive, so an empty window uses ``damp``.
    """
    if state.zero_init:
        return state.num_grads * damp
    return jnp.maximum(count, 1).astype(jnp.float64) * damp


def _age_order(m: int, pos: Any) -> Any:
    """Slots oldest first: ``(pos + i) % m``."""
    return (pos + jnp.arange(m, dtype=jnp.int32)) % m


def _refactor(gram: Any, pos: Any, shift: Any) -> tuple[Any, Any]:
    """The upper factor of ``C`` in age order from scratch (O(m^3)); and whether it worked."""
    m = gram.shape[0]
    idx = _age_order(m, pos)
    C = gram[idx][:, idx] + shift * jnp.eye(m, dtype=jnp.float64)
    L = jnp.linalg.cholesky(C)
    ok = jnp.all(jnp.isfinite(L)) & jnp.all(jnp.diagonal(L) > 0)
    return L.T, ok


def _replace_oldest(U: Any, b_age: Any, shift: Any) -> tuple[Any, Any]:
    """Edit the factor: drop the oldest (first) row and column, append the new one last.

    ``U`` is the upper factor of ``C`` in age order, ``b_age`` the new Gram row
    against the window after the replacement, in the new age order (its last
    entry the new gradient's squared norm). O(m^2), all in float64:

    1. Deleting row and column 0 leaves ``V^T V + u u^T`` for ``V = U[1:, 1:]``
       and ``u = U[0, 1:]``, a rank-one update. With ``q = V^{-T} u``,
       ``V^T V + u u^T = V^T (I + q q^T) V`` and ``I + q q^T = K^T K`` where K
       is upper triangular with ``K_jj = sqrt(s_{j+1}/s_j)`` and
       ``K_ji = beta_j q_i`` (``i > j``), ``s_j = 1 + sum_{i<j} q_i^2``,
       ``beta_j = q_j / sqrt(s_j s_{j+1})`` (Gill, Golub, Murray & Saunders
       1974; :mod:`mfac_core._cholesky` does the same by panels). Row j of
       ``K V`` is ``K_jj V_j + beta_j sum_{i>j} q_i V_i``: one bottom-up sweep
       with a running sum. The sweep is a ``fori_loop`` over rows, each step a
       contiguous row of length m: on XLA's CPU this took 0.8 ms at m = 1024,
       where ``lax.cumsum`` over the rows took 7.6 ms.
    2. Appending is one triangular solve ``U1^T c = b`` and the pivot
       ``sqrt(b_new + shift - c^T c)``.

    Returns the new factor and whether it can be trusted: a positive pivot
    and ``diag(U^T U)`` within ``_DRIFT_TOL`` of ``diag(C)``.
    """
    m = U.shape[0]
    n = m - 1
    # q from a solve with all of U, without copying V: U^T y = U_00 e_0 has
    # y[0] = 1 and y[1:] = -q.
    e0 = jnp.zeros((m,), jnp.float64).at[0].set(U[0, 0])
    q = -_solve_upper_t(U, e0)[1:]
    s = 1.0 + jnp.concatenate([jnp.zeros((1,), jnp.float64), jnp.cumsum(q * q)])
    diag = jnp.sqrt(s[1:] / s[:-1])
    beta = q / jnp.sqrt(s[1:] * s[:-1])

    def body(i: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        acc, out = carry
        j = n - 1 - i
        v = lax.dynamic_slice(U, (j + 1, 1), (1, n))[0]
        out = lax.dynamic_update_slice(out, (diag[j] * v + beta[j] * acc)[None, :], (j, 0))
        return acc + q[j] * v, out

    # The last row and column are those of the identity during the append's solve.
    out = jnp.zeros((m, m), jnp.float64).at[n, n].set(1.0)
    if n:  # m = 1: nothing is left after the deletion (and the body cannot be traced)
        _, out = lax.fori_loop(0, n, body, (jnp.zeros((n,), jnp.float64), out))
    c = b_age[n] + shift
    col = _solve_upper_t(out, b_age.at[n].set(0.0))[:n]
    pivot2 = c - col @ col
    good = pivot2 > _PIVOT_TOL * jnp.abs(c)
    out = out.at[:n, n].set(col).at[n, n].set(jnp.sqrt(jnp.where(good, pivot2, 1.0)))
    return out, good


def _check_state(state: Any, what: str) -> None:
    if not isinstance(state, WindowState):
        raise TypeError(
            f"{what} needs a WindowState (from window_init), got {type(state).__name__}"
        )
    _require_x64(what)


def _insert(state: WindowState, g: Any, damp: Any) -> tuple[WindowState, Any, Any]:
    """Insert ``g`` with the damping ``damp`` (float64, 0-d).

    Returns the new state, the Gram row ``G g`` (slot order) and success. A
    damping other than the state's changes the shift of ``C``: the factor is then
    recomputed from the Gram matrix (O(m^3)) instead of edited.
    """
    m = state.num_grads
    g = _check_vector(g, "g", state.dim, np.dtype(state.dtype))
    slot = state.pos
    # Pass 1 reads the window before the row is replaced: G g holds the new Gram row
    # except at the slot, whose entry is g.g. The other order (write g, then G g, as
    # DynamicIHVP does) needs the old row to undo a refused write, and XLA's CPU
    # backend then copied the whole m x d window (twice) instead of writing in place.
    # The diagonal then comes from another sum than the rest of the row (both float64),
    # so a duplicated gradient's 2 x 2 block may be indefinite by rounding before the
    # shift k damp is added; unless k damp < eps(float64) |g|^2 the shift absorbs it,
    # and otherwise the gradient is refused, never half-inserted.
    b = _project64(state.grads, g)  # pass 1 over the window, summed in float64
    g64 = g.astype(jnp.float64)
    b = b.at[slot].set(jnp.vdot(g64, g64))
    count = jnp.minimum(state.count + 1, m)
    pos = (slot + 1) % m
    gram = state.gram.at[slot, :].set(b).at[:, slot].set(b)
    shift = _shift(state, count, damp)
    # The O(m^2) edit needs an unchanged shift: a full window (or zero_init), same damp.
    use_edit = (
        (state.count == m) & (state.since_refactor < state.refactor_every) & (damp == state.damp)
    )
    idx = _age_order(m, pos)
    b_age = b[idx]

    def edit(_: Any) -> tuple[Any, Any]:
        U, good = _replace_oldest(state.factor, b_age, shift)
        want = jnp.diagonal(gram)[idx] + shift
        drift = jnp.max(jnp.abs(jnp.sum(U * U, axis=0) - want) / want)
        return U, good & (drift <= _DRIFT_TOL)

    def skip(_: Any) -> tuple[Any, Any]:
        return state.factor, jnp.zeros((), bool)

    U, edited = lax.cond(use_edit, edit, skip, None)
    U, ok = lax.cond(
        edited, lambda _: (U, jnp.ones((), bool)), lambda _: _refactor(gram, pos, shift), None
    )
    # A gradient holding NaN/inf (or overflowing float64) makes g.g non-finite: refuse it
    # and keep the window as it was, rather than poisoning every later step. So is one
    # that makes eps(float64) kappa >= 1 (kappa >= 1 + max_i |g_i|^2 / shift), where the
    # float64 work leaves no correct digit: a float32 gradient of 1e30 beside ones of 1
    # would otherwise give products of rounding noise (the core operators warn there;
    # a jitted step cannot).
    hopeless = _EPS64 * (1.0 + jnp.max(jnp.diagonal(gram)) / shift) >= 1.0
    # A traced damping (an injected hyper-parameter) cannot be checked by value before
    # the step; one that is not finite and positive refuses the gradient instead.
    good_damp = jnp.isfinite(damp) & (damp >= SMALLEST_DAMP)
    ok = ok & jnp.isfinite(b[slot]) & ~hopeless & good_damp
    new = WindowState(
        # One in-place write: the slot's own old row is the only other value read.
        grads=lax.dynamic_update_index_in_dim(
            state.grads,
            jnp.where(ok, g, lax.dynamic_index_in_dim(state.grads, slot, axis=0, keepdims=False)),
            slot,
            axis=0,
        ),
        gram=jnp.where(ok, gram, state.gram),
        factor=jnp.where(ok, U, state.factor),
        pos=jnp.where(ok, pos, state.pos),
        count=jnp.where(ok, count, state.count),
        since_refactor=jnp.where(
            ok, jnp.where(edited, state.since_refactor + 1, 0), state.since_refactor
        ),
        refactors=state.refactors + (ok & ~edited).astype(jnp.int32),
        damp=jnp.where(ok, damp, state.damp),
        zero_init=state.zero_init,
        refactor_every=state.refactor_every,
    )
    return new, b, ok


def _finish(state: WindowState, X: Any, P: Any) -> Any:
    """``(X - G^T C^{-1} P) / damp`` given ``P = G X`` (float64, slot order)."""
    m = state.num_grads
    idx = _age_order(m, state.pos)
    coef_age = _solve_upper(state.factor, _solve_upper_t(state.factor, P[idx]))
    coef = jnp.zeros_like(coef_age).at[idx].set(coef_age)
    # Pass 2, summed in float64 and rounded once (a float32 sum of x - G^T c cancels for
    # vectors near the window's span).
    if X.ndim == 1:
        Y = _combine64(state.grads, X, coef)
    else:
        Y = jax.vmap(_combine64, in_axes=(None, 1, 1), out_axes=1)(state.grads, X, coef)
    return (Y / state.damp).astype(state.dtype)


# The window functions run jitted bodies: called eagerly they compile once per
# shape (instead of dispatching dozens of small operations and re-tracing their
# conds at every call); inside a user's jit they are inlined. Donation is the
# caller's choice: jax.jit(window_update, donate_argnums=0) updates the window in
# place. The public functions are plain Python around them, which checks the
# arguments and the 64-bit mode at every call and at every trace.


@jax.jit
def _update_jit(state: WindowState, g: Any, damp: Any) -> WindowState:
    return _insert(state, g, damp)[0]


@jax.jit
def _update_and_matvec_jit(state: WindowState, g: Any, damp: Any) -> tuple[WindowState, Any]:
    new, b, ok = _insert(state, g, damp)
    out = _finish(new, g, b)
    return new, jnp.where(ok, out, jnp.nan)


@jax.jit
def _matvec_jit(state: WindowState, x: Any) -> Any:
    if x.ndim == 1:
        return _finish(state, x, _project64(state.grads, x))
    P = jax.vmap(_project64, in_axes=(None, 1), out_axes=1)(state.grads, x)
    return _finish(state, x, P)


def _step_damp(state: WindowState, damp: Any) -> Any:
    """The damping of a step (float64, 0-d): the state's, or a new one checked as such."""
    return state.damp if damp is None else jnp.asarray(_hyper_damp(damp), jnp.float64)


def window_update(state: WindowState, g: Any, /, *, damp: Any = None) -> WindowState:
    """Insert the gradient ``g`` (shape ``(d,)``); a full window drops its oldest.

    One read of the window (the Gram row ``G g``) and an O(m^2) factor edit
    (O(m^3) while a window without ``zero_init`` fills, every
    ``refactor_every`` edits, and when the drift check fails).

    A ``g`` holding NaN or infinity, or one the float64 factor cannot take
    (``eps(float64) * kappa >= 1``), leaves the window unchanged; nothing tells, so use
    :func:`window_update_and_matvec` (NaN result) where that matters.

    Parameters
    ----------
    state : WindowState
        The window, from :func:`window_init` or a previous update.
    g : array, shape (d,)
        The new gradient, in the window's storage dtype.
    damp : float or jax.Array, optional
        A new damping for this and later steps (default: the window's). One
        that differs from ``state.damp`` changes the capacitance matrix, so
        the factor is recomputed from the stored Gram matrix, O(m^3), instead
        of edited. It may be a traced value; a traced one that is not finite
        and positive refuses ``g`` as a NaN gradient is refused.

    Returns
    -------
    WindowState
        The new state. Jit with ``donate_argnums=0`` to update the window in
        place.

    Raises
    ------
    TypeError
        If ``state`` is not a :class:`WindowState`, or ``g`` does not have
        the window's dtype.
    RuntimeError
        If JAX's 64-bit mode is off.
    ValueError
        If ``g`` does not have shape ``(d,)``, or a concrete ``damp`` is not
        finite and positive.
    """
    _check_state(state, "window_update")
    g = _check_vector(g, "g", state.dim, np.dtype(state.dtype))
    return _update_jit(state, g, _step_damp(state, damp))


def window_update_and_matvec(
    state: WindowState, g: Any, /, *, damp: Any = None
) -> tuple[WindowState, Any]:
    """Insert ``g``, then return ``F^{-1} g`` for the window that includes it.

    The optimizer step: the product ``G g`` serves both the Gram row and the
    product, so the m x d window is read twice in all, the floor; the m x m
    part is an O(m^2) float64 factor edit plus two triangular solves.

    Parameters
    ----------
    state : WindowState
        The window, from :func:`window_init` or a previous update.
    g : array, shape (d,)
        The new gradient, in the window's storage dtype.
    damp : float or jax.Array, optional
        A new damping, as for :func:`window_update`; the product uses it.

    Returns
    -------
    state : WindowState
        The new state (jit with ``donate_argnums=0`` to update it in place).
    direction : jax.Array, shape (d,)
        ``F^{-1} g`` in the storage dtype; all NaN if ``g`` was refused (NaN
        or infinity, or a factorisation failure), in which case the window is
        unchanged (so ``optax.apply_if_finite`` can skip the step).

    Raises
    ------
    TypeError
        If ``state`` is not a :class:`WindowState`, or ``g`` does not have
        the window's dtype.
    RuntimeError
        If JAX's 64-bit mode is off.
    ValueError
        If ``g`` does not have shape ``(d,)``, or a concrete ``damp`` is not
        finite and positive.
    """
    _check_state(state, "window_update_and_matvec")
    g = _check_vector(g, "g", state.dim, np.dtype(state.dtype))
    return _update_and_matvec_jit(state, g, _step_damp(state, damp))


def window_matvec(state: WindowState, x: Any, /) -> Any:
    r"""Apply the inverse of the window's damped Fisher, in O(dm): two reads of the window.

    ``F = damp I + (1/k) sum g g^T`` over the ``k`` gradients in the window
    (``k = m`` with ``zero_init``). ``x`` may also be a matrix ``(d, n)``.

    Parameters
    ----------
    state : WindowState
        The window.
    x : array, shape (d,) or (d, n)
        A vector or the columns of a matrix, in the window's storage dtype.

    Returns
    -------
    jax.Array, shape (d,) or (d, n)
        ``F^{-1} x`` in the storage dtype.

    Raises
    ------
    TypeError
        If ``state`` is not a :class:`WindowState`, or ``x`` does not have
        the window's dtype.
    RuntimeError
        If JAX's 64-bit mode is off.
    ValueError
        If ``x`` does not have shape ``(d,)`` or ``(d, n)``.
    """
    _check_state(state, "window_matvec")
    return _matvec_jit(state, _check_vector(x, "x", state.dim, np.dtype(state.dtype), matrix=True))


# -- optax ---------------------------------------------------------------------------------

#: The window size of :func:`mfac` and :func:`mfac_sgd` when none is given. The digits
#: measurements of docs/guidance.rst ("Choosing m"): m = 8 -> 32 cut the training loss
#: six-fold, larger windows gained little more, at m times the memory.
_DEFAULT_NUM_GRADS = 64
#: The optimizers' damping when none is given: 1e-3 trained best in those measurements
#: ("Choosing the damping"); the paper's 1e-5 left a 13 times higher training loss.
_DEFAULT_DAMP = 1e-3


@dataclasses.dataclass(frozen=True)
class MFACState:
    """The state of :func:`mfac`: the sliding window of the flat float gradients.

    A pytree: ``window`` is its data, ``param_dtypes`` its static part.

    Attributes
    ----------
    window : WindowState or None
        The window over the coordinates of the float leaves, or ``None``
        when the parameters have none (an empty pytree, only integer
        leaves, an ``optax.multi_transform`` label that owns no parameter).
    param_dtypes : tuple of str
        The dtypes of the leaves of the parameters given to ``init``
        (``jax.tree_util.tree_leaves`` order); the float ones are in the
        window.
    """

    window: WindowState | None
    param_dtypes: tuple[str, ...] = dataclasses.field(metadata={"static": True})

    @property
    def windowed(self) -> tuple[bool, ...]:  # numpydoc ignore=RT01
        """Per leaf, whether its coordinates are in the window (a float leaf)."""
        return tuple(bool(jnp.issubdtype(np.dtype(t), jnp.floating)) for t in self.param_dtypes)


jax.tree_util.register_dataclass(MFACState)


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _leaf_dtype(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(jnp.asarray(x).dtype if dtype is None else dtype)


def _is_float(x: Any) -> bool:
    return bool(jnp.issubdtype(_leaf_dtype(x), jnp.floating))


def _float_mask(tree: Any) -> Any:
    """True at the float leaves of ``tree`` (for ``optax.masked`` weight decay)."""
    return jax.tree_util.tree_map(_is_float, tree)


def _param_layout(params: Any) -> tuple[tuple[str, ...], int, np.dtype]:
    """The leaves' dtypes, the number of float coordinates and the window's dtype.

    Float leaves are windowed, integer and boolean ones are not; complex ones are
    refused. The window's dtype is float32, or float64 when a float leaf is float64:
    every float leaf's values (2-byte ones included) enter it exactly.
    """
    names, dtypes, d = [], [], 0
    for i, x in enumerate(jax.tree_util.tree_leaves(params)):
        dt = _leaf_dtype(x)
        if jnp.issubdtype(dt, jnp.complexfloating) or dt == jax.dtypes.float0:
            raise TypeError(f"mfac works on real parameters; leaf {i} of the parameters is {dt}")
        names.append(dt.name)
        if jnp.issubdtype(dt, jnp.floating):
            dtypes.append(dt)
            d += int(np.prod(np.shape(x)))
    dtype = np.dtype(jnp.result_type(jnp.float32, *dtypes))
    return tuple(names), d, dtype


def _check_num_grads(num_grads: Any) -> int:
    if num_grads is None:
        return _DEFAULT_NUM_GRADS
    if _is_array(num_grads):
        raise TypeError(
            "num_grads is the window's shape (its number of rows), so it must be a Python "
            f"int fixed when the transformation is built, not an array ({num_grads!r}). "
            "optax.inject_hyperparams turns every numeric argument it is given into an "
            "array: name num_grads in its static_args, e.g. "
            "optax.inject_hyperparams(mfac, static_args=('num_grads',))(num_grads=32)"
        )
    return check_count(num_grads, "num_grads")


def mfac(
    num_grads: int | None = None,
    damp: Any = _DEFAULT_DAMP,
    *,
    zero_init: bool = True,
    refactor_every: Any = None,
) -> optax.GradientTransformation:
    r"""The M-FAC preconditioner as an optax transformation: ``g -> F^{-1} g``.

    The float leaves of the update pytree are treated as one flat vector of
    ``d`` coordinates (``jax.tree_util.tree_leaves`` order). Each update
    inserts the flat gradient ``g`` into a sliding window of the last
    ``num_grads`` gradients and returns ``F^{-1} g`` for
    ``F = damp I + (1/m) sum g_i g_i^T`` over the window, with the pytree's
    structure: the *direction*, not yet scaled by a learning rate.

    Parameters
    ----------
    num_grads : int, optional
        The window size m (default 64). Memory: ``m d`` values of the
        window's dtype plus two ``m x m`` float64 arrays. It is a shape, so
        it cannot be injected: with ``optax.inject_hyperparams`` name it in
        ``static_args`` when you pass it (``None``, the default, stands for
        64 so that the wrapper, which injects every numeric argument, the
        defaults included, leaves it alone).
    damp : float or jax.Array, optional
        The damping ``lambda > 0`` (default ``1e-3``). It may be a traced
        value (``optax.inject_hyperparams``); a step whose damping differs
        from the last one's recomputes the window's factor, O(m^3).
    zero_init : bool, optional
        Start from m zero gradients with the normalisation fixed at ``1/m``
        (default, as :class:`mfac_core.torch.MFAC`); see :func:`window_init`.
    refactor_every : int or jax.Array, optional
        See :func:`window_init`; may be injected too.

    Returns
    -------
    optax.GradientTransformation
        Its state is an :class:`MFACState`. ``init`` and ``update`` need JAX's
        64-bit mode (``RuntimeError`` otherwise).

    Raises
    ------
    TypeError
        If ``num_grads`` is an array (an injected shape), or an argument has
        the wrong type.
    ValueError
        If ``num_grads`` or ``refactor_every`` is not ``>= 1``, or ``damp``
        is not finite and positive.

    See Also
    --------
    mfac_sgd : The whole optimizer of :class:`mfac_core.torch.MFAC`.

    Notes
    -----
    :class:`mfac_core.torch.MFAC` (``lr``, ``momentum``, ``weight_decay``)
    is this chain, step for step::

        optax.chain(optax.add_decayed_weights(weight_decay),  # g + wd * theta
                    mfac(num_grads, damp),                     # s = F^{-1} g
                    optax.trace(decay=momentum),               # b = mu b + s
                    optax.scale_by_learning_rate(lr))          # theta -= lr b

    which :func:`mfac_sgd` builds. Jit the training step with
    ``donate_argnums`` on the optimizer state, so that XLA updates the
    ``m x d`` window in place instead of copying it every step. A step then
    reads the window twice (``G g`` and ``G^T c``) and does O(m^2) float64
    work: a Cholesky row replacement and two triangular solves (O(m^3) at
    the first m steps without ``zero_init``, every ``refactor_every`` steps
    and when ``damp`` changes). Flattening and unflattening the pytree adds
    two O(d) copies.

    **Leaves.** The window's dtype is float32, or float64 if a float leaf of
    the parameters is float64: every float leaf's gradient (bfloat16 and
    float16 ones included) enters it exactly, one of a wider dtype than the
    window's (a float64 gradient of float32 parameters) is rounded to it
    once, and the direction is that of the stored gradient, rounded once to
    the window's dtype and then to each update leaf's own dtype. Integer and
    boolean leaves are not preconditioned: their update is zero in the
    parameter's dtype (also for a ``float0`` gradient from
    ``jax.grad(..., allow_int=True)``), so ``optax.apply_updates`` leaves
    them as they are. Parameters without a float leaf (an empty
    pytree, an ``optax.multi_transform`` label that owns no parameter) get
    no window and zero updates.

    A gradient holding NaN or infinity leaves the window unchanged and gives
    a NaN direction; wrap the chain in ``optax.apply_if_finite`` to skip such
    steps. So does a traced ``damp`` that is not finite and positive (a
    concrete one is refused with a ``ValueError``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> jax.config.update("jax_enable_x64", True)
    >>> from mfac_core.jax import mfac
    >>> X = jax.random.normal(jax.random.key(0), (32, 4), dtype=jnp.float32)
    >>> y = X @ jnp.arange(1.0, 5.0, dtype=jnp.float32)
    >>> params = {"w": jnp.zeros(4, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    >>> loss = lambda p: jnp.mean((X @ p["w"] + p["b"] - y) ** 2)
    >>> opt = optax.chain(mfac(num_grads=8, damp=0.1), optax.scale(-0.5))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def train_step(params, state):
    ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...     return optax.apply_updates(params, updates), state
    >>> first = loss(params)
    >>> for _ in range(20):
    ...     params, state = train_step(params, state)
    >>> bool(loss(params) < 0.75 * first)
    True

    Every numeric hyper-parameter but ``num_grads`` can be injected:

    >>> opt = optax.inject_hyperparams(mfac)(damp=0.1)
    >>> state = opt.init(params)
    >>> state.hyperparams["damp"] = jnp.asarray(0.2, jnp.float32)  # from the next step on
    """
    m = _check_num_grads(num_grads)
    # Arrays (injected values) are checked when a window uses them: for parameters
    # without a float leaf, inject_hyperparams casts the damping to an integer dtype.
    damp = damp if _is_array(damp) else check_damp(damp)
    if refactor_every is not None:
        refactor_every = _hyper_count(refactor_every, "refactor_every")
    zero_init = check_flag(zero_init, "zero_init")

    def init_fn(params: Any) -> MFACState:
        _require_x64("mfac")
        names, d, dtype = _param_layout(params)
        window = None
        if d:
            window = window_init(
                m, d, damp=damp, dtype=dtype, zero_init=zero_init, refactor_every=refactor_every
            )
        return MFACState(window, names)

    def update_fn(updates: Any, state: MFACState, params: Any = None) -> tuple[Any, MFACState]:
        del params
        _require_x64("mfac")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        windowed = state.windowed
        if len(leaves) != len(windowed):
            raise ValueError(
                f"the updates have {len(leaves)} leaves but the parameters given to init had "
                f"{len(windowed)}"
            )
        # Non-float parameters get a zero update of their own dtype, also from a float0
        # gradient (jax.grad(..., allow_int=True)), which no later optax stage could take.
        out = [
            x if w else jnp.zeros(np.shape(x), np.dtype(t))
            for x, w, t in zip(leaves, windowed, state.param_dtypes, strict=True)
        ]
        if state.window is None:
            return jax.tree_util.tree_unflatten(treedef, out), state
        window = state.window
        if refactor_every is not None:
            window = dataclasses.replace(
                window, refactor_every=jnp.asarray(refactor_every, jnp.int32)
            )
        picked = [i for i, w in enumerate(windowed) if w]
        for i in picked:
            if not _is_float(leaves[i]):
                raise TypeError(
                    f"leaf {i} of the parameters is a float leaf, but its update has dtype "
                    f"{_leaf_dtype(leaves[i])}"
                )
        sizes = [int(np.prod(np.shape(leaves[i]))) for i in picked]
        if sum(sizes) != window.dim:
            raise ValueError(
                f"the updates have {sum(sizes)} float coordinates but the M-FAC window {window.dim}"
            )
        parts = [jnp.ravel(jnp.asarray(leaves[i])).astype(window.dtype) for i in picked]
        flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        window, direction = window_update_and_matvec(window, flat, damp=damp)
        start = 0
        for i, n in zip(picked, sizes, strict=True):
            x = leaves[i]
            out[i] = direction[start : start + n].reshape(np.shape(x)).astype(_leaf_dtype(x))
            start += n
        return jax.tree_util.tree_unflatten(treedef, out), MFACState(window, state.param_dtypes)

    return optax.GradientTransformation(init_fn, update_fn)


def mfac_sgd(
    learning_rate: Any,
    num_grads: int | None = None,
    damp: Any = _DEFAULT_DAMP,
    *,
    momentum: Any = 0.0,
    weight_decay: Any = 0.0,
    zero_init: bool = True,
) -> optax.GradientTransformation:
    r"""The optimizer of :class:`mfac_core.torch.MFAC` as an optax chain.

    ``g = grad + weight_decay * theta``; ``s = F^{-1} g`` (:func:`mfac`);
    ``b = momentum * b + s``; ``theta -= learning_rate * b``. Pass ``params``
    to ``update`` when ``weight_decay`` is not zero or is injected.

    Parameters
    ----------
    learning_rate : float, jax.Array or optax schedule
        The learning rate eta.
    num_grads : int, optional
        The window size m (default 64), as for :func:`mfac`: a shape, which
        ``optax.inject_hyperparams`` must get in ``static_args`` when it is
        passed.
    damp : float or jax.Array, optional
        The damping ``lambda > 0`` (default ``1e-3``), as for :func:`mfac`.
    momentum : float or jax.Array, optional
        Momentum mu on the preconditioned step, in ``[0, 1)`` (default 0).
    weight_decay : float or jax.Array, optional
        L2 penalty added to the gradient before preconditioning (default 0);
        float leaves only.
    zero_init : bool, optional
        Start from m zero gradients (default), as for :func:`mfac`.

    Returns
    -------
    optax.GradientTransformation
        The chain of ``optax.add_decayed_weights`` (if ``weight_decay`` is
        an array or not zero), :func:`mfac`, ``optax.trace`` (if ``momentum``
        is an array or not zero) and ``optax.scale_by_learning_rate``. Arrays,
        as ``optax.inject_hyperparams`` passes them, keep their stages in the
        chain whatever their value, so that its state has the same structure
        at every step.

    Raises
    ------
    ValueError
        If ``momentum`` is not in ``[0, 1)``, ``weight_decay`` is not finite
        and ``>= 0``, ``num_grads`` is not ``>= 1``, or ``damp`` is not finite
        and positive (arrays: checked when concrete).
    TypeError
        If ``momentum``, ``weight_decay`` or ``damp`` is neither a real
        number nor a 0-d real array, or ``num_grads`` is not a Python int.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> jax.config.update("jax_enable_x64", True)
    >>> from mfac_core.jax import mfac_sgd
    >>> opt = optax.inject_hyperparams(mfac_sgd)(learning_rate=0.1, damp=1e-2)
    >>> sorted(opt.init({"w": jnp.zeros(3, jnp.float32)}).hyperparams)
    ['damp', 'learning_rate', 'momentum', 'weight_decay']
    """
    momentum = _hyper(
        momentum,
        "momentum",
        lambda v: check_number(v, "momentum", low=0.0, high=1.0, high_open=True),
    )
    weight_decay = _hyper(
        weight_decay, "weight_decay", lambda v: check_number(v, "weight_decay", low=0.0)
    )
    parts = []
    if _is_array(weight_decay) or weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_float_mask))
    parts.append(mfac(num_grads, damp, zero_init=zero_init))
    if _is_array(momentum) or momentum:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
