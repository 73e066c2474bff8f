"""The static operator of :mod:`mfac_core.jax`: :class:`StaticIHVP` and :func:`static_ihvp`.

Re-exported by :mod:`mfac_core.jax`, where it is documented; imported only by it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from . import _capacitance, _pieces
from ._finite import non_finite_entry
from ._gram import contract_columns
from ._jax_common import (
    check_dtype,
    check_vector,
    combine64,
    concrete_float,
    concrete_true,
    project64,
    require_unbatched,
    require_x64,
    solve_upper,
    solve_upper_t,
    static_repr,
)
from ._validation import check_damp

__all__ = ["StaticIHVP", "static_ihvp"]

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
        require_x64("StaticIHVP.matvec")
        require_unbatched(self.G, "operators")
        x = check_vector(x, "x", self.dim, np.dtype(self.G.dtype))
        return _static_apply(self.G, self.U, x, _traced_damp(self.damp))

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
            If ``X`` does not have shape ``(d, n)`` or ``(d,)``, or the
            operator is a batch of operators (from :func:`jax.vmap`) applied
            outside of :func:`jax.vmap`.
        TypeError
            If ``X`` does not have the operator's dtype.
        """
        require_x64("StaticIHVP.matmat")
        require_unbatched(self.G, "operators")
        X = check_vector(X, "X", self.dim, np.dtype(self.G.dtype), matrix=True)
        if X.ndim == 1:
            return self.matvec(X)
        return _static_apply_columns(self.G, self.U, X, _traced_damp(self.damp))

    def __repr__(self) -> str:
        items = f"num_grads={self.num_grads}, damp={self.damp!r}"
        return static_repr("StaticIHVP", self.dim, tuple(self.G.shape[:-2]), items, self.dtype)

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
        ValueError
            If the operator is a batch of operators (from :func:`jax.vmap`)
            applied outside of :func:`jax.vmap`.
        """
        require_x64("StaticIHVP.diagonal")
        require_unbatched(self.G, "operators")
        return _static_diagonal(self.G, self.U, _traced_damp(self.damp), _chunk_width(self.G))


# Registered by a call, not as a decorator, so that the class stays a class where the
# documentation is built with JAX mocked.
jax.tree_util.register_dataclass(StaticIHVP)


def _traced_damp(damp: float) -> Any:
    """The damping as a float64 argument of the jitted passes, not a static one.

    A static damping is part of the compiled program's key: every new damping (a sweep,
    a damping search) would compile the set-up and the passes again for the same shape.
    """
    return np.float64(damp)


def _chunk_width(G: Any) -> int:
    """Columns of one float64 chunk of G's passes: the engine's rule for G's device.

    32 MiB on the host; on a GPU one device piece (``_pieces.DEVICE_PIECE_ENTRIES``),
    where each chunk is a few launches. A traced G is on JAX's default backend.
    """
    m, d = G.shape
    return min(d, _pieces.piece_width(jnp, G, m, host=_pieces.LARGE_PIECE_ENTRIES))


@jax.custom_jvp
def _host_gram(G: Any) -> Any:
    """``G G^T`` in float64 on the CPU, its sums in levels (``_gram.contract_columns``).

    Its derivative is ``dG G^T + G dG^T`` in plain float64 products, as the Gram was before
    the levels: differentiated through them, the loops' scans kept every block widened to
    float64 for the reverse pass, 2.2-2.7x the time and 1.5x the memory of ``jax.grad``
    with respect to G (m = 8 and 32, d = 2e5).
    """
    return contract_columns(jnp, G, G.T)


@_host_gram.defjvp
def _host_gram_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
    (G,), (dG,) = primals, tangents
    half = dG.astype(jnp.float64) @ G.astype(jnp.float64).T
    return _host_gram(G), half + half.T


def _gram_f64(G: Any, width: int) -> Any:
    """``G G^T`` accumulated in float64.

    On the CPU, :func:`mfac_core._gram.contract_columns` over G itself: blocks of a few
    hundred columns widened to float64 as they are read, the sums in levels (XLA's ``dot``
    over a whole chunk summed each entry in one running sum). On a GPU, chunks of
    ``width`` columns (:func:`_chunk_width`) widened to float64, one ``dot`` each
    (cuBLAS blocks its sums): converting all of G at once would need twice the memory of a
    float32 G.
    """
    if not _pieces.is_accelerator(jnp, G):
        return _host_gram(G)
    m, d = G.shape
    full = d // width

    def chunk_gram(X: Any) -> Any:
        X = X.astype(jnp.float64)
        return X @ X.T

    def body(i: Any, acc: Any) -> Any:
        return acc + chunk_gram(lax.dynamic_slice_in_dim(G, i * width, width, axis=1))

    # From the first chunk, not from zeros (a carry of the body's type: project64).
    gram = chunk_gram(G[:, :width]) if full else jnp.zeros((m, m), jnp.float64)
    if full > 1:
        gram = lax.fori_loop(1, full, body, gram)
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
        The damping ``lambda > 0``, static: a concrete Python or NumPy scalar
        (or 0-d array), not traced by ``jit``, ``vmap`` or ``grad``.

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
        bad ``damp`` (a traced one: ``TypeError``).
    FactorizationError
        If, outside of tracing, the capacitance matrix cannot be factorised
        in float64 (kappa near 1e16, or NaN/inf in G, whose first such entry
        the message names: ``G[1, 1] is nan``). Under ``jax.jit`` or
        ``jax.vmap`` the check is not possible and the operator then holds
        NaN instead.

    Warns
    -----
    IllConditionedWarning
        Outside of tracing, when ``eps(float64) * kappa**1.5 >= 1`` for a lower
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
    require_x64("static_ihvp")
    if isinstance(damp, jax.core.Tracer):
        # The set-up's checks, its kappa bound and warning read the damping on the host.
        # Any transformation traces it (jit, vmap, grad, ...): the advice covers each.
        raise TypeError(
            "static_ihvp's damp must be static: a concrete Python or NumPy scalar (or a "
            "concrete 0-d array), not a value traced by a JAX transformation (jit, vmap, "
            "grad, ...), got a traced value. Under jax.jit make it a static argument "
            "(static_argnames=...); to batch or differentiate over dampings, build one "
            "operator per damping outside the transformation"
        )
    damp = check_damp(damp)
    G = jnp.asarray(G)
    if G.ndim != 2 or 0 in G.shape:
        raise ValueError(
            f"G must be a non-empty 2-D array of shape (m, d), one gradient per "
            f"row; got shape {G.shape}"
        )
    damp = check_damp(damp, num_grads=int(G.shape[0]))
    dtype = check_dtype(G.dtype, "G")
    U, kappa_bound, kappa_lower, finite, gram_finite = _static_setup(
        G, _traced_damp(damp), _chunk_width(G)
    )
    # Outside of tracing these are concrete, and a failure is an exception as in
    # mfac_core.StaticIHVP; under jit or vmap the checks are skipped (NaN results).
    # The wording and the rule are the core's (mfac_core._capacitance).
    if not concrete_true(finite):
        kappa = (float(kappa_lower), float(kappa_bound))
        gram_ok = concrete_true(gram_finite)
        if not ((np.isfinite(kappa[0]) and np.isfinite(kappa[1])) or gram_ok):
            # A Gram that is not finite: G is concrete here (finite is), so its first NaN
            # or infinity can be named as mfac_core.StaticIHVP names it. One more read of
            # G, on failure only.
            raise _capacitance.non_finite_gram_error(damp, non_finite_entry(jnp, G, "G"))
        raise _capacitance.factorization_error(damp, kappa, gram_finite=gram_ok)
    del dtype
    lower = concrete_float(kappa_lower)
    if lower is not None:
        _capacitance.warn_if_passes_hopeless(lower, damp=damp)
    return StaticIHVP(G=G, U=U, kappa_bound=kappa_bound, damp=damp)


@functools.partial(jax.jit, static_argnums=2)
def _static_setup(G: Any, damp: Any, width: int) -> tuple[Any, Any, Any, Any, Any]:
    """U, the upper and a lower bound of kappa, whether the factor and the Gram are finite.

    The Gram's diagonal bounds its every entry: where it is finite and kappa is not,
    kappa overflowed by itself (a damping near float64's smallest normal number).

    Jitted as a whole so that an eager :func:`static_ihvp` compiles once per
    shape instead of dispatching a dozen small operations.
    """
    m = G.shape[0]
    gram = _gram_f64(G, width)
    C = gram + (m * damp) * jnp.eye(m, dtype=jnp.float64)
    U = jnp.linalg.cholesky(C).T
    # The bounds of the largest eigenvalue of mfac_core.StaticIHVP: the trace above, power
    # iterations from the largest diagonal entry (which no Gram can make vanish) below.
    # Scaled so that gradients near float64's largest number do not overflow them.
    excess_lo, excess_hi = _capacitance.excess_bounds(jnp, gram, shift=m * damp, scale=1.0)
    gram_finite = jnp.all(jnp.isfinite(jnp.diagonal(gram)))
    return U, 1.0 + excess_hi, 1.0 + excess_lo, jnp.all(jnp.isfinite(U)), gram_finite


@jax.jit
def _static_apply(G: Any, U: Any, x: Any, damp: Any) -> Any:
    """``F^{-1} x`` of the G-form, rounded once to G's dtype.

    ``x`` is widened once, so that reverse mode adds the two passes' cotangents of it
    in float64 and rounds them once (widened in each pass, each was rounded to x's
    dtype first: ``eps(float32) kappa`` off for cotangents near the gradients' span).
    """
    return _apply64(G, U, x.astype(jnp.float64), damp).astype(G.dtype)


@jax.custom_jvp
def _apply64(G: Any, U: Any, x: Any, damp: Any) -> Any:
    """``F^{-1} x`` in float64 for float64 ``x``, from ``U``, the factor of ``G`` and ``damp``."""
    a = solve_upper(U, solve_upper_t(U, project64(G, x)))
    return combine64(G, x, a) / damp


@functools.partial(_apply64.defjvp, symbolic_zeros=True)
def _apply64_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    # dy = F^{-1} (dx - d(damp) y - (dG^T G y + G^T dG y) / m), the derivative of the
    # inverse itself, with every pass summed in float64. U is read as the factor of
    # m damp I + G G^T: its tangent is G's and damp's, counted here (the set-up's
    # tangent of U is not used). Differentiated through the factor, the parts through U
    # and through G cancel to the result; each was rounded to G's dtype first, so
    # derivatives in G of products near the gradients' span were eps(float32) kappa off.
    # The part G^T dG y / m goes through F^{-1} G^T = m G^T C^{-1}: an m x m solve, not
    # F^{-1} of a vector in the gradients' span, whose float64 error (eps sqrt(kappa)
    # kappa) second derivatives amplified by kappa again. (Symbolic zeros: a derivative
    # in x alone makes no pass over a zero dG.)
    G, U, x, damp = primals
    dG, _, dx, ddamp = tangents
    y = _apply64(G, U, x, damp)
    t = jnp.zeros_like(y) if isinstance(dx, SymbolicZero) else dx
    if not isinstance(ddamp, SymbolicZero):
        t = t - ddamp * y
    if isinstance(dG, SymbolicZero):
        return y, _apply64(G, U, t, damp)
    m = G.shape[0]
    t = combine64(dG, t, project64(G, y) / m)
    c = solve_upper(U, solve_upper_t(U, project64(dG, y)))
    return y, combine64(G, _apply64(G, U, t, damp), c)


@jax.jit
def _static_apply_columns(G: Any, U: Any, X: Any, damp: Any) -> Any:
    """:func:`_static_apply` of each column of ``X``: a loop, not a (k, m, d) temporary."""
    return lax.map(lambda x: _static_apply(G, U, x, damp), X.T).T


@functools.partial(jax.jit, static_argnums=3)
def _static_diagonal(G: Any, U: Any, damp: Any, width: int) -> Any:
    """``(1 - ||U^{-T} g_j||^2) / damp`` per column, whitened in float64 chunk by chunk."""
    return _diagonal64(G, U, damp, width).astype(G.dtype)


def _by_columns(d: int, width: int, part: Any) -> Any:
    """``part(take)`` for each chunk of ``width`` columns, joined: (d,) float64.

    ``take(A)`` is the chunk's columns of an (m, d) ``A``.
    """
    full = d // width
    out = jnp.zeros((d,), jnp.float64)

    def body(i: Any, acc: Any) -> Any:
        chunk = part(lambda A: lax.dynamic_slice_in_dim(A, i * width, width, axis=1))
        return lax.dynamic_update_slice_in_dim(acc, chunk, i * width, axis=0)

    if full:  # the first chunk before the loop: a carry of the body's type (project64)
        out = body(0, out)
    if full > 1:
        out = lax.fori_loop(1, full, body, out)
    if full * width < d:
        out = out.at[full * width :].set(part(lambda A: A[:, full * width :]))
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _diagonal64(G: Any, U: Any, damp: Any, width: int) -> Any:
    """The diagonal of ``F^{-1}`` in float64, from ``U``, the factor of ``G`` and ``damp``."""

    def part(take: Any) -> Any:
        Z = solve_upper_t(U, take(G).astype(jnp.float64))
        return (1.0 - jnp.sum(Z * Z, axis=0)) / damp

    return _by_columns(G.shape[1], width, part)


@functools.partial(_diagonal64.defjvp, symbolic_zeros=True)
def _diagonal64_jvp(
    width: int, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Any, Any]:
    # The derivative of [F^{-1}]_jj itself: with z_j = C^{-1} g_j (then G F^{-1} e_j =
    # m z_j), -d(damp) |F^{-1} e_j|^2 - (2 / damp) (z_j . dg_j - z_j . (dG G^T) z_j), in
    # float64 and rounded once. Through the factor (whose tangent is G's and damp's,
    # counted here), the parts cancelled after rounding to G's dtype: eps kappa off.
    # dG is widened once (an m x d float64 tangent, as the Gram's): the two terms nearly
    # cancel where the gradients cover coordinate j, and reverse mode must add their
    # cotangents in float64 before the one rounding to G's dtype.
    G, U, damp = primals
    dG, _, ddamp = tangents
    m = G.shape[0]
    dG = None if isinstance(dG, SymbolicZero) else dG.astype(jnp.float64)
    H = None if dG is None else dG @ G.astype(jnp.float64).T

    def part(take: Any) -> Any:
        X = take(G).astype(jnp.float64)
        Z = solve_upper(U, solve_upper_t(U, X))  # C^{-1} g_j for the chunk's columns
        out = jnp.zeros(X.shape[1], jnp.float64)
        if not isinstance(ddamp, SymbolicZero):
            # |F^{-1} e_j|^2 = (1 - g_j . z_j - m damp |z_j|^2) / damp^2, as C z_j = g_j.
            norm2 = 1.0 - jnp.sum(X * Z, axis=0) - m * damp * jnp.sum(Z * Z, axis=0)
            out = out - ddamp * norm2 / damp**2
        if H is not None:
            dX = take(dG)
            out = out - (2.0 / damp) * (jnp.sum(Z * dX, axis=0) - jnp.sum(Z * (H @ Z), axis=0))
        return out

    return _diagonal64(G, U, damp, width), _by_columns(G.shape[1], width, part)
