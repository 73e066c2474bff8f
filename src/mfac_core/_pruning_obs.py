"""The building blocks of OBS pruning: saliencies, selection and the OBS update.

:func:`obs_saliency`, :func:`obd_saliency`, :func:`magnitude_saliency`,
:func:`select_pruned` and :func:`obs_update` are public, re-exported and
documented by :mod:`mfac_core.pruning`; the entry points there (``prune``,
``gradual_prune``, ``damping_sweep``, ``select_damping``) compose them, and
:class:`InverseFisherOperator` says what they need of the operator. The
joint update's per-block systems are built from ``entries`` of the operator
and solved here.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

from . import _engine
from ._compat import Array, is_dask_namespace
from ._compat import device as device_of
from ._finite import raise_non_finite
from ._operator import LinearOperator
from ._pruning_inputs import (
    check_bool,
    check_grads,
    check_kept_weights,
    check_mask,
    check_theta,
)
from ._static import EmpiricalFisher
from ._validation import check_count, check_damp, check_flag, check_fraction, check_operand

#: Entries of ``F^{-1}`` requested from :meth:`StaticIHVP.entries` per call.
_ENTRY_BUDGET = 2**20

#: obs_update's default max_joint_size (prune's too).
MAX_JOINT_SIZE = 4096

#: Slack when turning a sparsity into a count, so that 0.29 * 100 gives 29, not 28; at
#: least n * 2**-52 for a group of n weights (see _target_count).
_ROUND_SLACK = 1e-9


@runtime_checkable
class InverseFisherOperator(Protocol):
    """What the pruning functions need from an inverse-Fisher operator.

    :class:`~mfac_core.StaticIHVP` is one; any object with these members (for
    instance a wrapper around another curvature approximation) can be used.

    Attributes
    ----------
    shape : tuple of int
        ``(d, d)``.
    dtype, device, xp
        The dtype, device and Array-API namespace of its arrays.
    block_size : int
        The size of the diagonal blocks of ``F^{-1}`` (``d`` for a full one):
        entries across blocks are zero, and joint updates are block-wise.
    """

    shape: tuple[int, int]
    dtype: Any
    device: Any
    block_size: int

    @property
    def xp(self) -> Any:
        """The Array-API namespace of the operator's arrays."""

    def matvec(self, x: Array, /) -> Array:
        """Apply ``F^{-1}`` to a vector.

        Parameters
        ----------
        x : array, shape (d,)
            A vector in the operator's namespace, dtype and device.

        Returns
        -------
        array, shape (d,)
            ``F^{-1} x``.
        """

    def diagonal(self) -> Array:
        """Return the diagonal of ``F^{-1}``.

        Returns
        -------
        array, shape (d,)
            The diagonal entries ``[F^{-1}]_{jj}``.
        """

    def entries(self, rows: Array, cols: Array, /) -> Array:
        """Return selected entries of ``F^{-1}``.

        Parameters
        ----------
        rows, cols : array of int
            Row and column indices in ``[0, d)``, of the same shape, in the
            operator's namespace and device.

        Returns
        -------
        array
            ``[F^{-1}]_{rows[k], cols[k]}`` for every ``k``, in the shape of
            ``rows``; zero across blocks.
        """


#: What InverseFisherOperator asks of an operator (runtime_checkable checks all of them).
_MEMBERS = ("shape", "dtype", "device", "block_size", "xp", "matvec", "diagonal", "entries")


def _refuse_sharded(ihvp: Any, what: str) -> None:
    """Refuse a column-sharded operator, on every rank alike and before any collective.

    The pruning functions take whole vectors and decide from them locally (a weight
    count, whether any weight is selected) before a product: on the shards of a
    column-sharded operator, ranks would decide differently and some would wait in a
    reduction that the others never join (a rank holding every column passed the shape
    check and waited for a rank whose empty shard was refused).
    """
    if isinstance(ihvp, LinearOperator) and ihvp.layout is not None:
        raise TypeError(
            f"{what} does not take a column-sharded operator ({type(ihvp).__name__}): the "
            "pruning functions take whole vectors. On each rank, theta_local**2 / (2 * "
            "op.diagonal()) are its OBS saliencies, and theta_local - op.matvec(coef_local) "
            "the summed OBS update (collective: call it on every rank)"
        )


