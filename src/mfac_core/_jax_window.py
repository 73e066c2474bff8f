"""The sliding window of :mod:`mfac_core.jax`: :class:`WindowState` and its functions.

The window's state, the O(m^2) edit of its float64 factor (the core's edit,
``_linalg.replaced_row``) with the drift check, and :func:`window_init`,
:func:`window_update`, :func:`window_update_and_matvec` and :func:`window_matvec`.
Re-exported by :mod:`mfac_core.jax`, where it is documented; imported only by it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._capacitance import (
    DRIFT_TOL,
    EPS64,
    check_window_damp,
    is_hopeless,
    relative_column_drift,
    smallest_window_damp,
)
from ._dynamic_factor import TINY, rayleigh_slack
from ._jax_common import (
    check_dtype,
    check_vector,
    combine64,
    concrete_float,
    edit_limit,
    edited_factor,
    hyper_count,
    hyper_damp,
    project64,
    require_unbatched,
    require_x64,
    solve_upper,
    solve_upper_t,
    static_repr,
)
from ._linalg import replaced_row
from ._validation import SMALLEST_DAMP, check_count, check_flag, largest_damp

__all__ = [
    "WindowState",
    "window_init",
    "window_matvec",
    "window_update",
    "window_update_and_matvec",
]


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
            If ``x`` does not have shape ``(d,)`` or ``(d, n)``, or the state
            is a batch of windows (from :func:`jax.vmap`) used outside of
            :func:`jax.vmap`.
        TypeError
            If ``x`` does not have the storage dtype.
        """
        return window_matvec(self, x)

    def __repr__(self) -> str:
        # The damping and the fill are leaves (arrays, traced under jit): left out.
        items = f"num_grads={self.num_grads}, zero_init={self.zero_init}"
        batch = tuple(self.grads.shape[:-2])
        return static_repr("WindowState", self.dim, batch, items, self.dtype)

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

        Raises
        ------
        ValueError
            If the state is a batch of windows (from :func:`jax.vmap`) used
            outside of :func:`jax.vmap`.
        """
        require_unbatched(self.grads, "windows")
        m = self.num_grads
        return jnp.take(self.grads, (self.pos + jnp.arange(m, dtype=jnp.int32)) % m, axis=0)

    def kappa_bounds(self) -> tuple[Any, Any]:
        r"""Return bounds ``(lower, upper)`` of the window's condition number kappa, O(m^2).

        kappa is ``1 + lambda_max(G G^T) / (k damp)`` for the ``k`` gradients in
        the window (``m`` with ``zero_init``): the condition number of ``F``
        where ``d`` exceeds the gradients' rank, and what the float64 factor's
        rounding scales with. ``lambda_max`` is bounded from below by the
        largest squared norm and, as a row edit of the core window bounds it,
        by the Gram matrix's Rayleigh quotients with the ones vector and with
        the newest gradient's Gram row (nearly collinear gradients, of one sign
        or spread in sign), less their rounding; from above by its trace. All
        are read from the stored Gram matrix (no pass over the window), so the
        method runs under :func:`jax.jit` and :func:`jax.vmap`.

        The window cannot warn from inside ``jit``, so it never issues the
        :class:`~mfac_core.IllConditionedWarning` that
        :class:`mfac_core.DynamicIHVP` gives a gradient making its products
        imprecise; read this instead. The core operators warn where
        ``eps * lower**1.5 >= 1`` with ``eps = jnp.finfo(jnp.float64).eps``
        (``lower >= 2.7e10``); a step refuses a gradient with which ``eps * (1 +
        max_i |g_i|^2 / (k damp)) >= 1`` would hold.

        Returns
        -------
        lower : jax.Array
            A lower bound of kappa (float64, 0-d), at most ``upper``.
        upper : jax.Array
            An upper bound of kappa (float64, 0-d).

        Raises
        ------
        RuntimeError
            If JAX's 64-bit mode is off.
        ValueError
            If the state is a batch of windows (from :func:`jax.vmap`) used
            outside of :func:`jax.vmap`.
        """
        require_x64("WindowState.kappa_bounds")
        require_unbatched(self.grads, "windows")
        # Empty slots hold zero rows: the ones vector over the k gradients' slots gives
        # the same quotient as over all m slots, divided by k instead of m.
        k = self.count.astype(jnp.float64) if not self.zero_init else float(self.num_grads)
        shift = _shift(self, self.count, self.damp)
        gram = self.gram
        m = self.num_grads
        diagonal = jnp.diagonal(gram)
        trace = jnp.sum(diagonal)
        # The ones vector's quotient is one sum of the m^2 Gram entries (not the 2 m terms
        # of a product's that rayleigh_slack covers): XLA's order may err by about m^2 eps
        # of their magnitudes, at most k trace (as rayleigh_slack's), over k: (m^2 + 1) eps
        # trace; 2 (m^2 + 1) covers it with room (m = 32 erred by 128 eps on the CPU).
        ones = jnp.sum(gram) / jnp.maximum(k, 1.0) - 2.0 * (m * m + 1) * EPS64 * trace
        # The newest gradient's Gram row as DynamicIHVP's row edit takes it
        # (_dynamic_factor.probe_vectors): gradients spread in sign cancel in the ones
        # vector's quotient, not in this one.
        newest = (self.pos - 1) % m
        row = jnp.take(gram, newest, axis=0)
        v = (row / (row[newest] + TINY)).at[newest].set(1.0)
        quotient = jnp.dot(v, gram @ v) / jnp.dot(v, v)
        # Less its rounding, as the core's (both quotients are below lambda_max then).
        best = jnp.maximum(ones, quotient - rayleigh_slack(m) * trace)
        top = jnp.maximum(jnp.max(diagonal), jnp.where(jnp.isfinite(best), best, 0.0))
        # The roundings of the sums can put a quotient of equal gradients an ulp above
        # the trace (lower > upper): capped there, still a lower bound (lambda_max <= trace).
        top = jnp.minimum(top, trace)
        return 1.0 + top / shift, 1.0 + trace / shift


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
        leaf of the state). As for :class:`mfac_core.DynamicIHVP`, a float32
        window refuses one with which it could take no nonzero gradient
        (below about ``4.4e-106``, divided by m with ``zero_init``).
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
        refactorises earlier if needed; ``0`` refactorises at every update, as
        :class:`mfac_core.WindowOptions` ``(refactor_every=0)`` does. A leaf of
        the state, like ``damp``.

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
        If ``num_grads`` or ``dim`` is below 1 or ``refactor_every`` below 0,
        or ``damp`` is not finite and positive, or below the
        window's floor (see ``damp``; a traced one is not checked here).
    TypeError
        If ``num_grads``, ``dim`` or ``refactor_every`` is not an int (or, for
        ``refactor_every``, an integer array), ``damp`` is neither a real number
        nor a 0-d real array, or ``dtype`` is neither float32 nor float64.

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
    require_x64("window_init")
    m = check_count(num_grads, "num_grads")
    d = check_count(dim, "dim")
    dt = check_dtype(dtype, "dtype")
    every = (
        m if refactor_every is None else hyper_count(refactor_every, "refactor_every", minimum=0)
    )
    zero_init = check_flag(zero_init, "zero_init")
    damp64 = _window_damp(damp, dt, m, zero_init)
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
        refactor_every=edit_limit(every),
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


def _check_state(state: Any, what: str) -> None:
    if not isinstance(state, WindowState):
        raise TypeError(
            f"{what} needs a WindowState (from window_init), got {type(state).__name__}"
        )
    require_x64(what)
    require_unbatched(state.grads, "windows")


def _insert(state: WindowState, g: Any, damp: Any) -> tuple[WindowState, Any, Any, Any]:
    """Insert ``g`` with the damping ``damp`` (float64, 0-d).

    Returns the new state, the Gram row ``G g`` (slot order), success, and ``g`` as the
    passes read it, in float64 (zeros for a gradient holding NaN or infinity, which is
    refused): widened once, so that reverse mode adds its passes' cotangents of it in
    float64 and rounds them once (see :func:`_matvec_jit`). A
    damping other than the state's changes the shift of ``C``: the factor is then
    recomputed from the Gram matrix (O(m^3)) instead of edited.
    """
    m = state.num_grads
    g = check_vector(g, "g", state.dim, np.dtype(state.dtype))
    slot = state.pos
    # |g|^2 first: NaN or infinity in g (or an overflow) makes it non-finite. Such a
    # gradient is refused, and its branch still computes (a select keeps the old state):
    # reverse mode multiplied the zero cotangents by that branch's NaN partials, and
    # every derivative through a later step was NaN. It computes with zeros instead.
    g64 = g.astype(jnp.float64)
    norm2 = jnp.vdot(g64, g64)
    finite = jnp.isfinite(norm2)
    g = jnp.where(finite, g, jnp.zeros_like(g))
    g64 = jnp.where(finite, g64, jnp.zeros_like(g64))
    # Pass 1 reads the window before the row is replaced: G g holds the new Gram row
    # except at the slot, whose entry is g.g. The other order (write g, then G g, as
    # DynamicIHVP does) needs the old row to undo a refused write, and XLA's CPU
    # backend then copied the whole m x d window (twice) instead of writing in place.
    # The diagonal then comes from another sum than the rest of the row (both float64),
    # so a duplicated gradient's 2 x 2 block may be indefinite by rounding before the
    # shift k damp is added; unless k damp < eps(float64) |g|^2 the shift absorbs it,
    # and otherwise the gradient is refused, never half-inserted.
    b = project64(state.grads, g64)  # pass 1 over the window, summed in float64
    b = b.at[slot].set(jnp.where(finite, norm2, 0.0))
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
        # The core's O(m^2) edit (mfac_core._linalg._rowedit): drop the oldest row and
        # column (the first, in age order), append the new gradient's last.
        U, margin = replaced_row(jnp, state.factor, 0, b_age[:-1], b_age[-1] + shift)
        want = jnp.diagonal(gram)[idx] + shift
        drift = relative_column_drift(jnp, U, want)
        C = gram[idx][:, idx] + shift * jnp.eye(m, dtype=jnp.float64)  # as _refactor's
        return edited_factor(U, C), (margin > 0) & (drift <= DRIFT_TOL)

    # Under shard_map both branches' results must vary over the devices alike: the
    # edit's vary as the window and g do, so skip's are made to (an exact no-op select).
    def skip(_: Any) -> tuple[Any, Any]:
        same = b[0] == b[0]
        return jnp.where(same, state.factor, state.factor), same & use_edit & False

    U, edited = lax.cond(use_edit, edit, skip, None)
    U, ok = lax.cond(edited, lambda _: (U, edited), lambda _: _refactor(gram, pos, shift), None)
    # A gradient holding NaN/inf (or overflowing float64) makes g.g non-finite: refuse it
    # and keep the window as it was, rather than poisoning every later step. So is one
    # that makes eps(float64) kappa >= 1 (kappa >= 1 + |g|^2 / shift), where the float64
    # work leaves no correct digit: a float32 gradient of 1e30 beside ones of 1 would
    # otherwise give products of rounding noise. The new gradient's own |g|^2, as
    # DynamicIHVP judges it: the window's largest refused every gradient after a lowered
    # damping had left an older one hopeless, which then could never leave the window.
    hopeless = is_hopeless(1.0 + b[slot] / shift, eps=EPS64)
    # A traced damping (an injected hyper-parameter) cannot be checked by value before
    # the step; one that a concrete damping would fail with (not finite, not positive,
    # below the window's floor, or with m damp overflowing) refuses the gradient instead.
    good_damp = jnp.isfinite(damp) & (damp >= _damp_floor(state)) & (damp <= largest_damp(m))
    ok = ok & finite & ~hopeless & good_damp
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
    return new, b, ok, g64


def _finish(state: WindowState, X: Any, P: Any) -> Any:
    """``(X - G^T C^{-1} P) / damp`` given ``P = G X`` (float64, slot order)."""
    m = state.num_grads
    idx = _age_order(m, state.pos)
    coef_age = solve_upper(state.factor, solve_upper_t(state.factor, P[idx]))
    coef = jnp.zeros_like(coef_age).at[idx].set(coef_age)
    # Pass 2, summed in float64 and rounded once (a float32 sum of x - G^T c cancels for
    # vectors near the window's span).
    if X.ndim == 1:
        Y = combine64(state.grads, X, coef)
    else:
        Y = jax.vmap(combine64, in_axes=(None, 1, 1), out_axes=1)(state.grads, X, coef)
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
    new, b, ok, g = _insert(state, g, damp)
    out = _finish(new, g, b)
    return new, jnp.where(ok, out, jnp.nan)


@jax.jit
def _matvec_jit(state: WindowState, x: Any) -> Any:
    # x widened once: reverse mode adds the two passes' cotangents of it in float64 and
    # rounds them once (widened in each pass, each was rounded to x's dtype first, and
    # their float32 sum was eps(float32) kappa off for cotangents near the window's span).
    x = x.astype(jnp.float64)
    if x.ndim == 1:
        return _finish(state, x, project64(state.grads, x))
    P = jax.vmap(project64, in_axes=(None, 1), out_axes=1)(state.grads, x)
    return _finish(state, x, P)


def _window_damp(damp: Any, dtype: Any, num_grads: int, zero_init: bool) -> Any:
    """A window's damping (float64, 0-d), checked as :class:`~mfac_core.DynamicIHVP`'s.

    Finite, positive, normal, and not so small that the window could take no nonzero
    gradient (``_capacitance.check_window_damp``, the same check and message); a
    traced value has no value to check here: :func:`_insert` refuses the gradient of
    a step with a damping that would fail.
    """
    damp = hyper_damp(damp)
    value = concrete_float(damp)
    if value is not None:
        check_window_damp(np, dtype, num_grads, zero_init, value)
    return jnp.asarray(damp, jnp.float64)


def _damp_floor(state: WindowState) -> float:
    """The smallest damping ``_window_damp`` accepts for this window (a Python float)."""
    count = state.num_grads if state.zero_init else 1
    return max(SMALLEST_DAMP, smallest_window_damp(np, state.dtype, count))


def _step_damp(state: WindowState, damp: Any) -> Any:
    """The damping of a step (float64, 0-d): the state's, or a new one checked as such."""
    if damp is None:
        return state.damp
    return _window_damp(damp, state.dtype, state.num_grads, state.zero_init)


