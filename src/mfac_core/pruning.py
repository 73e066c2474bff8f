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

Gradients may be stored in 2 bytes (float16; bfloat16 of PyTorch or, for NumPy, of
ml_dtypes) with float32 weights: the Fisher keeps them as given (``StaticIHVP``'s
and ``SpectralIHVP``'s 2-byte storage, docs/mathematics.rst; :func:`damping_sweep`
and :func:`select_damping` included), and every result is float32.

Notes
-----
Pruned weights must not move again. The functions assume, and :func:`prune`
makes sure, that the gradients are zero at already-pruned coordinates; then
``F`` decouples those coordinates from the others and the updates never move
them. All updated vectors have their pruned coordinates set to exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, cast

from ._compat import Array
from ._compat import device as device_of
from ._pruning_inputs import (
    check_kept_weights,
    check_mask,
    check_selection_block,
    check_selection_options,
    check_step_options,
    check_theta,
    damping_grid,
    loss_value,
    prepared_grads,
)
from ._pruning_obs import (
    MAX_JOINT_SIZE,
    InverseFisherOperator,
    fisher_diagonal,
    magnitude_saliency,
    obd_saliency,
    obs_saliency,
    obs_update,
    ranking_key,
    saliency_of_diagonal,
    select_pruned,
    updated_weights,
)
from ._spectral import SpectralIHVP
from ._spectral_setup import check_namespace as check_spectral_namespace
from ._static import static_ihvp
from ._validation import check_choice, check_count, check_dampings, check_fraction

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
        masked copy stays in 2 bytes). With a ``mask``, G is copied to zero it
        at the pruned coordinates, unless it is zero there already (one read
        of G instead). Only ``saliency="magnitude"`` with ``update="none"``
        may pass ``None``.
    sparsity : float
        The fraction of weights pruned after the step, in ``[0, 1)``: the
        least salient kept weights, equal saliencies in index order (as
        :func:`select_pruned` picks them).
    damp : float, optional
        The damping ``lambda`` of the Fisher (default ``1e-5``, the paper's).
    block_size : int, optional
        Use a block-diagonal Fisher over blocks of this many weights
        (default: the full Fisher).
    saliency : {"obs", "obd", "magnitude"}, optional
        ``"obs"``: ``theta_i^2 / (2 [F^{-1}]_ii)`` with the M-FAC inverse
        (default); ``"obd"``: the diagonal-Fisher version; ``"magnitude"``:
        ``theta_i^2``, ranked as ``|theta_i|`` (exactly, where ``theta_i^2``
        would round to 0, a subnormal or infinity). OBS and OBD saliencies
        are ranked by a float64 key (their fourth root), exactly where they
        are beyond the range of theta's dtype (float32 saliencies overflow
        for ``|theta_i| sqrt(F_ii)`` above about 2.6e19), as long as
        ``F_ii`` and ``[F^{-1}]_ii`` themselves are within it: beyond (float32
        gradients of about 1e20 and more, or a damping beyond float32's
        range) the keys tie and the tied weights go by index (an ``F_ii``
        that overflows is warned of, a ``[F^{-1}]_ii`` that underflows to 0
        is not, as no result that underflows is).
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
        For a sparsity outside ``[0, 1)``, wrong shapes, unknown choices,
        NaN or infinity in a weight that ``mask`` keeps, or an update whose
        coefficients overflow theta's dtype (a Fisher's scale beyond it).
    TypeError
        For arrays of different libraries or dtypes.
    FactorizationError
        If the damped Fisher of the masked gradients cannot be factorised in
        float64 (as for :class:`~mfac_core.StaticIHVP`).

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
    xp = check_theta(theta)
    sparsity = check_fraction(sparsity, "sparsity")
    check_selection_block(selection_block_size)
    check_step_options(saliency, update, damp, block_size, joint_block_size)
    given = mask
    mask = check_mask(xp, theta, mask)
    check_kept_weights(xp, theta, mask)
    needs_grads = saliency != "magnitude" or update != "none"
    if G is None:
        if needs_grads:
            raise ValueError(f"saliency={saliency!r} with update={update!r} needs the gradients G")
    else:
        # With a mask, a masked copy in G's dtype (2-byte G stays 2-byte) where G is not
        # zero at the pruned coordinates already: the operator keeps it by reference, so
        # memory is then one more m x d array of G's dtype.
        G = prepared_grads(xp, theta, G, None if given is None else mask)
    # OBS and OBD rank by ranking_key, in float64: float32 saliencies overflow to infinity
    # at |theta| sqrt(F_jj) > ~2.6e19, and the tied weights were then taken by index.
    if saliency == "obd":
        scores = ranking_key(xp, theta, fisher_diagonal(theta, G, damp), inverse=False)
    elif saliency == "magnitude":
        # |theta| orders the weights as theta^2 does wherever theta^2 is a normal number,
        # and exactly beyond: theta^2 ties distinct weights at 0 or a subnormal (float32:
        # |theta| < 1.1e-19) and at inf (|theta| > 1.8e19); see magnitude_saliency.
        scores = xp.abs(theta)
    ihvp = diag = None
    if saliency == "obs" or update != "none":
        ihvp = static_ihvp(G, damp=damp, block_size=block_size)
        if saliency == "obs":
            # Computed once: the summed update divides by the same diagonal.
            diag = ihvp.diagonal()
            scores = ranking_key(xp, theta, diag)
    selected = select_pruned(scores, sparsity=sparsity, mask=mask, block_size=selection_block_size)
    if ihvp is None or update == "none":
        zero = xp.zeros((), dtype=theta.dtype, device=device_of(theta))
        new = xp.where(selected | ~mask, zero, theta)
    else:
        # obs_update's own checks were prune's (theta, mask, the kept weights).
        new = updated_weights(
            xp,
            theta,
            ihvp,
            selected,
            mask,
            joint=update == "joint",
            block_size=joint_block_size,
            max_joint_size=MAX_JOINT_SIZE,
            diag=diag,
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

    Raises
    ------
    ValueError
        For ``start`` or ``end`` outside ``[0, 1)``, ``end < start``,
        ``steps < 1`` or an unknown ``schedule``.
    TypeError
        For a ``steps`` that is not an int.

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
        The final sparsity, in ``[0, 1)``. At or below the sparsity of
        ``mask`` nothing more is pruned (``mask``'s pruned weights stay
        pruned, as with :func:`prune`).
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
        For a sparsity outside ``[0, 1)``, ``steps < 1``,
        ``grad_fn`` returning an array of the wrong shape, a grid of
        dampings without ``select_damp`` (or the reverse), or ``select_damp``
        with a saliency other than ``"obs"`` or a joint update, or NaN or
        infinity in a weight that ``mask`` keeps. Options are checked before
        the first ``grad_fn`` call.
    TypeError
        For a ``grad_fn``, ``callback`` or ``select_damp`` that is not
        callable, a ``select_damp`` that returns something other than a
        real number, or ``select_damp`` with Dask arrays (as
        :func:`select_damping`).
    FactorizationError
        If the damped Fisher of a step's gradients cannot be factorised in
        float64 (as for :func:`prune`).

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
    xp = check_theta(theta)
    sparsity = check_fraction(sparsity, "sparsity")
    check_selection_block(selection_block_size)
    mask = check_mask(xp, theta, mask)
    check_kept_weights(xp, theta, mask)
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    grid = damping_grid(damp, select_damp, saliency, update)
    if grid is not None:
        check_spectral_namespace(xp)  # select_damping's operator, before the first gradients
    # Before the first gradients, not by the first step's prune().
    check_step_options(
        saliency, update, None if grid is not None else damp, block_size, joint_block_size
    )
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
                damp=cast(float, damp),  # not a grid: damping_grid said so
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
        ``theta_i^2 / (2 [F_k^{-1}]_ii)`` for each damping (theta's dtype;
        infinity beyond its range, as :func:`obs_saliency`).
    selected : array of bool, shape (K, d)
        The weights each damping prunes to reach the sparsity (the least
        salient ones, as :func:`select_pruned` picks them, ranked in float64
        as :func:`prune` ranks them: right where ``saliency`` overflowed).
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
        For arrays of different libraries or dtypes, Dask arrays (the
        :class:`~mfac_core.SpectralIHVP` set-up needs an eigendecomposition),
        or dampings that are not a sequence of numbers.
    ValueError
        For mismatched shapes or devices, a sparsity outside ``[0, 1)``, a
        damping that is not finite and positive, or NaN or infinity in a
        weight that ``mask`` keeps.

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
    xp = check_theta(theta)
    given = mask
    mask = check_mask(xp, theta, mask)
    check_kept_weights(xp, theta, mask)
    sparsity = check_fraction(sparsity, "sparsity")
    dampings = check_dampings(dampings, "dampings")  # before the O(d m^2) set-up
    G = prepared_grads(xp, theta, G, None if given is None else mask)
    # m damp within float64's range, named as given (the operator's check says "damps").
    check_dampings(dampings, "dampings", num_grads=int(G.shape[0]))
    # Built at the largest damping, the best conditioned: a warning names a damping of the
    # grid (diagonal() checks the smaller ones), never one the caller did not ask for.
    op = SpectralIHVP(G, damp=max(dampings), block_size=block_size)
    diag = op.diagonal(damps=dampings)
    saliency = saliency_of_diagonal(xp, theta, diag)
    # Ranked as prune ranks (ranking_key), not by the saliencies, which may overflow.
    keys = ranking_key(xp, theta, diag)
    selected = xp.stack(
        [select_pruned(keys[k, ...], sparsity=sparsity, mask=mask) for k in range(keys.shape[0])]
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
        For arrays of different libraries or dtypes, Dask arrays (as
        :func:`damping_sweep`), a ``loss`` that is not callable or returns
        something other than a real number.
    ValueError
        For mismatched shapes, a sparsity outside ``[0, 1)``, a damping that
        is not finite and positive, ``update="joint"``, a non-finite loss, or
        NaN or infinity in a weight that ``mask`` keeps.
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
    xp = check_theta(theta)
    given = mask
    mask = check_mask(xp, theta, mask)
    check_kept_weights(xp, theta, mask)
    sparsity = check_fraction(sparsity, "sparsity")
    check_selection_block(selection_block_size)
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    check_selection_options("obs", update)
    dampings = check_dampings(dampings, "dampings")  # before the O(d m^2) set-up
    # Pruned coordinates decouple (module Notes).
    G = prepared_grads(xp, theta, G, None if given is None else mask)
    # m damp within float64's range, named as given (the operator's check says "damps").
    check_dampings(dampings, "dampings", num_grads=int(G.shape[0]))
    op = SpectralIHVP(G, damp=max(dampings), block_size=block_size)  # as damping_sweep
    diag = op.diagonal(damps=dampings)  # one pass for all K
    grid = tuple(float(dp) for dp in dampings)
    zero = xp.zeros((), dtype=theta.dtype, device=device_of(theta))
    losses: list[float] = []
    best: tuple[float, float, PruneResult] | None = None
    for k, dp in enumerate(grid):
        dk = diag[k, ...]
        selected = select_pruned(
            ranking_key(xp, theta, dk),
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
        value = loss_value(loss(dp, result), dp)
        losses.append(value)
        if best is None or value < best[1]:
            best = (dp, value, result)
    assert best is not None  # the grid is not empty (diagonal() checked it)
    return DampingChoice(best[0], best[2], grid, tuple(losses))
