"""What every part of :mod:`mfac_core.jax` shares: the checks and the float64 passes.

The refusal of JAX's 32-bit mode, the checks of dtypes, vectors and
hyper-parameters (concrete or traced), the triangular solves with a row-major
upper factor, and the two passes over the gradients summed in float64
(``G x`` and ``x - G^T a``) that the static operator and the window share.
Imported only by :mod:`mfac_core.jax` (it imports :mod:`jax`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._dtypes import FLOATING_DTYPES
from ._jax_mode import x64_off_error
from ._validation import (
    check_count,
    check_damp,
    dtype_mismatch_error,
    floating_dtype_error,
    real_scalar_error,
)

# -- checks --------------------------------------------------------------------------------


def require_x64(what: str) -> None:
    """Refuse to trace or run float64 m x m work while JAX's 64-bit mode is off.

    With the mode off JAX truncates float64 to float32 with only a warning;
    a float32 Cholesky factor of ``m damp I + G G^T`` loses all digits once
    kappa nears 1e7, far earlier than the float64 one. An error that says how
    to turn the mode on is better than a silently wrong optimizer.
    """
    if not jax.config.read("jax_enable_x64"):
        raise x64_off_error(f"mfac_core.jax.{what}")


def require_unbatched(array: Any, what: str) -> None:
    """Refuse a batch of operators or windows (from :func:`jax.vmap`) outside of ``vmap``.

    Under ``vmap`` each one's arrays have their own 2-D shape; outside, the batch's
    arrays have leading batch axes, and the products would fail deep in their
    shape logic ("too many values to unpack").
    """
    if np.ndim(array) != 2:
        raise ValueError(f"a batch of {what} (from jax.vmap) must be used under jax.vmap too")


def check_dtype(dtype: Any, name: str) -> np.dtype:
    """``dtype`` as a NumPy dtype, float32 or float64 (``None`` refused: NumPy reads it as
    float64, and a window would double in memory without a word)."""
    if dtype is None:
        raise floating_dtype_error(name, None)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise floating_dtype_error(name, repr(dtype)) from None
    if dt.name not in FLOATING_DTYPES:
        raise floating_dtype_error(name, dt)
    return dt


def check_vector(x: Any, name: str, dim: int, dtype: np.dtype, *, matrix: bool = False) -> Any:
    """``x`` as a JAX array of shape ``(dim,)`` (or ``(dim, n)``) and exactly ``dtype``."""
    x = jnp.asarray(x)
    shapes = "(d,) or (d, n)" if matrix else "(d,)"
    if x.ndim not in ((1, 2) if matrix else (1,)) or x.shape[0] != dim:
        raise ValueError(f"{name} must have shape {shapes} with d = {dim}, got {x.shape}")
    if np.dtype(x.dtype) != dtype:
        raise dtype_mismatch_error(name, x.dtype, owner="the operator", dtype=dtype)
    return x


def hyper(value: Any, name: str, check: Any) -> Any:
    """A numeric hyper-parameter: a Python number through ``check``, or a 0-d real array.

    Arrays are what ``optax.inject_hyperparams`` passes (and traced values under
    :func:`jax.jit`); a concrete one is checked by value like a Python number, a
    traced one cannot be and is returned as it is.
    """
    if not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return check(value)
    dtype = np.dtype(value.dtype)
    # jnp.issubdtype, not NumPy's kind: bfloat16 and the 8-bit floats (ml_dtypes) have
    # kind "V", and inject_hyperparams casts float hyper-parameters to the parameters'
    # widest float dtype, bfloat16 for a bfloat16 model.
    real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    if value.ndim != 0 or not real:
        raise real_scalar_error(name, value)
    try:
        concrete = float(value)
    except jax.errors.ConcretizationTypeError:
        return value
    # A NumPy scalar as the core's checks see it (their messages show its repr); one of
    # ml_dtypes' types is no numbers.Real to them, so it goes as its float.
    numpy_scalar = isinstance(value, np.generic) and dtype.kind in "fiu"
    try:
        check(value if numpy_scalar else concrete)
    except ValueError as exc:
        # A value given as 1e-8 reads 0.0 here (1e5 inf, a momentum of 0.9999 1.0): say
        # where it was rounded. Rounding makes no NaN and no negative value out of a valid
        # one, so those are refused as they are, with no word of a cast.
        if not (jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4 and concrete >= 0):
            raise
        raise ValueError(
            f"{exc} (a {dtype.name} array: optax.inject_hyperparams casts float "
            "hyper-parameters to the parameters' widest float dtype; give it "
            "hyperparam_dtype=jnp.float32, or jnp.float64)"
        ) from None
    return value


def hyper_damp(damp: Any) -> Any:
    return hyper(damp, "damp", check_damp)


def hyper_count(value: Any, name: str, *, minimum: int = 1) -> Any:
    """A count >= ``minimum`` (Python int, or an integer 0-d array as :func:`hyper` takes it)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if not jnp.issubdtype(value.dtype, jnp.integer):  # int4 has NumPy kind "V"
            raise TypeError(f"{name} must be an int, got an array of dtype {value.dtype}")
        return hyper(value, name, lambda v: check_count(int(v), name, minimum=minimum))
    return check_count(value, name, minimum=minimum)


def edit_limit(every: Any) -> Any:
    """``refactor_every`` as the window's int32 leaf: beyond int32's range it means never.

    Clamped to int32's largest value, not wrapped (an injected 2**40, int64 in 64-bit
    mode, became 0: a full refactorisation at every step).
    """
    top = int(np.iinfo(np.int32).max)
    if isinstance(every, (int, np.integer)):
        return jnp.asarray(min(int(every), top), jnp.int32)
    return jnp.minimum(jnp.asarray(every).astype(jnp.int64), top).astype(jnp.int32)


