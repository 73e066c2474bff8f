r"""Pruning with the static M-FAC inverse Fisher: OBD/OBS saliencies, masks and updates.

Section 4.1 of the M-FAC paper (Frantar, Kurtic & Alistarh, NeurIPS 2021)
prunes a trained model ``theta`` under the local quadratic model of the loss
``L(theta + delta) ~ L(theta) + delta^T F delta / 2`` with the damped
empirical Fisher ``F = damp I + G^T G / m`` of ``m`` gradients (the rows of
``G``). Everything here works on a flat parameter vector of any Array-API
library and stays in its namespace and on its device:

- saliencies: :func:`obs_saliency` (``theta_i^2 / (2 [F^{-1}]_ii)`` from a
  :class:`~mfac_core.StaticIHVP`), :func:`obd_saliency` (the same with the
  diagonal of F, as in Optimal Brain Damage) and :func:`magnitude_saliency`;
- :func:`select_pruned` picks the least salient weights, globally or per
  block, never picking weights that a mask already prunes;
- :func:`obs_update` applies the Optimal Brain Surgeon update of the
  remaining weights, either the paper's sum of single-weight updates or the
  exact joint update within each block;
- :func:`prune` is one step (saliency, selection, update), and
  :func:`gradual_prune` reaches a target sparsity in several steps,
  resampling the gradients at each one (the paper's "recomputations");
- :func:`damping_sweep` gives the saliencies and the predicted loss increase
  for a grid of dampings, and :func:`select_damping` prunes at every damping
  of a grid and keeps the one of the lowest held-out loss, both from one
  :class:`~mfac_core.SpectralIHVP` set-up.

Masks are boolean arrays with ``True`` for the weights that are kept.

Gradients may be stored in 2 bytes (float16; PyTorch's bfloat16) with float32
weights: the Fisher keeps them as given (``StaticIHVP``'s 2-byte storage,
docs/mathematics.rst), :func:`damping_sweep` works on a float32 copy, and
every result is float32.

Notes
-----
Pruned weights must not move again. The functions assume, and :func:`prune`
makes sure, that the gradients are zero at already-pruned coordinates; then
``F`` decouples those coordinates from the others and the updates never move
them. All updated vectors have their pruned coordinates set to exactly zero.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast, runtime_checkable

from ._compat import Array, is_dask_namespace
from ._compat import device as device_of
from ._gform import cast_pieces
from ._spectral import SpectralIHVP
from ._static import EmpiricalFisher, StaticIHVP
from ._validation import (
    check_choice,
    check_count,
    check_damp,
    check_dampings,
    check_floating,
    check_fraction,
    check_gradients,
    check_operand,
    check_same_space,
    half_dtype_name,
    is_number_list,
    namespace_of,
)

__all__ = [
    "DampingChoice",
    "DampingSweep",
    "InverseFisherOperator",
    "PruneResult",
    "gradual_prune",
    "magnitude_saliency",
    "obd_saliency",
    "obs_saliency",
    "obs_update",
    "damping_sweep",
    "prune",
    "select_damping",
    "select_pruned",
    "sparsity_schedule",
]

Saliency = Literal["obs", "obd", "magnitude"]
Update = Literal["single", "joint", "none"]
Schedule = Literal["linear", "cubic", "exponential"]

#: Entries of ``F^{-1}`` requested from :meth:`StaticIHVP.entries` per call.
_ENTRY_BUDGET = 2**20

#: Slack when turning a sparsity into a count, so that 0.29 * 100 gives 29, not 28.
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


class PruneResult(NamedTuple):
    """The outcome of a pruning step: the new weights and the new mask.

    Attributes
    ----------
    theta : array, shape (d,)
        The weights after the step; pruned coordinates are exactly zero.
    mask : array of bool, shape (d,)
        ``True`` for the weights that are kept.
    """

    theta: Array
    mask: Array


# -- validation ---------------------------------------------------------------------------


def _check_theta(theta: Array, name: str = "theta") -> Any:
    xp = namespace_of(theta, name)
    if theta.ndim != 1:
        raise ValueError(
            f"{name} must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}"
        )
    if theta.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one weight")
    check_floating(xp, theta, name)
    return xp


def _check_mask(xp: Any, theta: Array, mask: Array) -> Any:
    """The mask (all True when ``None``), checked against ``theta``."""
    d = theta.shape[0]
    if mask is None:
        return xp.ones((d,), dtype=xp.bool, device=device_of(theta))
    _check_bool(xp, theta, mask, "mask")
    if mask.ndim != 1 or mask.shape[0] != d:
        raise ValueError(f"mask must have shape ({d},) like theta, got {tuple(mask.shape)}")
    return mask


def _check_bool(xp: Any, theta: Array, x: Array, name: str) -> None:
    """``x`` must be a boolean array of theta's library and device."""
    check_same_space(xp, device_of(theta), x, name, owner="theta")
    if x.dtype != xp.bool:
        raise TypeError(f"{name} must be a boolean array (True = kept), got dtype {x.dtype}")


