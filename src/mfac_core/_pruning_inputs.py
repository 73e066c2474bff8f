"""The checks of the pruning functions' inputs, and the gradients as they all use them.

Every entry point of :mod:`mfac_core.pruning` checks its weights, mask
and gradients here, and prepares the gradients with one helper,
:func:`prepared_grads` (checked, and zeroed where the mask prunes), so that
the entry points cannot drift apart. The damping-selection options and the
held-out losses are checked here too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from . import _pieces
from ._compat import Array, detached, is_dask_namespace
from ._compat import device as device_of
from ._dtypes import half_dtype_name
from ._finite import non_finite_error
from ._validation import (
    check_choice,
    check_count,
    check_damp,
    check_dampings,
    check_floating,
    check_gradients,
    check_same_space,
    is_number_list,
    namespace_of,
)

# -- validation ---------------------------------------------------------------------------


def check_theta(theta: Array, name: str = "theta") -> Any:
    xp = namespace_of(theta, name)
    if theta.ndim != 1:
        raise ValueError(
            f"{name} must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}"
        )
    if theta.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one weight")
    check_floating(xp, theta, name)
    return xp


def check_mask(xp: Any, theta: Array, mask: Array) -> Any:
    """The mask (all True when ``None``), checked against ``theta``."""
    d = theta.shape[0]
    if mask is None:
        return xp.ones((d,), dtype=xp.bool, device=device_of(theta))
    check_bool(xp, theta, mask, "mask", meaning="True = kept")
    if mask.ndim != 1 or mask.shape[0] != d:
        raise ValueError(f"mask must have shape ({d},) like theta, got {tuple(mask.shape)}")
    return mask


def check_kept_weights(xp: Any, theta: Array, mask: Array) -> None:
    """Refuse NaN or infinity among the weights that ``mask`` keeps, naming the first.

    Their saliencies would be NaN (refused deep inside as "scores") or infinite (the
    weight never pruned, the update's result not finite). Weights already pruned are
    set to zero by every entry point, whatever they hold.
    """
    kept = xp.where(mask, theta, xp.zeros((), dtype=theta.dtype, device=device_of(theta)))
    error = non_finite_error(xp, kept, "theta")
    if error is not None:
        raise ValueError(f"{error} (a weight that mask keeps)")


def check_bool(xp: Any, theta: Array, x: Array, name: str, *, meaning: str) -> None:
    """``x`` must be a boolean array of theta's library and device; ``meaning`` says of what."""
    check_same_space(xp, device_of(theta), x, name, owner="theta")
    if x.dtype != xp.bool:
        raise TypeError(f"{name} must be a boolean array ({meaning}), got dtype {x.dtype}")


def check_grads(xp: Any, theta: Array, G: Array) -> str | None:
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


def prepared_grads(xp: Any, theta: Array, G: Array, mask: Array | None) -> Array:
    """The gradients as every entry point uses them: checked, and zeroed where ``mask`` prunes.

    G must have theta's dtype, or be 2-byte (float16, bfloat16) with float32
    theta, and stays in its dtype (the operators compute 2-byte G in float32).
    With a ``mask`` (checked already), a copy of G is zeroed at the pruned
    coordinates, so that they decouple from the kept ones; selected by
    ``where``, not multiplied, so that a NaN or infinity there is dropped too.
    Without one, or where G is zero at the pruned coordinates already (as
    MFACPruner's gradients are), G itself is returned.
    """
    check_grads(xp, theta, G)
    if mask is None or (not is_dask_namespace(xp) and _zero_where_pruned(xp, G, mask)):
        return G
    zero = xp.zeros((), dtype=G.dtype, device=device_of(G))
    return xp.where(mask[None, :], G, zero)


def _zero_where_pruned(xp: Any, G: Array, mask: Array) -> bool:
    """Whether G holds only zeros (no NaN) at the coordinates ``mask`` prunes.

    Then the masked copy, one more m x d array beside G for as long as the operator
    keeps it, would equal G: MFACPruner's gradients, zeroed there in place, doubled
    its peak memory. Read in column pieces (boolean temporaries of a piece), and only
    up to the first piece that is not zero there.
    """
    if bool(xp.all(mask)):
        return True
    m, d = G.shape
    width = _pieces.piece_width(xp, G, m, host=_pieces.LARGE_PIECE_ENTRIES)
    for a in range(0, d, width):
        b = min(d, a + width)
        if bool(xp.any((G[:, a:b] != 0) & ~mask[None, a:b])):
            return False
    return True


# -- damping selection -----------------------------------------------------------------


def damping_grid(damp: Any, select_damp: Any, saliency: str, update: str) -> list[float] | None:
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
    check_selection_options(saliency, update)
    return check_dampings(damp, "damp")


def check_selection_block(value: Any) -> None:
    """Refuse a ``selection_block_size`` that is not None or an int >= 1, by its own name.

    Checked at the door: ``select_pruned`` would refuse it as its ``block_size``, after
    the saliency's set-up.
    """
    if value is not None:
        check_count(value, "selection_block_size")


def check_step_options(
    saliency: Any, update: Any, damp: Any, block_size: Any, joint_block_size: Any
) -> None:
    """The options of one :func:`prune` step that it uses, checked before any work.

    :func:`gradual_prune` checks them before its first ``grad_fn`` call (m forward and
    backward passes, for MFACPruner), where a bad damping, block size or choice was
    refused only by the first step's :func:`prune`. Each is checked where the step uses
    it, as :func:`prune` does (the damping needs gradients: an OBS or OBD saliency, or
    an update; the block sizes the Fisher and the joint update); ``damp=None`` skips the
    damping (a grid, checked by :func:`damping_grid`).
    """
    check_choices(saliency, update)
    if damp is not None and (saliency != "magnitude" or update != "none"):
        check_damp(damp)
    if block_size is not None and (saliency == "obs" or update != "none"):
        check_count(block_size, "block_size")
    if joint_block_size is not None and update == "joint":
        # By its own name: obs_update took it as its block_size, and said so.
        check_count(joint_block_size, "joint_block_size")


def check_choices(saliency: Any, update: Any) -> None:
    """``saliency`` and ``update``, each one of the choices a pruning step knows."""
    check_choice(saliency, "saliency", ("obs", "obd", "magnitude"))
    check_choice(update, "update", ("single", "joint", "none"))


def check_selection_options(saliency: str, update: str) -> None:
    check_choices(saliency, update)
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


def loss_value(value: Any, damp: float) -> float:
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
    # A loss computed with autograd on (no torch.no_grad()): its value, without PyTorch's
    # warning about converting a tensor that requires grad.
    out = float(detached(value))
    if not math.isfinite(out):
        raise ValueError(f"the held-out loss at damp={damp:g} is {out}; it must be finite")
    return out