def concrete_float(value: Any) -> float | None:
    """``float(value)`` for a concrete 0-d value; None under tracing (checks are then skipped)."""
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        return None


def concrete_true(flag: Any) -> bool:
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


def static_repr(kind: str, dim: int, batch: tuple[int, ...], items: str, dtype: Any) -> str:
    """A pytree operator's repr in the core operators' style, from static values only.

    Printing an array leaf would read it back from the device (and show tracers under
    jit), so only shapes, dtypes and Python values enter it.
    """
    extra = f", batch_shape={tuple(batch)}" if batch else ""
    return f"<{dim}x{dim} mfac_core.jax.{kind} with {items}{extra}, dtype={dtype}>"


def solve_upper_t(U: Any, B: Any) -> Any:
    """``U^{-T} B`` for upper triangular ``U`` (B of shape (m,) or (m, n))."""
    vec = B.ndim == 1
    X = lax.linalg.triangular_solve(U.T, B[:, None] if vec else B, left_side=True, lower=True)
    return X[:, 0] if vec else X


def solve_upper(U: Any, B: Any) -> Any:
    """``U^{-1} B`` for upper triangular ``U``."""
    vec = B.ndim == 1
    X = lax.linalg.triangular_solve(
        U.T, B[:, None] if vec else B, left_side=True, lower=True, transpose_a=True
    )
    return X[:, 0] if vec else X


@jax.custom_jvp
def edited_factor(U: Any, C: Any) -> Any:
    """``U``, an upper factor of ``C = U^T U`` made without its derivatives (a row edit).

    A sliding window's O(m^2) edit reuses the factor of the previous window, computed
    with the damping then: its derivative in the damping (and in the rows it kept) was
    lost, and ``jax.grad`` through a traced damping gave another value (a sign off).
    The derivatives here are those of the Cholesky factor of ``C``, whatever made
    ``U``: ``C`` is only read when they are taken (XLA drops it otherwise).
    """
    return U


@edited_factor.defjvp
def _edited_factor_jvp(primals: tuple[Any, Any], tangents: tuple[Any, Any]) -> tuple[Any, Any]:
    # U through this function again: its own derivatives, under a second derivative.
    U = edited_factor(*primals)
    dC = tangents[1]
    # C = L L^T with L = U^T: dL = L Phi(L^{-1} dC L^{-T}), Phi the lower triangle with
    # half the diagonal. Linear in dC, so that reverse mode transposes it.
    A = solve_upper_t(U, solve_upper_t(U, dC).T)
    Phi = jnp.tril(A, -1) + 0.5 * jnp.diag(jnp.diagonal(A))
    return U, (U.T @ Phi).T


# -- the passes over the gradients, summed in float64 ----------------------------------------
#
# Written as fused elementwise loops, which XLA runs as one loop over G. Measured with XLA's
# CPU backend (m = 64, d = 1e6, float32 G, 2 cores): a float32 GEMV 6-10 ms; G x summed in
# float64 by dot_general(..., preferred_element_type=float64) 330 ms, over column slabs
# 14 ms; x - G^T a in float64 by dot_general 270 ms, as a reduction over the rows 900 ms, as
# a loop over groups of 8 rows that XLA fuses 20-27 ms.

#: Rows of G per step of the loop of :func:`combine64` (16 and more made XLA's CPU backend
#: spill the fused loop: 2.5x slower).
_ROW_GROUP = 8


#: float64 entries of the (m, w) slab of partial sums of :func:`project64` (8 MiB).
_SLAB_ENTRIES = 2**20


def project64(G: Any, x: Any) -> Any:
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

    # The loops start from the first slab's products, not from zeros: under shard_map a
    # carry must have the type of the body's result, varying over the devices as G and x.
    acc = G[:, :w].astype(jnp.float64) * x64[:w]
    out = jnp.sum(lax.fori_loop(1, full, body, acc) if full > 1 else acc, axis=1)
    if full * w < d:
        out = out + jnp.sum(G[:, full * w :].astype(jnp.float64) * x64[full * w :], axis=1)
    return out


def combine64(G: Any, x: Any, a: Any) -> Any:
    """``x - G^T a`` (d,) in float64 for ``a`` (m,) float64: the m terms summed first."""
    m = G.shape[0]
    full = m // _ROW_GROUP

    # Each row read by its own index: rows of one (8, d) slice, under jax.jacfwd of a
    # jitted step whose window is traced, made XLA's CPU backend emit a float32 x float64
    # multiply ("Failed to translate module to LLVM IR"); this form is no slower.
    def body(k: Any, y: Any) -> Any:
        for r in range(_ROW_GROUP):
            i = k * _ROW_GROUP + r
            row = lax.dynamic_index_in_dim(G, i, axis=0, keepdims=False)
            y = y + lax.dynamic_index_in_dim(a, i, keepdims=False) * row.astype(jnp.float64)
        return y

    # The first row starts the sum, not zeros: a carry of the body's type (project64).
    first = _ROW_GROUP if full else m
    y = a[0] * G[0].astype(jnp.float64)
    for i in range(1, first):
        y = y + a[i] * G[i].astype(jnp.float64)
    if full > 1:
        y = lax.fori_loop(1, full, body, y)
    for i in range(max(full * _ROW_GROUP, first), m):
        y = y + a[i] * G[i].astype(jnp.float64)
    return x.astype(jnp.float64) - y


# Jitted (inlined into a caller's jit): called eagerly, the passes would run op by op and
# build whole float64 copies of G instead of XLA's fused loops (a 244 MiB float32 G took
# 341 MiB more memory and 6x the time).