def _check_operator(ihvp: Any, theta: Array) -> Any:
    """The operator's checks; returns ``theta`` in its dtype (promoted where lossless)."""
    if not isinstance(ihvp, InverseFisherOperator):
        raise TypeError(
            f"ihvp must be an inverse-Fisher operator such as StaticIHVP (see "
            f"InverseFisherOperator), got {type(ihvp).__name__}"
        )
    d = theta.shape[0]
    if tuple(ihvp.shape) != (d, d):
        raise ValueError(f"ihvp has shape {tuple(ihvp.shape)} but theta has {d} weights")
    return check_operand(ihvp.xp, ihvp.device, ihvp.dtype, theta, "theta", owner=repr(ihvp))


def _check_grads(xp: Any, theta: Array, G: Array) -> str | None:
    """G against theta; returns G's 2-byte storage name ("float16", "bfloat16") or None."""
    check_gradients(G, require_finite=False, half=True)
    check_same_space(xp, device_of(theta), G, "G", owner="theta")
    storage = half_dtype_name(xp, G.dtype)
    if storage is not None:
        if theta.dtype != xp.float32:
            raise TypeError(
                f"G has dtype {G.dtype}, 2-byte storage computed in float32, but theta has "
                f"dtype {theta.dtype}; pass float32 weights"
            )
    elif G.dtype != theta.dtype:
        raise TypeError(
            f"G has dtype {G.dtype} but theta has dtype {theta.dtype}; cast one explicitly first"
        )
    d = theta.shape[0]
    if G.shape[1] != d:
        raise ValueError(
            f"G must have shape (m, {d}) with m >= 1, one gradient per row, got {tuple(G.shape)}"
        )
    return storage


def _prepared_grads(xp: Any, theta: Array, G: Array, mask: Array | None) -> Array:
    """The gradients as every entry point uses them: checked, and zeroed where ``mask`` prunes.

    G must have theta's dtype, or be 2-byte (float16, bfloat16) with float32
    theta, and stays in its dtype (the operators compute 2-byte G in float32).
    With a ``mask`` (checked already), a copy of G is zeroed at the pruned
    coordinates, so that they decouple from the kept ones; selected by
    ``where``, not multiplied, so that a NaN or infinity there is dropped too.
    Without one, G itself is returned (nothing is pruned yet).
    """
    _check_grads(xp, theta, G)
    if mask is None:
        return G
    zero = xp.zeros((), dtype=G.dtype, device=device_of(G))
    return xp.where(mask[None, :], G, zero)