def _check_operator(ihvp: Any, theta: Array) -> Any:
    """The operator's checks; returns ``theta`` in its dtype (promoted where lossless)."""
    if not isinstance(ihvp, InverseFisherOperator):
        # Named: the library's own SpectralIHVP has matvec and diagonal, but not entries.
        missing = [name for name in _MEMBERS if not hasattr(ihvp, name)]
        raise TypeError(
            f"ihvp must be an inverse-Fisher operator such as StaticIHVP (see "
            f"InverseFisherOperator), got {type(ihvp).__name__}, which lacks "
            f"{', '.join(missing)}"
        )
    d = theta.shape[0]
    if tuple(ihvp.shape) != (d, d):
        raise ValueError(f"ihvp has shape {tuple(ihvp.shape)} but theta has {d} weights")
    return check_operand(ihvp.xp, ihvp.device, ihvp.dtype, theta, "theta", owner=ihvp)


def _half_fisher_diagonal(xp: Any, G: Array, damp: float) -> Array:
    """``damp + sum_k G_ki^2 / m`` of 2-byte G, summed in float64 (and kept in float64).

    A ValueError if G holds NaN or infinity, as for float32/float64 G. The float64
    sums check G at no extra pass: a 2-byte value squared is at most about 1e77
    (bfloat16's largest), so a sum is non-finite exactly when its column is.
    """
    sums = _engine.square_sums(xp, G)
    if not bool(xp.all(xp.isfinite(sums))):
        raise_non_finite(xp, G, "G")
    return damp + sums / G.shape[0]


def fisher_diagonal(theta: Array, G: Array, damp: float) -> Array:
    """``F_ii = damp + sum_k G_ki^2 / m``, checked: theta's dtype, or float64 for 2-byte G.

    For 2-byte G the float64 sums are returned as they are (the ranking key of
    :func:`ranking_key` takes them; :func:`obd_saliency` rounds them once to float32).

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights (their dtype is G's, or float32 for 2-byte G).
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda > 0``.

    Returns
    -------
    array, shape (d,)
        The diagonal of the damped Fisher.
    """
    xp = check_theta(theta)
    if check_grads(xp, theta, G) is not None:
        return _half_fisher_diagonal(xp, G, check_damp(damp))
    return EmpiricalFisher(G, damp=damp).diagonal()


# -- saliencies ---------------------------------------------------------------------------


def obs_saliency(theta: Array, ihvp: InverseFisherOperator, /) -> Array:
    r"""The OBS/OBD saliency ``theta_i^2 / (2 [F^{-1}]_ii)`` of every weight.

    The increase of the quadratic model of the loss when weight ``i`` alone is
    set to zero and the others are moved optimally (paper Section 4.1).

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    ihvp : InverseFisherOperator
        The inverse Fisher ``F^{-1}`` over the same d coordinates, such as a
        :class:`~mfac_core.StaticIHVP`, in the namespace and on the device of
        ``theta``; its ``diagonal()`` is used (O(d m^2) for the M-FAC operators).

    Returns
    -------
    array, shape (d,)
        The saliencies, in theta's namespace, device and dtype: infinity
        where the saliency is beyond the dtype's range (float32: above about
        3.4e38, for ``|theta_i| sqrt(F_ii)`` above about 2.6e19).

    Raises
    ------
    TypeError
        If ``theta`` is not a floating array of the operator's library and
        dtype; for a column-sharded operator
        (:class:`~mfac_core.ShardedStaticIHVP`).
    ValueError
        If the shapes or devices do not match.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import StaticIHVP
    >>> from mfac_core.pruning import obs_saliency
    >>> G = np.random.default_rng(0).standard_normal((16, 6))
    >>> theta = np.array([1.0, -0.1, 0.5, 2.0, 0.0, -1.0])
    >>> rho = obs_saliency(theta, StaticIHVP(G, damp=0.1))
    >>> Finv = np.linalg.inv(0.1 * np.eye(6) + G.T @ G / 16)
    >>> bool(np.allclose(rho, theta**2 / (2 * np.diag(Finv))))
    True
    """
    _refuse_sharded(ihvp, "obs_saliency")
    check_theta(theta)
    theta = _check_operator(ihvp, theta)
    return saliency_of_diagonal(ihvp.xp, theta, ihvp.diagonal())