def window_update(state: WindowState, g: Any, /, *, damp: Any = None) -> WindowState:
    """Insert the gradient ``g`` (shape ``(d,)``); a full window drops its oldest.

    One read of the window (the Gram row ``G g``) and an O(m^2) factor edit
    (O(m^3) while a window without ``zero_init`` fills, every
    ``refactor_every`` edits, and when the drift check fails).

    A ``g`` holding NaN or infinity, or one the float64 factor cannot take
    (``eps(float64) * kappa >= 1``), leaves the window unchanged; nothing tells, so use
    :func:`window_update_and_matvec` (NaN result) where that matters. Nor does a
    ``g`` that the window takes warn where it makes the products imprecise, as
    :class:`mfac_core.DynamicIHVP` warns: see :meth:`WindowState.kappa_bounds`.

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
        of edited. It may be a traced value; a traced one that a concrete
        one would fail with (not finite and positive, or below the floor of
        :func:`window_init`) refuses ``g`` as a NaN gradient is refused.

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
        finite and positive, or is below the floor of :func:`window_init`, or
        ``state`` is a batch of windows (from :func:`jax.vmap`) used outside
        of :func:`jax.vmap`.
    """
    _check_state(state, "window_update")
    g = check_vector(g, "g", state.dim, np.dtype(state.dtype))
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
        unchanged (so ``optax.apply_if_finite`` placed after the
        preconditioner can skip the step).

    Raises
    ------
    TypeError
        If ``state`` is not a :class:`WindowState`, or ``g`` does not have
        the window's dtype.
    RuntimeError
        If JAX's 64-bit mode is off.
    ValueError
        If ``g`` does not have shape ``(d,)``, or a concrete ``damp`` is not
        finite and positive, or is below the floor of :func:`window_init`, or
        ``state`` is a batch of windows (from :func:`jax.vmap`) used outside
        of :func:`jax.vmap`.
    """
    _check_state(state, "window_update_and_matvec")
    g = check_vector(g, "g", state.dim, np.dtype(state.dtype))
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
        If ``x`` does not have shape ``(d,)`` or ``(d, n)``, or ``state`` is
        a batch of windows (from :func:`jax.vmap`) used outside of
        :func:`jax.vmap`.
    """
    _check_state(state, "window_matvec")
    return _matvec_jit(state, check_vector(x, "x", state.dim, np.dtype(state.dtype), matrix=True))
