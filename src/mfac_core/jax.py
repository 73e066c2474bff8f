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
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from ._jax_common import edit_limit, hyper, hyper_count, require_unbatched, require_x64
from ._jax_static import StaticIHVP, static_ihvp
from ._jax_window import (
    WindowState,
    window_init,
    window_matvec,
    window_update,
    window_update_and_matvec,
)
from ._validation import check_count, check_damp, check_flag, check_number

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

# The objects defined in the private modules are documented, doctested and pickled
# under this module's name, which is where users find them.
for _public in (
    StaticIHVP,
    static_ihvp,
    WindowState,
    window_init,
    window_matvec,
    window_update,
    window_update_and_matvec,
):
    _public.__module__ = __name__
del _public


# -- optax ---------------------------------------------------------------------------------

#: The window size of :func:`mfac` and :func:`mfac_sgd` when none is given. The digits
#: measurements of docs/guidance.rst ("Choosing m"): m = 8 -> 32 cut the training loss
#: six-fold, larger windows gained little more, at m times the memory.
_DEFAULT_NUM_GRADS = 64
#: The optimizers' damping when none is given: 1e-3 trained best in those measurements
#: ("Choosing the damping"); the paper's 1e-5 left a 13 times higher training loss.
_DEFAULT_DAMP = 1e-3


class _StaticTuple(tuple):
    """A tuple that is static data of a pytree (a node without leaves) wherever it sits.

    :class:`MFACState`'s ``param_dtypes``, ``param_shapes`` and ``param_paths``: JAX's
    flattening of the
    state keeps them as static data, and ``optax.tree_utils.tree_set`` walks a named
    tuple's fields itself (``getattr``), where a plain tuple of strings and ints would
    be leaves that the state's structure does not have.
    """

    __slots__ = ()


jax.tree_util.register_pytree_node(
    _StaticTuple, lambda t: ((), tuple(t)), lambda static, _: _StaticTuple(static)
)


class MFACState(NamedTuple):
    """The state of :func:`mfac`: the sliding window of the flat float gradients.

    A pytree: ``window`` is its data, ``param_dtypes``, ``param_shapes`` and
    ``param_paths`` its static part. A named tuple, as optax's own states are, so that
    :func:`optax.tree_utils.tree_get` and :func:`optax.tree_utils.tree_set`
    find its fields (``tree_get(state, "window")``) and the state itself by
    name (``tree_get(state, "MFACState")``). The :class:`WindowState` is not
    one: its ``count`` and ``damp`` would clash with those of
    ``optax.inject_hyperparams`` (and ``tree_set(state, damp=...)`` would
    change the damping of the window's factor without refactorising it).

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
    param_shapes : tuple of tuple of int
        Their shapes, which every update's leaves must have: the window's
        coordinates are the float leaves' entries in this layout.
    param_paths : tuple of str
        Their paths in the parameters' pytree (``jax.tree_util.keystr``, dict
        keys that compare equal written alike: ``np.int64(0)`` as ``0``), which
        every update's leaves must have: an update of another pytree (keys
        renamed) would be preconditioned in the wrong coordinates. Empty (not
        checked) for a state built without them.
    """

    window: WindowState | None
    param_dtypes: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    param_paths: tuple[str, ...] = ()

    @property
    def windowed(self) -> tuple[bool, ...]:  # numpydoc ignore=RT01
        """Per leaf, whether its coordinates are in the window (a float leaf)."""
        return tuple(bool(jnp.issubdtype(np.dtype(t), jnp.floating)) for t in self.param_dtypes)


MFACState.window.__doc__ = "The window over the float leaves' coordinates, or None."


def _mfac_state_children(state: MFACState) -> tuple[Any, Any]:
    # The window is the one child (a leaf path ending in .window, as the dataclass's
    # was); the dtypes and shapes are static data, not leaves that jit would trace.
    return ((jax.tree_util.GetAttrKey("window"), state.window),), (
        tuple(state.param_dtypes),
        tuple(state.param_shapes),
        tuple(state.param_paths),
    )


def _mfac_state_from(static: tuple[Any, ...], children: Any) -> MFACState:
    return MFACState(children[0], *(_StaticTuple(t) for t in static))