def obd_saliency(theta: Array, G: Array, /, *, damp: float) -> Array:
    r"""The OBD saliency with a diagonal Fisher: ``theta_i^2 F_ii / 2``.

    Optimal Brain Damage approximates ``[F^{-1}]_ii`` by ``1 / F_ii`` with
    ``F_ii = damp + sum_k G_ki^2 / m``, which ignores all correlations between
    weights.

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    G : array, shape (m, d)
        The gradients, one per row, in theta's namespace, device and dtype,
        or stored in 2 bytes (float16, bfloat16) with float32 ``theta``.
    damp : float
        The damping ``lambda > 0``.

    Returns
    -------
    array, shape (d,)
        The saliencies (theta's dtype).

    Raises
    ------
    ValueError
        If ``G`` holds NaN or infinity (in any dtype, 2-byte included), the
        shapes do not match, or ``damp`` is not finite and positive.
    TypeError
        If ``G``'s dtype does not go with theta's.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import obd_saliency
    >>> G = np.array([[1.0, 0.0], [1.0, 2.0]])
    >>> obd_saliency(np.array([1.0, 1.0]), G, damp=1.0)
    array([1. , 1.5])
    """
    xp = check_theta(theta)
    diag = xp.astype(fisher_diagonal(theta, G, damp), theta.dtype)
    return _squared(theta * xp.sqrt(diag / 2))


def _squared(t: Array) -> Array:
    """``t * t``: a saliency ``theta^2 c`` formed as ``(theta sqrt(c))^2``.

    ``theta^2`` alone overflows or turns subnormal (float32: beyond about 1.8e19 or
    below 1.1e-19) where the saliency is representable, e.g. for weights of 1e20
    under a Fisher of 1e-8; the square root scales first, at half the exponent.
    """
    return t * t


def saliency_of_diagonal(xp: Any, theta: Array, diag: Array, /) -> Array:
    """``theta^2 / (2 diag)`` for ``diag`` of ``F^{-1}`` (a stack of them broadcasts).

    Formed as ``(theta / sqrt(2 diag))^2`` (see :func:`_squared`): finite and
    accurate wherever the saliency is a normal number.

    Parameters
    ----------
    xp : module
        The namespace of ``theta`` and ``diag``.
    theta : array, shape (d,)
        The flat weights.
    diag : array, shape (d,) or (K, d)
        The diagonal of ``F^{-1}``, or one per damping.

    Returns
    -------
    array, shape of ``diag``
        The OBS saliencies, in ``diag``'s dtype.
    """
    return _squared(theta / xp.sqrt(2 * diag))


