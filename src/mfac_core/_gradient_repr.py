"""The items of the repr of an operator over gradients (static, spectral and dynamic alike)."""

from __future__ import annotations

from typing import Any

__all__ = ["gradient_items"]


def gradient_items(
    op: Any, *, power: float | None = None, filled: int | None = None, zero_init: bool = False
) -> tuple[str, ...]:
    """The ``key=value`` items of the repr of an operator over gradients, in one order.

    What tells two such operators apart: the power of F (spectral operators), the
    number of gradients m, how many a window holds (``filled``, its ``len``), the
    damping, a block size that was set, the 2-byte storage dtype, ``zero_init`` and
    refinement steps where given. Python values only, so that a repr reads no array
    (no pass over G, no device synchronisation).

    Parameters
    ----------
    op : LinearOperator
        An operator with ``num_grads``, ``dim``, ``damp`` (a Python float) and
        ``storage_dtype``, and optionally ``block_size`` and ``refine``.
    power : float, optional
        The power of F, for operators that have one.
    filled : int, optional
        The number of gradients a window holds.
    zero_init : bool, optional
        Whether the window is zero-initialised.

    Returns
    -------
    tuple of str
        The items, for :meth:`LinearOperator._repr_options`.
    """
    items = [] if power is None else [f"power={power:g}"]
    items.append(f"num_grads={op.num_grads}")
    if filled is not None:
        items.append(f"len={filled}")
    items.append(f"damp={op.damp!r}")
    block_size = getattr(op, "block_size", op.dim)
    if block_size < op.dim:
        items.append(f"block_size={block_size}")
    if op.storage_dtype is not None:
        items.append(f"storage_dtype={op.storage_dtype}")
    if zero_init:
        items.append("zero_init=True")
    if getattr(op, "refine", 0):
        items.append(f"refine={op.refine}")
    return tuple(items)