# A named tuple would be a pytree of its three fields; registered, the fields after the
# window are static (JAX looks up a registered class before treating it as a tuple).
jax.tree_util.register_pytree_with_keys(MFACState, _mfac_state_children, _mfac_state_from)


def _typed_sharding(x: Any) -> Any:
    """The sharding in ``x``'s type, or None where it names no mesh axis.

    Only JAX's explicit sharding (mesh axes of ``AxisType.Explicit``) puts a sharding
    in the type. A concrete array's is its own (on its devices): its type's names only an
    abstract mesh, on which ``jax.device_put`` cannot place an array.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return None
    return sharding if isinstance(x, jax.core.Tracer) else x.sharding


def _resharded(y: Any, sharding: Any, *, unsharded: bool = False) -> Any:
    """``y`` with ``sharding`` in its type, or with its mesh but no axis (None: as it is).

    The sharding of a concrete array (on its devices) goes by ``jax.device_put``: outside
    of ``jax.set_mesh``, ``jax.sharding.reshard`` refuses an array not yet on the mesh (the
    new window, a zero update), where adam's eager ``init`` and ``update`` need no mesh
    context. A traced array's (an abstract mesh) needs ``reshard``.
    """
    if sharding is None:
        return y
    if unsharded:
        sharding = sharding.update(spec=jax.sharding.PartitionSpec())
    if isinstance(sharding.mesh, jax.sharding.Mesh):
        return jax.device_put(y, sharding)
    return jax.sharding.reshard(y, sharding)


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


def _same_key(entry: Any) -> Any:
    """A key-path entry with its dict key in one spelling among the keys equal to it.

    Keys that compare equal are one key to a dict and to JAX's tree structures (adam
    takes the updates ``{0: g}`` for the parameters ``{np.int64(0): p}``), but ``keystr``
    writes each its own ``repr``: a NumPy scalar key becomes its Python value, and a
    ``bool`` or integral ``float`` key the ``int`` it equals.
    """
    if not isinstance(entry, jax.tree_util.DictKey):
        return entry
    key = entry.key.item() if isinstance(entry.key, np.generic) else entry.key
    if isinstance(key, (bool, float)) and float(key).is_integer():
        key = int(key)
    return jax.tree_util.DictKey(key)


def _leaf_paths(tree: Any) -> tuple[str, ...]:
    """The paths of the leaves of ``tree`` (``jax.tree_util.tree_leaves`` order), as strings.

    Strings, so that containers of the same keys (a tuple for a list, a ``FrozenDict`` for
    a dict) are the same tree, as their coordinates are the same.
    """
    return tuple(
        jax.tree_util.keystr(tuple(_same_key(entry) for entry in path))
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    )


def _param_layout(
    params: Any,
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], int, np.dtype]:
    """The leaves' dtypes and shapes, the number of float coordinates and the window's dtype.

    Float leaves are windowed, integer and boolean ones are not; complex ones are
    refused. The window's dtype is float32, or float64 when a float leaf is float64:
    every float leaf's values (2-byte ones included) enter it exactly.
    """
    names, shapes, dtypes, d = [], [], [], 0
    for i, x in enumerate(jax.tree_util.tree_leaves(params)):
        dt = _leaf_dtype(x)
        if jnp.issubdtype(dt, jnp.complexfloating) or dt == jax.dtypes.float0:
            raise TypeError(f"mfac works on real parameters; leaf {i} of the parameters is {dt}")
        names.append(dt.name)
        shapes.append(tuple(int(n) for n in np.shape(x)))
        if jnp.issubdtype(dt, jnp.floating):
            dtypes.append(dt)
            d += int(np.prod(np.shape(x)))
    # Not jnp.result_type: 8-bit floats have no implicit promotion path (it raises),
    # though their values enter a float32 window exactly, as adam takes such leaves.
    wide = any(dt.itemsize > 4 for dt in dtypes)
    dtype = np.dtype(np.float64 if wide else np.float32)
    return tuple(names), tuple(shapes), d, dtype


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
        the wrong type; ``update`` if its state is not an :class:`MFACState`.
    ValueError
        If ``num_grads`` is not ``>= 1`` or ``refactor_every`` not ``>= 0``, or ``damp``
        is not finite and positive; ``init`` if ``damp`` is below the floor
        of the window's dtype (:func:`window_init`); ``update`` if the
        updates' leaves differ in number or shape from the parameters given
        to ``init``, or the state is a batch of states (:func:`jax.vmap` of
        ``init``) updated outside of :func:`jax.vmap`, or its window has another
        ``num_grads`` or ``zero_init`` than the transformation's.

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
    the first m steps without ``zero_init``, after ``refactor_every`` edits
    and when ``damp`` changes). Flattening and unflattening the pytree adds
    two O(d) copies.

    **Leaves.** The window's dtype is float32, or float64 if a float leaf of
    the parameters is float64: every float leaf's gradient (bfloat16,
    float16 and 8-bit float ones included) enters it exactly, one of a wider
    dtype than the window's (a float64 gradient of float32 parameters) is
    rounded to it once, and the direction is that of the stored gradient, rounded once to
    the window's dtype and then to each update leaf's own dtype. Integer and
    boolean leaves are not preconditioned: their update is zero in the
    parameter's dtype (also for a ``float0`` gradient from
    ``jax.grad(..., allow_int=True)``), so ``optax.apply_updates`` leaves
    them as they are. Parameters without a float leaf (an empty
    pytree, an ``optax.multi_transform`` label that owns no parameter) get
    no window and zero updates.

    A gradient holding NaN or infinity, or one the window refuses (see
    docs/jax.rst, "Refused gradients"), leaves the window unchanged and gives
    a NaN direction. To skip such steps, put ``optax.apply_if_finite`` after
    this transformation, where it sees the direction:
    ``optax.chain(mfac(...), optax.apply_if_finite(optax.sgd(lr), 5))``
    (around the whole chain it sees only the incoming gradient, finite for a
    refused one). So does a traced ``damp`` that is not finite and positive,
    or below the floor of the window's dtype (a concrete one is refused with
    a ``ValueError``; see :func:`window_init`). A gradient the window takes
    never warns, even where :class:`mfac_core.DynamicIHVP` would warn of
    imprecise products: read ``state.window.kappa_bounds()``
    (:meth:`WindowState.kappa_bounds`).

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
        refactor_every = hyper_count(refactor_every, "refactor_every", minimum=0)
    zero_init = check_flag(zero_init, "zero_init")

    def init_fn(params: Any) -> MFACState:
        require_x64("mfac")
        names, shapes, d, dtype = _param_layout(params)
        window = None
        if d:
            window = window_init(
                m, d, damp=damp, dtype=dtype, zero_init=zero_init, refactor_every=refactor_every
            )
            # Under explicit sharding the window lives on the parameters' mesh, unsharded,
            # as the flat gradient does in update_fn (an array's mesh is in its type).
            typed = (_typed_sharding(x) for x in jax.tree_util.tree_leaves(params))
            sharding = next((s for s in typed if s is not None), None)
            window = jax.tree_util.tree_map(
                lambda a: _resharded(a, sharding, unsharded=True), window
            )
        paths = _StaticTuple(_leaf_paths(params))
        return MFACState(window, _StaticTuple(names), _StaticTuple(shapes), paths)

    def update_fn(updates: Any, state: MFACState, params: Any = None) -> tuple[Any, MFACState]:
        del params
        require_x64("mfac")
        if not isinstance(state, MFACState):
            # A chain's tuple of states, or another stage's state, passed by mistake:
            # say so rather than fail on a missing attribute.
            raise TypeError(
                f"mfac's update needs the MFACState that its init returned, got "
                f"{type(state).__name__}"
            )
        if state.window is not None:
            require_unbatched(state.window.grads, "optimizer states")
            # Both are the state's own (its shape, its static field): a state of another
            # mfac (a checkpoint of another configuration) went on with its window size
            # and normalisation, whatever this transformation was built with.
            if (state.window.num_grads, state.window.zero_init) != (m, zero_init):
                raise ValueError(
                    f"the state's window holds num_grads={state.window.num_grads} gradients "
                    f"with zero_init={state.window.zero_init}, but this mfac was built with "
                    f"num_grads={m} and zero_init={zero_init}: the state of another mfac "
                    "(init a new state, or build mfac with the state's options)"
                )
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        windowed = state.windowed
        if len(leaves) != len(windowed):
            raise ValueError(
                f"the updates have {len(leaves)} leaves but the parameters given to init had "
                f"{len(windowed)}"
            )
        # The window's coordinates are the leaves' entries in init's layout: updates of
        # another pytree (keys renamed, leaves of the same shapes) or of other shapes (the
        # same total size reshaped) would be preconditioned in the wrong coordinates.
        paths = _leaf_paths(updates) if state.param_paths else ()
        for i, (path, want) in enumerate(zip(paths, state.param_paths, strict=True)):
            if path != want:
                raise ValueError(
                    f"leaf {i} of the updates is at {path} but the parameters given to init "
                    f"had {want} there: the updates are of another pytree than the parameters"
                )
        for i, (x, shape) in enumerate(zip(leaves, state.param_shapes, strict=True)):
            if tuple(np.shape(x)) != shape:
                raise ValueError(
                    f"leaf {i} of the updates has shape {tuple(np.shape(x))} but the parameters "
                    f"given to init had {shape}"
                )
        # Non-float parameters get a zero update of their own dtype, also from a float0
        # gradient (jax.grad(..., allow_int=True)), which no later optax stage could take.
        # Under explicit sharding the leaves' shardings are part of their types: the
        # window is one unsharded vector over all the float leaves (jnp.concatenate
        # refuses parts of different shardings), and each update gets its leaf's
        # sharding back, as adam's would have (optax.apply_if_finite's lax.cond needs
        # the updates' types to equal the gradients').
        shardings = [_typed_sharding(x) for x in leaves]
        out = [
            x if w else _resharded(jnp.zeros(np.shape(x), np.dtype(t)), sharding)
            for x, w, t, sharding in zip(
                leaves, windowed, state.param_dtypes, shardings, strict=True
            )
        ]
        if state.window is None:
            return jax.tree_util.tree_unflatten(treedef, out), state
        window = state.window
        if refactor_every is not None:
            window = dataclasses.replace(window, refactor_every=edit_limit(refactor_every))
        picked = [i for i, w in enumerate(windowed) if w]
        for i in picked:
            if not _is_float(leaves[i]):
                raise TypeError(
                    f"leaf {i} of the parameters is a float leaf, but its update has dtype "
                    f"{_leaf_dtype(leaves[i])}"
                )
        sizes = [int(np.prod(np.shape(leaves[i]))) for i in picked]
        parts = [
            jnp.ravel(_resharded(jnp.asarray(leaves[i]), shardings[i], unsharded=True)).astype(
                window.dtype
            )
            for i in picked
        ]
        flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        window, direction = window_update_and_matvec(window, flat, damp=damp)
        start = 0
        for i, n in zip(picked, sizes, strict=True):
            x = leaves[i]
            y = direction[start : start + n].reshape(np.shape(x)).astype(_leaf_dtype(x))
            out[i] = _resharded(y, shardings[i])
            start += n
        return jax.tree_util.tree_unflatten(treedef, out), state._replace(window=window)

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
        If ``learning_rate`` (a number or array, not a schedule) or
        ``weight_decay`` is not finite and ``>= 0``, ``momentum`` is not in
        ``[0, 1)``, ``num_grads`` is not ``>= 1``, or ``damp`` is not finite
        and positive (arrays: checked when concrete), as
        :class:`mfac_core.torch.MFAC` refuses them.
    TypeError
        If ``learning_rate`` is neither a schedule nor a real number or 0-d
        real array, if ``momentum``, ``weight_decay`` or ``damp`` is neither
        a real number nor a 0-d real array, or ``num_grads`` is not a Python
        int.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, optax
    >>> jax.config.update("jax_enable_x64", True)
    >>> from mfac_core.jax import mfac_sgd
    >>> opt = optax.inject_hyperparams(mfac_sgd)(learning_rate=0.1, damp=1e-2)
    >>> sorted(opt.init({"w": jnp.zeros(3, jnp.float32)}).hyperparams)
    ['damp', 'learning_rate', 'momentum', 'weight_decay']
    """
    if not callable(learning_rate):  # a schedule is optax's to evaluate
        learning_rate = hyper(
            learning_rate,
            "learning_rate",
            lambda v: check_number(v, "learning_rate", low=0.0),
        )
    momentum = hyper(
        momentum,
        "momentum",
        lambda v: check_number(v, "momentum", low=0.0, high=1.0, high_open=True),
    )
    weight_decay = hyper(
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