def ranking_key(xp: Any, theta: Array, diag: Array, /, *, inverse: bool = True) -> Array:
    """A float64 key that orders the weights as their saliencies do, for every finite input.

    ``sqrt(|theta|) / diag^(1/4)`` for a diagonal of ``F^{-1}`` (OBS), or
    ``sqrt(|theta|) * diag^(1/4)`` for one of ``F`` (``inverse=False``, OBD): the
    saliency is ``key^4 / 2``, so the key ranks as it does. A float32 saliency
    overflows to infinity beyond about 3.4e38 (``|theta| sqrt(F_jj)`` beyond about
    2.6e19), where the selection then took the tied weights by index; a float64 one
    beyond about 1.8e308. The fourth root in float64 is zero for a zero weight and
    otherwise a normal number for every finite float32 or float64 weight and positive
    diagonal (between about 1e-243 and 1e235); it tells apart saliencies that differ
    by more than a few parts in 1e15.

    Parameters
    ----------
    xp : module
        The namespace of ``theta`` and ``diag``.
    theta : array, shape (d,)
        The flat weights.
    diag : array, shape (d,) or (K, d)
        The diagonal of ``F^{-1}`` (or of ``F``), or one per damping.
    inverse : bool, optional
        Whether ``diag`` is that of ``F^{-1}`` (default) or of ``F``.

    Returns
    -------
    array, shape of ``diag``, float64
        The keys: lower = pruned first.
    """
    root = xp.sqrt(xp.abs(xp.astype(theta, xp.float64)))
    quarter = xp.sqrt(xp.sqrt(xp.astype(diag, xp.float64)))
    return root / quarter if inverse else root * quarter


def magnitude_saliency(theta: Array, /) -> Array:
    """The magnitude saliency ``theta_i^2`` (magnitude pruning).

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.

    Returns
    -------
    array, shape (d,)
        ``theta * theta`` (theta's dtype), rounded as the product is.

    Notes
    -----
    The saliency ranks weights like ``abs(theta)`` wherever ``theta^2`` is a
    normal number (float32: ``1.1e-19 <= |theta| <= 1.8e19``; float64:
    ``1.5e-154 <= |theta| <= 1.3e154``). Below, distinct magnitudes may round
    to the same subnormal number or to 0; above, they all overflow to infinity
    (with NumPy's overflow warning). To select by magnitude exactly, give
    ``abs(theta)`` to :func:`select_pruned`, as ``prune(...,
    saliency="magnitude")`` does.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import magnitude_saliency
    >>> magnitude_saliency(np.array([-2.0, 0.5]))
    array([4.  , 0.25])
    """
    check_theta(theta)
    return theta * theta


# -- selection ----------------------------------------------------------------------------


def _target_count(sparsity: float, n: int) -> int:
    # The float sparsity (within 2**-54 of the decimal typed) times n (one more rounding)
    # is within 0.75 n 2**-52 of the count meant: a fixed slack of 1e-9 fell short from
    # n ~ 4e7 (0.29 of 10**8 weights gave 28_999_999).
    return min(n, math.floor(sparsity * n + max(_ROUND_SLACK, n * 2.0**-52)))