def _half_fisher_diagonal(xp: Any, G: Array, damp: float) -> Array:
    """``damp + sum_k G_ki^2 / m`` of 2-byte G in float32, a cast column piece at a time."""
    m = G.shape[0]
    parts = [
        damp + xp.sum(piece * piece, axis=0) / m for _, _, piece in cast_pieces(xp, G, xp.float32)
    ]
    return parts[0] if len(parts) == 1 else xp.concat(parts)


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
        ``theta``; its ``diagonal()`` is used (O(d m)).

    Returns
    -------
    array, shape (d,)
        The saliencies, in theta's namespace, device and dtype.

    Raises
    ------
    TypeError
        If ``theta`` is not a floating array of the operator's library and
        dtype.
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
    _check_theta(theta)
    theta = _check_operator(ihvp, theta)
    return theta * theta / (2 * ihvp.diagonal())


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

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import obd_saliency
    >>> G = np.array([[1.0, 0.0], [1.0, 2.0]])
    >>> obd_saliency(np.array([1.0, 1.0]), G, damp=1.0)
    array([1. , 1.5])
    """
    xp = _check_theta(theta)
    if _check_grads(xp, theta, G) is not None:
        return theta * theta * _half_fisher_diagonal(xp, G, check_damp(damp)) / 2
    return theta * theta * EmpiricalFisher(G, damp=damp).diagonal() / 2


def magnitude_saliency(theta: Array, /) -> Array:
    """The magnitude saliency ``theta_i^2`` (magnitude pruning).

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.

    Returns
    -------
    array, shape (d,)
        ``theta * theta``; ranks weights like ``abs(theta)``.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import magnitude_saliency
    >>> magnitude_saliency(np.array([-2.0, 0.5]))
    array([4.  , 0.25])
    """
    _check_theta(theta)
    return theta * theta


# -- selection ----------------------------------------------------------------------------


def _target_count(sparsity: float, n: int) -> int:
    return min(n, math.floor(sparsity * n + _ROUND_SLACK))


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
        The saliencies (lower = pruned first); no NaN.
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
        For a sparsity outside ``[0, 1)``, a ``count`` larger than the number
        of kept weights (in some block), scores holding NaN, or mismatched
        shapes.
    TypeError
        For arrays of different libraries or a non-boolean mask.

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
    xp = _check_theta(scores, "scores")
    mask = _check_mask(xp, scores, mask)
    if (sparsity is None) == (count is None):
        raise ValueError("give exactly one of sparsity and count")
    if sparsity is not None:
        sparsity = check_fraction(sparsity, "sparsity")
    else:
        count = check_count(count, "count", minimum=0)
    if bool(xp.any(xp.isnan(scores))):
        raise ValueError("scores must not contain NaN")
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
    max_joint_size: int = 4096,
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
      float64, all blocks at once; then one IHVP applies the update.

    The selected weights, and any weight that ``mask`` already prunes, are
    then set to exactly zero.

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
        block (their cost grows as its cube); use blocks instead.

    Returns
    -------
    array, shape (d,)
        The updated weights, with exact zeros at the pruned coordinates.

    Raises
    ------
    ValueError
        For mismatched shapes, or a joint block with more than
        ``max_joint_size`` selected weights.
    TypeError
        For arrays of another library or dtype than the operator's.

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
    xp = _check_theta(theta)
    theta = _check_operator(ihvp, theta)
    mask = _check_mask(xp, theta, mask)
    _check_bool(xp, theta, selected, "selected")
    d = theta.shape[0]
    if selected.ndim != 1 or selected.shape[0] != d:
        raise ValueError(f"selected must have shape ({d},), got {tuple(selected.shape)}")
    gone = selected | ~mask
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
        coef = xp.where(selected, theta / ihvp.diagonal(), zero)
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


# -- pruning steps ------------------------------------------------------------------------


def prune(
    theta: Array,
    G: Array,
    /,
    *,
    sparsity: float,
    damp: float = 1e-5,
    block_size: int | None = None,
    saliency: Saliency = "obs",
    update: Update = "single",
    mask: Array = None,
    selection_block_size: int | None = None,
    joint_block_size: int | None = None,
) -> PruneResult:
    r"""One pruning step: saliencies, selection to a target sparsity, weight update.

    The gradients are masked (set to zero at already-pruned coordinates),
    the inverse Fisher is built once with :class:`~mfac_core.StaticIHVP`, and
    the weights are pruned to ``sparsity`` of all d coordinates.

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    G : array, shape (m, d), or None
        The gradients at ``theta``, one per row (theta's namespace, device and
        dtype, or 2-byte float16/bfloat16 with float32 ``theta``, whose
        masked copy stays in 2 bytes). Only ``saliency="magnitude"`` with
        ``update="none"`` may pass ``None``.
    sparsity : float
        The fraction of weights pruned after the step, in ``[0, 1)``.
    damp : float, optional
        The damping ``lambda`` of the Fisher (default ``1e-5``, the paper's).
    block_size : int, optional
        Use a block-diagonal Fisher over blocks of this many weights
        (default: the full Fisher).
    saliency : {"obs", "obd", "magnitude"}, optional
        ``"obs"``: ``theta_i^2 / (2 [F^{-1}]_ii)`` with the M-FAC inverse
        (default); ``"obd"``: the diagonal-Fisher version; ``"magnitude"``:
        ``theta_i^2``.
    update : {"single", "joint", "none"}, optional
        The update of the remaining weights: the paper's summed single-weight
        OBS update (default), the joint OBS update within each block, or none
        (OBD / magnitude pruning).
    mask : array of bool, shape (d,), optional
        ``True`` for the weights kept so far; they stay pruned.
    selection_block_size : int, optional
        Prune ``sparsity`` of each block of this many weights instead of
        choosing globally.
    joint_block_size : int, optional
        Block size of the joint update (default: ``block_size``).

    Returns
    -------
    PruneResult
        ``(theta, mask)`` after the step.

    Raises
    ------
    ValueError
        For a sparsity outside ``[0, 1)``, wrong shapes, or unknown choices.
    TypeError
        For arrays of different libraries or dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import prune
    >>> rng = np.random.default_rng(0)
    >>> theta, G = rng.standard_normal(100), rng.standard_normal((16, 100))
    >>> res = prune(theta, G, sparsity=0.6, damp=1e-3, block_size=20)
    >>> int((~res.mask).sum()), bool(np.all(res.theta[~res.mask] == 0))
    (60, True)
    >>> res2 = prune(res.theta, G, sparsity=0.8, damp=1e-3, mask=res.mask)
    >>> bool(np.all(res2.mask <= res.mask))  # pruned weights stay pruned
    True
    """
    xp = _check_theta(theta)
    sparsity = check_fraction(sparsity, "sparsity")
    check_choice(saliency, "saliency", ("obs", "obd", "magnitude"))
    check_choice(update, "update", ("single", "joint", "none"))
    given = mask
    mask = _check_mask(xp, theta, mask)
    needs_grads = saliency != "magnitude" or update != "none"
    if G is None:
        if needs_grads:
            raise ValueError(f"saliency={saliency!r} with update={update!r} needs the gradients G")
    else:
        # With a mask, a masked copy in G's dtype (2-byte G stays 2-byte): the operator
        # keeps it by reference, so memory is one more m x d array of G's dtype.
        G = _prepared_grads(xp, theta, G, None if given is None else mask)
    if saliency == "obd":
        scores = obd_saliency(theta, G, damp=damp)
    elif saliency == "magnitude":
        scores = magnitude_saliency(theta)
    ihvp = None
    if saliency == "obs" or update != "none":
        ihvp = StaticIHVP(G, damp=damp, block_size=block_size)
        if saliency == "obs":
            scores = obs_saliency(theta, ihvp)
    selected = select_pruned(scores, sparsity=sparsity, mask=mask, block_size=selection_block_size)
    if ihvp is None or update == "none":
        zero = xp.zeros((), dtype=theta.dtype, device=device_of(theta))
        new = xp.where(selected | ~mask, zero, theta)
    else:
        new = obs_update(
            theta, ihvp, selected, mask=mask, joint=update == "joint", block_size=joint_block_size
        )
    return PruneResult(new, mask & ~selected)


def sparsity_schedule(
    start: float, end: float, steps: int, /, *, schedule: Schedule = "linear"
) -> list[float]:
    r"""The intermediate sparsities of a gradual pruning run, ending at ``end``.

    Parameters
    ----------
    start, end : float
        The sparsity before the first step and after the last, ``0 <= start
        <= end < 1``.
    steps : int
        The number of pruning steps (at least 1).
    schedule : {"linear", "cubic", "exponential"}, optional
        ``"linear"``: equal increments of sparsity; ``"cubic"``: the cubic
        schedule of Zhu & Gupta, ``s_t = end + (start - end)(1 - t/T)^3``,
        which prunes most early; ``"exponential"``: every step keeps the same
        fraction of the remaining weights.

    Returns
    -------
    list of float
        ``steps`` sparsities, increasing, the last equal to ``end``.

    Examples
    --------
    >>> from mfac_core.pruning import sparsity_schedule
    >>> [round(s, 3) for s in sparsity_schedule(0.0, 0.9, 3)]
    [0.3, 0.6, 0.9]
    >>> [round(s, 3) for s in sparsity_schedule(0.0, 0.9, 2, schedule="exponential")]
    [0.684, 0.9]
    """
    start, end = check_fraction(start, "start"), check_fraction(end, "end")
    if start > end:
        raise ValueError(f"the target sparsity {end} is below the current one {start}")
    T = check_count(steps, "steps")
    check_choice(schedule, "schedule", ("linear", "cubic", "exponential"))
    out = []
    for t in range(1, T + 1):
        f = t / T
        if schedule == "linear":
            s = start + (end - start) * f
        elif schedule == "cubic":
            s = end + (start - end) * (1.0 - f) ** 3
        else:
            s = 1.0 - (1.0 - start) * ((1.0 - end) / (1.0 - start)) ** f
        out.append(s)
    out[-1] = end
    return out


def gradual_prune(
    theta: Array,
    grad_fn: Callable[[Any, Any], Any],
    /,
    *,
    sparsity: float,
    steps: int,
    schedule: Schedule = "linear",
    mask: Array = None,
    damp: float | Sequence[float] = 1e-5,
    block_size: int | None = None,
    saliency: Saliency = "obs",
    update: Update = "single",
    selection_block_size: int | None = None,
    joint_block_size: int | None = None,
    callback: Callable[[int, PruneResult], None] | None = None,
    select_damp: Callable[[float, PruneResult], Any] | None = None,
) -> PruneResult:
    r"""Prune to ``sparsity`` in several steps, recomputing the Fisher at each.

    Each step asks ``grad_fn(theta, mask)`` for fresh gradients at the current
    (partially pruned and updated) weights, rebuilds the inverse Fisher and
    prunes to the next sparsity of :func:`sparsity_schedule`: the paper's
    "recomputations", which make a coarse one-shot step more accurate.

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    grad_fn : callable
        ``grad_fn(theta, mask) -> G``, an ``(m, d)`` array of gradients at
        ``theta`` (theta's namespace, device and dtype, or 2-byte as for
        :func:`prune`). Coordinates where ``mask`` is ``False`` are zeroed
        whatever it returns.
    sparsity : float
        The final sparsity, in ``[0, 1)``.
    steps : int
        The number of steps (recomputations).
    schedule : {"linear", "cubic", "exponential"}, optional
        How the sparsity grows from step to step (see
        :func:`sparsity_schedule`).
    mask : array of bool, shape (d,), optional
        ``True`` for the weights kept so far.
    damp : float or sequence or 1-d array of float, optional
        The damping of the Fisher (default ``1e-5``), as for :func:`prune`;
        with ``select_damp``, the grid of dampings to choose from.
    block_size : int, optional
        Block size of a block-diagonal Fisher, as for :func:`prune`.
    saliency : {"obs", "obd", "magnitude"}, optional
        As for :func:`prune`.
    update : {"single", "joint", "none"}, optional
        As for :func:`prune`.
    selection_block_size : int, optional
        As for :func:`prune`.
    joint_block_size : int, optional
        As for :func:`prune`.
    callback : callable, optional
        Called as ``callback(step, result)`` after each step (``step`` from 1).
    select_damp : callable, optional
        ``select_damp(damp, result) -> float``, the held-out loss of the
        pruned weights ``result`` (a :class:`PruneResult`) at one damping of
        the grid ``damp``. Each step then prunes at every damping of the grid
        from one :class:`~mfac_core.SpectralIHVP` set-up and continues from
        the result of the lowest loss (see :func:`select_damping`; OBS
        saliency, ``update`` ``"single"`` or ``"none"``). Record its
        arguments to see the losses; the damping chosen at a step is the
        first of its lowest.

    Returns
    -------
    PruneResult
        ``(theta, mask)`` after the last step.

    Raises
    ------
    ValueError
        For a sparsity outside ``[0, 1)`` or below the mask's, ``steps < 1``,
        ``grad_fn`` returning an array of the wrong shape, a grid of
        dampings without ``select_damp`` (or the reverse), or ``select_damp``
        with a saliency other than ``"obs"`` or a joint update.
    TypeError
        For a ``grad_fn`` or ``select_damp`` that is not callable, or a
        ``select_damp`` that returns something other than a real number.

    Examples
    --------
    A least-squares model ``(x^T theta - y)^2 / 2``, pruned to 75% in 3 steps:

    >>> import numpy as np
    >>> from mfac_core.pruning import gradual_prune
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((64, 12))
    >>> y = X @ rng.standard_normal(12)
    >>> theta = np.linalg.lstsq(X, y, rcond=None)[0]
    >>> def grad_fn(theta, mask):
    ...     return (X @ theta - y)[:, None] * X  # one gradient per sample
    >>> res = gradual_prune(theta, grad_fn, sparsity=0.75, steps=3, damp=1e-4)
    >>> int(res.mask.sum()), bool(np.all(res.theta[~res.mask] == 0))
    (3, True)

    The damping chosen at each step by the loss on held-out data:

    >>> X_val = rng.standard_normal((32, 12))
    >>> y_val = X_val @ theta
    >>> def val_loss(damp, result):
    ...     return float(np.mean((X_val @ result.theta - y_val) ** 2))
    >>> res = gradual_prune(theta, grad_fn, sparsity=0.75, steps=3,
    ...                     damp=[1e-6, 1e-4, 1e-2], select_damp=val_loss)
    >>> int(res.mask.sum())
    3
    """
    xp = _check_theta(theta)
    sparsity = check_fraction(sparsity, "sparsity")
    mask = _check_mask(xp, theta, mask)
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    grid = _damping_grid(damp, select_damp, saliency, update)
    d = theta.shape[0]
    start = 1.0 - int(xp.sum(xp.astype(mask, xp.int64))) / d
    targets = sparsity_schedule(min(start, sparsity), sparsity, steps, schedule=schedule)
    result = PruneResult(theta, mask)
    for t, target in enumerate(targets, start=1):
        G = (
            grad_fn(result.theta, result.mask)
            if (saliency != "magnitude" or update != "none")
            else None
        )
        if grid is not None and select_damp is not None:
            result = select_damping(
                result.theta,
                G,
                grid,
                sparsity=target,
                loss=select_damp,
                block_size=block_size,
                update=update,
                mask=result.mask,
                selection_block_size=selection_block_size,
            ).result
        else:
            result = prune(
                result.theta,
                G,
                sparsity=target,
                damp=cast(float, damp),  # not a grid: _damping_grid said so
                block_size=block_size,
                saliency=saliency,
                update=update,
                mask=result.mask,
                selection_block_size=selection_block_size,
                joint_block_size=joint_block_size,
            )
        if callback is not None:
            callback(t, result)
    return result


# -- damping sweep ------------------------------------------------------------------------


class DampingSweep(NamedTuple):
    """OBS saliencies and the predicted loss increase at each damping of a sweep.

    Attributes
    ----------
    dampings : tuple of float
        The K dampings, in the order given.
    saliency : array, shape (K, d)
        ``theta_i^2 / (2 [F_k^{-1}]_ii)`` for each damping (theta's dtype).
    selected : array of bool, shape (K, d)
        The weights each damping prunes to reach the sparsity (the least
        salient ones, as :func:`select_pruned` picks them).
    loss_increase : array, shape (K,)
        The sum of the selected saliencies: the increase of the quadratic
        model of the loss that OBS predicts when the selected weights are
        removed one by one, each with its optimal update (the estimate by
        which the paper ranks weights; it ignores the interaction of the
        removed weights).
    """

    dampings: tuple[float, ...]
    saliency: Array
    selected: Array
    loss_increase: Array


def damping_sweep(
    theta: Array,
    G: Array,
    dampings: Any,
    /,
    *,
    sparsity: float,
    block_size: int | None = None,
    mask: Array = None,
) -> DampingSweep:
    r"""OBS saliencies and predicted loss increases for a grid of dampings, in one pass.

    The damping of ``F = damp I + G^T G / m`` decides which weights OBS
    prunes; this evaluates a whole grid at the cost of about one:
    one :class:`~mfac_core.SpectralIHVP` set-up (O(d m^2)) and one whitening
    pass over G for the K diagonals of ``F_k^{-1}``
    (``SpectralIHVP.diagonal(damps=...)``), then a selection per damping.

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    G : array, shape (m, d)
        The gradients, one per row, in theta's namespace, device and dtype,
        or 2-byte (float16, bfloat16) with float32 ``theta``; zeroed at the
        coordinates ``mask`` prunes, as :func:`prune` does.
    dampings : sequence or 1-d array of float
        The K dampings ``> 0``.
    sparsity : float
        The target fraction of pruned weights, in ``[0, 1)``, counting those
        that ``mask`` already prunes (as in :func:`select_pruned`).
    block_size : int, optional
        Block-diagonal F over blocks of this many consecutive coordinates.
    mask : array of bool, shape (d,), optional
        ``True`` for the weights still kept (default: all); pruned weights
        are never selected.

    Returns
    -------
    DampingSweep
        The dampings, and per damping the saliencies, the selected weights and
        the predicted loss increase.

    Raises
    ------
    TypeError
        For arrays of different libraries or dtypes, or dampings that are not
        a sequence of numbers.
    ValueError
        For mismatched shapes or devices, a sparsity outside ``[0, 1)``, or a
        damping that is not finite and positive.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import StaticIHVP
    >>> from mfac_core.pruning import damping_sweep, obs_saliency, select_pruned
    >>> rng = np.random.default_rng(0)
    >>> G, theta = rng.standard_normal((8, 40)), rng.standard_normal(40)
    >>> res = damping_sweep(theta, G, [1e-3, 1e-1, 10.0], sparsity=0.5)
    >>> res.saliency.shape, res.selected.shape, res.loss_increase.shape
    ((3, 40), (3, 40), (3,))
    >>> rho = obs_saliency(theta, StaticIHVP(G, damp=1e-1))
    >>> bool(np.allclose(res.saliency[1], rho))
    True
    >>> bool(np.array_equal(res.selected[1], select_pruned(rho, sparsity=0.5)))
    True
    """
    xp = _check_theta(theta)
    given = mask
    mask = _check_mask(xp, theta, mask)
    sparsity = check_fraction(sparsity, "sparsity")
    dampings = check_dampings(dampings, "dampings")  # before the O(d m^2) set-up
    G = _prepared_grads(xp, theta, G, None if given is None else mask)
    op = SpectralIHVP(G, damp=1.0, block_size=block_size)
    diag = op.diagonal(damps=dampings)
    saliency = theta * theta / (2 * diag)
    selected = xp.stack(
        [
            select_pruned(saliency[k, ...], sparsity=sparsity, mask=mask)
            for k in range(saliency.shape[0])
        ]
    )
    zero = xp.zeros_like(saliency)
    increase = xp.sum(xp.where(selected, saliency, zero), axis=1)
    return DampingSweep(tuple(float(dp) for dp in dampings), saliency, selected, increase)


# -- damping selection by a held-out loss ---------------------------------------------------


class DampingChoice(NamedTuple):
    """The damping of a grid that a held-out loss picked, and the pruned weights at it.

    Attributes
    ----------
    damp : float
        The damping of the lowest loss (the first of equal ones).
    result : PruneResult
        ``(theta, mask)`` after pruning at ``damp``.
    dampings : tuple of float
        The grid, in the order given.
    losses : tuple of float
        The held-out loss after pruning at each damping of the grid.
    """

    damp: float
    result: PruneResult
    dampings: tuple[float, ...]
    losses: tuple[float, ...]


def _damping_grid(damp: Any, select_damp: Any, saliency: str, update: str) -> list[float] | None:
    """The grid of :func:`gradual_prune` (``None`` without ``select_damp``), checked up front."""
    is_grid = is_number_list(damp)
    if select_damp is None:
        if is_grid:
            raise ValueError(
                "damp is a grid of dampings; give select_damp (the held-out loss) to choose "
                "among them, or a single damping"
            )
        return None
    if not callable(select_damp):
        raise TypeError(f"select_damp must be callable, got {type(select_damp).__name__}")
    if not is_grid:
        raise TypeError(
            f"with select_damp, damp must be a sequence of dampings (the grid to choose "
            f"from), got {type(damp).__name__}"
        )
    _check_selection_options(saliency, update)
    return check_dampings(damp, "damp")


def _check_selection_options(saliency: str, update: str) -> None:
    check_choice(saliency, "saliency", ("obs", "obd", "magnitude"))
    check_choice(update, "update", ("single", "joint", "none"))
    if saliency != "obs":
        raise ValueError(
            f"choosing the damping needs the OBS saliency (saliency='obs'); with "
            f"saliency={saliency!r} the damping would only move the update"
        )
    if update == "joint":
        raise ValueError(
            "choosing the damping supports update='single' or 'none': the joint update needs "
            "entries of F^{-1}, which the spectral form behind the one-pass selection lacks"
        )


def _loss_value(value: Any, damp: float) -> float:
    """A held-out loss as a finite float, or a clear error naming the damping."""
    dtype = str(getattr(value, "dtype", ""))
    scalar = isinstance(value, numbers.Real) or (
        getattr(value, "ndim", None) == 0 and hasattr(value, "__float__")
    )
    if isinstance(value, bool) or "bool" in dtype or "complex" in dtype or not scalar:
        raise TypeError(
            f"the held-out loss at damp={damp:g} must be a real number (or a 0-d array), "
            f"got {type(value).__name__}"
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"the held-out loss at damp={damp:g} is {out}; it must be finite")
    return out


def select_damping(
    theta: Array,
    G: Array,
    dampings: Sequence[float],
    /,
    *,
    sparsity: float,
    loss: Callable[[float, PruneResult], Any],
    block_size: int | None = None,
    update: Update = "single",
    mask: Array = None,
    selection_block_size: int | None = None,
) -> DampingChoice:
    r"""Prune at every damping of a grid and keep the result of the lowest held-out loss.

    The damping of ``F = damp I + G^T G / m`` decides both which weights OBS
    prunes and how it moves the others. This prunes at each of K dampings as
    :func:`prune` does (OBS saliency, selection, OBS update) but from one
    :class:`~mfac_core.SpectralIHVP` set-up: the K diagonals of ``F_k^{-1}``
    come from one whitening pass over G, and each update is one
    product at that damping (``with_damp``), so the grid costs about one set-up
    and K + 1 products instead of K set-ups. ``loss(damp, result)`` scores
    each pruned vector (for instance the loss on held-out data) and the
    lowest wins.

    Parameters
    ----------
    theta : array, shape (d,)
        The flat weights.
    G : array, shape (m, d)
        The gradients at ``theta``, one per row, in theta's namespace, device
        and dtype; zeroed at the coordinates ``mask`` prunes.
    dampings : sequence or 1-d array of float
        The K dampings ``> 0`` to choose from.
    sparsity : float
        The fraction of weights pruned afterwards, in ``[0, 1)``.
    loss : callable
        ``loss(damp, result) -> float``: the held-out loss of the pruned
        weights ``result`` (a :class:`PruneResult`), called once per damping
        in the order of the grid. A real number or a 0-d array, finite.
    block_size : int, optional
        Block-diagonal F over blocks of this many coordinates (default: full).
    update : {"single", "none"}, optional
        The paper's summed single-weight OBS update (default), or none.
    mask : array of bool, shape (d,), optional
        ``True`` for the weights kept so far; they stay pruned.
    selection_block_size : int, optional
        Prune ``sparsity`` of each block of this many weights instead of
        choosing globally.

    Returns
    -------
    DampingChoice
        The chosen damping (the first of the lowest loss), the pruned weights
        and mask at it, the grid and every loss.

    Raises
    ------
    TypeError
        For arrays of different libraries or dtypes, a ``loss`` that is not
        callable or returns something other than a real number.
    ValueError
        For mismatched shapes, a sparsity outside ``[0, 1)``, a damping that
        is not finite and positive, ``update="joint"``, or a non-finite loss.
        Nothing is changed when it raises (``theta`` is never written).

    See Also
    --------
    damping_sweep : The saliencies and predicted loss increases of a grid.

    Notes
    -----
    Each candidate equals ``prune(theta, G, sparsity=sparsity, damp=d_k,
    ...)`` up to rounding (the spectral form instead of the Cholesky one),
    so the choice is that of a brute-force loop over the grid. The loss is
    called K times, which is where the rest of the time goes.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.pruning import prune, select_damping
    >>> rng = np.random.default_rng(0)
    >>> X, w = rng.standard_normal((96, 12)), rng.standard_normal(12)
    >>> y = X @ w + 0.1 * rng.standard_normal(96)
    >>> theta = np.linalg.lstsq(X[:64], y[:64], rcond=None)[0]
    >>> G = (X[:64] @ theta - y[:64])[:, None] * X[:64]
    >>> def val_loss(damp, result):   # on the 32 held-out samples
    ...     return float(np.mean((X[64:] @ result.theta - y[64:]) ** 2))
    >>> grid = [1e-4, 1e-2, 1.0]
    >>> choice = select_damping(theta, G, grid, sparsity=0.5, loss=val_loss)
    >>> brute = [val_loss(dp, prune(theta, G, sparsity=0.5, damp=dp)) for dp in grid]
    >>> choice.damp == grid[int(np.argmin(brute))], bool(np.allclose(choice.losses, brute))
    (True, True)
    """
    xp = _check_theta(theta)
    given = mask
    mask = _check_mask(xp, theta, mask)
    sparsity = check_fraction(sparsity, "sparsity")
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    _check_selection_options("obs", update)
    dampings = check_dampings(dampings, "dampings")  # before the O(d m^2) set-up
    # Pruned coordinates decouple (module Notes).
    G = _prepared_grads(xp, theta, G, None if given is None else mask)
    op = SpectralIHVP(G, damp=1.0, block_size=block_size)
    diag = op.diagonal(damps=dampings)  # one pass for all K
    grid = tuple(float(dp) for dp in dampings)
    zero = xp.zeros((), dtype=theta.dtype, device=device_of(theta))
    losses: list[float] = []
    best: tuple[float, float, PruneResult] | None = None
    for k, dp in enumerate(grid):
        dk = diag[k, ...]
        selected = select_pruned(
            theta * theta / (2 * dk),
            sparsity=sparsity,
            mask=mask,
            block_size=selection_block_size,
        )
        gone = selected | ~mask
        new = theta
        if update == "single" and bool(xp.any(selected)):
            # obs_update's summed single-weight update, with this damping's diagonal.
            new = theta - op.with_damp(dp).matvec(xp.where(selected, theta / dk, zero))
        result = PruneResult(xp.where(gone, zero, new), mask & ~selected)
        value = _loss_value(loss(dp, result), dp)
        losses.append(value)
        if best is None or value < best[1]:
            best = (dp, value, result)
    assert best is not None  # the grid is not empty (diagonal() checked it)
    return DampingChoice(best[0], best[2], grid, tuple(losses))