def select_pruned(
    scores: Array,
    /,
    *,
    sparsity: float | None = None,
    count: int | None = None,
    mask: Array = None,
    block_size: int | None = None,
) -> Array:
    """Select the least salient weights that are still kept.

    Give exactly one of ``sparsity`` and ``count``. Weights that ``mask``
    already prunes are never selected; ties are broken by the lower index.

    Parameters
    ----------
    scores : array, shape (d,)
        The saliencies (lower = pruned first); no NaN where ``mask`` keeps
        the weight.
    sparsity : float, optional
        The fraction of weights, in ``[0, 1)``, that is pruned after the
        selection, counting the already-pruned ones: ``floor(sparsity * n)``
        weights of each group of ``n`` (all d weights, or each block). Groups
        that are already sparser get no new selection.
    count : int, optional
        The number of *new* weights to select (globally, or in each block).
    mask : array of bool, shape (d,), optional
        ``True`` for the weights still kept (default: all).
    block_size : int, optional
        Select within each block of this many consecutive weights (the last
        block may be shorter) instead of globally.

    Returns
    -------
    array of bool, shape (d,)
        ``True`` for the newly selected weights.

    Raises
    ------
    ValueError
        For neither or both of ``sparsity`` and ``count``, a sparsity outside ``[0, 1)``,
        a ``count`` larger than the number of kept weights (in some block), scores holding
        NaN at a kept weight, or mismatched shapes.
    TypeError
        For arrays of different libraries or a non-boolean mask.

    Notes
    -----
    Equal scores are equal here: saliencies that overflowed to infinity (or
    rounded to zero) are tied and taken in index order. :func:`prune`,
    :func:`damping_sweep` and :func:`select_damping` do not select from the
    saliencies but from a float64 key that orders them for every finite
    weight and diagonal (a fourth root of the saliency).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import select_pruned
    >>> scores = np.array([0.5, 0.1, 0.9, 0.2, 0.3, 0.8])
    >>> select_pruned(scores, count=2).nonzero()[0]
    array([1, 3])
    >>> kept = np.array([True, False, True, True, True, True])
    >>> select_pruned(scores, sparsity=0.5, mask=kept).nonzero()[0]
    array([3, 4])
    >>> select_pruned(scores, count=1, block_size=3).nonzero()[0]
    array([1, 3])
    """
    xp = check_theta(scores, "scores")
    mask = check_mask(xp, scores, mask)
    if (sparsity is None) == (count is None):
        raise ValueError("give exactly one of sparsity and count")
    if sparsity is not None:
        sparsity = check_fraction(sparsity, "sparsity")
    else:
        count = check_count(count, "count", minimum=0)
    # Scores of weights already pruned are never read: they may be NaN (their weight
    # may be, as every entry point zeroes it).
    if bool(xp.any(xp.isnan(scores) & mask)):
        raise ValueError("scores must not contain NaN where mask keeps the weight")
    d = scores.shape[0]
    B = d if block_size is None else min(check_count(block_size, "block_size"), d)
    dev = device_of(scores)
    nb = -(-d // B)
    pad = nb * B - d
    inf = xp.full((pad,), math.inf, dtype=scores.dtype, device=dev)
    s = xp.reshape(xp.concat([scores, inf]), (nb, B))
    keep = xp.reshape(xp.concat([mask, xp.zeros((pad,), dtype=xp.bool, device=dev)]), (nb, B))
    kept = xp.sum(xp.astype(keep, xp.int64), axis=1)

    if count is not None:
        if count > int(xp.min(kept)):
            raise ValueError(
                f"count={count} is more than the {int(xp.min(kept))} weights still "
                f"kept" + (" in some block" if nb > 1 else "")
            )
        k = xp.full((nb,), count, dtype=xp.int64, device=dev)
    else:
        sizes = [B] * nb
        sizes[-1] = B - pad
        fraction = check_fraction(sparsity, "sparsity")
        target = xp.asarray([_target_count(fraction, n) for n in sizes], dtype=xp.int64, device=dev)
        pruned = xp.asarray(sizes, dtype=xp.int64, device=dev) - kept
        k = xp.clip(target - pruned, min=0)

    # Order each block by (pruned, score): kept weights first, by increasing score, then a
    # stable sort so that equal scores keep their index order.
    offsets = xp.reshape(xp.arange(nb, dtype=xp.int64, device=dev) * B, (nb, 1))
    by_score = xp.argsort(s, axis=1, stable=True)
    dropped = xp.astype(
        xp.take(xp.reshape(~keep, (-1,)), xp.reshape(by_score + offsets, (-1,))), xp.int8
    )
    by_kept = xp.argsort(xp.reshape(dropped, (nb, B)), axis=1, stable=True)
    order = xp.reshape(
        xp.take(xp.reshape(by_score, (-1,)), xp.reshape(by_kept + offsets, (-1,))), (nb, B)
    )
    rank = xp.argsort(order, axis=1)  # the inverse permutation: position of each weight
    selected = rank < xp.reshape(k, (nb, 1))
    return xp.reshape(selected, (-1,))[:d]


# -- the OBS update -----------------------------------------------------------------------


def obs_update(
    theta: Array,
    ihvp: InverseFisherOperator,
    selected: Array,
    /,
    *,
    joint: bool = False,
    block_size: int | None = None,
    mask: Array = None,
    max_joint_size: int = MAX_JOINT_SIZE,
) -> Array:
    r"""The OBS update that removes the ``selected`` weights and moves the others.

    With ``P`` the selected coordinates:

    - ``joint=False`` (the paper's update): the sum of the single-weight OBS
      updates, ``delta = -F^{-1} sum_{q in P} (theta_q / [F^{-1}]_qq) e_q``,
      one IHVP in all;
    - ``joint=True``: the exact multi-weight OBS update within each block,
      ``delta = -F^{-1}_{:,P} ([F^{-1}]_{PP})^{-1} theta_P``, the minimiser of
      ``delta^T F delta / 2`` subject to ``theta_P + delta_P = 0`` (for a
      block-diagonal F when ``block_size`` is the operator's block size). The
      small systems are built from :meth:`StaticIHVP.entries` and solved in
      float64, all blocks at once; then one IHVP applies the update. An
      operator's entries, and the coefficients it takes, are in its dtype:
      with a float32 operator the update is within a few ``eps32 *
      cond([F^{-1}]_PP)`` of the exact one, relative to ``|theta| + |delta|``
      (about 1e-2 at a condition number of 1e6, wherever the small system
      is solved); for worse conditioned blocks use a float64 operator.

    The selected weights, and any weight that ``mask`` already prunes, are
    then set to exactly zero; weights that ``mask`` prunes take no part in
    the update, whatever they hold, selected or not.

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    ihvp : StaticIHVP
        ``F^{-1}`` over the same coordinates (theta's namespace, device and
        dtype). Its gradients should be zero at coordinates pruned earlier.
    selected : array of bool, shape (d,)
        The weights to remove.
    joint : bool, optional
        Solve the joint system in each block (default ``False``).
    block_size : int, optional
        Block size of the joint systems (default: the operator's
        ``block_size``). A block size smaller than the operator's ignores the
        correlations between blocks, an approximation.
    mask : array of bool, shape (d,), optional
        ``True`` for the weights kept before this step.
    max_joint_size : int, optional
        Refuse joint systems with more selected weights than this in one
        block (their cost grows as its cube); use blocks instead. At least 1.

    Returns
    -------
    array, shape (d,)
        The updated weights, with exact zeros at the pruned coordinates.

    Raises
    ------
    ValueError
        For mismatched shapes, NaN or infinity in a weight that ``mask``
        keeps, a joint block with more than ``max_joint_size`` selected
        weights, or ``max_joint_size < 1``.
    TypeError
        For arrays of another library than the operator's, or of a dtype
        that it would round (float64 weights for a float32 operator; float32
        weights for a float64 one are promoted); for a column-sharded
        operator (:class:`~mfac_core.ShardedStaticIHVP`); for a ``joint``
        that is not a bool or a ``max_joint_size`` that is not an int.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import StaticIHVP
    >>> from mfac_core.pruning import obs_update
    >>> rng = np.random.default_rng(0)
    >>> G, theta = rng.standard_normal((32, 5)), rng.standard_normal(5)
    >>> ihvp = StaticIHVP(G, damp=0.1)
    >>> P = np.array([True, False, True, False, False])
    >>> new = obs_update(theta, ihvp, P, joint=True)
    >>> new[P]
    array([0., 0.])

    The joint update minimises ``delta^T F delta`` under the constraint:

    >>> F = 0.1 * np.eye(5) + G.T @ G / 32
    >>> delta = new - theta
    >>> free = ~P
    >>> bool(np.allclose(F[free] @ delta, 0))  # the stationarity conditions
    True
    """
    _refuse_sharded(ihvp, "obs_update")
    xp = check_theta(theta)
    # A truthy string ("no") ran the joint update; a max_joint_size that is not an int
    # failed, or passed, in a comparison deep inside.
    joint = check_flag(joint, "joint")
    max_joint_size = check_count(max_joint_size, "max_joint_size")
    theta = _check_operator(ihvp, theta)
    mask = check_mask(xp, theta, mask)
    # A mask of the weights to remove: integer indices are refused, not read as a mask.
    check_bool(xp, theta, selected, "selected", meaning="True = removed")
    d = theta.shape[0]
    if selected.ndim != 1 or selected.shape[0] != d:
        raise ValueError(f"selected must have shape ({d},), got {tuple(selected.shape)}")
    # As prune() does: a NaN or infinite kept weight is named here, not as "x[i] is nan"
    # of the product below (selected) or passed on to the result (not selected).
    check_kept_weights(xp, theta, mask)
    return updated_weights(
        xp,
        theta,
        ihvp,
        selected,
        mask,
        joint=joint,
        block_size=block_size,
        max_joint_size=max_joint_size,
    )


def updated_weights(
    xp: Any,
    theta: Array,
    ihvp: Any,
    selected: Array,
    mask: Array,
    *,
    joint: bool,
    block_size: int | None,
    max_joint_size: int,
    diag: Array | None = None,
) -> Array:
    """:func:`obs_update` once its inputs are checked.

    :func:`prune` passes the diagonal its OBS saliencies came from: the summed update
    computed it a second time, an O(d m^2) pass over G as long as the rest of the step.

    Parameters
    ----------
    xp : module
        The namespace of ``theta``.
    theta : array, shape (d,)
        The flat weights, checked, in the operator's dtype.
    ihvp : InverseFisherOperator
        ``F^{-1}``, checked against ``theta``.
    selected, mask : array of bool, shape (d,)
        The weights to remove and the weights kept before, checked.
    joint : bool
        As for :func:`obs_update`.
    block_size : int or None
        As for :func:`obs_update`.
    max_joint_size : int
        As for :func:`obs_update`.
    diag : array, shape (d,), optional
        ``ihvp.diagonal()``, if the caller has it (the summed update's divisor).

    Returns
    -------
    array, shape (d,)
        The updated weights, with exact zeros at the pruned coordinates.
    """
    d = theta.shape[0]
    gone = selected | ~mask
    # A weight that mask prunes already has nothing to remove, whatever it holds (it is
    # zeroed below): selected again, a NaN there failed the product. With zero gradients
    # there (see ihvp), F^{-1} does not couple it to the others, so leaving it out of the
    # update changes nothing else.
    selected = selected & mask
    zero = xp.zeros((), dtype=theta.dtype, device=device_of(theta))
    if not bool(xp.any(selected)):
        return xp.where(gone, zero, theta)
    if joint:
        if is_dask_namespace(xp):
            raise ValueError(
                "joint=True is not available for Dask arrays (Dask has no batched "
                "linalg.solve for the per-block systems); use joint=False"
            )
        B = min(check_count(ihvp.block_size if block_size is None else block_size, "block_size"), d)
        coef = _joint_coefficients(xp, theta, ihvp, selected, B, max_joint_size)
    else:
        coef = xp.where(selected, theta / (ihvp.diagonal() if diag is None else diag), zero)
    # The weights are finite (checked): a coefficient that is not overflowed (F^{-1} of
    # the Fisher's scale below theta / 3.4e38 in float32), which the product refused as
    # an "x" the caller never passed.
    if not is_dask_namespace(xp) and not bool(xp.all(xp.isfinite(coef))):
        raise ValueError(
            f"the OBS update's coefficients (theta over entries of F^-1) overflow "
            f"{theta.dtype}: the Fisher's scale is beyond it (rescale the gradients and "
            "the damping, or use float64)"
        )
    return xp.where(gone, zero, theta - ihvp.matvec(coef))


def _joint_coefficients(
    xp: Any, theta: Array, ihvp: Any, selected: Array, B: int, max_joint_size: int
) -> Any:
    """``u`` with ``u_P = ([F^{-1}]_{PP})^{-1} theta_P`` per block and zeros elsewhere."""
    d = theta.shape[0]
    dev = device_of(theta)
    nb = -(-d // B)
    pad = nb * B - d
    sel = xp.reshape(xp.concat([selected, xp.zeros((pad,), dtype=xp.bool, device=dev)]), (nb, B))
    counts = xp.sum(xp.astype(sel, xp.int64), axis=1)
    p = int(xp.max(counts))
    if p > max_joint_size:
        raise ValueError(
            f"the joint OBS update would solve a {p} x {p} system in one block "
            f"(max_joint_size={max_joint_size}); use a smaller block_size"
        )
    offsets = xp.reshape(xp.arange(nb, dtype=xp.int64, device=dev) * B, (nb, 1))
    # The selected positions of each block, in increasing order, padded to p.
    first = xp.argsort(xp.astype(~sel, xp.int8), axis=1, stable=True)[:, :p]
    valid = xp.reshape(xp.arange(p, dtype=xp.int64, device=dev), (1, p)) < xp.reshape(
        counts, (nb, 1)
    )
    idx = xp.clip(first + offsets, max=d - 1)  # (nb, p) global indices; padding is ignored
    flat_idx = xp.reshape(idx, (-1,))
    rhs = xp.where(valid, xp.reshape(xp.astype(xp.take(theta, flat_idx), xp.float64), (nb, p)), 0.0)

    # [F^{-1}]_{PP} of each block: only its upper triangle (it is symmetric), requested in
    # chunks of blocks to bound the temporaries of entries().
    ar = xp.arange(p, dtype=xp.int64, device=dev)
    lo, hi = xp.minimum(ar[:, None], ar[None, :]), xp.maximum(ar[:, None], ar[None, :])
    n_tri = p * (p + 1) // 2
    upper = xp.reshape(ar[:, None] <= ar[None, :], (-1,))
    tri = xp.argsort(xp.astype(~upper, xp.int8), stable=True)[:n_tri]  # row-major (i <= j)
    tri_r, tri_c = tri // p, tri % p
    # Position of (min(i, j), max(i, j)) in that list of upper-triangle pairs.
    packed = xp.reshape(lo * p - (lo * (lo - 1)) // 2 + (hi - lo), (-1,))
    rows_all = xp.take(idx, tri_r, axis=1)  # (nb, n_tri)
    cols_all = xp.take(idx, tri_c, axis=1)
    chunk = max(1, _ENTRY_BUDGET // max(1, n_tri))
    parts = []
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        vals = ihvp.entries(
            xp.reshape(rows_all[b0:b1, ...], (-1,)), xp.reshape(cols_all[b0:b1, ...], (-1,))
        )
        vals = xp.reshape(xp.astype(vals, xp.float64), (b1 - b0, n_tri))
        parts.append(xp.reshape(xp.take(vals, packed, axis=1), (b1 - b0, p, p)))
    M = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
    both = xp.reshape(valid, (nb, p, 1)) & xp.reshape(valid, (nb, 1, p))
    eye = xp.eye(p, dtype=xp.float64, device=dev)
    M = xp.where(both, M, xp.broadcast_to(eye, (nb, p, p)))
    c = xp.linalg.solve(M, xp.reshape(rhs, (nb, p, 1)))
    c = xp.reshape(xp.astype(c, theta.dtype), (-1,))

    # Scatter c back: the k-th selected weight of block b takes c[b, k].
    pos = xp.cumulative_sum(xp.astype(sel, xp.int64), axis=1) - 1
    where_c = xp.clip(
        xp.reshape(pos + xp.reshape(xp.arange(nb, dtype=xp.int64, device=dev) * p, (nb, 1)), (-1,)),
        min=0,
    )
    u = xp.where(
        xp.reshape(sel, (-1,)), xp.take(c, where_c), xp.zeros((), dtype=theta.dtype, device=dev)
    )
    return u[:d]


# Re-exported by mfac_core.pruning, under whose name they are documented, doctested and pickled.
for _public in (
    InverseFisherOperator,
    obs_saliency,
    obd_saliency,
    magnitude_saliency,
    select_pruned,
    obs_update,
):
    _public.__module__ = "mfac_core.pruning"
